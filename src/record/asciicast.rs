//! Encoding, parsing and terminal replay of asciicast v2 session recordings.
//!
//! An asciicast v2 file is newline-delimited JSON. The first line is a header
//! object such as `{"version":2,"width":80,"height":24,"timestamp":1700000000}`
//! and every following line is an event `[time, code, data]`, where `time` is
//! seconds since the start of the recording and `code` is one of `"o"`
//! (output), `"i"` (input), `"r"` (resize, data `"COLSxROWS"`) or `"m"`
//! (marker, data is a label). Our own metadata (identity, target, grant and so
//! on) travels in the header under the key `"breakglass"`.
//!
//! Everything here is pure: parsing never panics on any input, and replay takes
//! its sleeping function as a parameter so that tests can observe the pauses.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::time::Duration;

use serde_json::{Map, Value};

/// The key under which `Header::extra` is stored in the header line.
const EXTRA_KEY: &str = "breakglass";

/// The header line of an asciicast v2 recording.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Header {
    /// Terminal width in columns.
    pub width: u32,
    /// Terminal height in rows.
    pub height: u32,
    /// Start of the recording in seconds since the Unix epoch.
    pub timestamp: i64,
    /// The command that was recorded, if it was not an interactive shell.
    pub command: Option<String>,
    /// A human-readable title.
    pub title: Option<String>,
    /// Captured environment variables such as `TERM` and `SHELL`.
    pub env: BTreeMap<String, String>,
    /// Our own metadata, stored under the key `"breakglass"`.
    pub extra: Option<Value>,
}

/// The kind of an event line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// Data written by the program to the terminal (`"o"`).
    Output,
    /// Data typed by the user (`"i"`).
    Input,
    /// A terminal resize with data `"COLSxROWS"` (`"r"`).
    Resize,
    /// A marker with a label (`"m"`).
    Marker,
}

impl EventKind {
    /// Returns the one-letter code used in event lines.
    pub fn code(self) -> &'static str {
        match self {
            EventKind::Output => "o",
            EventKind::Input => "i",
            EventKind::Resize => "r",
            EventKind::Marker => "m",
        }
    }

    /// Returns the kind for a one-letter code, or `None` if it is unknown.
    pub fn from_code(code: &str) -> Option<EventKind> {
        match code {
            "o" => Some(EventKind::Output),
            "i" => Some(EventKind::Input),
            "r" => Some(EventKind::Resize),
            "m" => Some(EventKind::Marker),
            _ => None,
        }
    }
}

/// One parsed event line.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// Seconds since the start of the recording.
    pub time: f64,
    /// What kind of event this is.
    pub kind: EventKind,
    /// The event payload.
    pub data: String,
}

/// Encodes a header as one JSON line ending in `'\n'`.
pub fn encode_header(h: &Header) -> Vec<u8> {
    // The line is assembled by hand so that "version" comes first, as the
    // format expects, regardless of how serde_json orders map keys.
    let mut line = format!(
        "{{\"version\":2,\"width\":{},\"height\":{},\"timestamp\":{}",
        h.width, h.height, h.timestamp
    );
    if let Some(command) = &h.command {
        line.push_str(",\"command\":");
        line.push_str(&json_string(command));
    }
    if let Some(title) = &h.title {
        line.push_str(",\"title\":");
        line.push_str(&json_string(title));
    }
    if !h.env.is_empty() {
        let env: Map<String, Value> = h
            .env
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        line.push_str(",\"env\":");
        line.push_str(&Value::Object(env).to_string());
    }
    if let Some(extra) = &h.extra {
        line.push_str(",\"");
        line.push_str(EXTRA_KEY);
        line.push_str("\":");
        line.push_str(&extra.to_string());
    }
    line.push_str("}\n");
    line.into_bytes()
}

/// Encodes one event as a JSON line ending in `'\n'`, such as
/// `[1.234567, "o", "hi\r\n"]`.
///
/// The time is printed with at most six decimal places. A negative or
/// non-finite time is written as `0.0` so that the line stays valid JSON.
pub fn encode_event(time_secs: f64, kind: EventKind, data: &str) -> Vec<u8> {
    format!(
        "[{}, \"{}\", {}]\n",
        format_time(time_secs),
        kind.code(),
        json_string(data)
    )
    .into_bytes()
}

/// Returns `s` as a JSON string literal with all control characters escaped.
fn json_string(s: &str) -> String {
    // Displaying a `Value` cannot fail, unlike `serde_json::to_string`.
    Value::String(s.to_owned()).to_string()
}

/// Formats a time in seconds with at most six decimal places.
fn format_time(t: f64) -> String {
    let t = if t.is_finite() && t > 0.0 { t } else { 0.0 };
    // A finite float printed with a precision always contains a '.'.
    let mut s = format!("{t:.6}");
    while s.ends_with('0') && !s.ends_with(".0") {
        s.pop();
    }
    s
}

/// A streaming UTF-8 decoder for raw terminal bytes.
///
/// Terminal output arrives in arbitrary chunks, so a multi-byte character can
/// be split across two reads. `push` returns only complete text and keeps an
/// incomplete trailing sequence (at most three bytes) for the next call.
/// Invalid bytes become U+FFFD exactly as `String::from_utf8_lossy` would
/// replace them if it saw the whole stream at once.
#[derive(Clone, Debug, Default)]
pub struct Utf8Carry {
    pending: Vec<u8>,
}

impl Utf8Carry {
    /// Creates a decoder with nothing pending.
    pub fn new() -> Self {
        Self::default()
    }

    /// Decodes `bytes` after any pending bytes and returns the complete text.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        let joined;
        let mut input: &[u8] = if self.pending.is_empty() {
            bytes
        } else {
            let mut v = std::mem::take(&mut self.pending);
            v.extend_from_slice(bytes);
            joined = v;
            &joined
        };
        let mut out = String::with_capacity(input.len());
        loop {
            match std::str::from_utf8(input) {
                Ok(valid) => {
                    out.push_str(valid);
                    return out;
                }
                Err(e) => {
                    let (valid, rest) = input.split_at(e.valid_up_to());
                    // The prefix up to `valid_up_to` is valid UTF-8 by the
                    // contract of `Utf8Error`, so this never loses data.
                    out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                    match e.error_len() {
                        Some(n) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            input = rest.get(n..).unwrap_or_default();
                        }
                        None => {
                            // The rest is the start of a sequence that may be
                            // completed by the next chunk.
                            self.pending.extend_from_slice(rest);
                            return out;
                        }
                    }
                }
            }
        }
    }

    /// Flushes any leftover bytes, replacing them with U+FFFD.
    pub fn finish(&mut self) -> String {
        let rest = std::mem::take(&mut self.pending);
        String::from_utf8_lossy(&rest).into_owned()
    }
}

/// What went wrong while parsing a recording.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParseErrorKind {
    /// The text has no header line.
    MissingHeader,
    /// A line is not valid JSON; the payload is serde_json's message.
    Json(String),
    /// The header line is not a JSON object.
    HeaderNotObject,
    /// The header's version is not 2; the payload is the version as written.
    UnsupportedVersion(String),
    /// A required header field is missing or has the wrong type.
    BadHeaderField(&'static str),
    /// An event line is not an array `[number, string, string]`.
    BadEvent,
    /// An event time is negative.
    NegativeTime,
    /// An event has a code other than `o`, `i`, `r` or `m`.
    UnknownCode(String),
}

/// An error found while parsing a recording, with its 1-based line number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    /// The 1-based line number where the problem was found.
    pub line: usize,
    /// What the problem was.
    pub kind: ParseErrorKind,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: ", self.line)?;
        match &self.kind {
            ParseErrorKind::MissingHeader => write!(f, "missing header"),
            ParseErrorKind::Json(msg) => write!(f, "invalid json: {msg}"),
            ParseErrorKind::HeaderNotObject => write!(f, "header is not a json object"),
            ParseErrorKind::UnsupportedVersion(v) => {
                write!(f, "unsupported version {v}, expected 2")
            }
            ParseErrorKind::BadHeaderField(name) => {
                write!(f, "header field \"{name}\" is missing or invalid")
            }
            ParseErrorKind::BadEvent => write!(f, "expected [time, code, data]"),
            ParseErrorKind::NegativeTime => write!(f, "event time is negative"),
            ParseErrorKind::UnknownCode(code) => write!(f, "unknown event code {code:?}"),
        }
    }
}

impl std::error::Error for ParseError {}

/// Parses a whole asciicast v2 recording.
///
/// Blank lines are skipped. Unknown header keys are ignored, and optional
/// header fields of the wrong type are treated as absent.
pub fn parse(text: &str) -> Result<(Header, Vec<Event>), ParseError> {
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l))
        .filter(|(_, l)| !l.trim().is_empty());
    let Some((header_line, header_text)) = lines.next() else {
        return Err(ParseError {
            line: 1,
            kind: ParseErrorKind::MissingHeader,
        });
    };
    let header = parse_header(header_text).map_err(|kind| ParseError {
        line: header_line,
        kind,
    })?;
    let mut events = Vec::new();
    for (line, l) in lines {
        events.push(parse_event(l).map_err(|kind| ParseError { line, kind })?);
    }
    Ok((header, events))
}

/// Parses the header line.
fn parse_header(line: &str) -> Result<Header, ParseErrorKind> {
    let value: Value =
        serde_json::from_str(line).map_err(|e| ParseErrorKind::Json(e.to_string()))?;
    let Value::Object(obj) = value else {
        return Err(ParseErrorKind::HeaderNotObject);
    };
    match obj.get("version") {
        Some(v) if v.as_u64() == Some(2) => {}
        Some(v) => return Err(ParseErrorKind::UnsupportedVersion(v.to_string())),
        None => return Err(ParseErrorKind::BadHeaderField("version")),
    }
    let dimension = |name: &'static str| {
        obj.get(name)
            .and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
            .ok_or(ParseErrorKind::BadHeaderField(name))
    };
    let width = dimension("width")?;
    let height = dimension("height")?;
    let timestamp = match obj.get("timestamp") {
        None | Some(Value::Null) => 0,
        Some(v) => match (v.as_i64(), v.as_f64()) {
            (Some(n), _) => n,
            // A float timestamp is truncated; `as` saturates and cannot panic.
            (None, Some(f)) if f.is_finite() => f as i64,
            _ => return Err(ParseErrorKind::BadHeaderField("timestamp")),
        },
    };
    let text_field = |name: &str| obj.get(name).and_then(Value::as_str).map(str::to_owned);
    let env = match obj.get("env") {
        Some(Value::Object(map)) => map
            .iter()
            .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_owned())))
            .collect(),
        _ => BTreeMap::new(),
    };
    let extra = match obj.get(EXTRA_KEY) {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.clone()),
    };
    Ok(Header {
        width,
        height,
        timestamp,
        command: text_field("command"),
        title: text_field("title"),
        env,
        extra,
    })
}

/// Parses one event line.
fn parse_event(line: &str) -> Result<Event, ParseErrorKind> {
    let value: Value =
        serde_json::from_str(line).map_err(|e| ParseErrorKind::Json(e.to_string()))?;
    let Some([time, code, data]) = value.as_array().map(Vec::as_slice) else {
        return Err(ParseErrorKind::BadEvent);
    };
    let (Some(time), Some(code), Some(data)) = (time.as_f64(), code.as_str(), data.as_str()) else {
        return Err(ParseErrorKind::BadEvent);
    };
    if time < 0.0 {
        return Err(ParseErrorKind::NegativeTime);
    }
    let kind =
        EventKind::from_code(code).ok_or_else(|| ParseErrorKind::UnknownCode(code.into()))?;
    Ok(Event {
        time,
        kind,
        data: data.to_owned(),
    })
}

/// Writes the output events to `out` in real time.
///
/// Only `"o"` events are written, each followed by a flush. Before each one,
/// `sleep` is asked to wait for the time since the previous output event (or
/// since the start, for the first one), capped at `idle_limit` if given and
/// divided by `speed`. A `speed` that is not a positive finite number is
/// treated as 1.0. Times that go backwards cause no wait.
pub fn replay<W: Write>(
    events: &[Event],
    out: &mut W,
    speed: f64,
    idle_limit: Option<f64>,
    sleep: &mut dyn FnMut(Duration),
) -> std::io::Result<()> {
    let speed = if speed.is_finite() && speed > 0.0 {
        speed
    } else {
        1.0
    };
    let mut previous = 0.0_f64;
    for event in events.iter().filter(|e| e.kind == EventKind::Output) {
        let mut delta = event.time - previous;
        if event.time.is_finite() {
            previous = event.time;
        }
        if let Some(limit) = idle_limit {
            // `f64::min` ignores a NaN limit, so a NaN limit means no limit.
            delta = delta.min(limit);
        }
        let wait = delta / speed;
        if wait.is_finite() && wait > 0.0 {
            // The wait is positive and finite here, so conversion can only
            // fail by overflow, in which case the longest wait is used.
            sleep(Duration::try_from_secs_f64(wait).unwrap_or(Duration::MAX));
        }
        out.write_all(event.data.as_bytes())?;
        out.flush()?;
    }
    Ok(())
}

/// Concatenates the data of all output events.
pub fn output_text(events: &[Event]) -> String {
    events
        .iter()
        .filter(|e| e.kind == EventKind::Output)
        .map(|e| e.data.as_str())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic xorshift generator for property-style tests.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Returns random bytes mixing ASCII, control characters, valid
    /// multi-byte characters, truncated sequences and invalid bytes.
    fn random_bytes(rng: &mut Rng) -> Vec<u8> {
        let pieces: [&[u8]; 10] = [
            b"a",
            b"\r\n",
            b"\x1b[1;31m",
            "é".as_bytes(),
            "€".as_bytes(),
            "😀".as_bytes(),
            &"😀".as_bytes()[..2],
            &"€".as_bytes()[..1],
            b"\xff",
            b"\xed\xa0\x80",
        ];
        let mut v = Vec::new();
        for _ in 0..rng.below(40) {
            if rng.below(4) == 0 {
                v.push(rng.next() as u8);
            } else {
                v.extend_from_slice(pieces[rng.below(pieces.len())]);
            }
        }
        v
    }

    #[test]
    fn event_encoding_table() {
        fn check(time: f64, kind: EventKind, data: &str, want: &str) {
            let got = encode_event(time, kind, data);
            assert_eq!(
                String::from_utf8_lossy(&got),
                want,
                "time {time} data {data:?}"
            );
        }
        let cases: &[(f64, EventKind, &str, &str)] = &[
            (
                1.234567,
                EventKind::Output,
                "hi\r\n",
                "[1.234567, \"o\", \"hi\\r\\n\"]\n",
            ),
            (1.5, EventKind::Input, "x", "[1.5, \"i\", \"x\"]\n"),
            (
                0.0,
                EventKind::Resize,
                "120x40",
                "[0.0, \"r\", \"120x40\"]\n",
            ),
            (2.0000004, EventKind::Marker, "m1", "[2.0, \"m\", \"m1\"]\n"),
            (
                0.1234567,
                EventKind::Output,
                "",
                "[0.123457, \"o\", \"\"]\n",
            ),
            (-3.0, EventKind::Output, "a", "[0.0, \"o\", \"a\"]\n"),
            (f64::NAN, EventKind::Output, "a", "[0.0, \"o\", \"a\"]\n"),
            (
                1.0,
                EventKind::Output,
                "\x1b\"\\",
                "[1.0, \"o\", \"\\u001b\\\"\\\\\"]\n",
            ),
        ];
        for &(time, kind, data, want) in cases {
            check(time, kind, data, want);
        }
    }

    #[test]
    fn header_round_trip_and_unknown_keys() {
        let mut env = BTreeMap::new();
        env.insert("TERM".to_owned(), "xterm-256color".to_owned());
        let h = Header {
            width: 120,
            height: 40,
            timestamp: 1_700_000_000,
            command: Some("bash -l".to_owned()),
            title: Some("a \"quoted\" title".to_owned()),
            env,
            extra: Some(serde_json::json!({"identity": "alice", "grant": 7})),
        };
        let line = encode_header(&h);
        assert_eq!(line.last(), Some(&b'\n'));
        assert!(line.starts_with(b"{\"version\":2,"));
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
        let text = String::from_utf8_lossy(&line).into_owned();
        let (parsed, events) = parse(&text).map_err(|e| e.to_string()).unwrap_or_else(|e| {
            panic!("parse failed: {e}");
        });
        assert_eq!(parsed, h);
        assert!(events.is_empty());

        let minimal = "{\"version\":2,\"width\":80,\"height\":24,\"duration\":1.5,\
                       \"idle_time_limit\":2,\"theme\":{\"fg\":\"#fff\"},\"env\":{\"A\":1}}\n";
        let (parsed, _) = parse(minimal).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            parsed,
            Header {
                width: 80,
                height: 24,
                ..Header::default()
            }
        );
    }

    /// The events expected from a parse, as (time, kind, data).
    type Events<'a> = Vec<(f64, EventKind, &'a str)>;

    #[test]
    fn parse_table() {
        fn check(text: &str, want: Result<Events<'_>, &str>) {
            let got = parse(text)
                .map(|(_, events)| events)
                .map_err(|e| e.to_string());
            match (got, want) {
                (Ok(events), Ok(want)) => {
                    let got: Events<'_> = events
                        .iter()
                        .map(|e| (e.time, e.kind, e.data.as_str()))
                        .collect();
                    assert_eq!(got, want, "text {text:?}");
                }
                (Err(e), Err(want)) => assert_eq!(e, want, "text {text:?}"),
                (got, want) => panic!("text {text:?}: got {got:?}, want {want:?}"),
            }
        }
        let h = "{\"version\":2,\"width\":80,\"height\":24}";
        let cases: Vec<(String, Result<Events<'_>, &str>)> = vec![
            (format!("{h}\n"), Ok(vec![])),
            (
                format!("{h}\n[0.5, \"o\", \"hi\"]\n[1, \"r\", \"100x30\"]\n\n\n"),
                Ok(vec![
                    (0.5, EventKind::Output, "hi"),
                    (1.0, EventKind::Resize, "100x30"),
                ]),
            ),
            (
                format!("{h}\r\n[0.5, \"i\", \"ls\\r\"]\r\n[2, \"m\", \"x\"]\r\n"),
                Ok(vec![
                    (0.5, EventKind::Input, "ls\r"),
                    (2.0, EventKind::Marker, "x"),
                ]),
            ),
            (String::new(), Err("line 1: missing header")),
            ("\n \n".to_owned(), Err("line 1: missing header")),
            (
                format!("{h}\n[0.5, \"o\", \"hi\"]\n[1, \"x\", \"y\"]\n"),
                Err("line 3: unknown event code \"x\""),
            ),
            (
                format!("{h}\n[0.5, \"o\"]\n"),
                Err("line 2: expected [time, code, data]"),
            ),
            (
                format!("{h}\n{{\"a\":1}}\n"),
                Err("line 2: expected [time, code, data]"),
            ),
            (
                format!("{h}\n[\"1\", \"o\", \"x\"]\n"),
                Err("line 2: expected [time, code, data]"),
            ),
            (
                format!("{h}\n[-1, \"o\", \"x\"]\n"),
                Err("line 2: event time is negative"),
            ),
            (
                "{\"version\":1,\"width\":80,\"height\":24}".to_owned(),
                Err("line 1: unsupported version 1, expected 2"),
            ),
            (
                "{\"version\":2,\"height\":24}".to_owned(),
                Err("line 1: header field \"width\" is missing or invalid"),
            ),
            (
                "{\"version\":2,\"width\":80,\"height\":-1}".to_owned(),
                Err("line 1: header field \"height\" is missing or invalid"),
            ),
            (
                "[1,2,3]".to_owned(),
                Err("line 1: header is not a json object"),
            ),
        ];
        for (text, want) in cases {
            check(&text, want);
        }
        let err = parse(&format!("{h}\nnot json\n"))
            .map(|_| ())
            .map_err(|e| e.to_string());
        assert!(
            matches!(&err, Err(m) if m.starts_with("line 2: invalid json: ")),
            "{err:?}"
        );
    }

    #[test]
    fn utf8_carry_table() {
        fn check(chunks: &[&[u8]], want: &str) {
            let mut carry = Utf8Carry::new();
            let mut got: String = chunks.iter().map(|c| carry.push(c)).collect();
            got.push_str(&carry.finish());
            assert_eq!(got, want, "chunks {chunks:?}");
        }
        let euro = "€".as_bytes();
        let cases: &[(&[&[u8]], &str)] = &[
            (&[b"hello"], "hello"),
            (&[&euro[..1], &euro[1..]], "€"),
            (&[&euro[..1], &euro[1..2], &euro[2..]], "€"),
            (&[&euro[..2]], "\u{fffd}"),
            (&[b"a\xffb"], "a\u{fffd}b"),
            (&[b"\xe2\x82", b"x"], "\u{fffd}x"),
            (&[b"\xed", b"\xa0\x80"], "\u{fffd}\u{fffd}\u{fffd}"),
            (&[b"", b""], ""),
        ];
        for &(chunks, want) in cases {
            check(chunks, want);
        }
        // Only complete text is returned before the rest of a character arrives.
        let mut carry = Utf8Carry::new();
        assert_eq!(carry.push(b"ab\xf0\x9f"), "ab");
        assert_eq!(carry.push(b"\x98\x80!"), "😀!");
        assert_eq!(carry.finish(), "");
    }

    #[test]
    fn utf8_carry_matches_lossy_on_any_split() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for _ in 0..3000 {
            let bytes = random_bytes(&mut rng);
            let want = String::from_utf8_lossy(&bytes).into_owned();
            let mut carry = Utf8Carry::new();
            let mut got = String::new();
            let mut rest = bytes.as_slice();
            while !rest.is_empty() {
                let n = rng.below(rest.len() + 1);
                let (chunk, tail) = rest.split_at(n);
                got.push_str(&carry.push(chunk));
                rest = tail;
            }
            got.push_str(&carry.finish());
            assert_eq!(got, want, "bytes {bytes:?}");
        }
    }

    #[test]
    fn events_round_trip_through_parse() {
        let mut rng = Rng(42);
        let mut text = String::from_utf8_lossy(&encode_header(&Header::default())).into_owned();
        let mut want = Vec::new();
        for i in 0..500 {
            let data = String::from_utf8_lossy(&random_bytes(&mut rng)).into_owned();
            let time = i as f64 * 0.25 + (rng.below(1_000_000) as f64) / 1e7;
            let kind = [
                EventKind::Output,
                EventKind::Input,
                EventKind::Resize,
                EventKind::Marker,
            ][rng.below(4)];
            text.push_str(&String::from_utf8_lossy(&encode_event(time, kind, &data)));
            want.push((time, kind, data));
        }
        let (_, events) = parse(&text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(events.len(), want.len());
        for (event, (time, kind, data)) in events.iter().zip(&want) {
            assert!((event.time - time).abs() < 1e-6, "{} vs {time}", event.time);
            assert_eq!(event.kind, *kind);
            assert_eq!(&event.data, data);
        }
    }

    #[test]
    fn replay_table() {
        fn ev(time: f64, kind: EventKind, data: &str) -> Event {
            Event {
                time,
                kind,
                data: data.to_owned(),
            }
        }
        fn check(events: &[Event], speed: f64, idle: Option<f64>, want_sleeps: &[f64], want: &str) {
            let mut out = Vec::new();
            let mut sleeps = Vec::new();
            let result = replay(events, &mut out, speed, idle, &mut |d| {
                sleeps.push(d.as_secs_f64())
            });
            assert!(result.is_ok());
            assert_eq!(String::from_utf8_lossy(&out), want);
            assert_eq!(sleeps.len(), want_sleeps.len(), "sleeps {sleeps:?}");
            for (got, want) in sleeps.iter().zip(want_sleeps) {
                assert!(
                    (got - want).abs() < 1e-9,
                    "sleeps {sleeps:?} want {want_sleeps:?}"
                );
            }
        }
        let events = vec![
            ev(0.5, EventKind::Output, "a"),
            ev(1.0, EventKind::Input, "x"),
            ev(1.5, EventKind::Output, "b"),
            ev(11.5, EventKind::Output, "c"),
            ev(11.5, EventKind::Marker, "m"),
            ev(10.0, EventKind::Output, "d"),
        ];
        check(&events, 1.0, None, &[0.5, 1.0, 10.0], "abcd");
        check(&events, 2.0, None, &[0.25, 0.5, 5.0], "abcd");
        check(&events, 1.0, Some(2.0), &[0.5, 1.0, 2.0], "abcd");
        check(&events, 2.0, Some(2.0), &[0.25, 0.5, 1.0], "abcd");
        check(&events, 0.0, None, &[0.5, 1.0, 10.0], "abcd");
        check(&events, -1.0, None, &[0.5, 1.0, 10.0], "abcd");
        check(&events, f64::NAN, Some(f64::NAN), &[0.5, 1.0, 10.0], "abcd");
        check(&events, f64::INFINITY, Some(-1.0), &[], "abcd");
        let max = Duration::MAX.as_secs_f64();
        check(&events, 1e-300, None, &[max, max, max], "abcd");
        check(&[ev(f64::NAN, EventKind::Output, "z")], 1.0, None, &[], "z");
        assert_eq!(output_text(&events), "abcd");
    }
}
