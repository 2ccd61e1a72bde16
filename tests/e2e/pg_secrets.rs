//! PostgreSQL secrets and volume through the gateway with real programs: `PASSWORD` literals
//! (psql, and pgbench over the extended protocol) never reach the record in clear; `\copy`
//! row counts; a 60 MB row and a 500k-row result stay within a memory bound and export.

use serde_json::Value;
use std::process::{Command, Stdio};

use super::pg::{pg_credential, pg_world, psql_cmd};
use super::support::*;

/// Every file under `dir`, with LZ4 chunks also decompressed (a compressed chunk could hide a
/// clear secret from a plain grep).
fn files_with_contents(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let Ok(bytes) = std::fs::read(&p) else {
                continue;
            };
            if p.to_string_lossy().ends_with(".lz4") {
                let plain = breakglass::record::raw::decompress(
                    &bytes,
                    breakglass::record::raw::MAX_CHUNK_PLAIN as u64,
                )
                .unwrap_or_else(|e| panic!("{} decompresses: {e}", p.display()));
                out.push((p.with_extension("lz4-decompressed"), plain));
            }
            out.push((p, bytes));
        }
    }
    out
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// Waits until every session in the index has its end event (the clients have all exited, so
/// no new session can appear meanwhile).
fn wait_all_ended(w: &World) {
    wait_for(
        "every session to end",
        std::time::Duration::from_secs(20),
        || {
            let ended = w
                .siem_events()
                .iter()
                .filter(|e| e["action"] == "session_end")
                .count();
            let n = w.sessions().len();
            (n > 0 && ended >= n).then_some(n)
        },
    );
}

/// The SQL of every `statement` action event in the SIEM file.
fn statement_events(w: &World) -> Vec<String> {
    w.siem_events()
        .iter()
        .filter(|e| e["action"] == "statement")
        .filter_map(|e| e["command"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_literals_never_reach_the_record_in_clear() {
    let (pg, _pgdir, w, gw, _certs) = pg_world("", true).await;
    let (_req, secret) = pg_credential(&w, "30m").await;
    // Simple protocol, with psql: a role, a literal with a doubled quote among two statements
    // of one Query, an empty statement, and the password that stays.
    for sql in [
        "CREATE ROLE x LOGIN",
        "select 1; ALTER ROLE x WITH ENCRYPTED PASSWORD 'TopSecret-77-b''q'",
        ";",
        "ALTER ROLE x PASSWORD 'TopSecret-77'",
    ] {
        let out = output(psql_cmd(&w, &secret, sql)).await;
        assert!(out.status.success(), "{sql}: {}", text(&out.stderr));
    }
    // Extended protocol (Parse/Bind/Execute), with pgbench running a script.
    let script = w.path("alter.sql");
    std::fs::write(&script, "ALTER ROLE x PASSWORD 'TopSecret-78';\n").expect("script");
    let mut c = Command::new(pg_bin("pgbench"));
    c.args(["-n", "-t", "1", "-M", "extended", "-f"])
        .arg(&script)
        .arg(format!(
            "host=127.0.0.1 port={} user=alice dbname=orders-db sslmode=require",
            w.pg_port
        ))
        .env("PGPASSWORD", &secret)
        .stdin(Stdio::null());
    let out = output(c).await;
    assert!(out.status.success(), "pgbench: {}", text(&out.stderr));
    let out = output(psql_cmd(
        &w,
        &secret,
        "ALTER ROLE x PASSWORD 'TopSecret-77'",
    ))
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_all_ended(&w);

    // The target got the original bytes: x logs in with the password that was set.
    let out = pg.psql("x", "TopSecret-77", "select current_user");
    assert_eq!(text(&out.stdout).trim(), "x", "{}", text(&out.stderr));

    // Search (which builds the index in the state store) finds the masked text only.
    let bob = api_token(&w, "bob").await;
    let (code, body) = api(
        &w,
        Some(&bob),
        "GET",
        "/api/v1/search?q=ALTER%20ROLE%20x%20PASSWORD",
        None,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let hits = body["hits"].as_array().expect("hits");
    assert!(hits.len() >= 3, "{body}");
    // Part of every literal, and not the text the data dir is searched for below (the search
    // text itself is on the record, in the `recording_searched` event).
    let (code, none) = api(&w, Some(&bob), "GET", "/api/v1/search?q=Secret-7", None).await;
    assert_eq!(code, 200, "{none}");
    assert_eq!(none["hits"].as_array().map(Vec::len), Some(0), "{none}");
    // The web page's SQL timeline of each session with a hit.
    let mut pages = Vec::new();
    for h in hits {
        let sid = h["session_id"].as_str().expect("session");
        let (code, page) = api(
            &w,
            Some(&bob),
            "GET",
            &format!("/api/v1/sessions/{sid}/channels/{}/sql", h["channel"]),
            None,
        )
        .await;
        assert_eq!(code, 200, "{page}");
        pages.push(page.to_string());
        let (code, session) = api(
            &w,
            Some(&bob),
            "GET",
            &format!("/api/v1/sessions/{sid}"),
            None,
        )
        .await;
        assert_eq!(code, 200, "{session}");
        pages.push(session.to_string());
    }
    gw.stop().await;

    // The SIEM has the statements, masked (simple and extended protocol), and no event for
    // the empty one. (Action events are spooled in batches: read them after the drain.)
    let statements = statement_events(&w);
    let masked = "ALTER ROLE x PASSWORD '************'";
    assert!(
        statements.iter().filter(|s| s.contains(masked)).count() >= 3,
        "psql twice and pgbench's Parse: {statements:#?}"
    );
    assert!(
        statements
            .iter()
            .any(|s| s
                .contains("select 1; ALTER ROLE x WITH ENCRYPTED PASSWORD '*****************'")),
        "{statements:#?}"
    );
    assert!(
        !statements
            .iter()
            .any(|s| s.trim().is_empty() || s.trim() == ";"),
        "an empty statement made an action event: {statements:#?}"
    );
    for p in pages.iter().chain([body.to_string()].iter()) {
        assert!(
            !p.contains("TopSecret"),
            "a web response holds the secret: {p}"
        );
    }
    assert!(
        pages.iter().any(|p| p.contains("password-literal")),
        "{pages:#?}"
    );

    // The exports: masked statements with the redaction marker, from Parse too.
    let mut timeline = Vec::new();
    for s in w.sessions() {
        let jsonl = export(&w, s["id"].as_str().expect("id"));
        assert!(!jsonl.contains("TopSecret"), "{jsonl}");
        for line in jsonl.lines() {
            let e: Value = serde_json::from_str(line).expect("JSONL");
            validate("sql-event.schema.json", &e);
            timeline.push(e);
        }
        let out = w.cli(&["verify", s["id"].as_str().expect("id")]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    }
    // The signed session metadata says when a secret was masked, and how many bytes.
    let notes: Vec<String> = w
        .sessions()
        .iter()
        .flat_map(|s| {
            let meta = session_meta(&w, s["id"].as_str().expect("id"));
            meta["channels"][0]["notes"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|n| n.as_str().map(str::to_string))
        .collect();
    assert!(
        notes
            .iter()
            .filter(|n| n.contains("redacted password-literal (12 bytes)"))
            .count()
            >= 3,
        "{notes:#?}"
    );
    assert!(notes
        .iter()
        .any(|n| n.contains("redacted password-literal (17 bytes)")));
    let marked = |event: &str, sql: &str, bytes: u64| {
        timeline.iter().any(|e| {
            e["event"] == event
                && e["sql"].as_str().is_some_and(|q| q.contains(sql))
                && e["redacted"]
                    == serde_json::json!([{"kind": "password-literal", "bytes": bytes}])
        })
    };
    assert!(
        marked("query", "ALTER ROLE x PASSWORD '************'", 12),
        "{timeline:#?}"
    );
    assert!(marked(
        "query",
        "ENCRYPTED PASSWORD '*****************'",
        17
    ));
    assert!(
        marked("parse", "ALTER ROLE x PASSWORD '************'", 12),
        "pgbench's Parse: {timeline:#?}"
    );

    // Nothing under the data dir (recordings, decompressed chunks, state store and its WAL,
    // SIEM file, spool) holds a secret — nor the JIT credential psql logged in with (SCRAM
    // messages are not recorded); the stored frame holds the mask at the same length.
    let files = files_with_contents(&w.path("data"));
    assert!(files.len() > 5, "the data dir has files");
    for (path, bytes) in &files {
        for s in ["TopSecret", secret.as_str()] {
            assert!(!contains(bytes, s), "{} holds {s:?}", path.display());
        }
    }
    // No SASL frame of the login (mechanism name, client-first message) is in a recording.
    for (path, bytes) in files
        .iter()
        .filter(|(p, _)| p.extension().is_some_and(|x| x == "lz4-decompressed"))
    {
        for s in ["SCRAM-SHA-256", ",n=,r="] {
            assert!(!contains(bytes, s), "{} holds {s:?}", path.display());
        }
    }
    assert!(
        files.iter().any(
            |(p, b)| p.extension().is_some_and(|x| x == "lz4-decompressed")
                && contains(b, "ALTER ROLE x PASSWORD '************'\0")
        ),
        "a recorded frame holds the masked statement"
    );
    validate_all_events(&w);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_from_stdin_counts_every_row_once() {
    let (_pg, _pgdir, w, gw, _certs) = pg_world("", true).await;
    let (_req, secret) = pg_credential(&w, "30m").await;
    let out = output(psql_cmd(
        &w,
        &secret,
        "create table t(id int, note text); create table c(id int, note text)",
    ))
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Rows of uneven length, so psql's CopyData messages end in the middle of rows.
    let mut rows = String::new();
    let mut csv = String::from("id,note\n");
    for i in 0..10_000 {
        let note = "n".repeat(i % 97);
        rows.push_str(&format!("{i}\t{note}\n"));
        csv.push_str(&format!("{i},\"{note}\n, \"\"quoted\"\"\"\n"));
    }
    let data = w.path("rows.txt");
    std::fs::write(&data, rows).expect("rows");
    let out = output(psql_cmd(
        &w,
        &secret,
        &format!("\\copy t from '{}'", data.display()),
    ))
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    // CSV through psql's stdin, with a header and a newline inside every quoted field.
    let csv_path = w.path("rows.csv");
    std::fs::write(&csv_path, csv).expect("csv");
    let mut c = psql_cmd(&w, &secret, "\\copy c from stdin with (format csv, header)");
    c.stdin(std::fs::File::open(&csv_path).expect("csv file"));
    let out = output(c).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = output(psql_cmd(
        &w,
        &secret,
        "select (select count(*) from t) + (select count(*) from c)",
    ))
    .await;
    assert_eq!(text(&out.stdout).trim(), "20000", "{}", text(&out.stderr));
    wait_all_ended(&w);
    gw.stop().await;
    let mut copies = Vec::new();
    for s in w.sessions() {
        for line in export(&w, s["id"].as_str().expect("id")).lines() {
            let e: Value = serde_json::from_str(line).expect("JSONL");
            validate("sql-event.schema.json", &e);
            if e["event"] == "copy" {
                copies.push(e);
            }
        }
    }
    eprintln!("copy events: {copies:#?}");
    assert_eq!(copies.len(), 2, "{copies:#?}");
    for (format, want_bytes) in [
        ("text", std::fs::metadata(&data).expect("rows").len()),
        ("csv", std::fs::metadata(&csv_path).expect("csv").len()),
    ] {
        let e = copies
            .iter()
            .find(|e| e["format"] == format)
            .unwrap_or_else(|| panic!("a {format} copy: {copies:#?}"));
        assert_eq!(e["rows"], 10_000, "{e}");
        assert_eq!(e["copy_direction"], "in");
        assert_eq!(e["bytes"], want_bytes);
    }
}

/// The high-water mark of a process's resident memory, in KiB (`VmHWM` in /proc).
fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

/// What the gateway's resident memory may reach while relaying a 60 MB row and 500k rows:
/// the relay holds one whole protocol message (60 MB) while it is recorded and forwarded, the
/// recorder at most one chunk buffer plus its compressed copy (5 MiB each), and the process its
/// baseline; 256 MiB leaves room for allocator slack and TLS buffers, and would be exceeded if
/// a message were copied several times or the 500k rows were held at once.
const RSS_BOUND_KIB: u64 = 256 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_60_mb_row_and_500k_rows_are_recorded_in_bounded_chunks_and_memory() {
    let (_pg, _pgdir, w, gw, _certs) = pg_world("", true).await;
    let (_req, secret) = pg_credential(&w, "30m").await;
    // The gateway as its own process, so its memory is measured apart from the tests'.
    gw.stop().await;
    let mut proc = Process::start(&w);
    wait_port(w.pg_port);
    let pid = proc.child.id();
    let baseline = vm_hwm_kib(pid);
    for sql in [
        "select repeat('x', 60000000)",
        "select g, md5(g::text) from generate_series(1, 500000) g",
    ] {
        let mut c = psql_cmd(&w, &secret, sql);
        c.args(["-o", "/dev/null"]);
        let out = output(c).await;
        assert!(out.status.success(), "{sql}: {}", text(&out.stderr));
    }
    wait_all_ended(&w);
    let peak = vm_hwm_kib(pid);
    eprintln!(
        "gateway VmHWM: {} MiB at start, {} MiB after a 60 MB row and 500k rows (bound {} MiB)",
        baseline / 1024,
        peak / 1024,
        RSS_BOUND_KIB / 1024
    );
    proc.kill9();
    assert!(
        peak <= RSS_BOUND_KIB,
        "gateway peak RSS {peak} KiB over {RSS_BOUND_KIB}"
    );

    let sessions = w.sessions();
    assert_eq!(sessions.len(), 2, "{sessions:?}");
    let mut rows_returned = Vec::new();
    for s in &sessions {
        let id = s["id"].as_str().expect("id");
        let out = w.cli(&["verify", id]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
        for line in export(&w, id).lines() {
            let e: Value = serde_json::from_str(line).expect("JSONL");
            if e["event"] == "complete" {
                rows_returned.push(e["rows_returned"].as_u64().unwrap_or(0));
            }
        }
        // Every chunk is within the bound readers apply, and the big row spans many chunks.
        let dir = w
            .path("data/recordings")
            .join(s["recording"].as_str().expect("prefix"))
            .join("ch0000");
        let chunks: Vec<_> = std::fs::read_dir(&dir)
            .expect("channel dir")
            .flatten()
            .map(|e| std::fs::read(e.path()).expect("chunk"))
            .collect();
        let mut biggest = 0;
        for z in &chunks {
            let plain = breakglass::record::raw::decompress(z, u64::MAX).expect("lz4");
            biggest = biggest.max(plain.len());
        }
        eprintln!(
            "session {id}: {} chunks, largest {} KiB decompressed",
            chunks.len(),
            biggest / 1024
        );
        assert!(biggest <= breakglass::record::raw::MAX_CHUNK_PLAIN);
        // Normal operation (no store outage): a chunk is cut at 4 MiB plus at most one piece.
        assert!(biggest <= (4 << 20) + 2 * breakglass::record::raw::MAX_FRAME_DATA);
        if s["bytes_out"].as_u64().unwrap_or(0) > 60_000_000 {
            assert!(chunks.len() >= 14, "60 MB in {} chunks", chunks.len());
        }
    }
    rows_returned.sort();
    assert_eq!(rows_returned, [1, 500_000]);
}
