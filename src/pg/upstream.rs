//! The gateway's connection to a PostgreSQL target: TCP, then, when the target's `tls` says
//! so, SSLRequest and a TLS handshake that trusts only the target's `ca_file`.
//!
//! Trust: the server's certificate must chain to a certificate in `ca_file`, or be one of them
//! exactly (a pinned self-signed server certificate, which is usually marked as a CA and so
//! cannot be a chain's end entity). `verify-full` also checks that it names the host part of
//! the target's address; `require` does not. The public web roots are never trusted, and there
//! is no mode that encrypts without verifying.
//!
//! Credentials stay home: the gateway answers only SCRAM-SHA-256, with channel binding
//! (`SCRAM-SHA-256-PLUS`, `tls-server-end-point`) required under TLS (a server that offers no
//! -PLUS, or a certificate with no defined binding, is refused unless the target sets
//! `channel_binding = "prefer"`), unless a target opts in to cleartext or md5 with
//! `allow_password_auth`, which needs `verify-full`. A rogue server at a
//! target's address that asks for the password itself gets nothing ([`password_request`] for
//! the relay's own login, [`AuthGuard`] under tokio-postgres).
//!
//! Cancel requests do not come through here: they go to the target on a new plain TCP
//! connection, which PostgreSQL accepts whatever `pg_hba.conf` says (see `pg::handle`).
//! [`PostgresTls`] gives tokio-postgres (rotation, `vault verify`) the same TLS settings.

use std::sync::Arc;
use std::time::Duration;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};

use super::{wire, Conn};
use crate::config::{TargetConfig, UpstreamTls};

/// TLS client settings (ring provider) that trust only the certificates in `pem`. With
/// `verify_name`, the certificate must also name the host the gateway connects to.
pub fn tls_config(pem: &[u8], verify_name: bool) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = PinnedVerifier::new(pem, verify_name, provider.clone())?;
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// Verifies a target's certificate against its `ca_file` only (see the module doc).
#[derive(Debug)]
struct PinnedVerifier {
    /// webpki path building from the pinned certificates as trust anchors; also checks the
    /// handshake signatures.
    chain: Arc<rustls::client::WebPkiServerVerifier>,
    /// The certificates of `ca_file`, for the exact-match case.
    pinned: Vec<CertificateDer<'static>>,
    /// `verify-full`: the certificate must name the host.
    verify_name: bool,
}

impl PinnedVerifier {
    fn new(
        pem: &[u8],
        verify_name: bool,
        provider: Arc<rustls::crypto::CryptoProvider>,
    ) -> Result<PinnedVerifier, String> {
        use rustls::pki_types::pem::PemObject;
        let pinned: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("not PEM certificates: {e}"))?;
        if pinned.is_empty() {
            return Err("holds no PEM certificate".into());
        }
        let mut roots = rustls::RootCertStore::empty();
        for cert in &pinned {
            roots
                .add(cert.clone())
                .map_err(|e| format!("not a usable certificate: {e}"))?;
        }
        let chain =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| e.to_string())?;
        Ok(PinnedVerifier {
            chain,
            pinned,
            verify_name,
        })
    }
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let err = match self.chain.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        use CertificateError as C;
        let name_only = matches!(
            err,
            rustls::Error::InvalidCertificate(
                C::NotValidForName | C::NotValidForNameContext { .. }
            )
        );
        // webpki checks the name only after the chain, so this error means the chain is good.
        if name_only && !self.verify_name {
            return Ok(ServerCertVerified::assertion());
        }
        // An exactly pinned certificate needs no chain. webpki checks an end entity's dates
        // before anything else, so date (and encoding) errors are final; what is left after
        // them is about chain building (a self-signed certificate marked CA:TRUE is refused
        // as an end entity) and the name.
        let final_error = matches!(
            err,
            rustls::Error::InvalidCertificate(
                C::BadEncoding
                    | C::Expired
                    | C::ExpiredContext { .. }
                    | C::NotValidYet
                    | C::NotValidYetContext { .. }
                    | C::Revoked
            )
        );
        let pinned = self
            .pinned
            .iter()
            .any(|p| p.as_ref() == end_entity.as_ref());
        if !pinned {
            return Err(untrusted(err));
        }
        if final_error {
            return Err(err);
        }
        if self.verify_name {
            let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_name(&parsed, server_name)?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

/// A self-signed certificate that is not pinned fails in webpki as "CaUsedAsEndEntity" (as it
/// is usually marked CA:TRUE) before any issuer is looked for; what it means here is that no
/// certificate in `ca_file` vouches for it, so say that. rustls carries that webpki error only
/// as text; `only_the_pinned_certificates_are_trusted` notices if the text changes.
fn untrusted(err: rustls::Error) -> rustls::Error {
    match &err {
        rustls::Error::InvalidCertificate(CertificateError::Other(o))
            if o.to_string() == "CaUsedAsEndEntity" =>
        {
            CertificateError::UnknownIssuer.into()
        }
        _ => err,
    }
}

/// The host part of `host:port` (brackets of an IPv6 literal removed).
fn host_of(address: &str) -> &str {
    let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Connects to the target and, when its `tls` is on, negotiates TLS. Errors are written for
/// the client's FATAL message.
pub(super) async fn connect(
    t: &TargetConfig,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<(Box<dyn Conn>, Option<Vec<u8>>), String> {
    let mut tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(&t.address))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    let mode = match &t.tls {
        UpstreamTls::Disable => return Ok((Box::new(tcp), None)),
        UpstreamTls::Require(_) => "require",
        UpstreamTls::VerifyFull(_) => "verify-full",
    };
    let Some(cfg) = tls else {
        return Err(format!(
            "tls = \"{mode}\" but the target's ca_file was not loaded when the gateway started"
        ));
    };
    let name = ServerName::try_from(host_of(&t.address).to_string())
        .map_err(|e| format!("`{}` is not a TLS server name: {e}", t.address))?;
    let mut pkt = 8i32.to_be_bytes().to_vec();
    pkt.extend_from_slice(&wire::SSL_REQUEST.to_be_bytes());
    wire::send(&mut tcp, &pkt)
        .await
        .map_err(|e| e.to_string())?;
    // Exactly one byte: anything the server sends after 'S' belongs to the TLS handshake.
    let mut answer = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(10), tcp.read_exact(&mut answer))
        .await
        .map_err(|_| "the target did not answer the SSLRequest".to_string())?
        .map_err(|e| format!("the target closed the connection at the SSLRequest: {e}"))?;
    if answer[0] != b'S' {
        return Err(format!(
            "the target does not accept TLS (it answered {:?} to SSLRequest) and its tls is \"{mode}\"",
            answer[0] as char
        ));
    }
    let connector = tokio_rustls::TlsConnector::from(cfg.clone());
    let stream = tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
        .await
        .map_err(|_| "the TLS handshake with the target timed out".to_string())?
        .map_err(|e| {
            let unknown_issuer = e
                .get_ref()
                .and_then(|i| i.downcast_ref::<rustls::Error>())
                .is_some_and(|r| {
                    *r == rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
                });
            let hint = if unknown_issuer {
                " (the target's certificate is neither in its ca_file nor issued by a certificate there)"
            } else {
                ""
            };
            format!("TLS handshake with the target failed: {e}{hint}")
        })?;
    let binding = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| end_point_hash(c));
    Ok((Box::new(stream), binding))
}

/// Why the gateway will not answer an authentication request from the target, if it will
/// not: cleartext (3) and md5 (5) unless the target opted in (which needs `verify-full`).
pub(super) fn password_request(t: &TargetConfig, code: i32) -> Option<String> {
    let what = match code {
        3 => "a cleartext password",
        5 => "an md5 password",
        _ => return None,
    };
    if t.allow_password_auth && matches!(t.tls, UpstreamTls::VerifyFull(_)) {
        return None;
    }
    Some(format!(
        "the target {} asked for {what}; refused: the gateway sends the break-glass password only by SCRAM-SHA-256 (allow_password_auth is off; it needs tls = \"verify-full\")",
        t.name
    ))
}

/// The `tls-server-end-point` channel binding (RFC 5929) of a DER certificate: its hash under
/// the hash of its signature algorithm, SHA-256 for MD5 and SHA-1. `None` for an algorithm
/// without one (Ed25519, RSA-PSS), as PostgreSQL has none then either.
pub fn end_point_hash(der: &[u8]) -> Option<Vec<u8>> {
    /// One DER TLV: (tag, contents, the rest).
    fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, rest) = b.split_first()?;
        let (&first, rest) = rest.split_first()?;
        let (len, rest) = if first < 0x80 {
            (first as usize, rest)
        } else {
            let n = (first & 0x7f) as usize;
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let len = rest[..n].iter().fold(0usize, |a, &b| (a << 8) | b as usize);
            (len, &rest[n..])
        };
        (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
    }
    let (0x30, cert, _) = tlv(der)? else {
        return None;
    };
    let (0x30, _tbs, rest) = tlv(cert)? else {
        return None;
    };
    let (0x30, alg, _) = tlv(rest)? else {
        return None;
    };
    let (0x06, oid, _) = tlv(alg)? else {
        return None;
    };
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
    const ECDSA: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04];
    let algorithm = match oid {
        [r @ .., 0x04 | 0x05 | 0x0b] if r == RSA => &ring::digest::SHA256,
        [r @ .., 0x0c] if r == RSA => &ring::digest::SHA384,
        [r @ .., 0x0d] if r == RSA => &ring::digest::SHA512,
        [e @ .., 0x01] if e == ECDSA => &ring::digest::SHA256,
        [e @ .., 0x03, 0x02] if e == ECDSA => &ring::digest::SHA256,
        [e @ .., 0x03, 0x03] if e == ECDSA => &ring::digest::SHA384,
        [e @ .., 0x03, 0x04] if e == ECDSA => &ring::digest::SHA512,
        _ => return None,
    };
    Some(ring::digest::digest(algorithm, der).as_ref().to_vec())
}

/// A stream under tokio-postgres (rotation, `vault verify`) that reads the target's messages
/// until authentication is over and fails the connection, before tokio-postgres can answer,
/// when the target asks for a password [`password_request`] refuses.
pub struct AuthGuard<S> {
    inner: S,
    target: TargetConfig,
    /// The current message's first bytes (tag, length, and for 'R' the code).
    head: Vec<u8>,
    /// Bytes of the current message still to pass unread.
    skip: usize,
    /// AuthenticationOk seen (or a message after which none can come): pass everything.
    done: bool,
}

impl<S> AuthGuard<S> {
    pub fn new(inner: S, target: &TargetConfig) -> AuthGuard<S> {
        AuthGuard {
            inner,
            target: target.clone(),
            head: Vec::with_capacity(9),
            skip: 0,
            done: false,
        }
    }

    /// Follows the message framing over `bytes`.
    fn scan(&mut self, mut bytes: &[u8]) -> std::io::Result<()> {
        while !self.done && !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            let want = if self.head.len() >= 5 && self.head[0] == b'R' {
                9
            } else {
                5
            };
            let n = (want - self.head.len()).min(bytes.len());
            self.head.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.head.len() < want || (self.head[0] == b'R' && self.head.len() < 9) {
                continue;
            }
            let len = i32::from_be_bytes([self.head[1], self.head[2], self.head[3], self.head[4]]);
            let body = usize::try_from(len).unwrap_or(0).saturating_sub(4);
            if self.head[0] == b'R' {
                let code =
                    i32::from_be_bytes([self.head[5], self.head[6], self.head[7], self.head[8]]);
                if let Some(why) = password_request(&self.target, code) {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::PermissionDenied,
                        why,
                    ));
                }
                self.done = code == 0;
                self.skip = body.saturating_sub(4);
            } else {
                // ErrorResponse ends the login; anything else before AuthenticationOk is
                // skipped whole.
                self.done = self.head[0] == b'E';
                self.skip = body;
            }
            self.head.clear();
        }
        Ok(())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthGuard<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &r {
            if !self.done {
                let new = buf.filled()[before..].to_vec();
                if let Err(e) = self.scan(&new) {
                    buf.set_filled(before);
                    return Poll::Ready(Err(e));
                }
            }
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthGuard<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A target's TLS settings for tokio-postgres (with `SslMode::Require`), so that rotation
/// and `vault verify` reach a target the way the relay does: the same trust, channel binding
/// (`tls-server-end-point`) for SCRAM-SHA-256-PLUS, and the same [`AuthGuard`].
#[derive(Clone)]
pub struct PostgresTls(pub Arc<rustls::ClientConfig>, pub TargetConfig);

impl<S> tokio_postgres::tls::MakeTlsConnect<S> for PostgresTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PostgresTlsStream<S>;
    type TlsConnect = PostgresTlsConnect;
    type Error = rustls::pki_types::InvalidDnsNameError;

    fn make_tls_connect(&mut self, host: &str) -> Result<PostgresTlsConnect, Self::Error> {
        Ok(PostgresTlsConnect {
            cfg: self.0.clone(),
            target: self.1.clone(),
            name: ServerName::try_from(host.to_string())?,
        })
    }
}

/// One handshake to a named host.
pub struct PostgresTlsConnect {
    cfg: Arc<rustls::ClientConfig>,
    target: TargetConfig,
    name: ServerName<'static>,
}

impl<S> tokio_postgres::tls::TlsConnect<S> for PostgresTlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PostgresTlsStream<S>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<PostgresTlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let s = tokio_rustls::TlsConnector::from(self.cfg)
                .connect(self.name, stream)
                .await?;
            let binding = s
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| end_point_hash(c));
            Ok(PostgresTlsStream {
                inner: AuthGuard::new(s, &self.target),
                binding,
            })
        })
    }
}

/// A TLS stream as tokio-postgres wants it.
pub struct PostgresTlsStream<S> {
    inner: AuthGuard<tokio_rustls::client::TlsStream<S>>,
    binding: Option<Vec<u8>>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for PostgresTlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for PostgresTlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for PostgresTlsStream<S> {
    fn channel_binding(&self) -> tokio_postgres::tls::ChannelBinding {
        match &self.binding {
            Some(h) => tokio_postgres::tls::ChannelBinding::tls_server_end_point(h.clone()),
            None => tokio_postgres::tls::ChannelBinding::none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Fixtures made with the openssl CLI, valid for 100 years (P-256):
    // CA: `req -x509 -subj /CN=test-ca`; LEAF: signed by CA, CA:FALSE, DNS:db.internal;
    // SELF: self-signed `req -x509` (so CA:TRUE) with DNS:db.internal; OTHER: another CA.
    const CA: &str = "-----BEGIN CERTIFICATE-----
MIIBejCCASGgAwIBAgIUKa3eG5NEBDH319EmjwkxYlXgSyUwCgYIKoZIzj0EAwIw
EjEQMA4GA1UEAwwHdGVzdC1jYTAgFw0yNjExMjMxNDQ3MjdaGA8yMTI2MTAzMDE0
NDcyN1owEjEQMA4GA1UEAwwHdGVzdC1jYTBZMBMGByqGSM49AgEGCCqGSM49AwEH
A0IABGuYWdEP4TYZEUqp9+VspyrQaOsJpyTEKf3I8niGxBtPK1Uw98VPmgJJFW77
mUO1rP7Gee5x4AiKpuyXXCyebBejUzBRMB0GA1UdDgQWBBRjKMrvEEuF/u0kojbx
Dcl23HpbmTAfBgNVHSMEGDAWgBRjKMrvEEuF/u0kojbxDcl23HpbmTAPBgNVHRMB
Af8EBTADAQH/MAoGCCqGSM49BAMCA0cAMEQCIBZvGdJZiFdeSN2Y69t5mysIx3ov
NE1JFJWiBXHBwJRfAiArjXUN450LljA7jzoy8IYLsCopKUdThoKt8vJaJ4YjNA==
-----END CERTIFICATE-----
";
    const LEAF: &str = "-----BEGIN CERTIFICATE-----
MIIBqTCCAU+gAwIBAgIUOLI1VcJYybTuBkJ4p0MQwgRYEkwwCgYIKoZIzj0EAwIw
EjEQMA4GA1UEAwwHdGVzdC1jYTAgFw0yNjExMjMxNDQ3MjdaGA8yMTI2MTAzMDE0
NDcyN1owFjEUMBIGA1UEAwwLZGIuaW50ZXJuYWwwWTATBgcqhkjOPQIBBggqhkjO
PQMBBwNCAATi8nk6RmVPkk0C/Zo5xhwh6k0rcQY9nwn9YVNkyLwVzmlISwfzOvyb
LLJZw13iaHXl8JZWOn9nQHSdoa/9v1gio30wezAMBgNVHRMBAf8EAjAAMBYGA1Ud
EQQPMA2CC2RiLmludGVybmFsMBMGA1UdJQQMMAoGCCsGAQUFBwMBMB0GA1UdDgQW
BBQKWyHKs1/r1ZBKBGbb1yg840N8+TAfBgNVHSMEGDAWgBRjKMrvEEuF/u0kojbx
Dcl23HpbmTAKBggqhkjOPQQDAgNIADBFAiEA539HK50G+i+Raun4HXn2QP6X4qpd
pakKbDo8GBOYdIQCIDwOXLAH9dtg0husru3L5BDftoI/Lr9+tlGYECgEl65h
-----END CERTIFICATE-----
";
    const SELF: &str = "-----BEGIN CERTIFICATE-----
MIIBmjCCAUGgAwIBAgIUDWFyZi+hWGwB16xKnhj6bDMEjBcwCgYIKoZIzj0EAwIw
FjEUMBIGA1UEAwwLZGIuaW50ZXJuYWwwIBcNMjYxMTIzMTQ0NzI3WhgPMjEyNjEw
MzAxNDQ3MjdaMBYxFDASBgNVBAMMC2RiLmludGVybmFsMFkwEwYHKoZIzj0CAQYI
KoZIzj0DAQcDQgAE1kRgS/hZUjRSYqwwV0H9twAyZysAuh1w8XeF06nS0z1cPFZL
23LyRyKVc4CtpQ/T7V36Eo7JoV9q6Di4P/ghYqNrMGkwHQYDVR0OBBYEFDxacb/R
l9sNGMU4ze+WzTBbSs2nMB8GA1UdIwQYMBaAFDxacb/Rl9sNGMU4ze+WzTBbSs2n
MA8GA1UdEwEB/wQFMAMBAf8wFgYDVR0RBA8wDYILZGIuaW50ZXJuYWwwCgYIKoZI
zj0EAwIDRwAwRAIgJEJ9raFAEwmghcC7R10PMl2owpGYn53jchn9v1tNzL8CIHra
eAmLq0k86bsPvSuj0y9fizKNSqZ2RlxyH2SOSlsi
-----END CERTIFICATE-----
";
    const OTHER: &str = "-----BEGIN CERTIFICATE-----
MIIBfDCCASOgAwIBAgIUZ4fYSla2Ez+NmAPZ0ZT9Nk8uo7YwCgYIKoZIzj0EAwIw
EzERMA8GA1UEAwwIb3RoZXItY2EwIBcNMjYxMTIzMTQ0NzI3WhgPMjEyNjEwMzAx
NDQ3MjdaMBMxETAPBgNVBAMMCG90aGVyLWNhMFkwEwYHKoZIzj0CAQYIKoZIzj0D
AQcDQgAEoKnm26hKgVOiY+OtQEy0G4k1sgxergaUqO0Rnqi8HvWekXIWWATziqu+
0s/O5C5Rv9pbbYyBp5Tqz+pM2wq0faNTMFEwHQYDVR0OBBYEFKx2rqnrSHfL491i
OVZE8lzCEKhBMB8GA1UdIwQYMBaAFKx2rqnrSHfL491iOVZE8lzCEKhBMA8GA1Ud
EwEB/wQFMAMBAf8wCgYIKoZIzj0EAwIDRwAwRAIgeO6YvhLuLd7C2Nr9Fi2/mra3
+1yG7rvKD5a3XZoTUpICIFShM8k597N5kRFdWwbb+DLiUami+ruN7LhbZIIOFezl
-----END CERTIFICATE-----
";

    fn der(pem: &str) -> CertificateDer<'static> {
        use rustls::pki_types::pem::PemObject;
        CertificateDer::from_pem_slice(pem.as_bytes()).expect("fixture is PEM")
    }

    #[test]
    fn only_the_pinned_certificates_are_trusted() {
        let year = 365 * 24 * 3600;
        let now = UnixTime::now();
        let later = UnixTime::since_unix_epoch(Duration::from_secs(now.as_secs() + 200 * year));
        // (ca_file, presented, host, verify-full, time, accepted)
        let cases: &[(&str, &str, &str, bool, UnixTime, bool)] = &[
            (CA, LEAF, "db.internal", true, now, true),
            (CA, LEAF, "other.internal", true, now, false),
            (CA, LEAF, "other.internal", false, now, true),
            (CA, LEAF, "db.internal", true, later, false),
            (OTHER, LEAF, "db.internal", true, now, false),
            (OTHER, LEAF, "db.internal", false, now, false),
            (SELF, SELF, "db.internal", true, now, true),
            (SELF, SELF, "127.0.0.1", true, now, false),
            (SELF, SELF, "127.0.0.1", false, now, true),
            (SELF, SELF, "db.internal", true, later, false),
            (SELF, SELF, "db.internal", false, later, false),
            (CA, SELF, "db.internal", false, now, false),
            (SELF, LEAF, "db.internal", false, now, false),
            (LEAF, LEAF, "db.internal", true, now, true),
        ];
        for (i, (trusted, presented, host, full, at, want)) in cases.iter().enumerate() {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let v = PinnedVerifier::new(trusted.as_bytes(), *full, provider).expect("verifier");
            let name = ServerName::try_from(host.to_string()).expect("name");
            let got = v.verify_server_cert(&der(presented), &[], &name, &[], *at);
            assert_eq!(got.is_ok(), *want, "case {i}: {got:?}");
        }
        // A self-signed certificate that is not pinned is reported as of unknown issuer.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let v = PinnedVerifier::new(OTHER.as_bytes(), true, provider).expect("verifier");
        let name = ServerName::try_from("db.internal").expect("name");
        let got = v.verify_server_cert(&der(SELF), &[], &name, &[], now);
        assert_eq!(
            got.err(),
            Some(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer
            ))
        );
        assert!(tls_config(b"not pem", true).is_err());
        assert!(tls_config(b"", false).is_err());
    }

    #[test]
    fn the_end_point_hash_of_an_ecdsa_sha256_certificate_is_its_sha256() {
        let d = der(LEAF);
        let want = ring::digest::digest(&ring::digest::SHA256, d.as_ref());
        assert_eq!(end_point_hash(d.as_ref()).as_deref(), Some(want.as_ref()));
        // Truncated, empty, or not a certificate: no binding, no panic.
        for bad in [
            &d.as_ref()[..d.as_ref().len() / 2],
            &[][..],
            b"\x30\x84\xff\xff\xff\xff",
        ] {
            assert_eq!(end_point_hash(bad), None);
        }
    }

    fn target(allow: bool, tls: UpstreamTls) -> TargetConfig {
        let cfg = crate::config::Config::from_toml(&format!(
            "{}\n[[targets]]\nname = \"db\"\nprotocol = \"postgres\"\naddress = \"127.0.0.1:5432\"\nlogin = \"bg\"\n",
            crate::config::tests::base()
        ));
        let mut t = cfg
            .map(|c| c.targets["db"].clone())
            .unwrap_or_else(|e| panic!("{e}"));
        t.allow_password_auth = allow;
        t.tls = tls;
        t
    }

    #[test]
    fn the_guard_stops_a_password_request_wherever_the_bytes_split() {
        let msg = |tag: u8, body: &[u8]| {
            let mut m = vec![tag];
            m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
            m.extend_from_slice(body);
            m
        };
        let sasl = msg(b'R', b"\0\0\0\x0aSCRAM-SHA-256\0\0");
        let ok = msg(b'R', &[0, 0, 0, 0]);
        let clear = msg(b'R', &[0, 0, 0, 3]);
        let md5 = msg(b'R', b"\0\0\0\x05salt");
        let param = msg(b'S', b"a\0b\0");
        let off = target(false, UpstreamTls::Disable);
        let on = target(true, UpstreamTls::VerifyFull("/ca".into()));
        let cases: Vec<(Vec<u8>, &TargetConfig, bool)> = vec![
            (
                [sasl.clone(), ok.clone(), clear.clone()].concat(),
                &off,
                true,
            ),
            ([sasl.clone(), clear.clone()].concat(), &off, false),
            ([param.clone(), md5.clone()].concat(), &off, false),
            (md5.clone(), &on, true),
            (clear.clone(), &on, true),
        ];
        for (bytes, t, fine) in cases {
            for step in [1, 2, 3, 5, 7, bytes.len()] {
                let mut g = AuthGuard::new((), t);
                let r: std::io::Result<()> = bytes.chunks(step).try_for_each(|c| g.scan(c));
                assert_eq!(r.is_ok(), fine, "{bytes:?} in steps of {step}");
            }
        }
        assert!(password_request(&off, 10).is_none());
        assert!(password_request(&off, 3).is_some());
        // The opt-in counts only with verify-full, whatever the config said.
        assert!(password_request(&target(true, UpstreamTls::Require("/ca".into())), 5).is_some());
    }

    #[test]
    fn host_is_the_address_without_port_and_brackets() {
        for (address, host) in [
            ("127.0.0.1:5432", "127.0.0.1"),
            ("db.internal:5432", "db.internal"),
            ("[::1]:5432", "::1"),
        ] {
            assert_eq!(host_of(address), host);
        }
    }
}
