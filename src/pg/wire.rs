//! The PostgreSQL v3 wire format as the proxy needs it: startup packets, typed messages, and
//! the few backend messages the gateway writes itself (authentication, errors, notices).

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Startup codes.
pub const SSL_REQUEST: i32 = 80877103;
pub const GSSENC_REQUEST: i32 = 80877104;
pub const CANCEL_REQUEST: i32 = 80877102;
pub const PROTOCOL_3: i32 = 196608;

/// A wire problem; `side` says who caused it.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection closed")]
    Closed,
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("message of {len} bytes is over the {limit}-byte limit")]
    TooLong { len: usize, limit: usize },
}

/// One startup-phase packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Startup {
    pub code: i32,
    pub body: Vec<u8>,
}

/// Reads a startup packet (length, code, body), at most 10 000 bytes.
pub async fn read_startup<R: AsyncRead + Unpin>(r: &mut R) -> Result<Startup, WireError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(WireError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = i32::from_be_bytes(len);
    if !(8..=10_000).contains(&len) {
        return Err(WireError::Malformed(format!("startup packet length {len}")));
    }
    let mut rest = vec![0u8; len as usize - 4];
    r.read_exact(&mut rest).await?;
    let code = i32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
    Ok(Startup {
        code,
        body: rest[4..].to_vec(),
    })
}

/// Parses `key\0value\0...\0` startup parameters.
pub fn startup_params(body: &[u8]) -> Result<Vec<(String, String)>, WireError> {
    let mut out = Vec::new();
    let mut parts = body.split(|b| *b == 0);
    let mut terminated = false;
    while let Some(k) = parts.next() {
        if k.is_empty() {
            terminated = true;
            break;
        }
        let v = parts
            .next()
            .ok_or_else(|| WireError::Malformed("startup parameter without a value".into()))?;
        out.push((
            String::from_utf8_lossy(k).into_owned(),
            String::from_utf8_lossy(v).into_owned(),
        ));
    }
    if !terminated {
        return Err(WireError::Malformed(
            "startup parameters are not terminated".into(),
        ));
    }
    Ok(out)
}

/// A typed message: the tag byte and the whole frame (tag, length and body) as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub tag: u8,
    pub frame: Vec<u8>,
}

impl Message {
    /// The body after tag and length.
    pub fn body(&self) -> &[u8] {
        self.frame.get(5..).unwrap_or_default()
    }
}

/// Frames up to this length are allocated whole when their header arrives; longer ones grow
/// as their bytes do.
const EAGER_FRAME: usize = 64 << 10;

/// Reads one typed message, refusing frames longer than `limit`.
pub async fn read_message<R: AsyncRead + Unpin>(
    r: &mut R,
    limit: usize,
) -> Result<Message, WireError> {
    let mut head = [0u8; 5];
    match r.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(WireError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]);
    if len < 4 {
        return Err(WireError::Malformed(format!("message length {len}")));
    }
    let len = len as usize;
    if len > limit {
        return Err(WireError::TooLong { len, limit });
    }
    let frame = if len <= EAGER_FRAME {
        let mut frame = Vec::with_capacity(len + 1);
        frame.extend_from_slice(&head);
        frame.resize(len + 1, 0);
        r.read_exact(&mut frame[5..]).await?;
        frame
    } else {
        // A large declared length is only a claim: memory grows with the bytes that arrive
        // (at most twice them), not with the header.
        let mut frame = Vec::with_capacity(EAGER_FRAME + 1);
        frame.extend_from_slice(&head);
        let want = (len - 4) as u64;
        let got = (&mut *r).take(want).read_to_end(&mut frame).await?;
        if (got as u64) < want {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
        frame
    };
    Ok(Message {
        tag: head[0],
        frame,
    })
}

/// Builds a typed message.
pub fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(body.len() + 5);
    v.push(tag);
    v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// An Authentication message with a code and payload.
pub fn auth(code: i32, payload: &[u8]) -> Vec<u8> {
    let mut b = code.to_be_bytes().to_vec();
    b.extend_from_slice(payload);
    message(b'R', &b)
}

fn fields(severity: &str, code: &str, msg: &str) -> Vec<u8> {
    let mut b = Vec::new();
    for (t, v) in [
        (b'S', severity),
        (b'V', severity),
        (b'C', code),
        (b'M', msg),
    ] {
        b.push(t);
        b.extend_from_slice(v.as_bytes());
        b.push(0);
    }
    b.push(0);
    b
}

/// An ErrorResponse.
pub fn error(severity: &str, code: &str, msg: &str) -> Vec<u8> {
    message(b'E', &fields(severity, code, msg))
}

/// A NoticeResponse.
pub fn notice(code: &str, msg: &str) -> Vec<u8> {
    message(b'N', &fields("WARNING", code, msg))
}

/// Writes bytes and flushes.
pub async fn send<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> Result<(), WireError> {
    w.write_all(bytes).await?;
    w.flush().await?;
    Ok(())
}

/// Reads a C string from the front of `b`.
pub fn cstr(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let i = b.iter().position(|x| *x == 0)?;
    Some((&b[..i], &b[i + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_large_frame_is_read_whole_and_a_short_one_is_an_error() {
        let body = vec![7u8; 300 << 10];
        let m = message(b'D', &body);
        let mut r = &m[..];
        let got = read_message(&mut r, 1 << 20).await.expect("read");
        assert_eq!(got.frame, m);
        let mut short = &m[..m.len() - 1];
        assert!(read_message(&mut short, 1 << 20).await.is_err());
    }

    #[tokio::test]
    async fn frames_round_trip_and_limits_hold() {
        let m = message(b'Q', b"select 1\0");
        let got = read_message(&mut &m[..], 1024).await.expect("reads");
        assert_eq!(got.tag, b'Q');
        assert_eq!(got.body(), b"select 1\0");
        assert!(matches!(
            read_message(&mut &m[..], 5).await,
            Err(WireError::TooLong { .. })
        ));
        let bad = [b'Q', 0, 0, 0, 1];
        assert!(matches!(
            read_message(&mut &bad[..], 1024).await,
            Err(WireError::Malformed(_))
        ));
        assert!(matches!(
            read_message(&mut &m[..3], 1024).await,
            Err(WireError::Closed)
        ));
        let mut startup = Vec::new();
        let body = b"user\0alice\0database\0orders\0\0";
        startup.extend_from_slice(&((8 + body.len()) as i32).to_be_bytes());
        startup.extend_from_slice(&PROTOCOL_3.to_be_bytes());
        startup.extend_from_slice(body);
        let s = read_startup(&mut &startup[..]).await.expect("startup");
        assert_eq!(s.code, PROTOCOL_3);
        let p = startup_params(&s.body).expect("params");
        assert_eq!(
            p,
            vec![
                ("user".into(), "alice".into()),
                ("database".into(), "orders".into())
            ]
        );
        assert!(startup_params(b"user\0").is_err());
    }
}
