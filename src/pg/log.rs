//! The SQL timeline: PostgreSQL protocol messages (as recorded, exact bytes) turned into one
//! JSON object per event — statements, binds with parameters, COPY, outcomes, notices — for
//! `breakglass export --format jsonl` and `breakglass replay`. Schema:
//! `recordings-schema/sql-event.schema.json`.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::record::raw::Frame;
use crate::record::Stream;

fn be16(b: &[u8], at: usize) -> Option<i16> {
    Some(i16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn be32(b: &[u8], at: usize) -> Option<i32> {
    Some(i32::from_be_bytes([
        *b.get(at)?,
        *b.get(at + 1)?,
        *b.get(at + 2)?,
        *b.get(at + 3)?,
    ]))
}

fn cstr(b: &[u8], at: usize) -> Option<(String, usize)> {
    let rest = b.get(at..)?;
    let end = rest.iter().position(|x| *x == 0)?;
    Some((
        String::from_utf8_lossy(&rest[..end]).into_owned(),
        at + end + 1,
    ))
}

/// The SQL of every simple Query and Parse in a batch of whole frontend messages, for
/// per-statement SIEM events. Anything that does not frame cleanly ends the scan.
pub fn statements(batch: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut at = 0;
    while let (Some(&tag), Some(len)) = (batch.get(at), be32(batch, at + 1)) {
        let Some(body) = usize::try_from(len)
            .ok()
            .filter(|l| *l >= 4)
            .and_then(|l| batch.get(at + 5..at + 1 + l))
        else {
            break;
        };
        match tag {
            b'Q' => out.extend(cstr(body, 0).map(|(q, _)| q)),
            b'P' => {
                if let Some((q, _)) = cstr(body, 0).and_then(|(_, next)| cstr(body, next)) {
                    out.push(q);
                }
            }
            _ => {}
        }
        at += 1 + len as usize;
    }
    out
}

fn error_fields(b: &[u8]) -> Value {
    let mut out = serde_json::Map::new();
    let mut at = 0;
    while let Some(&t) = b.get(at) {
        if t == 0 {
            break;
        }
        let Some((v, next)) = cstr(b, at + 1) else {
            break;
        };
        let k = match t {
            b'S' => "severity",
            b'C' => "sqlstate",
            b'M' => "message",
            b'D' => "detail",
            b'H' => "hint",
            _ => {
                at = next;
                continue;
            }
        };
        out.insert(k.into(), Value::String(v));
        at = next;
    }
    Value::Object(out)
}

/// Accumulates COPY data between the CopyIn/Out response and CopyDone/Fail.
#[derive(Default)]
struct Copy {
    direction: &'static str,
    rows: u64,
    bytes: u64,
    hash: Option<Sha256>,
}

/// Decodes a recorded PostgreSQL session into events, in order. Data rows are counted, never
/// logged (results are not evidence of what someone did, and can be large or sensitive).
pub fn events(frames: &[Frame]) -> Vec<Value> {
    let mut out = Vec::new();
    let mut rows: u64 = 0;
    let mut copy: Option<Copy> = None;
    // A recorded frame holds one or more whole protocol messages.
    let messages = frames.iter().flat_map(|f| {
        let mut v = Vec::new();
        let mut at = 0usize;
        while let (Some(&tag), Some(len)) = (f.data.get(at), be32(&f.data, at + 1)) {
            let end = at + 1 + (len.max(4) as usize);
            let Some(body) = f.data.get(at + 5..end) else {
                break;
            };
            v.push((f.stream, f.time_us, tag, body));
            at = end;
        }
        v
    });
    for (stream, time_us, tag, b) in messages {
        let t = time_us as f64 / 1e6;
        let ev = match (stream, tag) {
            (Stream::In, b'Q') => cstr(b, 0).map(|(q, _)| json!({"event": "query", "sql": q})),
            (Stream::In, b'P') => (|| {
                let (name, at) = cstr(b, 0)?;
                let (sql, at) = cstr(b, at)?;
                let n = be16(b, at)?.max(0) as usize;
                let oids: Vec<i32> = (0..n).filter_map(|i| be32(b, at + 2 + 4 * i)).collect();
                Some(json!({"event": "parse", "statement": name, "sql": sql, "param_type_oids": oids}))
            })(),
            (Stream::In, b'B') => (|| {
                let (portal, at) = cstr(b, 0)?;
                let (stmt, mut at) = cstr(b, at)?;
                let nf = be16(b, at)?.max(0) as usize;
                let formats: Vec<i16> = (0..nf).filter_map(|i| be16(b, at + 2 + 2 * i)).collect();
                at += 2 + 2 * nf;
                let np = be16(b, at)?.max(0) as usize;
                at += 2;
                let mut params = Vec::new();
                for i in 0..np {
                    let len = be32(b, at)?;
                    at += 4;
                    let fmt = match formats.len() {
                        0 => 0,
                        1 => formats[0],
                        _ => *formats.get(i).unwrap_or(&0),
                    };
                    if len < 0 {
                        params.push(json!({"format": fmt, "value": null}));
                        continue;
                    }
                    let v = b.get(at..at + len as usize)?;
                    at += len as usize;
                    params.push(if fmt == 1 {
                        json!({"format": 1, "base64": B64.encode(v)})
                    } else {
                        json!({"format": 0, "text": String::from_utf8_lossy(v)})
                    });
                }
                Some(json!({"event": "bind", "portal": portal, "statement": stmt, "params": params}))
            })(),
            (Stream::In, b'E') => cstr(b, 0).map(|(p, at)| {
                json!({"event": "execute", "portal": p, "max_rows": be32(b, at).unwrap_or(0)})
            }),
            (Stream::In, b'C') => cstr(b, 1).map(|(n, _)| {
                json!({"event": "close", "kind": if b.first() == Some(&b'S') { "statement" } else { "portal" }, "name": n})
            }),
            (Stream::In, b'F') => be32(b, 0).map(|oid| json!({"event": "function_call", "function_oid": oid})),
            (Stream::In, b'd') | (Stream::Out, b'd') => {
                if let Some(c) = copy.as_mut() {
                    // Text rows end in a newline; a lone `\.` line is the end marker, not a row.
                    c.rows += b
                        .split(|x| *x == b'\n')
                        .filter(|l| !l.is_empty() && *l != b"\\.")
                        .count() as u64;
                    c.bytes += b.len() as u64;
                    if let Some(h) = c.hash.as_mut() {
                        h.update(b);
                    }
                }
                None
            }
            (Stream::Out, b'G') | (Stream::Out, b'H') => {
                copy = Some(Copy {
                    direction: if tag == b'G' { "in" } else { "out" },
                    hash: Some(Sha256::new()),
                    ..Default::default()
                });
                None
            }
            (Stream::In, b'c') | (Stream::Out, b'c') | (Stream::In, b'f') => copy.take().map(|c| {
                json!({"event": "copy", "copy_direction": c.direction, "rows": c.rows, "bytes": c.bytes,
                       "sha256": c.hash.map(|h| hex::encode(h.finalize())), "failed": tag == b'f'})
            }),
            (Stream::Out, b'D') => {
                rows += 1;
                None
            }
            (Stream::Out, b'C') => cstr(b, 0).map(|(tag, _)| {
                let r = std::mem::take(&mut rows);
                json!({"event": "complete", "command_tag": tag, "rows_returned": r})
            }),
            (Stream::Out, b'E') => {
                rows = 0;
                Some(json!({"event": "error", "error": error_fields(b)}))
            }
            (Stream::Out, b'N') => Some(json!({"event": "notice", "notice": error_fields(b)})),
            (Stream::In, b'X') => Some(json!({"event": "terminate"})),
            _ => None,
        };
        if let Some(mut e) = ev {
            if let Some(o) = e.as_object_mut() {
                o.insert("time".into(), json!(t));
                o.insert(
                    "direction".into(),
                    json!(if stream == Stream::In {
                        "client"
                    } else {
                        "server"
                    }),
                );
            }
            out.push(e);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_come_from_query_and_parse() {
        let mut b = crate::pg::wire::message(b'Q', b"select 1\0");
        b.extend(crate::pg::wire::message(b'P', b"s1\0select $1\0\0\0"));
        b.extend(crate::pg::wire::message(b'S', b""));
        assert_eq!(statements(&b), ["select 1", "select $1"]);
        assert!(statements(&[b'Q', 0, 0, 0, 2]).is_empty(), "bad length");
        assert!(
            statements(&[b'Q', 0, 0, 0, 50, b'x']).is_empty(),
            "truncated"
        );
    }

    fn frame(stream: Stream, tag: u8, body: &[u8]) -> Frame {
        Frame {
            stream,
            time_us: 1,
            data: crate::pg::wire::message(tag, body),
        }
    }

    #[test]
    fn statements_binds_outcomes_and_errors() {
        let mut bind = b"\0s1\0".to_vec();
        bind.extend_from_slice(&1i16.to_be_bytes()); // one format code for all: binary
        bind.extend_from_slice(&1i16.to_be_bytes());
        bind.extend_from_slice(&1i16.to_be_bytes()); // one parameter
        bind.extend_from_slice(&4i32.to_be_bytes());
        bind.extend_from_slice(&[0, 0, 0, 42]);
        let frames = vec![
            frame(Stream::In, b'Q', b"select 1\0"),
            frame(Stream::Out, b'D', b""),
            frame(Stream::Out, b'C', b"SELECT 1\0"),
            frame(Stream::In, b'P', b"s1\0select $1\0\0\x01\0\0\0\x17"),
            frame(Stream::In, b'B', &bind),
            frame(
                Stream::Out,
                b'E',
                b"SERROR\0C42P01\0Mrelation \"x\" does not exist\0\0",
            ),
            frame(Stream::In, b'B', b"\0"), // truncated: skipped, not a panic
        ];
        let ev = events(&frames);
        assert_eq!(ev[0]["sql"], "select 1");
        assert_eq!(ev[1]["command_tag"], "SELECT 1");
        assert_eq!(ev[1]["rows_returned"], 1);
        assert_eq!(ev[2]["param_type_oids"], json!([23]));
        assert_eq!(ev[3]["params"][0]["base64"], B64.encode([0, 0, 0, 42]));
        assert_eq!(ev[4]["error"]["sqlstate"], "42P01");
        assert_eq!(ev.len(), 5);
    }
}
