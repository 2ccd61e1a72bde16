//! The PROXY protocol (HAProxy's, versions 1 and 2) on the gateway's listeners, so that behind
//! a load balancer every connection still has its real client's address: for the per-source
//! pre-auth caps, the session record, the SIEM and the logs.
//!
//! The rules:
//! - Only a peer listed in `listeners.proxy_protocol_from` (addresses or CIDR blocks) is read
//!   for a header, and such a peer **must** send one first: a connection from it without a
//!   valid header is closed (counted as `proxy_header` in the pre-auth refusals). A header
//!   from any other peer is never looked for, so a client cannot claim an address; its bytes
//!   reach the protocol as they are and fail there.
//! - A `PROXY` command (v2) or a `TCP4`/`TCP6` line (v1) gives the client's address. A
//!   `LOCAL` command (v2, the balancer's own health check) or `UNKNOWN` (v1) keeps the peer's.
//! - The header is read byte-exact from the socket (nothing after it is consumed), within
//!   [`HEADER_TIMEOUT`], and is at most [`MAX_V2`] bytes (v2) or [`MAX_V1`] (v1). v2 TLVs are
//!   skipped.
//! - Connections from trusted peers that are still waiting for their header are capped apart
//!   (the listener's `preauth_max`), before the pre-auth table, which counts the client.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// A trusted peer gets this long to send its header.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest v1 line, CR LF included (the protocol's own limit).
pub const MAX_V1: usize = 107;
/// The longest v2 header this gateway reads: the 16-byte head and up to 520 bytes of
/// addresses and TLVs.
pub const MAX_V2: usize = 536;

const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// Why a trusted peer's header was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    #[error("no PROXY header within {0:?}")]
    Timeout(Duration),
    #[error("the connection closed before its PROXY header ended")]
    Closed,
    #[error("not a PROXY protocol header")]
    NotProxy,
    #[error("PROXY header: {0}")]
    Malformed(&'static str),
}

/// The peers whose PROXY headers are believed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trusted(Vec<(IpAddr, u8)>);

impl Trusted {
    /// Parses `10.0.0.5`, `10.0.1.0/24` or `fd00::/64` entries.
    pub fn parse(entries: &[String]) -> Result<Trusted, String> {
        let mut out = Vec::new();
        for e in entries {
            let (addr, bits) = match e.split_once('/') {
                Some((a, b)) => (a, Some(b)),
                None => (e.as_str(), None),
            };
            let ip: IpAddr = addr
                .trim()
                .parse()
                .map_err(|_| format!("`{e}` is not an address or CIDR block"))?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            let bits = match bits {
                None => max,
                Some(b) => b
                    .trim()
                    .parse::<u8>()
                    .ok()
                    .filter(|b| *b <= max)
                    .ok_or_else(|| format!("`{e}`: the prefix length must be 0..={max}"))?,
            };
            // An IPv4-mapped entry (`::ffff:10.0.0.5/128`) is the IPv4 block it maps.
            let (ip, bits) = match (ip, canonical(ip)) {
                (IpAddr::V6(_), v4 @ IpAddr::V4(_)) => {
                    if bits < 96 {
                        return Err(format!(
                            "`{e}`: an IPv4-mapped block needs a prefix of at least 96"
                        ));
                    }
                    (v4, bits - 96)
                }
                _ => (ip, bits),
            };
            out.push((ip, bits));
        }
        Ok(Trusted(out))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `ip` (an IPv4-mapped IPv6 address counts as IPv4) is in a trusted block.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.0
            .iter()
            .any(|&(net, bits)| match (canonical(net), ip) {
                (IpAddr::V4(n), IpAddr::V4(a)) => prefix_eq(&n.octets(), &a.octets(), bits),
                (IpAddr::V6(n), IpAddr::V6(a)) => prefix_eq(&n.octets(), &a.octets(), bits),
                _ => false,
            })
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(a) => a.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn prefix_eq(a: &[u8], b: &[u8], bits: u8) -> bool {
    let bits = bits.min((a.len().min(b.len()) * 8) as u8);
    let full = usize::from(bits / 8);
    if a[..full] != b[..full] {
        return false;
    }
    let rest = bits % 8;
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    (a[full] & mask) == (b[full] & mask)
}

/// The client address of a connection from `peer`: the peer's own when it is not trusted,
/// else what its PROXY header says (the peer's own for `LOCAL`/`UNKNOWN`).
pub async fn client_of<S: AsyncRead + Unpin>(
    s: &mut S,
    peer: SocketAddr,
    trusted: &Trusted,
) -> Result<SocketAddr, HeaderError> {
    if !trusted.contains(peer.ip()) {
        return Ok(peer);
    }
    match tokio::time::timeout(HEADER_TIMEOUT, read_header(s)).await {
        Ok(Ok(found)) => Ok(found.unwrap_or(peer)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(HeaderError::Timeout(HEADER_TIMEOUT)),
    }
}

/// Reads one header from `s`, consuming exactly its bytes. `None`: a `LOCAL` or `UNKNOWN`
/// header, which names no client.
pub async fn read_header<S: AsyncRead + Unpin>(
    s: &mut S,
) -> Result<Option<SocketAddr>, HeaderError> {
    let closed = |_| HeaderError::Closed;
    let mut first = [0u8; 1];
    s.read_exact(&mut first).await.map_err(closed)?;
    match first[0] {
        b'\r' => {
            let mut head = [0u8; 16];
            head[0] = b'\r';
            s.read_exact(&mut head[1..]).await.map_err(closed)?;
            if &head[..12] != V2_SIGNATURE {
                return Err(HeaderError::NotProxy);
            }
            let len = usize::from(u16::from_be_bytes([head[14], head[15]]));
            if 16 + len > MAX_V2 {
                return Err(HeaderError::Malformed("longer than 536 bytes"));
            }
            let mut body = vec![0u8; len];
            s.read_exact(&mut body).await.map_err(closed)?;
            parse_v2(&head, &body)
        }
        b'P' => {
            let mut line = vec![b'P'];
            let mut b = [0u8; 1];
            while !line.ends_with(b"\r\n") {
                if line.len() >= MAX_V1 {
                    return Err(HeaderError::Malformed("a v1 line longer than 107 bytes"));
                }
                s.read_exact(&mut b).await.map_err(closed)?;
                line.push(b[0]);
            }
            parse_v1(&line)
        }
        _ => Err(HeaderError::NotProxy),
    }
}

/// A v2 header: the 16-byte head and the `len` bytes after it.
pub fn parse_v2(head: &[u8; 16], body: &[u8]) -> Result<Option<SocketAddr>, HeaderError> {
    if &head[..12] != V2_SIGNATURE {
        return Err(HeaderError::NotProxy);
    }
    let (version, command) = (head[12] >> 4, head[12] & 0x0f);
    if version != 2 {
        return Err(HeaderError::Malformed("version is not 2"));
    }
    match command {
        0 => return Ok(None),
        1 => {}
        _ => return Err(HeaderError::Malformed("unknown command")),
    }
    let (family, transport) = (head[13] >> 4, head[13] & 0x0f);
    if transport != 1 && transport != 0 {
        return Err(HeaderError::Malformed("not a stream transport"));
    }
    match family {
        0 => Ok(None),
        1 => {
            let a = body
                .get(..12)
                .ok_or(HeaderError::Malformed("short IPv4 addresses"))?;
            let ip = Ipv4Addr::new(a[0], a[1], a[2], a[3]);
            let port = u16::from_be_bytes([a[8], a[9]]);
            Ok(Some(SocketAddr::new(IpAddr::V4(ip), port)))
        }
        2 => {
            let a = body
                .get(..36)
                .ok_or(HeaderError::Malformed("short IPv6 addresses"))?;
            let mut o = [0u8; 16];
            o.copy_from_slice(&a[..16]);
            let port = u16::from_be_bytes([a[32], a[33]]);
            Ok(Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(o)), port)))
        }
        // AF_UNIX: no address a per-source cap could count.
        3 => Ok(None),
        _ => Err(HeaderError::Malformed("unknown address family")),
    }
}

/// A v1 line, `PROXY TCP4 src dst sport dport\r\n` or `PROXY UNKNOWN ...\r\n`.
pub fn parse_v1(line: &[u8]) -> Result<Option<SocketAddr>, HeaderError> {
    let text = line
        .strip_suffix(b"\r\n")
        .and_then(|l| std::str::from_utf8(l).ok())
        .ok_or(HeaderError::Malformed(
            "a v1 line must be ASCII and end in CR LF",
        ))?;
    let mut parts = text.split(' ');
    if parts.next() != Some("PROXY") {
        return Err(HeaderError::NotProxy);
    }
    let family = parts.next().ok_or(HeaderError::Malformed("no family"))?;
    if family == "UNKNOWN" {
        return Ok(None);
    }
    let fields: Vec<&str> = parts.collect();
    let [src, _dst, sport, _dport] = fields[..] else {
        return Err(HeaderError::Malformed("a v1 line needs four fields"));
    };
    let ip: IpAddr = match family {
        "TCP4" => src
            .parse::<Ipv4Addr>()
            .map(IpAddr::V4)
            .map_err(|_| HeaderError::Malformed("bad IPv4 source"))?,
        "TCP6" => src
            .parse::<Ipv6Addr>()
            .map(IpAddr::V6)
            .map_err(|_| HeaderError::Malformed("bad IPv6 source"))?,
        _ => return Err(HeaderError::Malformed("unknown family")),
    };
    let port: u16 = sport
        .parse()
        .map_err(|_| HeaderError::Malformed("bad source port"))?;
    Ok(Some(SocketAddr::new(ip, port)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend_from_slice(&(body.len() as u16).to_be_bytes());
        h.extend_from_slice(body);
        h
    }

    async fn read(bytes: &[u8]) -> (Result<Option<SocketAddr>, HeaderError>, Vec<u8>) {
        let mut r = bytes;
        let got = read_header(&mut r).await;
        (got, r.to_vec())
    }

    #[tokio::test]
    async fn headers_give_the_client_and_consume_only_themselves() {
        let mut body = vec![198, 51, 100, 7, 10, 0, 0, 1];
        body.extend_from_slice(&4242u16.to_be_bytes());
        body.extend_from_slice(&22u16.to_be_bytes());
        // A TLV after the addresses is skipped.
        body.extend_from_slice(&[0x04, 0x00, 0x01, 0xaa]);
        let mut wire = v2(1, 0x11, &body);
        wire.extend_from_slice(b"SSH-2.0-OpenSSH\r\n");
        let (got, rest) = read(&wire).await;
        assert_eq!(got, Ok(Some("198.51.100.7:4242".parse().unwrap())));
        assert_eq!(rest, b"SSH-2.0-OpenSSH\r\n");

        let mut six = Vec::new();
        six.extend_from_slice(&"2001:db8::9".parse::<Ipv6Addr>().unwrap().octets());
        six.extend_from_slice(&[0; 16]);
        six.extend_from_slice(&[0x10, 0x92, 0, 22]);
        let (got, _) = read(&v2(1, 0x21, &six)).await;
        assert_eq!(got, Ok(Some("[2001:db8::9]:4242".parse().unwrap())));
        // LOCAL (a health check): no client named.
        assert_eq!(read(&v2(0, 0x00, &[])).await.0, Ok(None));

        let (got, rest) = read(b"PROXY TCP4 203.0.113.9 10.0.0.1 5555 6432\r\n\0\0\0\x08").await;
        assert_eq!(got, Ok(Some("203.0.113.9:5555".parse().unwrap())));
        assert_eq!(rest, b"\0\0\0\x08");
        assert_eq!(read(b"PROXY UNKNOWN\r\n").await.0, Ok(None));
    }

    #[tokio::test]
    async fn bad_headers_are_refused_without_a_panic() {
        let cases: Vec<Vec<u8>> = vec![
            b"SSH-2.0-OpenSSH_9.6\r\n".to_vec(),
            b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 1\r\n".to_vec(),
            b"PROXY TCP4 1.2.3.4\r\n".to_vec(),
            b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n".to_vec(),
            [b"PROXY TCP4 ".as_slice(), &[b'1'; 200]].concat(),
            v2(1, 0x11, &[1, 2, 3]),
            v2(1, 0x21, &[0; 20]),
            v2(7, 0x11, &[0; 12]),
            v2(1, 0x71, &[0; 12]),
            {
                let mut h = v2(1, 0x11, &[]);
                h[14..16].copy_from_slice(&600u16.to_be_bytes());
                h
            },
            b"\r\n\r\n\0\r\nQUIX\n\x21\x11\0\0".to_vec(),
            b"\r\n".to_vec(),
            Vec::new(),
        ];
        for c in cases {
            let (got, _) = read(&c).await;
            assert!(
                got.is_err(),
                "{:?} gave {got:?}",
                String::from_utf8_lossy(&c)
            );
        }
    }

    #[test]
    fn trusted_blocks() {
        let t = Trusted::parse(&["10.0.1.0/24".into(), "127.0.0.1".into(), "fd00::/64".into()])
            .expect("valid");
        for (ip, want) in [
            ("10.0.1.77", true),
            ("10.0.2.1", false),
            ("127.0.0.1", true),
            ("127.0.0.2", false),
            ("::ffff:127.0.0.1", true),
            ("fd00::5", true),
            ("fd00:0:0:1::5", false),
        ] {
            assert_eq!(t.contains(ip.parse().unwrap()), want, "{ip}");
        }
        assert!(Trusted::parse(&["10.0.0.0/33".into()]).is_err());
        // An IPv4-mapped entry is its IPv4 address (it used to panic at every connection).
        let mapped = Trusted::parse(&["::ffff:10.0.0.5".into(), "::ffff:10.9.0.0/112".into()])
            .expect("valid");
        for (ip, want) in [
            ("10.0.0.5", true),
            ("::ffff:10.0.0.5", true),
            ("10.0.0.6", false),
            ("10.9.4.4", true),
            ("fd00::1", false),
        ] {
            assert_eq!(mapped.contains(ip.parse().unwrap()), want, "{ip}");
        }
        assert!(Trusted::parse(&["::ffff:10.0.0.0/64".into()]).is_err());
        assert!(Trusted::parse(&["example.com".into()]).is_err());
        assert!(Trusted::parse(&["0.0.0.0/0".into()])
            .expect("valid")
            .contains("8.8.8.8".parse().unwrap()));
    }
}
