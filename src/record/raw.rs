//! The exact-bytes recording format for channels without a pty (exec, scp, sftp).
//!
//! A `.raw` stream is one JSON header line, then frames:
//! `stream: u8 ('i' | 'o' | 'e') ‖ time_us: u64 BE ‖ len: u32 BE ‖ data[len]`.
//! Chunks are cut at frame boundaries, so the concatenation of a channel's chunks in key order
//! is one valid stream. A stream cut short by a crash decodes up to its last whole frame.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ChannelKind, Stream};

/// The header line of a raw stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawHeader {
    pub session_id: String,
    pub channel: u32,
    pub kind: ChannelKind,
}

#[derive(Serialize, Deserialize)]
struct HeaderLine {
    breakglass_raw: u32,
    #[serde(flatten)]
    header: RawHeader,
}

/// Encodes the header line.
pub fn encode_header(h: &RawHeader) -> Vec<u8> {
    let mut v = serde_json::to_vec(&HeaderLine {
        breakglass_raw: 1,
        header: h.clone(),
    })
    .unwrap_or_default();
    v.push(b'\n');
    v
}

/// Appends one frame.
pub fn encode_frame(buf: &mut Vec<u8>, stream: Stream, at: Duration, data: &[u8]) {
    // SSH packets are at most 256 KiB, so a frame never exceeds u32; split defensively anyway.
    for piece in data.chunks(u32::MAX as usize) {
        buf.push(match stream {
            Stream::In => b'i',
            Stream::Out => b'o',
            Stream::Err => b'e',
        });
        buf.extend_from_slice(&(at.as_micros().min(u64::MAX as u128) as u64).to_be_bytes());
        buf.extend_from_slice(&(piece.len() as u32).to_be_bytes());
        buf.extend_from_slice(piece);
    }
}

/// Compresses one chunk as a standard LZ4 frame.
pub fn compress(plain: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::io::Write;
    let mut enc = lz4_flex::frame::FrameEncoder::new(Vec::with_capacity(plain.len() / 4 + 64));
    enc.write_all(plain)?;
    enc.finish().map_err(std::io::Error::other)
}

/// Decompresses LZ4 frames (one or several concatenated), refusing to expand beyond `limit`.
pub fn decompress(compressed: &[u8], limit: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::new();
    lz4_flex::frame::FrameDecoder::new(compressed)
        .take(limit.saturating_add(1))
        .read_to_end(&mut out)?;
    if out.len() as u64 > limit {
        return Err(std::io::Error::other(format!(
            "chunk expands beyond {limit} bytes"
        )));
    }
    Ok(out)
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub stream: Stream,
    pub time_us: u64,
    pub data: Vec<u8>,
}

/// A decoded stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    pub header: RawHeader,
    pub frames: Vec<Frame>,
    /// Bytes at the end that did not form a whole frame (a crash mid-write).
    pub trailing: usize,
}

/// A raw stream that cannot be decoded.
#[derive(Debug, thiserror::Error)]
pub enum RawError {
    #[error("raw stream has no header line")]
    NoHeader,
    #[error("raw stream header is not valid: {0}")]
    BadHeader(String),
    #[error("raw stream frame at byte {0} has unknown stream tag {1:#04x}")]
    BadTag(usize, u8),
}

/// Decodes a whole stream.
pub fn decode(bytes: &[u8]) -> Result<Decoded, RawError> {
    let nl = bytes
        .iter()
        .position(|&b| b == b'\n')
        .ok_or(RawError::NoHeader)?;
    let line: HeaderLine =
        serde_json::from_slice(&bytes[..nl]).map_err(|e| RawError::BadHeader(e.to_string()))?;
    let mut pos = nl + 1;
    let mut frames = Vec::new();
    while pos < bytes.len() {
        let rest = &bytes[pos..];
        if rest.len() < 13 {
            break;
        }
        let stream = match rest[0] {
            b'i' => Stream::In,
            b'o' => Stream::Out,
            b'e' => Stream::Err,
            other => return Err(RawError::BadTag(pos, other)),
        };
        let mut t = [0u8; 8];
        t.copy_from_slice(&rest[1..9]);
        let mut l = [0u8; 4];
        l.copy_from_slice(&rest[9..13]);
        let len = u32::from_be_bytes(l) as usize;
        if rest.len() < 13 + len {
            break;
        }
        frames.push(Frame {
            stream,
            time_us: u64::from_be_bytes(t),
            data: rest[13..13 + len].to_vec(),
        });
        pos += 13 + len;
    }
    Ok(Decoded {
        header: line.header,
        frames,
        trailing: bytes.len() - pos,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_truncation() {
        let h = RawHeader {
            session_id: "s".into(),
            channel: 2,
            kind: ChannelKind::Exec {
                command: "head -c 3 /dev/zero".into(),
            },
        };
        let mut buf = encode_header(&h);
        encode_frame(&mut buf, Stream::In, Duration::from_micros(5), b"y");
        encode_frame(
            &mut buf,
            Stream::Out,
            Duration::from_millis(1),
            &[0, 0xff, 0],
        );
        encode_frame(&mut buf, Stream::Err, Duration::from_secs(2), b"oops\n");
        let d = decode(&buf).expect("decodes");
        assert_eq!(d.header, h);
        assert_eq!(d.frames.len(), 3);
        assert_eq!(d.frames[1].data, vec![0, 0xff, 0]);
        assert_eq!(d.frames[2].time_us, 2_000_000);
        assert_eq!(d.trailing, 0);
        for cut in 1..13 {
            let d = decode(&buf[..buf.len() - cut]).expect("truncated decodes");
            assert_eq!(d.frames.len(), 2, "cut {cut}");
            assert!(d.trailing > 0);
        }
        let mut bad = buf.clone();
        let first_frame = bad.iter().position(|&b| b == b'\n').expect("header") + 1;
        bad[first_frame] = b'x';
        assert!(matches!(decode(&bad), Err(RawError::BadTag(..))));
        assert!(matches!(decode(b"no newline"), Err(RawError::NoHeader)));
        let z = compress(&buf).expect("compress");
        assert_eq!(decompress(&z, 1 << 20).expect("decompress"), buf);
        assert!(decompress(&z, 10).is_err(), "expansion limit enforced");
        assert!(decompress(b"not lz4", 1 << 20).is_err());
    }
}
