//! The SQL timeline: PostgreSQL protocol messages (as recorded, exact bytes) turned into one
//! JSON object per event — statements, binds with parameters, COPY, outcomes, notices — for
//! `breakglass export --format jsonl` and `breakglass replay`. Schema:
//! `recordings-schema/sql-event.schema.json`.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::record::export::{ChannelData, ExportError};
use crate::record::raw::{self, Frame};
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
/// per-statement SIEM events: password literals masked (the relay masks them before recording;
/// this holds for any other caller too), blank statements (`;`, white space, comments only)
/// left out. Anything that does not frame cleanly ends the scan.
pub fn statements(batch: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut push = |q: String| {
        if !crate::pg::redact::is_blank(q.as_bytes()) {
            out.push(redact_sql(q).0);
        }
    };
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
            b'Q' => {
                if let Some((q, _)) = cstr(body, 0) {
                    push(q);
                }
            }
            b'P' => {
                if let Some((q, _)) = cstr(body, 0).and_then(|(_, next)| cstr(body, next)) {
                    push(q);
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

/// Accumulates COPY data between the CopyIn/Out response and CopyDone/Fail. Rows are counted
/// over the whole data stream, not per CopyData message: a client (psql's `\copy`) cuts its
/// data wherever its buffer ends, often in the middle of a row.
#[derive(Default)]
struct Copy {
    direction: &'static str,
    /// Binary COPY has no row delimiter we count: its rows are reported as unknown.
    binary: bool,
    /// CSV: a newline inside a quoted field does not end a row.
    csv: bool,
    /// CSV with a HEADER line.
    header: bool,
    in_quotes: bool,
    /// Text format: the previous byte was a backslash, so this one is data (`\` then a
    /// newline is a newline inside a value, not the end of a row).
    escaped: bool,
    rows: u64,
    bytes: u64,
    /// Bytes of the current (unterminated) line, and its first two, to spot the `\.` marker.
    line_len: u64,
    line_head: [u8; 2],
    hash: Option<Sha256>,
}

impl Copy {
    fn feed(&mut self, b: &[u8]) {
        self.bytes += b.len() as u64;
        if let Some(h) = self.hash.as_mut() {
            h.update(b);
        }
        if self.binary {
            return;
        }
        for &c in b {
            let escaped = std::mem::take(&mut self.escaped);
            if self.csv && c == b'"' {
                self.in_quotes = !self.in_quotes;
            }
            if !self.csv && c == b'\\' && !escaped {
                self.escaped = true;
            }
            if c == b'\n' && !self.in_quotes && !escaped {
                self.end_line();
                continue;
            }
            if let Some(slot) = self.line_head.get_mut(self.line_len as usize) {
                *slot = c;
            }
            self.line_len += 1;
        }
    }

    /// A row ends; an empty line or the lone `\.` end marker is not a row.
    fn end_line(&mut self) {
        let marker = self.line_len == 2 && self.line_head == *b"\\.";
        if self.line_len > 0 && !marker {
            self.rows += 1;
        }
        self.line_len = 0;
    }

    fn finish(mut self, failed: bool) -> Value {
        if self.line_len > 0 && !self.in_quotes {
            self.end_line();
        }
        // A CSV header line is data on the wire but not a row of the table.
        let rows = self.rows.saturating_sub(u64::from(self.csv && self.header));
        let rows = if self.binary {
            json!(null)
        } else {
            json!(rows)
        };
        json!({"event": "copy", "copy_direction": self.direction,
               "format": if self.binary { "binary" } else if self.csv { "csv" } else { "text" },
               "rows": rows, "bytes": self.bytes,
               "sha256": self.hash.map(|h| hex::encode(h.finalize())), "failed": failed})
    }
}

/// Whether a COPY statement has a word (`CSV`, `FORMAT csv`, `HEADER`): a best-effort match on
/// the statement text, used only to count rows (the server's command tag is the authority).
fn copy_has_word(sql: &str, word: &str) -> bool {
    sql.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .any(|w| w.eq_ignore_ascii_case(word))
}

/// The `redacted` entries of a statement: every password literal, already masked in the
/// recording by the relay (and masked here again for recordings made before it did).
fn redact_sql(sql: String) -> (String, Option<Value>) {
    let mut b = sql.into_bytes();
    let counts = crate::pg::redact::mask_sql(&mut b);
    let sql = String::from_utf8_lossy(&b).into_owned();
    if counts.is_empty() {
        return (sql, None);
    }
    let r: Vec<Value> = counts
        .iter()
        .map(|n| json!({"kind": "password-literal", "bytes": n}))
        .collect();
    (sql, Some(Value::Array(r)))
}

/// Splits each direction's recorded bytes back into protocol messages. A frame normally holds
/// whole messages, but a message larger than a frame arrives in pieces (see
/// `record::raw::MAX_FRAME_DATA`), so each direction is parsed as one byte stream. Bodies are
/// kept only for the messages the timeline reads; DataRow and CopyData bodies stream through.
#[derive(Default)]
struct Reader {
    head: Vec<u8>,
    tag: u8,
    remaining: usize,
    keep: bool,
    body: Vec<u8>,
    time_us: u64,
}

/// One piece of a direction's stream, as the timeline sees it.
enum Piece<'a> {
    /// A whole message with its body (for the tags the timeline reads).
    Message {
        tag: u8,
        time_us: u64,
        body: Vec<u8>,
    },
    /// A message begins (its header is complete).
    Begin { tag: u8 },
    /// Body bytes of a streamed message (DataRow, CopyData).
    Bytes { tag: u8, data: &'a [u8] },
}

impl Reader {
    fn feed<'a>(&mut self, time_us: u64, mut data: &'a [u8], out: &mut Vec<Piece<'a>>) {
        while !data.is_empty() {
            if self.head.len() < 5 {
                let n = (5 - self.head.len()).min(data.len());
                self.head.extend_from_slice(&data[..n]);
                data = &data[n..];
                if self.head.len() < 5 {
                    return;
                }
                self.tag = self.head[0];
                let len =
                    i32::from_be_bytes([self.head[1], self.head[2], self.head[3], self.head[4]]);
                // The relay framed every message it recorded, so a bad length cannot come from
                // a live session; treat it as an empty message rather than guess.
                self.remaining = usize::try_from(len).unwrap_or(4).max(4) - 4;
                self.keep = !matches!(self.tag, b'D' | b'd');
                self.time_us = time_us;
                self.body.clear();
                out.push(Piece::Begin { tag: self.tag });
            }
            let n = self.remaining.min(data.len());
            if self.keep {
                self.body.extend_from_slice(&data[..n]);
            } else if n > 0 {
                out.push(Piece::Bytes {
                    tag: self.tag,
                    data: &data[..n],
                });
            }
            data = &data[n..];
            self.remaining -= n;
            if self.remaining == 0 {
                if self.keep {
                    out.push(Piece::Message {
                        tag: self.tag,
                        time_us: self.time_us,
                        body: std::mem::take(&mut self.body),
                    });
                }
                self.head.clear();
            }
        }
    }
}

/// Turns a recorded PostgreSQL channel into its SQL timeline, one JSON object per line (the
/// adapter's extractor for `export --sql`, the web SQL view and search).
pub fn sql_jsonl(ch: u32, data: &ChannelData, session_id: &str) -> Result<String, ExportError> {
    let d = raw::decode(&data.bytes).map_err(|e| ExportError::BadChannel(ch, e.to_string()))?;
    let mut out = String::new();
    for mut e in events(&d.frames) {
        if let Some(o) = e.as_object_mut() {
            o.insert("session_id".into(), Value::String(session_id.to_string()));
            o.insert("schema_version".into(), json!(1));
        }
        out.push_str(&e.to_string());
        out.push('\n');
    }
    Ok(out)
}

/// Decodes a recorded PostgreSQL session into events, in order. Data rows are counted, never
/// logged (results are not evidence of what someone did, and can be large or sensitive).
pub fn events(frames: &[Frame]) -> Vec<Value> {
    let mut out = Vec::new();
    let mut rows: u64 = 0;
    let mut copy: Option<Copy> = None;
    // The SQL of the last Query or Parse, to tell a CSV COPY from a text one.
    let mut last_sql = String::new();
    let (mut client, mut server) = (Reader::default(), Reader::default());
    let mut pieces = Vec::new();
    for f in frames {
        pieces.clear();
        match f.stream {
            Stream::In => client.feed(f.time_us, &f.data, &mut pieces),
            Stream::Out | Stream::Err => server.feed(f.time_us, &f.data, &mut pieces),
        }
        let stream = match f.stream {
            Stream::In => Stream::In,
            Stream::Out | Stream::Err => Stream::Out,
        };
        for p in pieces.drain(..) {
            let (tag, time_us, b) = match p {
                Piece::Begin { tag } => {
                    if stream == Stream::Out && tag == b'D' {
                        rows += 1;
                    }
                    continue;
                }
                Piece::Bytes { tag, data } => {
                    if let (b'd', Some(c)) = (tag, copy.as_mut()) {
                        c.feed(data);
                    }
                    continue;
                }
                Piece::Message { tag, time_us, body } => (tag, time_us, body),
            };
            let b = b.as_slice();
            let t = time_us as f64 / 1e6;
            let ev = match (stream, tag) {
                (Stream::In, b'Q') => cstr(b, 0).map(|(q, _)| {
                    let (sql, redacted) = redact_sql(q);
                    last_sql.clone_from(&sql);
                    let mut e = json!({"event": "query", "sql": sql});
                    if let Some(r) = redacted {
                        e["redacted"] = r;
                    }
                    e
                }),
                (Stream::In, b'P') => (|| {
                    let (name, at) = cstr(b, 0)?;
                    let (sql, at) = cstr(b, at)?;
                    let n = be16(b, at)?.max(0) as usize;
                    let oids: Vec<i32> = (0..n).filter_map(|i| be32(b, at + 2 + 4 * i)).collect();
                    let (sql, redacted) = redact_sql(sql);
                    last_sql.clone_from(&sql);
                    let mut e = json!({"event": "parse", "statement": name, "sql": sql, "param_type_oids": oids});
                    if let Some(r) = redacted {
                        e["redacted"] = r;
                    }
                    Some(e)
                })(),
                (Stream::In, b'p') => Some(json!({"event": "password_message",
                    "redacted": [{"kind": "password-message", "bytes": b.len()}]})),
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
                (Stream::Out, b'G') | (Stream::Out, b'H') => {
                    copy = Some(Copy {
                        direction: if tag == b'G' { "in" } else { "out" },
                        binary: b.first() == Some(&1),
                        csv: copy_has_word(&last_sql, "csv"),
                        header: copy_has_word(&last_sql, "header"),
                        hash: Some(Sha256::new()),
                        ..Default::default()
                    });
                    None
                }
                (Stream::In, b'c') | (Stream::Out, b'c') | (Stream::In, b'f') => {
                    copy.take().map(|c| c.finish(tag == b'f'))
                }
                (Stream::Out, b'C') => cstr(b, 0).map(|(tag, _)| {
                    let r = std::mem::take(&mut rows);
                    json!({"event": "complete", "command_tag": tag, "rows_returned": r})
                }),
                (Stream::Out, b'E') => {
                    rows = 0;
                    // A COPY that the server ends with an error is over too.
                    let failed = copy.take().map(|c| c.finish(true));
                    out.extend(failed.map(|mut e| {
                        e["time"] = json!(t);
                        e["direction"] = json!("server");
                        e
                    }));
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

    /// `bytes` as frames of at most `cut` bytes each (as a relay may record them).
    fn cut(stream: Stream, bytes: &[u8], cut: usize) -> Vec<Frame> {
        bytes
            .chunks(cut)
            .map(|c| Frame {
                stream,
                time_us: 2,
                data: c.to_vec(),
            })
            .collect()
    }

    fn copy_in(sql: &str, format: u8, data: &[u8], cut_at: usize) -> Value {
        let mut frames = vec![frame(Stream::In, b'Q', format!("{sql}\0").as_bytes())];
        frames.push(frame(Stream::Out, b'G', &[format, 0, 0]));
        let mut msgs = Vec::new();
        for piece in data.chunks(cut_at) {
            msgs.extend(crate::pg::wire::message(b'd', piece));
        }
        msgs.extend(crate::pg::wire::message(b'c', b""));
        // The batches themselves arrive cut at odd places too.
        frames.extend(cut(Stream::In, &msgs, 7));
        frames.push(frame(Stream::Out, b'C', b"COPY 3\0"));
        let ev = events(&frames);
        ev.into_iter()
            .find(|e| e["event"] == "copy")
            .expect("a copy event")
    }

    #[test]
    fn copy_rows_are_counted_across_message_boundaries() {
        let text = b"1\tone\n2\ttwo\n3\tthree\n";
        for at in [1, 2, 3, 5, 8, 100] {
            let e = copy_in("COPY t FROM STDIN", 0, text, at);
            assert_eq!(e["rows"], 3, "cut every {at}: {e}");
            assert_eq!(e["bytes"], text.len());
            assert_eq!(e["format"], "text");
        }
        // No final newline; the old `\.` end marker is not a row.
        assert_eq!(copy_in("copy t from stdin", 0, b"1\n2\n3", 2)["rows"], 3);
        // A backslash before a newline makes it data, not a row end; `\\` is one backslash.
        assert_eq!(
            copy_in("copy t from stdin", 0, b"a\\\nb\nc\\\\\nd\n", 1)["rows"],
            3
        );
        assert_eq!(
            copy_in("copy t from stdin", 0, b"1\n2\n3\n\\.\n", 3)["rows"],
            3
        );
        // CSV: a newline inside quotes is data; a header line is not a row.
        let csv = b"a,\"multi\nline\"\nb,x\nc,\"q\"\"\n\"\n";
        let e = copy_in("COPY t FROM STDIN (FORMAT csv)", 0, csv, 4);
        assert_eq!(
            (e["rows"].clone(), e["format"].clone()),
            (json!(3), json!("csv"))
        );
        let e = copy_in("\\copy t from stdin csv header", 0, b"h1,h2\n1,2\n", 3);
        assert_eq!(e["rows"], 1);
        // Binary: rows are not counted, and the timeline says so.
        let e = copy_in(
            "COPY t FROM STDIN (FORMAT binary)",
            1,
            b"PGCOPY\n\xff\r\n\0",
            4,
        );
        assert_eq!(
            (e["rows"].clone(), e["format"].clone()),
            (json!(null), json!("binary"))
        );
    }

    #[test]
    fn a_message_larger_than_a_frame_is_read_whole() {
        let mut out = crate::pg::wire::message(b'T', b"\0\x01x\0");
        let mut row = vec![0, 1];
        row.extend_from_slice(&5000i32.to_be_bytes());
        row.extend(std::iter::repeat_n(b'x', 5000));
        out.extend(crate::pg::wire::message(b'D', &row));
        out.extend(crate::pg::wire::message(b'D', &row));
        out.extend(crate::pg::wire::message(b'C', b"SELECT 2\0"));
        let big_query = format!("select '{}' -- {}\0", "y".repeat(3000), "z");
        let mut frames = cut(
            Stream::In,
            &crate::pg::wire::message(b'Q', big_query.as_bytes()),
            1000,
        );
        frames.extend(cut(Stream::Out, &out, 999));
        let ev = events(&frames);
        assert_eq!(ev.len(), 2, "{ev:?}");
        assert_eq!(
            ev[0]["sql"].as_str().map(str::len),
            Some(big_query.len() - 1)
        );
        assert_eq!(ev[1]["rows_returned"], 2);
    }

    #[test]
    fn password_literals_and_messages_are_marked_redacted() {
        let frames = vec![
            frame(Stream::In, b'Q', b"ALTER ROLE x PASSWORD '************'\0"),
            frame(Stream::In, b'Q', b"alter role y password 'old-recording'\0"),
            frame(Stream::In, b'P', b"\0create role z password 'p'\0\0\0"),
            frame(Stream::In, b'p', b"*****\0"),
            frame(Stream::In, b'Q', b"ALTER ROLE x PASSWORD NULL\0"),
        ];
        let ev = events(&frames);
        assert_eq!(
            ev[0]["redacted"],
            json!([{"kind": "password-literal", "bytes": 12}])
        );
        assert_eq!(ev[1]["sql"], "alter role y password '*************'");
        assert_eq!(ev[2]["redacted"][0]["bytes"], 1);
        assert_eq!(ev[3]["event"], "password_message");
        assert_eq!(ev[3]["redacted"][0]["kind"], "password-message");
        assert!(ev[4].get("redacted").is_none());
    }

    #[test]
    fn blank_statements_make_no_action_events() {
        let mut b = crate::pg::wire::message(b'Q', b";\0");
        b.extend(crate::pg::wire::message(b'Q', b"  \n\0"));
        b.extend(crate::pg::wire::message(b'Q', b"-- just a comment\0"));
        b.extend(crate::pg::wire::message(b'P', b"\0\0\0\0"));
        b.extend(crate::pg::wire::message(b'Q', b"select 1;\0"));
        assert_eq!(statements(&b), ["select 1;"]);
    }

    #[test]
    fn random_frames_never_panic_the_timeline() {
        let mut seed = 0x51_7cc1_b727_220au64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        const TAGS: &[u8] = b"QPBECFdcfGHDNXpSZT";
        for _ in 0..20_000 {
            let mut frames = Vec::new();
            for _ in 0..(next() % 8) {
                let r = next();
                let mut data = Vec::new();
                for _ in 0..(r % 4) {
                    let body: Vec<u8> = (0..(next() % 24)).map(|_| next() as u8).collect();
                    let mut m =
                        crate::pg::wire::message(TAGS[(next() as usize) % TAGS.len()], &body);
                    if next() % 5 == 0 {
                        // A lying length, or a cut message.
                        let at = 1 + (next() as usize) % 4;
                        m[at] = next() as u8;
                        m.truncate((next() as usize) % (m.len() + 1));
                    }
                    data.extend(m);
                }
                frames.push(Frame {
                    stream: if r & 16 == 0 { Stream::In } else { Stream::Out },
                    time_us: r >> 40,
                    data,
                });
            }
            let _ = events(&frames);
            if let Some(f) = frames.first() {
                let _ = statements(&f.data);
            }
        }
    }
}
