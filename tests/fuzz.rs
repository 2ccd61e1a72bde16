//! Fuzzed parsers: every parser a client, a target or a file can reach gets mutated valid
//! inputs (bit flips, truncation, splices, random bytes, length fields set to extremes) and
//! must return, never panic. Stable Rust, no extra crates: a seeded xorshift drives the
//! mutations, so a failure prints its seed and case and can be replayed.
//!
//! `cargo test --test fuzz` runs `BREAKGLASS_FUZZ_CASES` inputs per parser (default 2,000, the
//! short pass CI runs); the long run is
//! `BREAKGLASS_FUZZ_CASES=1000000 cargo test --release --test fuzz -- --nocapture`.
//! `BREAKGLASS_FUZZ_SEED` replays one seed.
//!
//! Every input's allocations are measured too (a counting global allocator, per thread): the
//! most a parser holds at once above what it held before the input must stay within
//! [`ALLOC_LIMIT`] plus [`ALLOC_PER_BYTE`] times the input's length, so no length field
//! makes a parser reserve what the input does not carry. Each parser's worst is printed.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

/// Bytes a parser may hold at once for any input, beyond [`ALLOC_PER_BYTE`] per input byte.
const ALLOC_LIMIT: isize = 256 << 10;
/// Bytes a parser may hold per byte of input (copies, decoded forms, growth slack).
const ALLOC_PER_BYTE: isize = 16;

/// The system allocator, counting this thread's live bytes and their peak.
struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn note(delta: isize) {
    // try_with: nothing to count while the thread's locals are being torn down.
    let _ = LIVE.try_with(|l| {
        let v = l.get() + delta;
        l.set(v);
        let _ = PEAK.try_with(|p| p.set(p.get().max(v)));
    });
}

// SAFETY: every call goes to `System` unchanged; only counters are updated beside it.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            note(l.size() as isize);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            note(l.size() as isize);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        note(-(l.size() as isize));
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            note(new as isize - l.size() as isize);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f` and returns the most bytes this thread held at once during it, above what it
/// held before.
fn peak_during(f: impl FnOnce()) -> isize {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    f();
    PEAK.with(Cell::get) - base
}

use breakglass::pg::{log as pglog, redact, scram, wire};
use breakglass::record::{asciicast, transfer};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

fn cases() -> u64 {
    std::env::var("BREAKGLASS_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000)
}

fn seed() -> u64 {
    std::env::var("BREAKGLASS_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x9e37_79b9_7f4a_7c15)
}

/// One mutation of `seed` (up to a few stacked edits).
fn mutate(r: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..1 + r.below(4) {
        match r.below(8) {
            0 if !b.is_empty() => {
                let i = r.below(b.len());
                b[i] ^= 1 << r.below(8);
            }
            1 if !b.is_empty() => {
                let i = r.below(b.len());
                b[i] = r.next() as u8;
            }
            2 => {
                let n = r.below(b.len() + 1);
                b.truncate(n);
            }
            3 => {
                let i = r.below(b.len() + 1);
                let n = r.below(16);
                let extra: Vec<u8> = (0..n).map(|_| r.next() as u8).collect();
                b.splice(i..i, extra);
            }
            4 if b.len() >= 4 => {
                // A length field set to an extreme.
                let i = r.below(b.len() - 3);
                let v: [u8; 4] = match r.below(4) {
                    0 => [0x7f, 0xff, 0xff, 0xff],
                    1 => [0xff, 0xff, 0xff, 0xff],
                    2 => [0, 0, 0, 0],
                    _ => [0x80, 0, 0, 0],
                };
                b[i..i + 4].copy_from_slice(&v);
            }
            5 if !b.is_empty() => {
                // Splice a copy of a range (repeated structure).
                let i = r.below(b.len());
                let j = (i + r.below(64)).min(b.len());
                let part = b[i..j].to_vec();
                let at = r.below(b.len() + 1);
                b.splice(at..at, part);
            }
            6 => {
                let special: &[u8] = match r.below(6) {
                    0 => b"\0",
                    1 => b"\x1b[",
                    2 => b"'",
                    3 => b"\"",
                    4 => b"\xff\xfe",
                    _ => b"--",
                };
                let at = r.below(b.len() + 1);
                b.splice(at..at, special.iter().copied());
            }
            _ => {
                let n = r.below(32);
                b = (0..n).map(|_| r.next() as u8).collect();
            }
        }
    }
    b
}

/// Runs `f` on `cases()` mutations of the seeds; fails with the case on a panic.
fn fuzz(name: &str, seeds: &[Vec<u8>], mut f: impl FnMut(&[u8])) {
    let n = cases();
    let s = seed();
    let mut r = Rng(s ^ name.bytes().fold(0u64, |a, b| a.rotate_left(5) ^ b as u64) | 1);
    let t = Instant::now();
    let mut worst = 0isize;
    for i in 0..n {
        let input = if i < seeds.len() as u64 {
            seeds[i as usize].clone()
        } else {
            let base = &seeds[r.below(seeds.len())];
            mutate(&mut r, base)
        };
        let mut result = Ok(());
        let held = peak_during(|| result = catch_unwind(AssertUnwindSafe(|| f(&input))));
        if result.is_err() {
            panic!(
                "{name}: panic on case {i} (seed {s}): {:?}",
                String::from_utf8_lossy(&input)
            );
        }
        let limit = ALLOC_LIMIT + ALLOC_PER_BYTE * input.len() as isize;
        assert!(
            held <= limit,
            "{name}: case {i} (seed {s}) held {held} bytes at once for {} input bytes (limit {limit}): {:?}",
            input.len(),
            String::from_utf8_lossy(&input[..input.len().min(200)])
        );
        worst = worst.max(held);
    }
    eprintln!(
        "fuzz {name}: {n} inputs, no panic, at most {worst} bytes held at once, {:?}",
        t.elapsed()
    );
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    futures::executor::block_on(f)
}

#[test]
fn postgres_framing_and_the_startup_packet() {
    let mut startup = 0i32.to_be_bytes().to_vec();
    startup.extend_from_slice(&wire::PROTOCOL_3.to_be_bytes());
    startup.extend_from_slice(b"user\0alice\0database\0orders-db\0\0");
    let l = startup.len() as i32;
    startup[..4].copy_from_slice(&l.to_be_bytes());
    let mut ssl = 8i32.to_be_bytes().to_vec();
    ssl.extend_from_slice(&wire::SSL_REQUEST.to_be_bytes());
    fuzz("startup", &[startup, ssl], |b| {
        let mut s = b;
        if let Ok(st) = block_on(wire::read_startup(&mut s)) {
            let _ = format!("{st:?}");
        }
        let _ = wire::startup_params(b);
    });
    let batch = [
        wire::message(b'Q', b"select 1\0"),
        wire::message(b'P', b"s1\0select $1\0\0\x01\0\0\0\x17"),
        wire::message(
            b'B',
            b"\0s1\0\0\x01\0\x01\0\x01\0\0\0\x04\0\0\0\x29\0\x01\0\x01",
        ),
        wire::message(b'p', b"SCRAM-SHA-256\0\0\0\0\x05n,,n="),
        wire::message(b'd', b"1\t2\n"),
        wire::message(b'X', b""),
    ]
    .concat();
    let backend = [
        wire::auth(10, b"SCRAM-SHA-256\0\0"),
        wire::message(
            b'T',
            b"\0\x01a\0\0\0\0\0\0\0\0\0\0\x17\0\x04\xff\xff\xff\xff\0\0",
        ),
        wire::message(b'D', b"\0\x01\0\0\0\x0242"),
        wire::message(b'C', b"SELECT 1\0"),
        wire::message(b'Z', b"I"),
        wire::error("FATAL", "28P01", "password authentication failed"),
    ]
    .concat();
    fuzz("frames", &[batch.clone(), backend], |b| {
        let mut s = b;
        while let Ok(m) = block_on(wire::read_message(&mut s, 1 << 20)) {
            let _ = wire::cstr(m.body());
        }
    });
    fuzz(
        "sql-statements-and-redaction",
        &[
            batch,
            wire::message(b'Q', b"ALTER ROLE x PASSWORD 'secret'\0"),
        ],
        |b| {
            let _ = pglog::statements(b);
            if let Some(m) = redact::mask_frontend(b) {
                let _ = m;
            }
            let mut sql = b.to_vec();
            let _ = redact::mask_sql(&mut sql);
            let _ = redact::password_literals(b);
            let _ = redact::is_blank(b);
        },
    );
}

#[test]
fn scram_messages_from_either_side() {
    let v = scram::Verifier::parse(&breakglass::credential::verifier("pw")).expect("verifier");
    let (mut client, first) = scram::ClientExchange::start("pw", scram::Binding::None);
    let (server, server_first) = scram::ServerExchange::start(&first, v.clone()).expect("start");
    let fin = client.respond(&server_first).expect("respond");
    let server_final = server.finish(&fin).expect("finish");
    fuzz(
        "scram-server",
        &[first.clone().into_bytes(), fin.clone().into_bytes()],
        |b| {
            let t = text(b);
            if let Ok((ex, _)) = scram::ServerExchange::start(&t, v.clone()) {
                let _ = ex.finish(&t);
            }
            if let Ok((ex, sf)) = scram::ServerExchange::start(&first, v.clone()) {
                let _ = sf;
                let _ = ex.finish(&t);
            }
        },
    );
    // A server-first message with a small iteration count, so a million cases stay short.
    let cheap_first = server_first
        .split(',')
        .map(|p| if p.starts_with("i=") { "i=16" } else { p })
        .collect::<Vec<_>>()
        .join(",");
    fuzz(
        "scram-client",
        &[cheap_first.into_bytes(), server_final.into_bytes()],
        |b| {
            let t = text(b);
            // The iteration count is capped at 1,000,000 by the parser; PBKDF2 at that count
            // is only slow, so the loop keeps to counts that keep a million cases short.
            let big = t
                .split(',')
                .find_map(|p| p.strip_prefix("i="))
                .and_then(|i| i.parse::<u32>().ok())
                .is_some_and(|i| i > 256);
            if big {
                return;
            }
            let (mut c, _) = scram::ClientExchange::start("pw", scram::Binding::Used(vec![1; 32]));
            if c.respond(&t).is_ok() {
                let _ = c.verify(&t);
            }
            let _ = c.verify(&t);
        },
    );
}

#[test]
fn control_commands() {
    let seeds: Vec<Vec<u8>> = [
        "request web-01 --reason disk full on /var --incident INC-1 --for 30m --severity high",
        "approve R-3f9c2a1b7e4d --comment 'looks right'",
        "deny R-1 --reason \"not now\"",
        "grants --all",
        "credential R-1",
        "review S-1 --findings a --root-cause b",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    fuzz("control", &seeds, |b| {
        if let Ok(p) = breakglass::control::parse(&text(b)) {
            let _ = format!("{p:?}");
        }
        let t = text(b);
        let _ = breakglass::text::check("reason", &t, breakglass::text::Lines::One);
        let _ = breakglass::text::terminal(&t);
        let _ = breakglass::text::slack(&t);
    });
}

#[test]
fn asciicast_files() {
    let cast = b"{\"version\":2,\"width\":80,\"height\":24,\"timestamp\":1700000000,\"env\":{\"TERM\":\"xterm\"}}\n[0.1,\"o\",\"$ \"]\n[0.5,\"i\",\"ls\\r\"]\n[0.6,\"o\",\"a b\\r\\n\\u001b[0m\"]\n[1.0,\"r\",\"100x30\"]\n[1.2,\"m\",\"mark\"]\n".to_vec();
    fuzz("asciicast", &[cast], |b| {
        if let Ok((_, events)) = asciicast::parse(&text(b)) {
            let _ = asciicast::output_text(&events);
        }
        let mut carry = asciicast::Utf8Carry::new();
        let _ = carry.push(b);
        let _ = carry.finish();
    });
}

#[test]
fn scp_and_sftp_trackers() {
    let scp_up = b"C0644 5 notes.txt\nhello\0E\n".to_vec();
    let scp_down = b"\0\0D0755 0 dir\nC0600 3 x\nabc\0E\n".to_vec();
    // SFTP: INIT, OPEN, WRITE, CLOSE (length-prefixed packets).
    let pkt = |t: u8, body: &[u8]| {
        let mut p = ((body.len() + 1) as u32).to_be_bytes().to_vec();
        p.push(t);
        p.extend_from_slice(body);
        p
    };
    let sftp = [
        pkt(1, &[0, 0, 0, 3]),
        pkt(3, b"\0\0\0\x01\0\0\0\x05a.txt\0\0\0\x1a\0\0\0\0"),
        pkt(6, b"\0\0\0\x02\0\0\0\x04hand\0\0\0\0\0\0\0\0\0\0\0\x03abc"),
        pkt(4, b"\0\0\0\x03\0\0\0\x04hand"),
    ]
    .concat();
    let status = [pkt(2, &[0, 0, 0, 3]), pkt(102, b"\0\0\0\x01\0\0\0\x04hand")].concat();
    fuzz("scp", &[scp_up, scp_down], |b| {
        for d in [transfer::Direction::Upload, transfer::Direction::Download] {
            let mut t = transfer::ScpTracker::new(d, "/tmp".into());
            let _ = t.from_client(b);
            let _ = t.from_server(b);
            let _ = t.finish();
        }
        let _ = transfer::scp_direction(&text(b));
    });
    fuzz("sftp", &[sftp, status], |b| {
        let mut t = transfer::SftpTracker::new();
        let (x, y) = b.split_at(b.len() / 2);
        let _ = t.from_client(x);
        let _ = t.from_server(y);
        let _ = t.from_client(b);
        let _ = t.take_ops();
        let _ = t.finish();
    });
}

#[test]
fn config_files() {
    let example = std::fs::read("config/breakglass.toml").expect("config/breakglass.toml");
    let small = b"data_dir = \"/tmp/bg\"\n[listeners]\nssh = \"127.0.0.1:2222\"\n[limits]\nlogin_grace = \"30s\"\npreauth_max = 512\n[[targets]]\nname = \"db\"\nprotocol = \"postgres\"\naddress = \"db:5432\"\nlogin = \"bg\"\ntls = \"verify-full\"\nca_file = \"/ca\"\nallow_password_auth = true\n".to_vec();
    fuzz("config", &[example, small], |b| {
        let _ = breakglass::config::Config::from_toml(&text(b));
    });
}

#[test]
fn http_sink_answers() {
    let seeds: Vec<Vec<u8>> = ["200", "429", "503", "400", "401", "2000", "0"]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect();
    fuzz("sink-classify", &seeds, |b| {
        let status = text(b).trim().parse::<u16>().unwrap_or(0);
        let _ = breakglass::outbound::classify(status, text(b));
    });
}

#[test]
fn proxy_protocol_headers() {
    let mut v2 = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\0\x0c".to_vec();
    v2.extend_from_slice(&[198, 51, 100, 7, 10, 0, 0, 1, 0x10, 0x92, 0, 22]);
    let mut v6 = b"\r\n\r\n\0\r\nQUIT\n\x21\x21\0\x24".to_vec();
    v6.extend_from_slice(&[0x20; 36]);
    let v1 = b"PROXY TCP4 203.0.113.9 10.0.0.1 5555 6432\r\n".to_vec();
    let v1_6 = b"PROXY TCP6 2001:db8::1 2001:db8::2 5555 22\r\n".to_vec();
    fuzz("proxy-header", &[v2, v6, v1, v1_6], |b| {
        let mut r = b;
        let got = block_on(breakglass::proxy_protocol::read_header(&mut r));
        // A header never consumes more than its limit, and what it names parses back.
        assert!(b.len() - r.len() <= breakglass::proxy_protocol::MAX_V2);
        if let Ok(Some(addr)) = got {
            assert_eq!(
                addr.to_string().parse::<std::net::SocketAddr>().ok(),
                Some(addr)
            );
        }
    });
}
