//! The exact-bytes recording format for channels without a pty (exec, scp, sftp).
//!
//! A `.raw` stream is one JSON header line, then frames:
//! `stream: u8 ‖ time_us: u64 BE ‖ len: u32 BE ‖ data[len]`, with `len` at most
//! [`MAX_FRAME_DATA`]. The stream tag is `i`, `o` or `e` (client → target, stdout, stderr) for
//! a frame that ends its payload, and `I`, `O` or `E` for a piece of a larger payload that the
//! next frame of the same stream continues; [`decode`] joins the pieces back into one frame.
//! Recordings written before frames were bounded hold only lowercase tags and decode as they
//! always did.
//!
//! Chunks are cut at frame boundaries, so the concatenation of a channel's chunks in key order
//! is one valid stream. A stream cut short by a crash decodes up to its last whole frame (a
//! payload whose last piece is missing is kept as far as it was written).
//!
//! Bounds: a writer never puts more than [`MAX_FRAME_DATA`] bytes in one frame, and the relays
//! hand the recorder at most that much per message (the PostgreSQL relay cuts a larger batch
//! into pieces), so the recorder can cut a chunk between the pieces of a 60 MB message. The
//! largest chunk a writer produces is therefore [`MAX_CHUNK_PLAIN`], and readers decompress a
//! chunk to at most that.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ChannelKind, Stream};

/// The most data one frame holds. A larger payload becomes several frames (continued tags).
pub const MAX_FRAME_DATA: usize = 1 << 20;

/// Tag, time and length in front of every frame's data.
pub const FRAME_OVERHEAD: usize = 13;

/// The largest encoding one recorder message adds to a chunk buffer: a header line (at most one
/// SSH packet of 256 KiB, JSON-escaped at most sixfold, plus the session id) or one frame.
pub const MAX_MESSAGE_ENCODING: usize = 2 << 20;

/// The largest plain (decompressed) chunk a writer produces: the recorder stops taking messages
/// while it holds `SPOOL_LIMIT` unwritten bytes (a store outage), a chunk is flushed once its
/// buffer reaches `MAX_CHUNK_BYTES` (normal operation), and one message adds at most
/// [`MAX_MESSAGE_ENCODING`]. Readers refuse a chunk that expands beyond this.
pub const MAX_CHUNK_PLAIN: usize = {
    let cap = if super::SPOOL_LIMIT > super::MAX_CHUNK_BYTES {
        super::SPOOL_LIMIT
    } else {
        super::MAX_CHUNK_BYTES
    };
    cap + MAX_MESSAGE_ENCODING
};

// One frame fits in one message's encoding.
const _: () = assert!(FRAME_OVERHEAD + MAX_FRAME_DATA <= MAX_MESSAGE_ENCODING);

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

/// The tag of a frame: lowercase ends a payload, uppercase is continued by the next frame.
fn tag(stream: Stream, continued: bool) -> u8 {
    let t = match stream {
        Stream::In => b'i',
        Stream::Out => b'o',
        Stream::Err => b'e',
    };
    if continued {
        t.to_ascii_uppercase()
    } else {
        t
    }
}

/// Appends one payload as frames of at most [`MAX_FRAME_DATA`] bytes; all but the last carry
/// the continued tag. An empty payload is one empty frame, as before.
pub fn encode_frame(buf: &mut Vec<u8>, stream: Stream, at: Duration, data: &[u8]) {
    let time = (at.as_micros().min(u64::MAX as u128) as u64).to_be_bytes();
    let mut pieces = data.chunks(MAX_FRAME_DATA).peekable();
    if pieces.peek().is_none() {
        buf.push(tag(stream, false));
        buf.extend_from_slice(&time);
        buf.extend_from_slice(&0u32.to_be_bytes());
        return;
    }
    while let Some(piece) = pieces.next() {
        buf.push(tag(stream, pieces.peek().is_some()));
        buf.extend_from_slice(&time);
        // A piece is at most MAX_FRAME_DATA (1 MiB), far below u32::MAX.
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

/// Decodes a whole stream, joining continued pieces into one frame (time of the first piece).
pub fn decode(bytes: &[u8]) -> Result<Decoded, RawError> {
    let nl = bytes
        .iter()
        .position(|&b| b == b'\n')
        .ok_or(RawError::NoHeader)?;
    let line: HeaderLine =
        serde_json::from_slice(&bytes[..nl]).map_err(|e| RawError::BadHeader(e.to_string()))?;
    let mut pos = nl + 1;
    let mut frames: Vec<Frame> = Vec::new();
    // Payloads still being joined, per stream (index into `frames`).
    let mut open: [Option<usize>; 3] = [None; 3];
    while pos < bytes.len() {
        let rest = &bytes[pos..];
        if rest.len() < FRAME_OVERHEAD {
            break;
        }
        let (stream, continued) = match rest[0] {
            b'i' => (Stream::In, false),
            b'o' => (Stream::Out, false),
            b'e' => (Stream::Err, false),
            b'I' => (Stream::In, true),
            b'O' => (Stream::Out, true),
            b'E' => (Stream::Err, true),
            other => return Err(RawError::BadTag(pos, other)),
        };
        let mut t = [0u8; 8];
        t.copy_from_slice(&rest[1..9]);
        let mut l = [0u8; 4];
        l.copy_from_slice(&rest[9..13]);
        let len = u32::from_be_bytes(l) as usize;
        let Some(data) = rest.get(FRAME_OVERHEAD..FRAME_OVERHEAD.saturating_add(len)) else {
            break;
        };
        let slot = match stream {
            Stream::In => 0,
            Stream::Out => 1,
            Stream::Err => 2,
        };
        match open[slot].and_then(|i| frames.get_mut(i)) {
            Some(f) => f.data.extend_from_slice(data),
            None => {
                open[slot] = Some(frames.len());
                frames.push(Frame {
                    stream,
                    time_us: u64::from_be_bytes(t),
                    data: data.to_vec(),
                });
            }
        }
        if !continued {
            open[slot] = None;
        }
        pos += FRAME_OVERHEAD + len;
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

    fn header() -> RawHeader {
        RawHeader {
            session_id: "s".into(),
            channel: 0,
            kind: ChannelKind::Postgres {
                database: "d".into(),
                role: "r".into(),
            },
        }
    }

    #[test]
    fn large_payloads_are_split_into_bounded_frames_and_joined_back() {
        let big: Vec<u8> = (0..(2 * MAX_FRAME_DATA + 17)).map(|i| i as u8).collect();
        let mut buf = encode_header(&header());
        let body = buf.len();
        encode_frame(&mut buf, Stream::Out, Duration::from_micros(7), &big);
        encode_frame(&mut buf, Stream::In, Duration::from_micros(9), b"q");
        encode_frame(&mut buf, Stream::Out, Duration::from_micros(11), b"");
        // Three pieces for the big payload: two continued ('O'), one final ('o').
        let mut tags = Vec::new();
        let mut at = body;
        while at < buf.len() {
            tags.push(buf[at]);
            let len = u32::from_be_bytes([buf[at + 9], buf[at + 10], buf[at + 11], buf[at + 12]]);
            assert!(len as usize <= MAX_FRAME_DATA, "frame of {len} bytes");
            at += FRAME_OVERHEAD + len as usize;
        }
        assert_eq!(tags, b"OOoio");
        let d = decode(&buf).expect("decodes");
        assert_eq!(d.frames.len(), 3);
        assert_eq!(d.frames[0].data, big);
        assert_eq!(d.frames[0].time_us, 7);
        assert_eq!(d.frames[1].data, b"q");
        assert!(d.frames[2].data.is_empty());
        assert_eq!(d.trailing, 0);

        // Pieces of two streams interleaved (as chunks of a relay may be) join per stream.
        let mut buf = encode_header(&header());
        let piece = |buf: &mut Vec<u8>, t: u8, data: &[u8]| {
            buf.push(t);
            buf.extend_from_slice(&1u64.to_be_bytes());
            buf.extend_from_slice(&(data.len() as u32).to_be_bytes());
            buf.extend_from_slice(data);
        };
        piece(&mut buf, b'I', b"ab");
        piece(&mut buf, b'o', b"x");
        piece(&mut buf, b'i', b"cd");
        let d = decode(&buf).expect("decodes");
        assert_eq!(
            d.frames
                .iter()
                .map(|f| f.data.as_slice())
                .collect::<Vec<_>>(),
            [&b"abcd"[..], b"x"]
        );
        // A stream cut after a continued piece keeps what was written.
        let mut buf = encode_header(&header());
        piece(&mut buf, b'O', b"part");
        let d = decode(&buf).expect("decodes");
        assert_eq!(d.frames[0].data, b"part");
    }

    #[test]
    fn the_reader_limit_covers_the_largest_chunk_a_writer_makes() {
        // The largest buffer the recorder can flush: just under the outage hold, plus one
        // message's worth of frames (a 1 MiB piece, the most a relay hands over at once).
        let mut buf = vec![0u8; super::super::SPOOL_LIMIT - 1];
        encode_frame(
            &mut buf,
            Stream::Out,
            Duration::ZERO,
            &vec![b'x'; MAX_FRAME_DATA],
        );
        assert!(buf.len() <= MAX_CHUNK_PLAIN);
        let z = compress(&buf).expect("compress");
        assert_eq!(
            decompress(&z, MAX_CHUNK_PLAIN as u64)
                .expect("within the limit")
                .len(),
            buf.len()
        );
    }

    #[test]
    fn random_bytes_never_panic_the_decoder() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20_000 {
            let n = (next() % 64) as usize;
            let mut b = encode_header(&header());
            for _ in 0..n {
                let r = next();
                b.push(match r % 5 {
                    0 => b"iIoOeE"[(r >> 8) as usize % 6],
                    _ => (r >> 16) as u8,
                });
            }
            let _ = decode(&b);
        }
    }
}
