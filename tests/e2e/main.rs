//! End-to-end tests: real OpenSSH `sshd` as the target, real `ssh`/`scp`/`sftp` as clients,
//! the real `asciinema` CLI replaying exports, all on 127.0.0.1.

mod audit_views;
mod disk;
mod escapes;
mod flood;
mod outage;
mod pg_secrets;
mod rogue;
mod secrets;
mod siem;
mod support;
mod tamper;
mod web;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

/// The recording metadata (session.json) of a finished session.
fn session_meta(w: &World, session_id: &str) -> Value {
    let s = w
        .sessions()
        .into_iter()
        .find(|s| s["id"] == session_id)
        .unwrap_or_else(|| panic!("session {session_id} is in the index"));
    let path = w
        .path("data/recordings")
        .join(s["recording"].as_str().expect("recording prefix"))
        .join("session.json");
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("session.json exists"))
            .expect("session.json is JSON");
    validate("session.schema.json", &meta);
    meta
}

/// Every SIEM event written so far validates against the schema.
fn validate_all_events(w: &World) {
    let events = w.siem_events();
    assert!(!events.is_empty(), "some SIEM events were written");
    for e in &events {
        validate("siem-event.schema.json", e);
    }
}

fn last_session_id(w: &World) -> String {
    let s = w.sessions();
    s.first().expect("a session in the index")["id"]
        .as_str()
        .expect("id")
        .to_string()
}

fn export(w: &World, session: &str) -> String {
    let out = w.path(&format!("{session}.cast"));
    w.cli_ok(&["export", session, "-o", out.to_str().expect("utf-8 path")]);
    // Auditing the auditors: the export is on the record.
    assert!(
        w.siem_events()
            .iter()
            .any(|e| e["action"] == "recording_exported"
                && e["session_id"]
                    .as_str()
                    .is_some_and(|id| id.starts_with(session))),
        "no recording_exported event for {session}"
    );
    std::fs::read_to_string(out).expect("export written")
}

/// What Debian's asciinema CLI prints for a .cast file (it needs a tty, hence `script`).
fn asciinema_cat(path: &std::path::Path) -> String {
    require("asciinema", "asciinema");
    let out = Command::new(require("script", "bsdutils"))
        .args([
            "-qec",
            &format!("asciinema cat {}", path.display()),
            "/dev/null",
        ])
        .output()
        .expect("run asciinema cat");
    assert!(
        out.status.success(),
        "asciinema cat failed: {}",
        text(&out.stderr)
    );
    text(&out.stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_relays_output_and_exit_status_and_is_recorded() {
    let w = World::new();
    let gw = InProcess::start(&w).await;
    let grant = w.grant("alice", "30m");
    let out = output(w.ssh(
        "alice",
        "web-01",
        &[],
        &["echo out-$((40+2)); echo err-line >&2; exit 3"],
    ))
    .await;
    assert_eq!(out.status.code(), Some(3), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "out-42\n");
    assert!(text(&out.stderr).contains("err-line"));
    w.wait_ended(1);
    gw.stop().await;

    let id = last_session_id(&w);
    let meta = session_meta(&w, &id);
    assert_eq!(meta["session"]["person"], "alice");
    assert_eq!(meta["session"]["grant_id"], grant.as_str());
    assert_eq!(meta["session"]["incident_id"], "INC-7");
    let ch = &meta["channels"][0];
    assert_eq!(
        ch["kind"]["command"],
        "echo out-$((40+2)); echo err-line >&2; exit 3"
    );
    assert_eq!(ch["exit_status"], 3);
    assert_eq!(ch["format"], "raw");
    let cast = export(&w, &id);
    assert!(cast.contains("out-42"), "export holds the output: {cast}");
    assert!(cast.contains("err-line"));

    let events = w.siem_events();
    let start = events
        .iter()
        .find(|e| e["action"] == "session_start")
        .expect("start event");
    let end = events
        .iter()
        .find(|e| e["action"] == "session_end")
        .expect("end event");
    assert_eq!(start["session_id"], id.as_str());
    assert_eq!(start["justification"], "disk full on /var");
    assert_eq!(end["reason"], "client_closed");
    assert_eq!(end["chain_head"], meta["chain_head"]);
    assert!(end["bytes_out"].as_u64().expect("bytes_out") >= 16);
    validate_all_events(&w);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interactive_shell_with_resize_replays_in_asciinema() {
    let w = World::new();
    let gw = InProcess::start(&w).await;
    w.grant("alice", "30m");
    let steps = serde_json::json!([
        {"expect": "[$#] $", "timeout": 15},
        {"send": "export PS1='bg$ '\r"},
        {"expect": "bg\\$ $"},
        {"send": "echo bg-$((6*7))\r"},
        {"expect": "bg-42"},
        {"resize": [40, 100]},
        {"send": "stty size\r"},
        {"expect": "40 100"},
        {"send": "echo typo\u{7f}\u{7f}\u{7f}\u{7f}fixed\r"},
        {"expect": "fixed"},
        {"send": "exit\r"},
        {"wait_exit": 10}
    ]);
    let out = w.pty_ssh("alice", "web-01", steps).await;
    let transcript = text(&out.stdout);
    assert!(
        out.status.success(),
        "pty session failed: {transcript}\n{}",
        text(&out.stderr)
    );
    assert!(transcript.contains("[exit 0]"), "{transcript}");
    w.wait_ended(1);
    gw.stop().await;

    let id = last_session_id(&w);
    let meta = session_meta(&w, &id);
    let ch = &meta["channels"][0];
    assert_eq!(ch["format"], "cast");
    assert_eq!(ch["kind"]["type"], "shell");
    let commands: Vec<&str> = ch["commands"]
        .as_array()
        .expect("commands")
        .iter()
        .map(|c| c["text"].as_str().expect("text"))
        .collect();
    assert!(commands.contains(&"echo bg-$((6*7))"), "{commands:?}");
    assert!(commands.contains(&"stty size"), "{commands:?}");
    assert!(
        commands.contains(&"echo fixed"),
        "line editing applied: {commands:?}"
    );

    let cast = export(&w, &id);
    let header: Value =
        serde_json::from_str(cast.lines().next().expect("header line")).expect("header JSON");
    validate("asciicast-v2-header.schema.json", &header);
    assert_eq!(header["breakglass"]["session"]["person"], "alice");
    assert!(
        cast.contains("\"r\", \"100x40\"") || cast.contains("\"r\",\"100x40\""),
        "resize recorded"
    );
    assert!(
        cast.lines().any(|l| l.contains("\"i\"")),
        "keystrokes recorded"
    );
    let replayed = w.cli_ok(&["replay", &id, "--speed", "50", "--idle-limit", "0.1"]);
    assert!(
        replayed.contains("bg-42"),
        "breakglass replay shows the output: {replayed}"
    );
    let played = asciinema_cat(&w.path(&format!("{id}.cast")));
    assert!(
        played.contains("bg-42"),
        "asciinema shows the output: {played}"
    );
    assert!(
        played.contains("echo bg-$((6*7))"),
        "asciinema shows the typed command"
    );
    validate_all_events(&w);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denials_are_clear_and_on_the_record() {
    let w = World::new();
    let gw = InProcess::start(&w).await;

    // No grant at all.
    let out = output(w.ssh("alice", "web-01", &[], &["true"])).await;
    assert_ne!(out.status.code(), Some(0));
    assert!(
        text(&out.stderr).contains("has no break-glass grant"),
        "{}",
        text(&out.stderr)
    );

    // An expired grant.
    let g = w.grant("alice", "1s");
    wait_for("the grant to expire", Duration::from_secs(5), || {
        w.cli_ok(&["grant", "list", "--all", "--format", "csv"])
            .lines()
            .any(|l| l.starts_with(&g) && l.contains(",expired,"))
            .then_some(())
    });
    let out = output(w.ssh("alice", "web-01", &[], &["true"])).await;
    assert!(
        text(&out.stderr).contains("expired at"),
        "{}",
        text(&out.stderr)
    );

    // A revoked grant.
    let g = w.grant("bob", "30m");
    w.cli_ok(&["grant", "revoke", &g, "--reason", "incident closed"]);
    let out = output(w.ssh("bob", "web-01", &[], &["true"])).await;
    assert!(
        text(&out.stderr).contains("was revoked at"),
        "{}",
        text(&out.stderr)
    );

    // An unknown key.
    let out = output(w.ssh("mallory", "web-01", &[], &["true"])).await;
    assert_eq!(out.status.code(), Some(255));
    assert!(
        text(&out.stderr).contains("is not registered to any person"),
        "{}",
        text(&out.stderr)
    );

    // An unknown target.
    w.grant("alice", "30m");
    let out = output(w.ssh("alice", "db-99", &[], &["true"])).await;
    assert!(
        text(&out.stderr).contains("no target named `db-99`"),
        "{}",
        text(&out.stderr)
    );

    // Port forwarding (stdio forward opens a direct-tcpip channel at once).
    let port = w.sshd.port.to_string();
    let out = output(w.ssh(
        "alice",
        "web-01",
        &["-W", &format!("127.0.0.1:{port}")],
        &[],
    ))
    .await;
    assert_ne!(out.status.code(), Some(0));
    assert!(
        text(&out.stderr).contains("prohibited"),
        "{}",
        text(&out.stderr)
    );
    // Remote forwarding.
    let out = output(w.ssh(
        "alice",
        "web-01",
        &["-o", "ExitOnForwardFailure=yes", "-R", "0:127.0.0.1:9"],
        &["true"],
    ))
    .await;
    assert_ne!(out.status.code(), Some(0), "remote forwarding must fail");

    let reasons: Vec<String> = w
        .wait_event("the unknown-key denial", |e| e["reason"] == "unknown_key")
        .as_object()
        .map(|_| {
            w.siem_events()
                .iter()
                .filter(|e| e["action"] == "session_denied" || e["action"] == "forwarding_refused")
                .map(|e| e["reason"].as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default();
    for want in [
        "no_grant",
        "grant_expired",
        "grant_revoked",
        "unknown_key",
        "unknown_target",
    ] {
        assert!(
            reasons.iter().any(|r| r == want),
            "denial {want} recorded: {reasons:?}"
        );
    }
    assert!(
        reasons.iter().any(|r| r.starts_with("port_forwarding")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.starts_with("remote_port_forwarding")),
        "{reasons:?}"
    );
    gw.stop().await;
    validate_all_events(&w);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_key_mismatch_refuses_the_session() {
    let w = World::with(Opts {
        wrong_host_key: true,
        ..Default::default()
    });
    let gw = InProcess::start(&w).await;
    w.grant("alice", "30m");
    let out = output(w.ssh("alice", "web-01", &[], &["echo should-not-run"])).await;
    assert_ne!(out.status.code(), Some(0));
    assert!(!text(&out.stdout).contains("should-not-run"));
    assert!(
        text(&out.stderr).contains("possible man-in-the-middle"),
        "{}",
        text(&out.stderr)
    );
    let e = w.wait_event("host key denial", |e| e["reason"] == "host_key_mismatch");
    assert_eq!(e["side"], "upstream");
    gw.stop().await;
    assert!(w.sessions().is_empty(), "no session was started");
}

/// Reads a child's stdout lines as they arrive, each with its arrival time.
fn stamped_lines(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<(Instant, String)> {
    let stdout = child.stdout.take().expect("stdout is piped");
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, String)>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send((Instant::now(), line));
        }
    });
    rx
}

/// Starts `ssh ... sleep 60` in the background and waits until the session is live.
fn start_long_session(w: &World, extra: &[&str], cmd: &str) -> std::process::Child {
    let child = w
        .ssh("alice", "web-01", extra, &[cmd])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start ssh");
    w.wait_event("session start", |e| e["action"] == "session_start");
    child
}

fn wait_exit(child: &mut std::process::Child, timeout: Duration) -> (Option<i32>, String, String) {
    let status = wait_for("ssh to exit", timeout, || {
        child.try_wait().expect("try_wait")
    });
    let mut out = String::new();
    let mut err = String::new();
    use std::io::Read;
    if let Some(mut s) = child.stdout.take() {
        let _ = s.read_to_string(&mut out);
    }
    if let Some(mut s) = child.stderr.take() {
        let _ = s.read_to_string(&mut err);
    }
    (status.code(), out, err)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_grant_cuts_the_live_session_within_a_second() {
    let w = World::new();
    let gw = InProcess::start(&w).await;
    let g = w.grant("alice", "30m");
    let mut child = start_long_session(&w, &[], "echo started; sleep 60");
    // Revoke once the command runs (the channel is open), as an operator would.
    let rx = stamped_lines(&mut child);
    rx.recv_timeout(Duration::from_secs(10))
        .expect("the command started");
    let revoke_done = {
        w.cli_ok(&["grant", "revoke", &g, "--reason", "done"]);
        Instant::now()
    };
    let (code, _out, err) = wait_exit(&mut child, Duration::from_secs(5));
    let took = revoke_done.elapsed();
    eprintln!("revocation cut the session {took:?} after `grant revoke` returned");
    assert!(took <= Duration::from_millis(1000), "cut after {took:?}");
    assert_ne!(code, Some(0));
    assert!(err.contains("revoked"), "the user is told why: {err}");
    gw.stop().await;
    let ev = w.wait_event("revoke event", |e| e["action"] == "session_revoked");
    assert_eq!(ev["grant_id"], g.as_str());
    let id = last_session_id(&w);
    assert_eq!(session_meta(&w, &id)["end"]["end_reason"], "revoked");
    validate_all_events(&w);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_warns_then_cuts_the_session() {
    let w = World::with(Opts {
        extra_limits: "warn_before = [\"2s\"]".into(),
        ..Default::default()
    });
    let gw = InProcess::start(&w).await;
    w.grant("alice", "4s");
    let started = Instant::now();
    let mut child = start_long_session(&w, &["-tt"], "sleep 60");
    let deadline = w.sessions()[0]["deadline"]
        .as_str()
        .expect("deadline")
        .to_string();
    let deadline = chrono::DateTime::parse_from_rfc3339(&deadline).expect("rfc3339");
    let (code, out, _err) = wait_exit(&mut child, Duration::from_secs(10));
    let late = chrono::Utc::now().signed_duration_since(deadline.with_timezone(&chrono::Utc));
    eprintln!(
        "session ended {late} after its deadline ({:?} after start)",
        started.elapsed()
    );
    assert!(
        late <= chrono::Duration::milliseconds(1000),
        "ended {late} after the deadline"
    );
    assert_ne!(code, Some(0));
    assert!(
        out.contains("this session ends in 2s"),
        "warning shown: {out}"
    );
    assert!(out.contains("deadline was reached"), "reason shown: {out}");
    gw.stop().await;
    w.wait_event("expiry event", |e| e["action"] == "session_expired");
    let id = last_session_id(&w);
    let meta = session_meta(&w, &id);
    assert_eq!(meta["end"]["end_reason"], "deadline");
    let cast = export(&w, &id);
    assert!(cast.contains("\"m\""), "warning recorded as a marker");
    validate_all_events(&w);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_at_most_the_last_second() {
    let w = World::new();
    let mut gw = Process::start(&w);
    w.grant("alice", "30m");
    let mut child = w
        .ssh(
            "alice",
            "web-01",
            &[],
            &["for i in $(seq 1 400); do echo line-$i; sleep 0.02; done; sleep 60"],
        )
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start ssh");
    // Read lines as they arrive, with their arrival times.
    let rx = stamped_lines(&mut child);
    let mut seen = Vec::new();
    while let Ok((t, l)) = rx.recv_timeout(Duration::from_secs(15)) {
        seen.push((t, l));
        if seen.len() >= 150 {
            break;
        }
    }
    assert!(seen.len() >= 150, "output flowed");
    let killed_at = Instant::now();
    gw.kill9();
    let _ = child.kill();
    let _ = child.wait();
    let must_have: Vec<&String> = seen
        .iter()
        .filter(|(t, _)| *t + Duration::from_secs(1) <= killed_at)
        .map(|(_, l)| l)
        .collect();
    assert!(!must_have.is_empty(), "some lines were older than a second");

    // The recording exports without the gateway having sealed it.
    let id = last_session_id(&w);
    let cast = export(&w, &id);
    for l in &must_have {
        assert!(
            cast.contains(&format!("{l}\\n")),
            "{l} (seen over 1 s before the kill) is in the export"
        );
    }
    // A restart closes the session left open.
    let _gw2 = Process::start(&w);
    let ev = w.wait_event("crash recovery event", |e| e["reason"] == "gateway_crashed");
    assert_eq!(ev["session_id"], id.as_str());
    let row = w
        .sessions()
        .into_iter()
        .find(|s| s["id"] == id.as_str())
        .expect("row");
    assert_eq!(row["end_reason"], "gateway_crashed");
    // The restart sealed what was stored: verify says INCOMPLETE (exit 2), not TAMPERED.
    let out = w.cli(&["verify", &id]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains("INCOMPLETE"),
        "{}",
        text(&out.stdout)
    );
    validate_all_events(&w);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_failure_refuses_new_sessions_and_ends_live_ones() {
    let w = World::with(Opts {
        extra_limits: "storage_grace = \"1s\"".into(),
        ..Default::default()
    });
    let gw = InProcess::start(&w).await;
    w.grant("alice", "30m");

    // A live session whose recording directory disappears and is replaced by a file.
    let mut child = start_long_session(&w, &[], "while true; do echo tick; sleep 0.05; done");
    let prefix = w.sessions()[0]["recording"]
        .as_str()
        .expect("prefix")
        .to_string();
    let dir = w.path("data/recordings").join(&prefix);
    std::fs::remove_dir_all(&dir).expect("remove session dir");
    std::fs::write(&dir, b"blocked").expect("block the path");
    let (code, _out, err) = wait_exit(&mut child, Duration::from_secs(10));
    assert_ne!(code, Some(0));
    assert!(
        err.contains("recording failed"),
        "the user is told why: {err}"
    );
    let ev = w.wait_event("end event", |e| e["action"] == "session_end");
    assert_eq!(ev["outcome"], "failure");
    assert_eq!(ev["reason"], "recording_failed");

    // New sessions are refused while the store is unusable.
    let sessions_dir = w.path("data/recordings/sessions");
    std::fs::remove_dir_all(&sessions_dir).expect("remove store dir");
    std::fs::write(&sessions_dir, b"blocked").expect("block the store");
    let out = output(w.ssh("alice", "web-01", &[], &["echo should-not-run"])).await;
    assert!(!text(&out.stdout).contains("should-not-run"));
    assert!(
        text(&out.stderr).contains("never run unrecorded"),
        "{}",
        text(&out.stderr)
    );
    w.wait_event("recording denial", |e| {
        e["reason"] == "recording_unavailable"
    });
    gw.stop().await;
}

#[test]
fn check_config_names_the_bad_key() {
    let w = World::new();
    let out = w.cli(&["check-config", w.config_path.to_str().expect("path")]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains("reachable"),
        "{}",
        text(&out.stdout)
    );

    let bad = std::fs::read_to_string(&w.config_path)
        .expect("config")
        .replace("max_session_ttl = \"1h\"", "max_session_ttl = \"forever\"");
    let bad_path = w.path("bad.toml");
    std::fs::write(&bad_path, bad).expect("write");
    let out = w.cli(&["check-config", bad_path.to_str().expect("path")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("limits.max_session_ttl"),
        "{}",
        text(&out.stderr)
    );

    // The example config in config/ is valid as it stands.
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/breakglass.toml");
    let out = w.cli(&["check-config", "--offline", example]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// Deterministic pseudo-random bytes (no two runs of the test differ).
fn content(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scp_and_sftp_work_and_transfers_are_recorded() {
    let w = World::new();
    let gw = InProcess::start(&w).await;
    w.grant("alice", "30m");
    let remote = w.path("remote");
    std::fs::create_dir_all(&remote).expect("remote dir");
    let up = content(300_000, 7);
    let local_up = w.path("up.bin");
    std::fs::write(&local_up, &up).expect("write");
    let down = content(123_457, 9);
    std::fs::write(remote.join("down.bin"), &down).expect("write");

    let scp = |extra: &[&str], from: String, to: String| {
        let mut c = Command::new(require("scp", "openssh-client"));
        c.args(w.ssh_args("alice"))
            .args(["-P", &w.gw_port.to_string()])
            .args(extra)
            .arg(from)
            .arg(to)
            .stdin(std::process::Stdio::null());
        c
    };
    let at = |p: &std::path::Path| format!("web-01@127.0.0.1:{}", p.display());

    // scp over the SFTP protocol (OpenSSH's default), then legacy scp (-O), both ways.
    for (mode, extra) in [("sftp", vec![]), ("legacy", vec!["-O"])] {
        let dest = remote.join(format!("up-{mode}.bin"));
        let out = output(scp(&extra, local_up.display().to_string(), at(&dest))).await;
        assert!(
            out.status.success(),
            "scp {mode} upload: {}",
            text(&out.stderr)
        );
        assert_eq!(
            std::fs::read(&dest).expect("uploaded"),
            up,
            "scp {mode} upload intact"
        );
        let got = w.path(&format!("down-{mode}.bin"));
        let out = output(scp(
            &extra,
            at(&remote.join("down.bin")),
            got.display().to_string(),
        ))
        .await;
        assert!(
            out.status.success(),
            "scp {mode} download: {}",
            text(&out.stderr)
        );
        assert_eq!(
            std::fs::read(&got).expect("downloaded"),
            down,
            "scp {mode} download intact"
        );
    }

    // An interactive-style sftp batch.
    let batch = w.path("batch");
    std::fs::write(
        &batch,
        format!(
            "put {} {}\nget {} {}\nrm {}\n",
            local_up.display(),
            remote.join("sftp-up.bin").display(),
            remote.join("down.bin").display(),
            w.path("sftp-down.bin").display(),
            remote.join("sftp-up.bin").display(),
        ),
    )
    .expect("batch");
    let mut c = Command::new(require("sftp", "openssh-client"));
    c.args(w.ssh_args("alice"))
        .args(["-P", &w.gw_port.to_string(), "-b"])
        .arg(&batch)
        .arg("web-01@127.0.0.1")
        .stdin(std::process::Stdio::null());
    let out = output(c).await;
    assert!(out.status.success(), "sftp batch: {}", text(&out.stderr));
    assert_eq!(
        std::fs::read(w.path("sftp-down.bin")).expect("sftp get"),
        down
    );
    w.wait_ended(5);
    gw.stop().await;

    let mut transfers = Vec::new();
    let mut notes = Vec::new();
    for s in w.sessions() {
        let meta = session_meta(&w, s["id"].as_str().expect("id"));
        for ch in meta["channels"].as_array().expect("channels") {
            transfers.extend(
                ch["transfers"]
                    .as_array()
                    .expect("transfers")
                    .iter()
                    .cloned(),
            );
            notes.extend(ch["notes"].as_array().expect("notes").iter().cloned());
        }
    }
    let (up_sha, down_sha) = (sha256_hex(&up), sha256_hex(&down));
    for (protocol, direction, sha, size) in [
        ("sftp", "upload", &up_sha, up.len()),
        ("sftp", "download", &down_sha, down.len()),
        ("scp", "upload", &up_sha, up.len()),
        ("scp", "download", &down_sha, down.len()),
    ] {
        assert!(
            transfers.iter().any(|t| t["protocol"] == protocol
                && t["direction"] == direction
                && t["sha256"] == sha.as_str()
                && t["size"] == size as u64
                && t["complete"] == true),
            "{protocol} {direction} of {size} bytes recorded with its hash: {transfers:#?}"
        );
    }
    assert!(
        transfers
            .iter()
            .filter(|t| t["path"].as_str().unwrap_or("").contains("up-sftp.bin"))
            .count()
            == 1,
        "the file name is recorded: {transfers:#?}"
    );
    assert!(
        notes
            .iter()
            .any(|n| n.as_str().unwrap_or("").contains("remove")),
        "sftp rm recorded: {notes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_channels_share_one_session_and_env_is_allow_listed() {
    let w = World::new();
    let gw = InProcess::start(&w).await;
    w.grant("alice", "30m");
    let sock = w.path("cm.sock");
    let sock_s = sock.display().to_string();
    // An OpenSSH connection master; the commands below are channels on its one connection.
    let mut master = w
        .ssh("alice", "web-01", &["-M", "-S", &sock_s, "-N"], &[])
        .spawn()
        .expect("start master");
    wait_for("the control socket", Duration::from_secs(10), || {
        sock.exists().then_some(())
    });
    let one = output(w.ssh("alice", "web-01", &["-S", &sock_s], &["echo first"])).await;
    assert_eq!(text(&one.stdout), "first\n", "{}", text(&one.stderr));
    let two = output(w.ssh(
        "alice",
        "web-01",
        &["-S", &sock_s],
        &["echo second; exit 4"],
    ))
    .await;
    assert_eq!(text(&two.stdout), "second\n", "{}", text(&two.stderr));
    assert_eq!(two.status.code(), Some(4), "{}", text(&two.stderr));
    let _ = output(w.ssh("alice", "web-01", &["-S", &sock_s, "-O", "exit"], &[])).await;
    let _ = master.wait();

    // Environment: only allow-listed variables reach the target.
    let env = output(w.ssh(
        "alice",
        "web-01",
        &["-o", "SetEnv=LANG=C.UTF-8 EVIL=1"],
        &["echo \"[$LANG][$EVIL]\""],
    ))
    .await;
    assert_eq!(
        text(&env.stdout),
        "[C.UTF-8][]\n",
        "allowed env passes, others do not: {}",
        text(&env.stderr)
    );
    w.wait_ended(2);
    gw.stop().await;

    let metas: Vec<Value> = w
        .sessions()
        .iter()
        .map(|s| session_meta(&w, s["id"].as_str().expect("id")))
        .collect();
    assert_eq!(metas.len(), 2);
    let muxed = metas
        .iter()
        .find(|m| m["channels"].as_array().map(|c| c.len()) == Some(2))
        .expect("the multiplexed connection is one session with two channels");
    let chans = muxed["channels"].as_array().expect("channels");
    assert_eq!(chans[0]["kind"]["command"], "echo first");
    assert_eq!(chans[1]["kind"]["command"], "echo second; exit 4");
    assert_eq!(chans[1]["exit_status"], 4);
    let plain = metas.iter().find(|m| *m != muxed).expect("the env session");
    let env = &plain["channels"][0]["env"];
    assert_eq!(env["LANG"], "C.UTF-8");
    assert!(
        env.get("EVIL").is_none(),
        "refused env is not recorded as passed: {env}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_held_key_logs_in_upstream() {
    let w = World::with(Opts {
        held_key: true,
        ..Default::default()
    });
    let gw = InProcess::start(&w).await;
    w.grant("alice", "30m");
    let out = output(w.ssh("alice", "web-01", &[], &["echo held-key-ok"])).await;
    assert_eq!(text(&out.stdout), "held-key-ok\n", "{}", text(&out.stderr));
    w.wait_ended(1);
    gw.stop().await;
    // The target saw the gateway's key, never alice's.
    let log = std::fs::read_to_string(w.path("sshd.log")).expect("sshd log");
    let fp = Command::new(require("ssh-keygen", "openssh-client"))
        .arg("-lf")
        .arg(w.path("gateway_held_key.pub"))
        .output()
        .expect("ssh-keygen -lf");
    let fp = text(&fp.stdout)
        .split_whitespace()
        .nth(1)
        .expect("fingerprint")
        .to_string();
    assert!(
        log.lines()
            .any(|l| l.contains("Accepted publickey") && l.contains(&fp)),
        "sshd accepted the gateway-held key {fp}: {log}"
    );
}

/// Runs a control command over the gateway's SSH endpoint as `person`.
async fn control(w: &World, person: &str, login: &str, command: &str) -> (i32, String, String) {
    let out = output(w.ssh(person, login, &[], &[command])).await;
    (
        out.status.code().unwrap_or(-1),
        text(&out.stdout),
        text(&out.stderr),
    )
}

fn request_id(out: &str) -> String {
    out.split_whitespace()
        .skip_while(|w| *w != "request")
        .nth(1)
        .unwrap_or_else(|| panic!("a request id in {out}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_person_workflow_over_the_ssh_control_channel() {
    let w = World::with(Opts {
        extra_limits: "request_ttl = \"3s\"".into(),
        ..Default::default()
    });
    let gw = InProcess::start(&w).await;

    // alice asks; the login name `breakglass` (or her own name) reaches the control channel.
    let (code, out, err) = control(
        &w,
        "alice",
        "breakglass",
        "request web-01 --reason disk full on /var --incident INC-7 --for 30m --severity high --scenario outage",
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    let req = request_id(&out);
    assert!(
        out.contains("approval(s) from: bob, role:sre-lead"),
        "{out}"
    );

    // Nobody approves their own request; requesting is not access.
    let (code, _, err) = control(&w, "alice", "alice", &format!("approve {req}")).await;
    assert_eq!(code, 1);
    assert!(err.contains("cannot approve your own request"), "{err}");
    let out = output(w.ssh("alice", "web-01", &[], &["true"])).await;
    assert!(
        text(&out.stderr).contains("has no break-glass grant"),
        "{}",
        text(&out.stderr)
    );

    // The approver sees it waiting and approves; alice gets in.
    let (_, status, _) = control(&w, "bob", "breakglass", "status").await;
    assert!(
        status.contains(&req),
        "bob sees the request waiting: {status}"
    );
    assert!(status.contains("custodians: carol"), "{status}");
    let (code, out, err) = control(&w, "bob", "bob", &format!("approve {req}")).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("grant"), "{out}");
    let (code, _, err) = control(&w, "carol", "breakglass", &format!("approve {req}")).await;
    assert_eq!(code, 1, "a decided request cannot be approved again");
    assert!(err.contains("not pending"), "{err}");
    let out = output(w.ssh("alice", "web-01", &[], &["echo granted-$((1+1))"])).await;
    assert_eq!(text(&out.stdout), "granted-2\n", "{}", text(&out.stderr));
    w.wait_ended(1);

    // Two approvals needed: the same approver cannot count twice.
    let (_, out, _) = control(
        &w,
        "alice",
        "breakglass",
        "request web-02 --reason deploy fix --incident INC-8",
    )
    .await;
    let req2 = request_id(&out);
    let (code, out, _) = control(&w, "bob", "breakglass", &format!("approve {req2}")).await;
    assert_eq!(code, 0);
    assert!(out.contains("1 of 2"), "{out}");
    let (code, _, err) = control(&w, "bob", "breakglass", &format!("approve {req2}")).await;
    assert_eq!(code, 1);
    assert!(err.contains("already approved"), "{err}");
    let (code, out, _) = control(&w, "carol", "breakglass", &format!("approve {req2}")).await;
    assert_eq!(code, 0);
    assert!(out.contains("approved"), "{out}");

    // Denial needs a reason and is final.
    let (_, out, _) = control(
        &w,
        "alice",
        "breakglass",
        "request web-01 --reason again --incident INC-9",
    )
    .await;
    let req3 = request_id(&out);
    let (code, _, err) = control(&w, "carol", "breakglass", &format!("deny {req3}")).await;
    assert_eq!(code, 1);
    assert!(err.contains("needs a reason"), "{err}");
    let (code, _, _) = control(
        &w,
        "carol",
        "breakglass",
        &format!("deny {req3} --reason use the runbook"),
    )
    .await;
    assert_eq!(code, 0);
    let (code, _, err) = control(&w, "bob", "breakglass", &format!("approve {req3}")).await;
    assert_eq!(code, 1);
    assert!(err.contains("denied"), "{err}");

    // Emergency self-service only where the target allows it.
    let (code, _, err) = control(
        &w,
        "bob",
        "breakglass",
        "request web-01 --reason fire --incident INC-10 --emergency",
    )
    .await;
    assert_eq!(code, 1);
    assert!(
        err.contains("does not allow emergency self-service"),
        "{err}"
    );
    let (code, out, _) = control(
        &w,
        "bob",
        "breakglass",
        "request web-02 --reason fire --incident INC-10 --emergency",
    )
    .await;
    assert_eq!(code, 0);
    assert!(out.contains("EMERGENCY"), "{out}");
    let ev = w.wait_event("emergency grant", |e| {
        e["action"] == "grant_created" && e["emergency"] == true
    });
    assert_eq!(ev["person"], "bob");

    // A pending request expires (request_ttl = 3s here).
    let (_, out, _) = control(
        &w,
        "alice",
        "breakglass",
        "request web-01 --reason slow --incident INC-11",
    )
    .await;
    let req4 = request_id(&out);
    let ev = w.wait_event("request expiry", |e| {
        e["action"] == "request_expired" && e["request_id"] == req4.as_str()
    });
    assert_eq!(ev["correlation_id"], req4.as_str());
    let (code, _, err) = control(&w, "bob", "breakglass", &format!("approve {req4}")).await;
    assert_eq!(code, 1);
    assert!(err.contains("expired"), "{err}");

    // The holder revokes through the control channel.
    let (code, out, err) = control(
        &w,
        "alice",
        "breakglass",
        &format!("revoke {req} --reason fixed"),
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    let out = output(w.ssh("alice", "web-01", &[], &["true"])).await;
    assert!(
        text(&out.stderr).contains("was revoked"),
        "{}",
        text(&out.stderr)
    );
    gw.stop().await;

    // One correlation id ties the incident together, in the event store and the SIEM file.
    let events = w.cli_ok(&["events", "--correlation", &req, "--format", "json"]);
    let events: Vec<Value> = serde_json::from_str(&events).expect("events JSON");
    let types: Vec<&str> = events
        .iter()
        .map(|e| e["event_type"].as_str().unwrap_or(""))
        .collect();
    for want in [
        "request_created",
        "request_approved",
        "grant_created",
        "session_start",
        "session_end",
        "grant_revoked",
    ] {
        assert!(types.contains(&want), "{want} in {types:?}");
    }
    for e in &events {
        assert_eq!(e["event_data"]["correlation_id"], req.as_str());
        assert!(e["actor"].as_str().is_some_and(|a| !a.is_empty()));
    }
    validate_all_events(&w);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_alerts_arrive_within_a_second_and_never_block_access() {
    // The JSON hook fails once (retried); the Slack hook works; a third points nowhere.
    let json_hook = HttpReceiver::start(vec![500, 200]).await;
    let slack_hook = HttpReceiver::start(vec![200]).await;
    let dead_port = free_port();
    let w = World::with(Opts {
        extra_config: format!(
            "[alerts]\nwebhooks = [\n  {{ url = \"http://127.0.0.1:{}/hook\", format = \"json\", header = \"Authorization: Bearer t0k\" }},\n  {{ url = \"http://127.0.0.1:{}/slack\", format = \"slack\" }},\n  {{ url = \"http://127.0.0.1:{dead_port}/down\" }},\n]\n",
            json_hook.port, slack_hook.port
        ),
        ..Default::default()
    });
    let gw = InProcess::start(&w).await;

    let (code, out, err) = control(
        &w,
        "alice",
        "breakglass",
        "request web-01 --reason disk full --incident INC-7",
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    let asked = Instant::now();
    let req = request_id(&out);
    let (t, body) = wait_for("the Slack alert", Duration::from_secs(5), || {
        slack_hook
            .bodies()
            .into_iter()
            .find(|(_, b)| b.contains("requests break-glass access"))
    });
    let took = t.saturating_duration_since(asked);
    eprintln!("request alert reached the Slack hook {took:?} after the request");
    assert!(took <= Duration::from_secs(1), "alert took {took:?}");
    let slack: Value = serde_json::from_str(&body).expect("slack body is JSON");
    assert!(
        slack["text"].as_str().is_some_and(|t| t.contains(&req)),
        "{slack}"
    );

    // The JSON hook got it after a retry, with the custodians and the full event.
    let (_, body) = wait_for(
        "the JSON alert after a retry",
        Duration::from_secs(5),
        || {
            let b = json_hook.bodies();
            (b.len() >= 2).then(|| b[1].clone())
        },
    );
    let alert: Value = serde_json::from_str(&body).expect("json body");
    assert_eq!(alert["event"]["action"], "request_created");
    assert_eq!(alert["event"]["request_id"], req.as_str());
    assert_eq!(alert["custodians"], serde_json::json!(["carol"]));
    let head = json_hook.hits.lock().expect("lock")[1].1.clone();
    // Header names are case-insensitive (the client sends them in lower case).
    assert!(
        head.lines()
            .any(|l| l.to_ascii_lowercase().starts_with("authorization:")
                && l.ends_with(": Bearer t0k")),
        "{head}"
    );

    // Approval and session start alert too; the dead hook delays nothing.
    let (code, _, _) = control(&w, "bob", "breakglass", &format!("approve {req}")).await;
    assert_eq!(code, 0);
    let out = output(w.ssh("alice", "web-01", &[], &["echo in"])).await;
    assert_eq!(text(&out.stdout), "in\n", "{}", text(&out.stderr));
    for want in ["approved", "started a break-glass session"] {
        wait_for(&format!("alert `{want}`"), Duration::from_secs(5), || {
            slack_hook
                .bodies()
                .into_iter()
                .find(|(_, b)| b.contains(want))
        });
    }
    w.wait_ended(1);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn used_grants_get_a_review_that_goes_overdue_and_is_signed_off_once() {
    let w = World::with(Opts {
        extra_config: "[reviews]\nproduction_outage = \"3s\"\n".into(),
        ..Default::default()
    });
    let gw = InProcess::start(&w).await;
    let (_, out, _) = control(
        &w,
        "alice",
        "breakglass",
        "request web-01 --reason db locked --incident INC-20 --scenario production_outage",
    )
    .await;
    let req = request_id(&out);
    let (code, _, _) = control(&w, "bob", "breakglass", &format!("approve {req}")).await;
    assert_eq!(code, 0);
    // No review until the grant is used.
    let (_, list, _) = control(&w, "dave", "breakglass", "reviews").await;
    assert!(!list.contains(&req), "{list}");
    let out = output(w.ssh("alice", "web-01", &[], &["true"])).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let opened = w.wait_event("review opened", |e| e["action"] == "review_opened");
    assert_eq!(opened["correlation_id"], req.as_str());
    let (_, list, _) = control(&w, "dave", "breakglass", "reviews").await;
    assert!(list.contains(&req), "{list}");

    // The approver and the requester may not review their own incident.
    let (code, _, err) = control(
        &w,
        "bob",
        "breakglass",
        &format!("review {req} --findings ok --root-cause lock"),
    )
    .await;
    assert_eq!(code, 1);
    assert!(
        err.contains("took part in this incident (approver)"),
        "{err}"
    );
    let (code, _, err) = control(
        &w,
        "alice",
        "breakglass",
        &format!("review {req} --findings ok --root-cause lock"),
    )
    .await;
    assert_eq!(code, 1);
    assert!(err.contains("not a reviewer"), "{err}");

    // Unsigned past its deadline: an overdue event (and alert).
    let overdue = w.wait_event("review overdue", |e| e["action"] == "review_overdue");
    assert_eq!(overdue["correlation_id"], req.as_str());

    let (code, out, err) = control(
        &w,
        "dave",
        "breakglass",
        &format!(
            "review {req} --findings vacuum stuck on a lock --root-cause missing index on orders"
        ),
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    let signed = w.wait_event("review signed", |e| e["action"] == "review_signed");
    assert_eq!(signed["root_cause"], "missing index on orders");
    let review_id = signed["review_id"].as_str().expect("review id").to_string();
    let stored = w
        .path("data/recordings/reviews")
        .join(&req)
        .join(format!("{review_id}.json"));
    let doc: Value =
        serde_json::from_str(&std::fs::read_to_string(&stored).expect("review in the store"))
            .expect("json");
    assert_eq!(doc["signed_by"], "dave");
    let (code, _, err) = control(
        &w,
        "dave",
        "breakglass",
        &format!("review {req} --findings x --root-cause y"),
    )
    .await;
    assert_eq!(code, 1);
    assert!(err.contains("immutable"), "{err}");
    gw.stop().await;
    validate_all_events(&w);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jit_credential_is_shown_once_and_stored_only_as_a_verifier() {
    let w = World::new();
    let gw = InProcess::start(&w).await;
    let (_, out, _) = control(
        &w,
        "alice",
        "breakglass",
        "request web-01 --reason dba work --incident INC-30",
    )
    .await;
    let req = request_id(&out);
    let (code, _, err) = control(&w, "alice", "breakglass", &format!("credential {req}")).await;
    assert_eq!(code, 1, "no credential before approval");
    assert!(err.contains("no grant"), "{err}");
    control(&w, "bob", "breakglass", &format!("approve {req}")).await;
    let (code, _, err) = control(&w, "bob", "breakglass", &format!("credential {req}")).await;
    assert_eq!(code, 1);
    assert!(err.contains("not yours"), "{err}");
    let (code, out, err) = control(&w, "alice", "breakglass", &format!("credential {req}")).await;
    assert_eq!(code, 0, "{err}");
    let secret = out
        .lines()
        .find_map(|l| l.strip_prefix("password: "))
        .expect("a password line")
        .to_string();
    assert_eq!(secret.len(), 32);
    gw.stop().await;
    // The secret is nowhere on disk: not in the state file, the SIEM file or the recordings.
    for f in [
        "data/state.sqlite",
        "data/state.sqlite-wal",
        "data/siem.jsonl",
    ] {
        let bytes = std::fs::read(w.path(f)).unwrap_or_default();
        assert!(
            !bytes
                .windows(secret.len())
                .any(|win| win == secret.as_bytes()),
            "{f} must not contain the secret"
        );
    }
    let ev = w.wait_event("credential event", |e| e["action"] == "credential_issued");
    assert_eq!(ev["correlation_id"], req.as_str());

    // The quarterly access review lists accounts, custodians, approvers, grants, idle keys.
    let review = w.cli_ok(&["access-review", "--since", "1d"]);
    assert!(
        review.contains("web-01") && review.contains("custodians carol"),
        "{review}"
    );
    assert!(
        review.contains("dave") && review.contains("never used"),
        "{review}"
    );
    assert!(
        review.contains(&req) || review.contains("INC-30"),
        "{review}"
    );
}

/// Calls the JSON API with the real `curl`; returns (status, body).
async fn api(
    w: &World,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut c = Command::new(require("curl", "curl"));
    c.args(["-s", "-o", "-", "-w", "\n%{http_code}", "-X", method])
        .arg(format!("http://127.0.0.1:{}{path}", w.http_port));
    if let Some(t) = token {
        c.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    if let Some(b) = body {
        c.args([
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            &b.to_string(),
        ]);
    }
    let out = output(c).await;
    let text = text(&out.stdout);
    let (body, code) = text.rsplit_once('\n').expect("status line");
    let code: u16 = code.trim().parse().expect("status code");
    let body = serde_json::from_str(body).unwrap_or(Value::Null);
    check_openapi(method, path, code, &body);
    (code, body)
}

async fn api_token(w: &World, person: &str) -> String {
    let (code, out, err) = control(w, person, "breakglass", "token").await;
    assert_eq!(code, 0, "{err}");
    out.lines()
        .find_map(|l| l.strip_prefix("token: "))
        .expect("token line")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_api_runs_the_same_workflow_for_verified_people() {
    let w = World::new();
    let gw = InProcess::start(&w).await;
    let (code, body) = api(&w, None, "GET", "/api/v1/requests", None).await;
    assert_eq!(code, 401, "{body}");
    let (code, _) = api(&w, Some("forged"), "GET", "/api/v1/requests", None).await;
    assert_eq!(code, 401);

    let alice = api_token(&w, "alice").await;
    let bob = api_token(&w, "bob").await;
    let (code, body) = api(
        &w,
        Some(&alice),
        "POST",
        "/api/v1/requests",
        Some(serde_json::json!({"target": "web-01", "reason": "disk full", "incident": "INC-40", "duration": "30m", "scenario": "production_outage"})),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let req = body["request_id"].as_str().expect("request_id").to_string();

    let (code, body) = api(
        &w,
        Some(&alice),
        "POST",
        &format!("/api/v1/requests/{req}/approve"),
        None,
    )
    .await;
    assert_eq!(code, 403, "self-approval refused: {body}");
    let (code, body) = api(&w, Some(&bob), "GET", "/api/v1/requests", None).await;
    assert_eq!(code, 200);
    assert!(
        body["requests"]
            .as_array()
            .expect("list")
            .iter()
            .any(|r| r["id"] == req.as_str()),
        "{body}"
    );
    let (code, body) = api(
        &w,
        Some(&bob),
        "POST",
        &format!("/api/v1/requests/{req}/approve"),
        None,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let grant = body["grant_id"].as_str().expect("grant_id").to_string();
    let (code, body) = api(
        &w,
        Some(&bob),
        "POST",
        &format!("/api/v1/requests/{req}/approve"),
        None,
    )
    .await;
    assert_eq!(code, 409, "{body}");

    let (code, body) = api(&w, Some(&alice), "GET", "/api/v1/grants", None).await;
    assert_eq!(code, 200);
    assert!(
        body["grants"]
            .as_array()
            .expect("grants")
            .iter()
            .any(|g| g["id"] == grant.as_str()),
        "{body}"
    );
    let out = output(w.ssh("alice", "web-01", &[], &["echo via-api"])).await;
    assert_eq!(text(&out.stdout), "via-api\n", "{}", text(&out.stderr));

    let (code, body) = api(
        &w,
        Some(&alice),
        "POST",
        &format!("/api/v1/grants/{grant}/revoke"),
        Some(serde_json::json!({"reason": "done"})),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = api(
        &w,
        Some(&bob),
        "POST",
        "/api/v1/requests/R-nope/deny",
        Some(serde_json::json!({"reason": "x"})),
    )
    .await;
    assert_eq!(code, 404, "{body}");
    w.wait_ended(1);
    gw.stop().await;
    let ev = w.wait_event("API approval event", |e| {
        e["action"] == "request_approved" && e["actor"] == "bob"
    });
    assert_eq!(ev["correlation_id"], req.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_password_is_rotated_after_the_grant_ends() {
    let pgdir = tempfile::tempdir().expect("tempdir");
    let pg = Postgres::start(pgdir.path());
    let out = pg.psql(
        "postgres",
        &pg.superuser_password,
        "CREATE ROLE bg_dba LOGIN PASSWORD 'initial-bg-password'",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let w = World::with(Opts {
        extra_config: format!(
            "[[targets]]\nname = \"orders-db\"\nprotocol = \"postgres\"\naddress = \"127.0.0.1:{}\"\nlogin = \"bg_dba\"\napprovers = [\"bob\"]\n",
            pg.port
        ),
        ..Default::default()
    });
    // The operator puts the break-glass password in the vault once.
    w.vault_set("orders-db", "initial-bg-password");
    w.cli_ok(&["vault", "verify", "orders-db"]);
    let state = std::fs::read(w.path("data/state.sqlite")).expect("state");
    assert!(
        !state.windows(19).any(|win| win == b"initial-bg-password"),
        "the vault holds no plaintext"
    );

    // SSH to a PostgreSQL target is refused with a clear message.
    let gw = InProcess::start(&w).await;
    let g = w.cli_ok(&[
        "grant",
        "add",
        "--person",
        "alice",
        "--target",
        "orders-db",
        "--for",
        "2s",
        "--reason",
        "lock",
        "--incident",
        "INC-50",
    ]);
    let out = output(w.ssh("alice", "orders-db", &[], &["true"])).await;
    assert!(
        text(&out.stderr).contains("is a PostgreSQL target"),
        "{}",
        text(&out.stderr)
    );

    // When the grant ends the password is rotated: the old one stops working, the vault's works.
    let ev = w.wait_event("rotation event", |e| {
        e["action"] == "credential_rotated" && e["target"] == "orders-db"
    });
    assert_eq!(ev["grant_id"], g.trim());
    assert_eq!(ev["outcome"], "success", "{ev}");
    gw.stop().await;
    let old = pg.psql("bg_dba", "initial-bg-password", "SELECT 1");
    assert!(!old.status.success(), "the old password no longer logs in");
    assert!(
        text(&old.stderr).contains("password authentication failed"),
        "{}",
        text(&old.stderr)
    );
    w.cli_ok(&["vault", "verify", "orders-db"]);
    // The new password never reached the server's log in clear: ALTER ROLE got a verifier.
    let log = std::fs::read_to_string(pgdir.path().join("postgres.log")).unwrap_or_default();
    assert!(
        !log.contains("PASSWORD '") || log.contains("SCRAM-SHA-256$"),
        "{log}"
    );
    validate_all_events(&w);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_held_ssh_key_is_replaced_after_the_grant_ends() {
    let w = World::with(Opts {
        held_key: true,
        ..Default::default()
    });
    let old_pub = std::fs::read_to_string(w.path("gateway_held_key.pub")).expect("old pub");
    let old_blob = old_pub.split_whitespace().nth(1).expect("blob").to_string();
    let gw = InProcess::start(&w).await;
    w.grant("alice", "2s");
    let out = output(w.ssh("alice", "web-01", &[], &["echo before"])).await;
    assert_eq!(text(&out.stdout), "before\n", "{}", text(&out.stderr));
    let ev = w.wait_event("key rotation", |e| {
        e["action"] == "credential_rotated" && e["target"] == "web-01"
    });
    assert_eq!(ev["outcome"], "success", "{ev}");
    assert!(
        ev["message"].as_str().unwrap_or("").contains("replaced"),
        "{ev}"
    );

    // The target now trusts only the new key: the old key file no longer logs in directly.
    let ak = std::fs::read_to_string(w.path("authorized_keys")).expect("authorized_keys");
    assert!(!ak.contains(&old_blob), "old key removed: {ak}");
    assert!(
        ak.contains("breakglass-held-web-01"),
        "new key installed: {ak}"
    );
    let mut c = Command::new(require("ssh", "openssh-client"));
    c.args(["-F", "/dev/null", "-i"])
        .arg(w.path("gateway_held_key"))
        .args([
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
        ])
        .args([
            "-o",
            &format!("UserKnownHostsFile={}", w.path("kh2").display()),
        ])
        .args([
            "-p",
            &w.sshd.port.to_string(),
            &format!("{}@127.0.0.1", current_user()),
            "true",
        ])
        .stdin(std::process::Stdio::null());
    let direct = output(c).await;
    assert_eq!(
        direct.status.code(),
        Some(255),
        "the retired key is refused"
    );

    // The gateway logs in with the new key (from the vault) for the next grant.
    w.grant("alice", "30m");
    let out = output(w.ssh("alice", "web-01", &[], &["echo after"])).await;
    assert_eq!(text(&out.stdout), "after\n", "{}", text(&out.stderr));
    w.wait_ended(2);
    gw.stop().await;
    validate_all_events(&w);
}

/// Copies a directory tree (the recording store) so each tamper case starts from the original.
fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    let st = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .expect("cp");
    assert!(st.success());
}

fn writable(p: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o644)).expect("chmod");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_detects_every_kind_of_tampering() {
    let w = World::with(Opts {
        extra_limits: "flush_interval = \"100ms\"".into(),
        ..Default::default()
    });
    let gw = InProcess::start(&w).await;
    w.grant("alice", "30m");
    let out = output(w.ssh(
        "alice",
        "web-01",
        &[],
        &["for i in $(seq 1 30); do echo line-$i; sleep 0.03; done"],
    ))
    .await;
    assert!(out.status.success());
    w.wait_ended(1);
    gw.stop().await;
    let id = last_session_id(&w);
    let prefix = w.sessions()[0]["recording"]
        .as_str()
        .expect("prefix")
        .to_string();

    // Online: OK.
    let out = w.cli(&["verify", &id]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(text(&out.stdout).contains("OK"), "{}", text(&out.stdout));

    // Offline, with only the public keys and a copy of the store.
    let keys = w.path("signing.pub");
    std::fs::write(&keys, w.cli_ok(&["keys", "show", "--signing"])).expect("keys");
    let chunks: Vec<std::path::PathBuf> = {
        let dir = w.path("data/recordings").join(&prefix).join("ch0000");
        let mut v: Vec<_> = std::fs::read_dir(&dir)
            .expect("chunks")
            .map(|e| e.expect("entry").path())
            .collect();
        v.sort();
        v
    };
    assert!(
        chunks.len() >= 4,
        "several chunks to tamper with: {chunks:?}"
    );
    let store_root = w.path("data/recordings");
    let rels: Vec<std::path::PathBuf> = chunks
        .iter()
        .map(|p| {
            p.strip_prefix(&store_root)
                .expect("inside store")
                .to_path_buf()
        })
        .collect();
    let (c2, c1b, c2b) = (rels[2].clone(), rels[1].clone(), rels[2].clone());
    let (c1f, clast) = (rels[1].clone(), rels[rels.len() - 1].clone());
    let manifest = std::path::PathBuf::from(&prefix).join("session.json");
    let sig = std::path::PathBuf::from(&prefix).join("session.json.sig");

    // An attacker's own signing key, to re-sign manifests.
    let stranger_dir = tempfile::tempdir().expect("tempdir");
    let stranger = std::sync::Arc::new(
        breakglass::signing::Signer::load_or_create(stranger_dir.path()).expect("stranger key"),
    );
    let resign = {
        let stranger = stranger.clone();
        move |root: &std::path::Path, m: &std::path::Path, sg: &std::path::Path, body: Vec<u8>| {
            use base64::Engine;
            let (mp, sp) = (root.join(m), root.join(sg));
            writable(&mp);
            writable(&sp);
            let sig = serde_json::json!({
                "algorithm": "ed25519",
                "key_id": stranger.current_public.id,
                "signature": base64::engine::general_purpose::STANDARD.encode(stranger.sign(&body)),
                "sha256": sha256_hex(&body),
            });
            std::fs::write(&mp, &body).expect("write manifest");
            std::fs::write(&sp, serde_json::to_vec(&sig).expect("json")).expect("write sig");
        }
    };
    let (resign1, resign2) = (resign.clone(), resign);

    type Tamper = Box<dyn Fn(&std::path::Path)>;
    let cases: Vec<(&str, Tamper, Option<i32>, &str, bool)> = vec![
        ("untouched", Box::new(|_| {}), Some(0), "OK", false),
        (
            "sign with another key",
            {
                let (m, sg) = (manifest.clone(), sig.clone());
                Box::new(move |root| {
                    let body = std::fs::read(root.join(&m)).expect("read");
                    resign1(root, &m, &sg, body);
                })
            },
            Some(3),
            "not among the trusted keys",
            false,
        ),
        (
            "replace the manifest (drop the last chunk, re-chain, re-sign)",
            {
                let (m, sg) = (manifest.clone(), sig.clone());
                Box::new(move |root| {
                    let mut meta: Value =
                        serde_json::from_slice(&std::fs::read(root.join(&m)).expect("read"))
                            .expect("json");
                    let objs = meta["objects"].as_array_mut().expect("objects");
                    objs.pop();
                    let head = objs.last().expect("objects")["chain"].clone();
                    meta["chain_head"] = head;
                    resign2(
                        root,
                        &m,
                        &sg,
                        serde_json::to_vec_pretty(&meta).expect("json"),
                    );
                })
            },
            Some(3),
            "manifest replaced",
            true,
        ),
        (
            "flip a byte",
            Box::new(move |root| {
                let p = root.join(&c1f);
                writable(&p);
                let mut b = std::fs::read(&p).expect("read");
                let mid = b.len() / 2;
                b[mid] ^= 0x01;
                std::fs::write(&p, b).expect("write");
            }),
            Some(3),
            "was modified",
            false,
        ),
        (
            "delete a middle chunk",
            Box::new(move |root| std::fs::remove_file(root.join(&c2)).expect("rm")),
            Some(3),
            "was deleted",
            false,
        ),
        (
            "delete the last chunk",
            Box::new(move |root| std::fs::remove_file(root.join(&clast)).expect("rm")),
            Some(3),
            "was deleted",
            false,
        ),
        (
            "reorder two chunks",
            Box::new(move |root| {
                let (a, b) = (root.join(&c1b), root.join(&c2b));
                let tmp = root.join("swap");
                std::fs::rename(&a, &tmp).expect("mv");
                std::fs::rename(&b, &a).expect("mv");
                std::fs::rename(&tmp, &b).expect("mv");
            }),
            Some(3),
            "was modified",
            false,
        ),
        (
            "edit the manifest",
            {
                let m = manifest.clone();
                Box::new(move |root| {
                    let p = root.join(&m);
                    writable(&p);
                    let t = std::fs::read_to_string(&p)
                        .expect("read")
                        .replace("\"alice\"", "\"mallory\"");
                    std::fs::write(&p, t).expect("write");
                })
            },
            Some(3),
            "does not match its signature",
            false,
        ),
        (
            "delete the signature",
            {
                let s = sig.clone();
                Box::new(move |root| std::fs::remove_file(root.join(&s)).expect("rm"))
            },
            Some(3),
            "signature deleted",
            false,
        ),
        (
            "add an object",
            {
                let pfx = prefix.clone();
                Box::new(move |root| {
                    std::fs::write(
                        root.join(&pfx).join("ch0000").join("99999999.raw.lz4"),
                        b"extra",
                    )
                    .expect("write")
                })
            },
            Some(3),
            "not in the manifest",
            false,
        ),
        (
            "delete the manifest (SIEM has the head)",
            {
                let (m, s) = (manifest.clone(), sig.clone());
                Box::new(move |root| {
                    std::fs::remove_file(root.join(&m)).expect("rm");
                    std::fs::remove_file(root.join(&s)).expect("rm");
                })
            },
            Some(3),
            "manifest deleted",
            true,
        ),
        (
            "delete the manifest (no SIEM copy)",
            {
                let (m, s) = (manifest.clone(), sig.clone());
                Box::new(move |root| {
                    std::fs::remove_file(root.join(&m)).expect("rm");
                    std::fs::remove_file(root.join(&s)).expect("rm");
                })
            },
            Some(2),
            "INCOMPLETE",
            false,
        ),
    ];
    for (i, (name, tamper, code, want, with_siem)) in cases.iter().enumerate() {
        let copy = w.path(&format!("case{i}"));
        copy_tree(&w.path("data/recordings"), &copy);
        tamper(&copy);
        let mut args = vec![
            "verify".to_string(),
            id.clone(),
            "--store".into(),
            copy.display().to_string(),
            "--public-key".into(),
            keys.display().to_string(),
        ];
        if *with_siem {
            args.extend([
                "--siem".into(),
                w.path("data/siem.jsonl").display().to_string(),
            ]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = w.cli(&args);
        let report = text(&out.stdout);
        assert_eq!(
            out.status.code(),
            *code,
            "{name}: {report}{}",
            text(&out.stderr)
        );
        assert!(
            report.contains(want),
            "{name}: expected `{want}` in {report}"
        );
    }

    // A rotated signing key still verifies what the old key signed; a stranger's key does not.
    let old_key = text(&w.cli(&["keys", "show", "--signing"]).stdout);
    w.cli_ok(&["keys", "rotate-signing"]);
    let out = w.cli(&["verify", &id]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    // The rotation is announced with both key ids, and the new key is certified by the old.
    let rotated = w.wait_event("the rotation event", |e| {
        e["action"] == "signing_key_rotated"
    });
    validate("siem-event.schema.json", &rotated);
    let (new_id, old_id) = (
        rotated["signing_key_id"]
            .as_str()
            .expect("new id")
            .to_string(),
        rotated["previous_signing_key_id"]
            .as_str()
            .expect("old id")
            .to_string(),
    );
    assert!(old_key.contains(&old_id), "{old_key}");
    let chain = w.cli_ok(&["keys", "show", "--signing"]);
    assert!(
        chain.contains(&format!("# key {new_id} certified by key {old_id}"))
            && chain.contains("ed25519-cert "),
        "keys show --signing prints the chain: {chain}"
    );
    // A session signed by the new key verifies through the chain: online, and offline with the
    // printed chain; offline with only the old key (no certificate) it does not.
    let gw = InProcess::start(&w).await;
    w.grant("bob", "30m");
    let out = output(w.ssh("bob", "web-01", &[], &["echo after-rotation"])).await;
    assert!(out.status.success());
    w.wait_ended(2);
    gw.stop().await;
    let id2 = last_session_id(&w);
    let sig2 = w.sessions()[0]["recording"]
        .as_str()
        .expect("prefix")
        .to_string();
    let sig2: Value = serde_json::from_slice(
        &std::fs::read(
            w.path("data/recordings")
                .join(sig2)
                .join("session.json.sig"),
        )
        .expect("sig"),
    )
    .expect("json");
    assert_eq!(sig2["key_id"], new_id.as_str(), "signed by the new key");
    let out = w.cli(&["verify", &id2]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    let (chain_file, old_file) = (w.path("chain.pub"), w.path("old.pub"));
    std::fs::write(&chain_file, &chain).expect("write");
    std::fs::write(&old_file, &old_key).expect("write");
    let store = w.path("data/recordings");
    let offline = |keys: &std::path::Path, store: &std::path::Path| {
        w.cli(&[
            "verify",
            &id2,
            "--store",
            store.to_str().expect("p"),
            "--public-key",
            keys.to_str().expect("p"),
        ])
    };
    let out = offline(&chain_file, &store);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    // The certificate is kept with the evidence, so the key pinned at install time is enough.
    let out = offline(&old_file, &store);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    // Without the certificate, the old key alone does not vouch for the new one.
    let no_cert = w.path("store-without-certificates");
    copy_tree(&store, &no_cert);
    std::fs::remove_dir_all(no_cert.join(".breakglass/signing-keys")).expect("rm certificates");
    let out = offline(&old_file, &no_cert);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stdout));
    assert!(
        text(&out.stdout).contains(&format!(
            "signed by key {new_id} which is not among the trusted keys"
        )),
        "{}",
        text(&out.stdout)
    );
    let stranger = w.path("stranger.pub");
    std::fs::write(
        &stranger,
        "ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGb7mZ1Bq0Ckq8xN3sKZ0x0pXqk8iJ9C\n",
    )
    .expect("write");
    let out = w.cli(&[
        "verify",
        &id,
        "--store",
        w.path("data/recordings").to_str().expect("p"),
        "--public-key",
        stranger.to_str().expect("p"),
    ]);
    assert_ne!(out.status.code(), Some(0), "{}", text(&out.stdout));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_store_outage_loses_nothing_and_checkpoints_reach_the_siem() {
    let w = World::with(Opts {
        extra_limits:
            "storage_grace = \"10s\"\ncheckpoint_interval = \"1s\"\nflush_interval = \"200ms\""
                .into(),
        ..Default::default()
    });
    let gw = InProcess::start(&w).await;
    w.grant("alice", "30m");
    let mut child = start_long_session(
        &w,
        &[],
        "for i in $(seq 1 60); do echo tick-$i; sleep 0.05; done",
    );
    let prefix = w.sessions()[0]["recording"]
        .as_str()
        .expect("prefix")
        .to_string();
    let dir = w.path("data/recordings").join(&prefix);
    let aside = w.path("aside");
    // The store fails (the session's directory is a file) for about a second, then comes back.
    wait_for("a first chunk", Duration::from_secs(10), || {
        dir.join("ch0000").exists().then_some(())
    });
    std::fs::rename(&dir, &aside).expect("move aside");
    std::fs::write(&dir, b"outage").expect("block");
    let cp = w.wait_event("a checkpoint", |e| e["action"] == "recording_checkpoint");
    assert!(
        cp["chain_head"].as_str().is_some_and(|h| h.len() == 64),
        "{cp}"
    );
    std::fs::remove_file(&dir).expect("unblock");
    std::fs::rename(&aside, &dir).expect("move back");
    let (code, out, err) = wait_exit(&mut child, Duration::from_secs(20));
    assert_eq!(code, Some(0), "the session survived the outage: {err}");
    assert!(out.contains("tick-60"));
    w.wait_ended(1);
    gw.stop().await;
    let id = last_session_id(&w);
    let cast = export(&w, &id);
    for i in 1..=60 {
        assert!(
            cast.contains(&format!("tick-{i}\\n")),
            "tick-{i} recorded despite the outage"
        );
    }
    let out = w.cli(&["verify", &id]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recordings_go_to_s3_with_object_lock_and_unlocked_buckets_are_refused() {
    let logs = tempfile::tempdir().expect("tempdir");
    let mut s3 = S3Server::start(&logs.path().join("moto.log"));
    s3.bucket("bg-locked", Some(1));
    s3.bucket("bg-plain", None);
    let storage = |bucket: &str| {
        format!(
            "[storage]\nkind = \"s3\"\nbucket = \"{bucket}\"\nprefix = \"prod\"\nendpoint = \"{}\"\nregion = \"us-east-1\"\nobject_lock = \"compliance\"\nretention_days = 1\n",
            s3.endpoint()
        )
    };

    // A bucket without Object Lock: check-config fails and the gateway refuses to start.
    let plain = World::with(Opts {
        extra_config: storage("bg-plain"),
        ..Default::default()
    });
    let out = plain.cli(&["check-config", plain.config_path.to_str().expect("path")]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stdout));
    assert!(
        text(&out.stdout).contains("Object Lock"),
        "{}",
        text(&out.stdout)
    );
    let mut serve = Command::new(env!("CARGO_BIN_EXE_breakglass"))
        .args(["serve", "--config"])
        .arg(&plain.config_path)
        .envs(S3_ENV)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("serve");
    let status = wait_for("serve to refuse", Duration::from_secs(20), || {
        serve.try_wait().expect("try_wait")
    });
    assert!(
        !status.success(),
        "the gateway must not run on an unlocked bucket"
    );

    // A locked bucket: sessions are recorded there and verify against it.
    let w = World::with(Opts {
        extra_config: storage("bg-locked"),
        extra_limits: "storage_grace = \"2s\"".into(),
        ..Default::default()
    });
    let out = w.cli(&["check-config", w.config_path.to_str().expect("path")]);
    assert!(out.status.success(), "{}", text(&out.stdout));
    let _gw = Process::start(&w);
    w.grant("alice", "30m");
    let out = output(w.ssh("alice", "web-01", &[], &["echo into-s3"])).await;
    assert_eq!(text(&out.stdout), "into-s3\n", "{}", text(&out.stderr));
    w.wait_ended(1);
    let id = last_session_id(&w);
    let out = w.cli(&["verify", &id]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(export(&w, &id).contains("into-s3"));

    // The objects carry a COMPLIANCE lock: deleting a version is refused, and nothing was
    // written to the local directory.
    let out = s3.boto(
        "objs = s3.list_object_versions(Bucket='bg-locked', Prefix='prod/sessions/')['Versions']\n\
         k = [o for o in objs if o['Key'].endswith('session.json')][0]\n\
         h = s3.head_object(Bucket='bg-locked', Key=k['Key'], VersionId=k['VersionId'])\n\
         print('MODE', h.get('ObjectLockMode'))\n\
         try:\n    s3.delete_object(Bucket='bg-locked', Key=k['Key'], VersionId=k['VersionId'])\n    print('DELETED')\n\
         except Exception as e:\n    print('REFUSED', e)",
    );
    let said = text(&out.stdout);
    assert!(
        said.contains("MODE COMPLIANCE"),
        "{said}{}",
        text(&out.stderr)
    );
    assert!(
        said.contains("REFUSED") && !said.contains("DELETED"),
        "{said}"
    );
    assert!(
        !w.path("data/recordings/sessions").exists(),
        "recordings went to S3 only"
    );

    // Overwrites are refused: the gateway writes with If-None-Match, and so does this attempt.
    let out = s3.boto(
        "k = [o['Key'] for o in s3.list_objects_v2(Bucket='bg-locked', Prefix='prod/sessions/')['Contents'] if o['Key'].endswith('session.json')][0]\n\
         try:\n    s3.put_object(Bucket='bg-locked', Key=k, Body=b'forged', IfNoneMatch='*', ChecksumAlgorithm='SHA256')\n    print('OVERWRITTEN')\n\
         except Exception as e:\n    print('REFUSED', e)",
    );
    let said = text(&out.stdout);
    assert!(
        said.contains("REFUSED") && !said.contains("OVERWRITTEN"),
        "{said}{}",
        text(&out.stderr)
    );

    // The store goes away mid-session: the session ends within the grace period and new
    // sessions are refused.
    w.grant("bob", "30m");
    let mut child = w
        .ssh(
            "bob",
            "web-01",
            &[],
            &["while true; do echo tick; sleep 0.05; done"],
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start ssh");
    wait_for("bob's session", Duration::from_secs(10), || {
        (w.siem_events()
            .iter()
            .filter(|e| e["action"] == "session_start")
            .count()
            >= 2)
            .then_some(())
    });
    let down = Instant::now();
    s3.stop();
    let (code, _out, err) = wait_exit(&mut child, Duration::from_secs(15));
    eprintln!(
        "session ended {:?} after the S3 server stopped (grace 2s)",
        down.elapsed()
    );
    assert!(
        down.elapsed() < Duration::from_secs(6),
        "ended within the grace period (plus a flush)"
    );
    assert_ne!(code, Some(0));
    assert!(err.contains("recording failed"), "{err}");
    let out = output(w.ssh("bob", "web-01", &[], &["echo should-not-run"])).await;
    assert!(!text(&out.stdout).contains("should-not-run"));
    assert!(
        text(&out.stderr).contains("never run unrecorded"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_during_a_store_outage_still_loses_at_most_a_second() {
    let w = World::with(Opts {
        extra_limits: "storage_grace = \"30s\"\nflush_interval = \"200ms\"".into(),
        ..Default::default()
    });
    let mut gw = Process::start(&w);
    w.grant("alice", "30m");
    let mut child = w
        .ssh(
            "alice",
            "web-01",
            &[],
            &["for i in $(seq 1 400); do echo line-$i; sleep 0.02; done; sleep 60"],
        )
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start ssh");
    let rx = stamped_lines(&mut child);
    let mut seen = Vec::new();
    while let Ok(x) = rx.recv_timeout(Duration::from_secs(15)) {
        seen.push(x);
        if seen.len() >= 40 {
            break;
        }
    }
    let prefix = w.sessions()[0]["recording"]
        .as_str()
        .expect("prefix")
        .to_string();
    let dir = w.path("data/recordings").join(&prefix);
    let aside = w.path("aside");
    std::fs::rename(&dir, &aside).expect("move aside");
    std::fs::write(&dir, b"outage").expect("block");
    // The store is down: chunks go to the local spool.
    let spool = w.path("data/spool").join(&prefix).join("ch0000");
    wait_for("a spooled chunk", Duration::from_secs(10), || {
        std::fs::read_dir(&spool)
            .ok()
            .and_then(|mut d| d.next())
            .map(|_| ())
    });
    while let Ok(x) = rx.recv_timeout(Duration::from_millis(1500)) {
        seen.push(x);
        if seen.len() >= 150 {
            break;
        }
    }
    let killed_at = Instant::now();
    gw.kill9();
    let _ = child.kill();
    let _ = child.wait();
    std::fs::remove_file(&dir).expect("unblock");
    std::fs::rename(&aside, &dir).expect("move back");

    // The restart drains the spool, then seals the session as INCOMPLETE.
    let _gw2 = Process::start(&w);
    let id = last_session_id(&w);
    w.wait_event("crash recovery", |e| e["reason"] == "gateway_crashed");
    let cast = export(&w, &id);
    let must: Vec<&String> = seen
        .iter()
        .filter(|(t, _)| *t + Duration::from_secs(1) <= killed_at)
        .map(|(_, l)| l)
        .collect();
    assert!(must.len() > 40, "lines were seen during the outage");
    for l in must {
        assert!(
            cast.contains(&format!("{l}\\n")),
            "{l} (seen over 1 s before the kill, during the outage) survived"
        );
    }
    let out = w.cli(&["verify", &id]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stdout));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_through_the_gateway_with_tls_scram_and_a_jit_credential() {
    let (_pg, _pgdir, w, gw, _certs) = pg_world("", true).await;
    let (_req, secret) = pg_credential(&w, "30m").await;

    let psql = |user: &str, password: &str, sslmode: &str, sql: &str| {
        let mut c = Command::new(require("psql", "postgresql-client"));
        c.arg(format!(
            "host=127.0.0.1 port={} user={user} dbname=orders-db sslmode={sslmode}",
            w.pg_port
        ))
        .args(["-XAtc", sql])
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(std::process::Stdio::null());
        c
    };
    let out = output(psql("alice", &secret, "require", "select 40+2")).await;
    assert_eq!(text(&out.stdout).trim(), "42", "{}", text(&out.stderr));
    let out = output(psql(
        "alice",
        &secret,
        "require",
        "create table t(x int); insert into t values (1),(2); select count(*) from t",
    ))
    .await;
    assert_eq!(
        text(&out.stdout).lines().last(),
        Some("2"),
        "{}",
        text(&out.stderr)
    );

    // verify-full: the client checks the gateway's certificate.
    let mut c = Command::new(require("psql", "postgresql-client"));
    c.arg(format!(
        "host=127.0.0.1 port={} user=alice dbname=orders-db sslmode=verify-full sslrootcert={}",
        w.pg_port,
        _certs.path().join("cert.pem").display()
    ))
    .args(["-XAtc", "select 6*7"])
    .env("PGPASSWORD", &secret)
    .stdin(std::process::Stdio::null());
    let out = output(c).await;
    assert_eq!(
        text(&out.stdout).trim(),
        "42",
        "verify-full: {}",
        text(&out.stderr)
    );
    let out = output(psql("alice", &secret, "require", "select * from nosuch")).await;
    assert!(
        text(&out.stderr).contains("nosuch"),
        "{}",
        text(&out.stderr)
    );
    let out = output(psql("alice", &secret, "require", "copy t to stdout")).await;
    assert_eq!(text(&out.stdout), "1\n2\n", "{}", text(&out.stderr));

    for (user, pw, mode, want) in [
        (
            "alice",
            "wrong-password",
            "require",
            "password authentication failed",
        ),
        ("alice", secret.as_str(), "disable", "requires TLS"),
        (
            "bob",
            "whatever",
            "require",
            "password authentication failed",
        ),
    ] {
        let out = output(psql(user, pw, mode, "select 1")).await;
        assert!(!out.status.success(), "{user}/{mode} must be refused");
        assert!(
            text(&out.stderr).contains(want),
            "{user}/{mode}: {}",
            text(&out.stderr)
        );
    }
    w.wait_ended(5);
    gw.stop().await;

    let sessions = w.sessions();
    let pgs: Vec<&Value> = sessions
        .iter()
        .filter(|s| s["protocol"] == "postgres")
        .collect();
    assert_eq!(pgs.len(), 5, "{sessions:?}");
    for s in pgs {
        assert!(
            s["bytes_in"].as_u64().unwrap_or(0) > 0 && s["bytes_out"].as_u64().unwrap_or(0) > 0,
            "{s}"
        );
        let id = s["id"].as_str().expect("id");
        let out = w.cli(&["verify", id]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    }
    // Every session exports as a SQL timeline that validates against its schema.
    let mut all = Vec::new();
    for s in &sessions {
        let jsonl = export(&w, s["id"].as_str().expect("id"));
        assert!(
            !jsonl.contains(&secret),
            "the credential is not on the record"
        );
        for line in jsonl.lines() {
            let e: Value = serde_json::from_str(line).expect("JSONL");
            validate("sql-event.schema.json", &e);
            all.push(e);
        }
    }
    assert!(all.iter().any(|e| e["event"] == "query"
        && e["sql"]
            .as_str()
            .is_some_and(|q| q.contains("create table t"))));
    assert!(all
        .iter()
        .any(|e| e["event"] == "complete" && e["command_tag"] == "INSERT 0 2"));
    assert!(all
        .iter()
        .any(|e| e["event"] == "error" && e["error"]["sqlstate"] == "42P01"));
    assert!(
        all.iter()
            .any(|e| e["event"] == "copy" && e["copy_direction"] == "out" && e["rows"] == 2),
        "{all:#?}"
    );
    let timeline = w.cli_ok(&["replay", sessions[0]["id"].as_str().expect("id")]);
    assert!(
        timeline.contains("->"),
        "replay prints the statement timeline: {timeline}"
    );

    // A reviewer finds the statement by its text, and the hit says where in which session.
    let gw = InProcess::start(&w).await;
    let bob = api_token(&w, "bob").await;
    let (code, body) = api(
        &w,
        Some(&bob),
        "GET",
        "/api/v1/search?q=CREATE%20TABLE%20t",
        None,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let hits = body["hits"].as_array().expect("hits");
    assert_eq!(hits.len(), 1, "{body}");
    let hit = &hits[0];
    assert_eq!(
        (hit["kind"].as_str(), hit["protocol"].as_str()),
        (Some("sql"), Some("postgres"))
    );
    let sid = hit["session_id"].as_str().expect("session");
    let (code, body) = api(
        &w,
        Some(&bob),
        "GET",
        &format!("/api/v1/sessions/{sid}/channels/{}/sql", hit["channel"]),
        None,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let at = body["events"]
        .as_array()
        .expect("events")
        .iter()
        .find(|e| {
            e["sql"]
                .as_str()
                .is_some_and(|q| q.contains("create table t"))
        })
        .expect("the statement in the timeline");
    assert_eq!(
        at["time"], hit["time"],
        "the hit points at the statement's moment"
    );
    // An error is in the timeline of its session, for the UI to highlight.
    let (code, body) = api(&w, Some(&bob), "GET", "/api/v1/search?q=nosuch", None).await;
    assert_eq!(code, 200, "{body}");
    let sid = body["hits"][0]["session_id"]
        .as_str()
        .expect("a hit for nosuch");
    let (_, body) = api(
        &w,
        Some(&bob),
        "GET",
        &format!("/api/v1/sessions/{sid}/channels/0/sql"),
        None,
    )
    .await;
    assert!(
        body["events"]
            .as_array()
            .is_some_and(|ev| ev.iter().any(|e| e["event"] == "error")),
        "{body}"
    );
    gw.stop().await;
    validate_all_events(&w);
}

/// How [`pg_world_with`] sets up the cluster and the gateway.
#[derive(Default)]
struct PgOpts<'a> {
    /// Extra `[limits]` lines.
    limits: &'a str,
    /// Whether the gateway's PostgreSQL listener presents a certificate (and requires TLS).
    client_tls: bool,
    /// Extra `[postgres]` lines.
    postgres: &'a str,
    /// The cluster runs with `ssl = on` and this certificate and key.
    server_tls: Option<(&'a std::path::Path, &'a std::path::Path)>,
    /// Lines before initdb's own in the cluster's `pg_hba.conf`.
    hba_first: &'a str,
    /// SQL the superuser runs once the cluster is up (more roles).
    sql: &'a str,
    /// Extra lines for the `orders-db` target.
    target: &'a str,
    /// More config (e.g. `[[targets]]`); `{pg_port}` becomes the cluster's port.
    more: &'a str,
    /// More (target, password) pairs for the vault.
    vault: &'a [(&'a str, &'a str)],
}

/// A PostgreSQL target behind the gateway: a real cluster, a TLS certificate, the vault
/// password, and alice approved with a fetched JIT credential. Returns (cluster, world,
/// gateway, certificate dir).
async fn pg_world(
    extra_limits: &str,
    tls: bool,
) -> (
    Postgres,
    tempfile::TempDir,
    World,
    InProcess,
    tempfile::TempDir,
) {
    pg_world_with(PgOpts {
        limits: extra_limits,
        client_tls: tls,
        ..Default::default()
    })
    .await
}

/// [`pg_world`] with more options.
async fn pg_world_with(
    opts: PgOpts<'_>,
) -> (
    Postgres,
    tempfile::TempDir,
    World,
    InProcess,
    tempfile::TempDir,
) {
    let pgdir = tempfile::tempdir().expect("tempdir");
    let pg = Postgres::start_with(
        pgdir.path(),
        PgServerOpts {
            tls: opts.server_tls,
            hba_first: opts.hba_first,
        },
    );
    for sql in [
        "CREATE ROLE bg_dba LOGIN SUPERUSER PASSWORD 'initial-bg-password'",
        opts.sql,
    ] {
        if sql.is_empty() {
            continue;
        }
        let out = pg.psql("postgres", &pg.superuser_password, sql);
        assert!(out.status.success(), "{sql}: {}", text(&out.stderr));
    }
    let certs = tempfile::tempdir().expect("tempdir");
    let (cert, key) = self_signed_cert(certs.path());
    let w = World::with(Opts {
        extra_limits: opts.limits.to_string(),
        extra_config: format!(
            "[siem]\nactions = true\n\n[postgres]\n{}{}\n\n[[targets]]\nname = \"orders-db\"\nprotocol = \"postgres\"\naddress = \"127.0.0.1:{}\"\nlogin = \"bg_dba\"\napprovers = [\"bob\"]\n{}\n\n{}\n",
            if opts.client_tls {
                format!("tls_cert = \"{}\"\ntls_key = \"{}\"\n", cert.display(), key.display())
            } else {
                String::new()
            },
            opts.postgres,
            pg.port,
            opts.target,
            opts.more.replace("{pg_port}", &pg.port.to_string()),
        ),
        ..Default::default()
    });
    w.vault_set("orders-db", "initial-bg-password");
    for (target, password) in opts.vault {
        w.vault_set(target, password);
    }
    let gw = InProcess::start(&w).await;
    (pg, pgdir, w, gw, certs)
}

/// alice's JIT credential for a fresh approved request on orders-db lasting `duration`.
async fn pg_credential(w: &World, duration: &str) -> (String, String) {
    pg_credential_for(w, "orders-db", duration).await
}

/// alice's JIT credential for a fresh approved request on `target` lasting `duration`.
async fn pg_credential_for(w: &World, target: &str, duration: &str) -> (String, String) {
    let (_, out, _) = control(
        w,
        "alice",
        "breakglass",
        &format!("request {target} --reason locked table --incident INC-61 --for {duration}"),
    )
    .await;
    let req = request_id(&out);
    control(w, "bob", "breakglass", &format!("approve {req}")).await;
    let (_, out, _) = control(w, "alice", "breakglass", &format!("credential {req}")).await;
    (
        req,
        out.lines()
            .find_map(|l| l.strip_prefix("password: "))
            .expect("password")
            .to_string(),
    )
}

fn psql_cmd(w: &World, password: &str, sql: &str) -> Command {
    psql_cmd_to(w, "orders-db", password, sql)
}

/// `psql -XAtc SQL` as alice through the gateway (TLS) to `target`.
fn psql_cmd_to(w: &World, target: &str, password: &str, sql: &str) -> Command {
    let mut c = Command::new(require("psql", "postgresql-client"));
    c.arg(format!(
        "host=127.0.0.1 port={} user=alice dbname={target} sslmode=require",
        w.pg_port
    ))
    .args(["-XAtc", sql])
    .env("PGPASSWORD", password)
    .env("PGCONNECT_TIMEOUT", "10")
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped());
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_sessions_get_warnings_and_are_cut_at_the_deadline_and_on_revoke() {
    let (_pg, _pgdir, w, gw, _certs) = pg_world(
        "warn_before = [\"2s\"]\ncheckpoint_interval = \"500ms\"",
        true,
    )
    .await;
    // Deadline: a 4 s grant; a long query is cut with FATAL 57P01 after a NOTICE.
    let (_req, secret) = pg_credential(&w, "4s").await;
    let mut child = psql_cmd(&w, &secret, "select pg_sleep(30)")
        .spawn()
        .expect("psql");
    w.wait_event("pg session start", |e| {
        e["action"] == "session_start" && e["protocol"] == "postgres"
    });
    let (code, _out, err) = wait_exit(&mut child, Duration::from_secs(15));
    assert_ne!(code, Some(0));
    assert!(err.contains("deadline was reached"), "{err}");
    assert!(
        err.contains("this session ends in 2s"),
        "the NOTICE warning came first: {err}"
    );
    let expired = w.wait_event("pg expiry", |e| {
        e["action"] == "session_expired" && e["protocol"] == "postgres"
    });
    let deadline =
        chrono::DateTime::parse_from_rfc3339(expired["deadline"].as_str().expect("deadline"))
            .expect("rfc3339");
    let end = w.wait_event("pg end", |e| {
        e["action"] == "session_end" && e["protocol"] == "postgres"
    });
    let ended = chrono::DateTime::parse_from_rfc3339(end["timestamp"].as_str().expect("ts"))
        .expect("rfc3339");
    let late = ended.signed_duration_since(deadline);
    eprintln!("postgres session ended {late} after its deadline");
    assert!(late <= chrono::Duration::milliseconds(1000), "{late}");
    // Its chain head reached the SIEM while it ran, as for SSH.
    let cp = w.wait_event("pg checkpoint", |e| {
        e["action"] == "recording_checkpoint" && e["protocol"] == "postgres"
    });
    assert_eq!(cp["session_id"], end["session_id"]);
    assert!(cp["objects"].as_u64().is_some_and(|n| n >= 1), "{cp}");

    // Revoke: the session ends within a second with the reason.
    let (req, secret) = pg_credential(&w, "30m").await;
    let mut child = psql_cmd(&w, &secret, "select pg_sleep(30)")
        .spawn()
        .expect("psql");
    wait_for("the second pg session", Duration::from_secs(10), || {
        (w.siem_events()
            .iter()
            .filter(|e| e["action"] == "session_start" && e["protocol"] == "postgres")
            .count()
            >= 2)
            .then_some(())
    });
    let (code, _, _) = control(
        &w,
        "alice",
        "breakglass",
        &format!("revoke {req} --reason done"),
    )
    .await;
    assert_eq!(code, 0);
    let revoked = Instant::now();
    let (code, _out, err) = wait_exit(&mut child, Duration::from_secs(10));
    eprintln!(
        "postgres session cut {:?} after the revoke",
        revoked.elapsed()
    );
    assert!(revoked.elapsed() <= Duration::from_millis(1000));
    assert_ne!(code, Some(0));
    assert!(err.contains("revoked"), "{err}");
    gw.stop().await;
    validate_all_events(&w);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_cancel_reaches_the_backend_through_the_gateway() {
    let (pg, _pgdir, w, gw, _certs) = pg_world("", true).await;
    let (_req, secret) = pg_credential(&w, "30m").await;
    cancel_through_the_gateway(&pg, &w, "orders-db", &secret);
    gw.stop().await;
}

/// Runs `select pg_sleep(30)` with psql through the gateway to `target`, presses Ctrl-C once
/// it runs upstream, and checks that the backend cancelled it.
fn cancel_through_the_gateway(pg: &Postgres, w: &World, target: &str, secret: &str) {
    let child = sleep_upstream(pg, w, target, secret);
    press_ctrl_c(child);
}

/// psql running `select pg_sleep(30)` through the gateway to `target`, once the query runs
/// upstream.
fn sleep_upstream(pg: &Postgres, w: &World, target: &str, secret: &str) -> std::process::Child {
    let child = psql_cmd_to(w, target, secret, "select pg_sleep(30)")
        .spawn()
        .expect("psql");
    w.wait_event("pg session start", |e| {
        e["action"] == "session_start" && e["protocol"] == "postgres" && e["target"] == target
    });
    // Wait until the query runs upstream, then press Ctrl-C (SIGINT) in psql.
    wait_for("pg_sleep to run", Duration::from_secs(10), || {
        let out = pg.psql(
            "postgres",
            &pg.superuser_password,
            "select count(*) from pg_stat_activity where query like 'select pg_sleep%'",
        );
        (text(&out.stdout).trim() == "1").then_some(())
    });
    child
}

/// Sends psql SIGINT (Ctrl-C) and checks that the backend cancelled its query.
fn press_ctrl_c(mut child: std::process::Child) {
    let sent = Instant::now();
    let st = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(st.success());
    let (code, _out, err) = wait_exit(&mut child, Duration::from_secs(10));
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "cancelled, not timed out"
    );
    assert_ne!(code, Some(0));
    assert!(
        err.contains("canceling statement due to user request"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_with_a_pinned_certificate_reaches_a_hostssl_only_target() {
    // The cluster has ssl = on with a self-signed certificate for 127.0.0.1 and refuses
    // bg_dba without TLS; the target pins that certificate as its ca_file.
    let tls = tempfile::tempdir().expect("tempdir");
    let (cert, key) = self_signed_cert(tls.path());
    let pinned = |name: &str, address: &str, mode: &str| {
        format!(
            "[[targets]]\nname = \"{name}\"\nprotocol = \"postgres\"\naddress = \"{address}\"\nlogin = \"bg_dba\"\napprovers = [\"bob\"]\ntls = \"{mode}\"\nca_file = \"{}\"\n",
            cert.display()
        )
    };
    let more = format!(
        "{}\n[[targets]]\nname = \"orders-plain\"\nprotocol = \"postgres\"\naddress = \"127.0.0.1:{{pg_port}}\"\nlogin = \"bg_dba\"\napprovers = [\"bob\"]\n",
        // The certificate names 127.0.0.1, not localhost: `require` does not check the name.
        pinned("orders-by-name", "localhost:{pg_port}", "require"),
    );
    let (pg, _pgdir, w, gw, _certs) = pg_world_with(PgOpts {
        client_tls: true,
        server_tls: Some((&cert, &key)),
        hba_first: "hostnossl all bg_dba all reject",
        target: &format!("tls = \"verify-full\"\nca_file = \"{}\"", cert.display()),
        more: &more,
        vault: &[
            ("orders-by-name", "initial-bg-password"),
            ("orders-plain", "initial-bg-password"),
        ],
        ..Default::default()
    })
    .await;
    let ssl = "select ssl from pg_stat_ssl where pid = pg_backend_pid()";
    for target in ["orders-db", "orders-by-name"] {
        let (_req, secret) = pg_credential_for(&w, target, "30m").await;
        let out = output(psql_cmd_to(&w, target, &secret, ssl)).await;
        assert_eq!(
            text(&out.stdout).trim(),
            "t",
            "{target}: the target sees an encrypted connection: {}",
            text(&out.stderr)
        );
    }
    // Without tls, the target's pg_hba.conf refuses the gateway, and the client is told.
    let (_req, secret) = pg_credential_for(&w, "orders-plain", "30m").await;
    let out = output(psql_cmd_to(&w, "orders-plain", &secret, "select 1")).await;
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("cannot reach target orders-plain") && err.contains("no encryption"),
        "{err}"
    );
    // Cancel goes to the target on a plain connection, which it accepts even so.
    let (req, secret) = pg_credential(&w, "30m").await;
    cancel_through_the_gateway(&pg, &w, "orders-db", &secret);
    w.wait_ended(3);
    // Rotation after the grant ends logs in over TLS too (the target refuses it otherwise).
    let (code, _, _) = control(
        &w,
        "alice",
        "breakglass",
        &format!("revoke {req} --reason done"),
    )
    .await;
    assert_eq!(code, 0);
    let ev = w.wait_event("rotation", |e| {
        e["action"] == "credential_rotated" && e["target"] == "orders-db"
    });
    assert_eq!(ev["outcome"], "success", "{ev}");
    gw.stop().await;
    let old = pg.psql("bg_dba", "initial-bg-password", "select 1");
    assert!(!old.status.success(), "the old password no longer logs in");
    w.cli_ok(&["vault", "verify", "orders-db"]);
    validate_all_events(&w);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_refuses_a_certificate_outside_ca_file_with_a_clear_fatal() {
    let tls = tempfile::tempdir().expect("tempdir");
    let (cert, key) = self_signed_cert(tls.path());
    let other = tempfile::tempdir().expect("tempdir");
    let (wrong, _) = self_signed_cert(other.path());
    // A server that answers N to SSLRequest, as PostgreSQL with ssl = off does.
    let no_tls = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let no_tls_port = no_tls.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for mut s in no_tls.incoming().flatten() {
            let mut req = [0u8; 8];
            if s.read_exact(&mut req).is_ok() {
                let _ = s.write_all(b"N");
            }
            let _ = s.read_to_end(&mut Vec::new());
        }
    });
    let target = |name: &str, address: &str, ca: &std::path::Path| {
        format!(
            "[[targets]]\nname = \"{name}\"\nprotocol = \"postgres\"\naddress = \"{address}\"\nlogin = \"bg_dba\"\napprovers = [\"bob\"]\ntls = \"verify-full\"\nca_file = \"{}\"\n",
            ca.display()
        )
    };
    let more = [
        target("orders-wrong-ca", "127.0.0.1:{pg_port}", &wrong),
        target("orders-by-name", "localhost:{pg_port}", &cert),
        target("orders-no-tls", &format!("127.0.0.1:{no_tls_port}"), &cert),
    ]
    .join("\n");
    let (_pg, _pgdir, w, gw, _certs) = pg_world_with(PgOpts {
        client_tls: true,
        server_tls: Some((&cert, &key)),
        target: &format!("tls = \"verify-full\"\nca_file = \"{}\"", cert.display()),
        more: &more,
        vault: &[
            ("orders-wrong-ca", "initial-bg-password"),
            ("orders-by-name", "initial-bg-password"),
            ("orders-no-tls", "initial-bg-password"),
        ],
        ..Default::default()
    })
    .await;
    for (target, want) in [
        // UnknownIssuer or BadSignature, depending on whether the other CA shares the name.
        ("orders-wrong-ca", "invalid peer certificate: "),
        ("orders-by-name", "not valid for name"),
        (
            "orders-no-tls",
            "does not accept TLS (it answered 'N' to SSLRequest)",
        ),
    ] {
        let (_req, secret) = pg_credential_for(&w, target, "30m").await;
        let out = output(psql_cmd_to(&w, target, &secret, "select 1")).await;
        let err = text(&out.stderr);
        eprintln!("{target}: {}", err.trim());
        assert!(!out.status.success(), "{target} must be refused");
        assert!(
            err.contains(&format!("FATAL:  cannot reach target {target}")) && err.contains(want),
            "{target}: {err}"
        );
    }
    // No session started, each refusal is on the SIEM record as the upstream's doing, and the
    // gateway still serves the correctly pinned target.
    let (_req, secret) = pg_credential(&w, "30m").await;
    let out = output(psql_cmd(&w, &secret, "select 6*7")).await;
    assert_eq!(text(&out.stdout).trim(), "42", "{}", text(&out.stderr));
    w.wait_ended(1);
    gw.stop().await;
    let events = w.siem_events();
    let denied: Vec<&Value> = events
        .iter()
        .filter(|e| e["action"] == "session_denied" && e["reason"] == "upstream_unreachable")
        .collect();
    assert_eq!(denied.len(), 3, "{denied:#?}");
    assert!(
        denied.iter().all(|e| e["side"] == "upstream"),
        "{denied:#?}"
    );
    assert_eq!(
        events
            .iter()
            .filter(|e| e["action"] == "session_start")
            .count(),
        1
    );
    validate_all_events(&w);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_upstream_needs_an_opt_in_and_verified_tls_and_trust_logins_work() {
    let tls = tempfile::tempdir().expect("tempdir");
    let (cert, key) = self_signed_cert(tls.path());
    let target = |name: &str, login: &str, extra: &str| {
        format!(
            "[[targets]]\nname = \"{name}\"\nprotocol = \"postgres\"\naddress = \"127.0.0.1:{{pg_port}}\"\nlogin = \"{login}\"\napprovers = [\"bob\"]\n{extra}\n"
        )
    };
    let opted_in = format!(
        "tls = \"verify-full\"\nca_file = \"{}\"\nallow_password_auth = true",
        cert.display()
    );
    let more = target("orders-md5", "bg_md5", "")
        + &target("orders-md5-tls", "bg_md5", &opted_in)
        + &target("orders-trust", "bg_trust", "");
    let (pg, _pgdir, w, gw, _certs) = pg_world_with(PgOpts {
        client_tls: true,
        server_tls: Some((&cert, &key)),
        // The first matching line wins: md5 for bg_md5, no password at all for bg_trust.
        hba_first: "host all bg_md5 127.0.0.1/32 md5\nhost all bg_trust 127.0.0.1/32 trust",
        sql: "SET password_encryption = 'md5'; \
              CREATE ROLE bg_md5 LOGIN PASSWORD 'md5-bg-password'; \
              CREATE ROLE bg_trust LOGIN",
        more: &more,
        vault: &[
            ("orders-md5", "md5-bg-password"),
            ("orders-md5-tls", "md5-bg-password"),
            ("orders-trust", "not-asked-for"),
        ],
        ..Default::default()
    })
    .await;
    // With an md5 hash stored and an md5 line, the server asks for md5 (not SCRAM).
    let out = pg.psql(
        "postgres",
        &pg.superuser_password,
        "select rolpassword like 'md5%' from pg_authid where rolname = 'bg_md5'",
    );
    assert_eq!(text(&out.stdout).trim(), "t", "{}", text(&out.stderr));
    // Without the opt-in the gateway does not answer md5, and says why.
    let (_req, secret) = pg_credential_for(&w, "orders-md5", "30m").await;
    let out = output(psql_cmd_to(
        &w,
        "orders-md5",
        &secret,
        "select current_user",
    ))
    .await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("asked for an md5 password; refused"),
        "{}",
        text(&out.stderr)
    );
    for (target, role) in [("orders-md5-tls", "bg_md5"), ("orders-trust", "bg_trust")] {
        let (_req, secret) = pg_credential_for(&w, target, "30m").await;
        let out = output(psql_cmd_to(&w, target, &secret, "select current_user")).await;
        assert_eq!(
            text(&out.stdout).trim(),
            role,
            "{target}: {}",
            text(&out.stderr)
        );
    }
    w.wait_ended(2);
    gw.stop().await;
    validate_all_events(&w);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_notify_passes_through_the_relay_and_is_recorded() {
    let (pg, _pgdir, w, gw, _certs) = pg_world("", false).await;
    let (_req, secret) = pg_credential(&w, "30m").await;
    // psql: the notification comes back in the same session.
    let mut c = Command::new(require("psql", "postgresql-client"));
    c.arg(format!(
        "host=127.0.0.1 port={} user=alice dbname=orders-db sslmode=disable",
        w.pg_port
    ))
    .args(["-X", "-c", "LISTEN ch", "-c", "NOTIFY ch, 'hi'"])
    .env("PGPASSWORD", &secret)
    .stdin(std::process::Stdio::null());
    let out = output(c).await;
    let said = text(&out.stdout) + &text(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("Asynchronous notification \"ch\" with payload \"hi\" received"),
        "{said}"
    );
    // tokio-postgres: an idle listener gets a NOTIFY sent by another backend, outside the
    // gateway — the target speaks first, with no request to answer.
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1")
        .port(w.pg_port)
        .user("alice")
        .password(secret.as_str())
        .dbname("orders-db");
    let (client, mut conn) = cfg
        .connect(tokio_postgres::NoTls)
        .await
        .expect("tokio-postgres through the gateway");
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    let task = tokio::spawn(async move {
        while let Some(m) = futures::future::poll_fn(|cx| conn.poll_message(cx)).await {
            if let Ok(tokio_postgres::AsyncMessage::Notification(n)) = m {
                let _ = tx
                    .send((n.channel().to_string(), n.payload().to_string()))
                    .await;
            }
        }
    });
    client.batch_execute("LISTEN jobs").await.expect("listen");
    let out = pg.psql(
        "postgres",
        &pg.superuser_password,
        "NOTIFY jobs, 'from-another-backend'",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let got = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("the notification arrives within 10 s");
    assert_eq!(
        got,
        Some(("jobs".to_string(), "from-another-backend".to_string()))
    );
    drop(client);
    let _ = task.await;
    w.wait_ended(2);
    gw.stop().await;
    let mut queries = Vec::new();
    for s in w.sessions() {
        for line in export(&w, s["id"].as_str().expect("id")).lines() {
            let e: Value = serde_json::from_str(line).expect("json");
            validate("sql-event.schema.json", &e);
            if e["event"] == "query" {
                queries.push(e["sql"].as_str().unwrap_or_default().to_string());
            }
        }
    }
    for q in ["LISTEN ch", "NOTIFY ch, 'hi'", "LISTEN jobs"] {
        assert!(queries.iter().any(|s| s == q), "{q} in {queries:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_over_the_limit_get_fatal_53300_and_logins_in_progress_do_not_count() {
    let (pg, _pgdir, w, gw, _certs) = pg_world("max_connections = 1", true).await;
    let (_req, secret) = pg_credential(&w, "30m").await;
    let connect = || std::net::TcpStream::connect(("127.0.0.1", w.pg_port)).expect("connect");
    // Connections that have not logged in take no session place: with two of them idle, one
    // session still gets in.
    let idle: Vec<std::net::TcpStream> = (0..2).map(|_| connect()).collect();
    let sleeper = sleep_upstream(&pg, &w, "orders-db", &secret);
    // The running session holds the only place: the next one is told why, after logging in,
    // whether it starts with an SSLRequest or a plain startup packet.
    for mode in ["require", "disable"] {
        let mut c = Command::new(require("psql", "postgresql-client"));
        c.arg(format!(
            "host=127.0.0.1 port={} user=alice dbname=orders-db sslmode={mode}",
            w.pg_port
        ))
        .args(["-XAtc", "select 1"])
        .env("PGPASSWORD", &secret)
        .stdin(std::process::Stdio::null());
        let out = output(c).await;
        let err = text(&out.stderr);
        eprintln!("sslmode={mode}: {}", err.trim());
        assert!(!out.status.success());
        if mode == "require" {
            assert!(err.contains("too many clients already"), "{mode}: {err}");
        } else {
            // Without TLS the gateway refuses before that.
            assert!(err.contains("requires TLS"), "{mode}: {err}");
        }
    }
    // Ctrl-C still works: a cancel request is not a session.
    press_ctrl_c(sleeper);
    drop(idle);
    let t = Instant::now();
    let said = wait_for("psql to get through again", Duration::from_secs(10), || {
        let out = psql_cmd(&w, &secret, "select 6*7").output().expect("psql");
        out.status.success().then(|| text(&out.stdout))
    });
    assert_eq!(said.trim(), "42");
    eprintln!("served again {:?} after the session ended", t.elapsed());
    w.wait_ended(2);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_postgres_input_gets_a_clear_error_and_no_panic() {
    use std::io::{Read, Write};
    let (_pg, _pgdir, w, gw, _certs) =
        pg_world("login_grace = \"1s\"\nmax_connections = 4", true).await;
    let connect = || std::net::TcpStream::connect(("127.0.0.1", w.pg_port)).expect("connect");
    let read_all = |mut s: std::net::TcpStream| {
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut v = Vec::new();
        let _ = s.read_to_end(&mut v);
        String::from_utf8_lossy(&v).into_owned()
    };
    // An unsupported protocol version gets FATAL 0A000.
    let mut s = connect();
    s.write_all(&[0, 0, 0, 8, 0, 2, 0, 0]).expect("write");
    let got = read_all(s);
    assert!(
        got.contains("0A000") && got.contains("unsupported frontend protocol"),
        "{got:?}"
    );
    // A malformed startup length: the connection is closed without a reply.
    let mut s = connect();
    s.write_all(&[0, 0, 0, 3]).expect("write");
    assert_eq!(read_all(s), "");
    // A client that stalls mid-startup is dropped after login_grace.
    let s = connect();
    let t = Instant::now();
    assert_eq!(read_all(s), "");
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "dropped after the 1 s grace, not the read timeout"
    );
    // The gateway still serves after all of that.
    let (_req, secret) = pg_credential(&w, "30m").await;
    let out = output(psql_cmd(&w, &secret, "select 7*6")).await;
    assert_eq!(text(&out.stdout).trim(), "42");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_runs_through_the_gateway_in_every_query_mode() {
    let (_pg, _pgdir, w, gw, _certs) = pg_world("", true).await;
    let (_req, secret) = pg_credential(&w, "30m").await;
    let conn = format!(
        "host=127.0.0.1 port={} user=alice dbname=orders-db sslmode=require",
        w.pg_port
    );
    let pgbench = |args: &[&str]| {
        let mut c = Command::new(pg_bin("pgbench"));
        c.args(args)
            .arg(&conn)
            .env("PGPASSWORD", &secret)
            .stdin(std::process::Stdio::null());
        c
    };
    let out = output(pgbench(&["-i", "-s", "1", "-q"])).await;
    assert!(out.status.success(), "pgbench -i: {}", text(&out.stderr));
    for mode in ["simple", "extended", "prepared"] {
        for script in [&["-S"][..], &[][..]] {
            let mut args = vec!["-n", "-c", "2", "-t", "20", "-M", mode];
            args.extend_from_slice(script);
            let out = output(pgbench(&args)).await;
            let said = text(&out.stdout);
            assert!(
                out.status.success(),
                "pgbench {args:?}: {}{said}",
                text(&out.stderr)
            );
            assert!(
                said.contains("number of transactions actually processed: 40/40"),
                "{args:?}: {said}"
            );
        }
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_protocol_with_binary_parameters_and_copy_in_are_recorded() {
    // Without a certificate the listener speaks plain TCP (for clients behind a TLS proxy).
    let (_pg, _pgdir, w, gw, _certs) = pg_world("", false).await;
    let (_req, secret) = pg_credential(&w, "30m").await;
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1")
        .port(w.pg_port)
        .user("alice")
        .password(secret.as_str())
        .dbname("orders-db");
    let (client, conn) = cfg
        .connect(tokio_postgres::NoTls)
        .await
        .expect("tokio-postgres through the gateway");
    let task = tokio::spawn(conn);
    // tokio-postgres uses Parse/Bind/Execute with binary parameters.
    let row = client
        .query_one("select $1::int4 + 1, $2::text", &[&41i32, &"hello"])
        .await
        .expect("query");
    assert_eq!(row.get::<_, i32>(0), 42);
    assert_eq!(row.get::<_, String>(1), "hello");
    client
        .batch_execute("create table c(x int)")
        .await
        .expect("create");
    drop(client);
    let _ = task.await;
    // psql: COPY FROM STDIN and a meta-command.
    let mut c = Command::new(require("psql", "postgresql-client"));
    c.arg(format!(
        "host=127.0.0.1 port={} user=alice dbname=orders-db sslmode=disable",
        w.pg_port
    ))
    .args([
        "-X",
        "-c",
        "\\copy c from stdin",
        "-c",
        "\\d c",
        "-c",
        "select sum(x) from c",
    ])
    .env("PGPASSWORD", &secret)
    .stdin(std::process::Stdio::piped())
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped());
    let mut child = c.spawn().expect("psql");
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(b"1\n2\n3\n\\.\n")
            .expect("write");
    }
    let out = child.wait_with_output().expect("psql");
    let said = text(&out.stdout);
    assert!(out.status.success(), "{said}{}", text(&out.stderr));
    assert!(said.contains("Table \"public.c\""), "\\d works: {said}");
    assert!(said.contains(" 6"), "COPY in landed: {said}");
    w.wait_ended(2);
    gw.stop().await;
    let mut all = Vec::new();
    for s in w.sessions() {
        for line in export(&w, s["id"].as_str().expect("id")).lines() {
            let e: Value = serde_json::from_str(line).expect("json");
            validate("sql-event.schema.json", &e);
            all.push(e);
        }
    }
    // Each statement is also a BREAK_GLASS_ACTION SIEM event ([siem] actions = true).
    let sqls = [
        "select $1::int4 + 1, $2::text",
        "create table c(x int)",
        "select sum(x) from c",
    ];
    // Action events are spooled in batches, beside the session's own events.
    let statements: Vec<Value> = wait_for("statement events", Duration::from_secs(15), || {
        let s: Vec<Value> = w
            .siem_events()
            .into_iter()
            .filter(|e| e["action"] == "statement")
            .collect();
        sqls.iter()
            .all(|q| s.iter().any(|e| e["command"] == *q))
            .then_some(s)
    });
    for e in &statements {
        validate("siem-event.schema.json", e);
        assert_eq!(e["event_type"], "BREAK_GLASS_ACTION");
        assert_eq!(e["protocol"], "postgres");
    }
    let bind = all
        .iter()
        .find(|e| e["event"] == "bind" && e["params"].as_array().is_some_and(|p| p.len() == 2))
        .expect("a bind with two parameters");
    assert_eq!(
        bind["params"][0]["format"], 1,
        "binary parameter kept: {bind}"
    );
    assert_eq!(
        bind["params"][0]["base64"], "AAAAKQ==",
        "41 as int4: {bind}"
    );
    assert!(
        all.iter()
            .any(|e| e["event"] == "copy" && e["copy_direction"] == "in" && e["rows"] == 3),
        "{all:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_oversized_messages_after_login_get_fatal_08p01() {
    use breakglass::pg::{scram, wire};
    let (_pg, _pgdir, w, gw, _certs) = pg_world_with(PgOpts {
        postgres: "max_message = \"4KiB\"",
        ..Default::default()
    })
    .await;
    let (_req, secret) = pg_credential(&w, "30m").await;
    // A hand-rolled client: startup, SCRAM, then a bad message.
    async fn login(port: u16, secret: &str) -> tokio::net::TcpStream {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        let body = b"user\0alice\0database\0orders-db\0\0";
        let mut pkt = ((8 + body.len()) as i32).to_be_bytes().to_vec();
        pkt.extend_from_slice(&wire::PROTOCOL_3.to_be_bytes());
        pkt.extend_from_slice(body);
        wire::send(&mut s, &pkt).await.expect("startup");
        let mut ex = None;
        loop {
            let m = wire::read_message(&mut s, 1 << 20).await.expect("message");
            let b = m.body();
            match (
                m.tag,
                b.get(..4)
                    .map(|c| i32::from_be_bytes([c[0], c[1], c[2], c[3]])),
            ) {
                (b'R', Some(10)) => {
                    let (e, first) = scram::ClientExchange::start(secret, scram::Binding::None);
                    let mut p = b"SCRAM-SHA-256\0".to_vec();
                    p.extend_from_slice(&(first.len() as i32).to_be_bytes());
                    p.extend_from_slice(first.as_bytes());
                    wire::send(&mut s, &wire::message(b'p', &p))
                        .await
                        .expect("send");
                    ex = Some(e);
                }
                (b'R', Some(11)) => {
                    let e = ex.as_mut().expect("exchange");
                    let fin = e
                        .respond(&String::from_utf8_lossy(&b[4..]))
                        .expect("respond");
                    wire::send(&mut s, &wire::message(b'p', fin.as_bytes()))
                        .await
                        .expect("send");
                }
                (b'Z', _) => return s,
                (b'E', _) => panic!("login refused: {}", String::from_utf8_lossy(b)),
                _ => {}
            }
        }
    }
    async fn fatal_after(mut s: tokio::net::TcpStream, bytes: &[u8]) -> String {
        use tokio::io::AsyncReadExt;
        wire::send(&mut s, bytes).await.expect("send");
        let mut v = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut v)).await;
        String::from_utf8_lossy(&v).into_owned()
    }
    let s = login(w.pg_port, &secret).await;
    let got = fatal_after(s, &wire::message(b'Z', b"")).await;
    assert!(
        got.contains("08P01") && got.contains("unknown frontend message type"),
        "{got:?}"
    );
    // postgres.max_message = 4KiB: a query whose message is exactly 4096 bytes long (the
    // length field counts itself, not the type byte) runs; one byte more ends the session.
    let query = |marker: &str, len: usize| {
        let head = format!("select '{marker}' as m, '");
        let pad = len - 4 - head.len() - 2;
        let sql = format!("{head}{}'\0", "x".repeat(pad));
        let m = wire::message(b'Q', sql.as_bytes());
        assert_eq!(m.len(), len + 1);
        m
    };
    let mut s = login(w.pg_port, &secret).await;
    wire::send(&mut s, &query("fits-the-limit", 4096))
        .await
        .expect("send");
    let mut said = Vec::new();
    loop {
        let m = wire::read_message(&mut s, 1 << 20).await.expect("reply");
        said.push(m.tag);
        if m.tag == b'Z' {
            break;
        }
    }
    assert_eq!(said, b"TDCZ", "row description, row, complete, ready");
    let got = fatal_after(s, &query("over-the-limit", 4097)).await;
    assert!(
        got.contains("08P01")
            && got.contains("message of 4097 bytes is over the 4096-byte limit")
            && got.contains("postgres.max_message"),
        "{got:?}"
    );
    let s = login(w.pg_port, &secret).await;
    let mut huge = vec![b'Q'];
    huge.extend_from_slice(&(200_000_000i32).to_be_bytes());
    let got = fatal_after(s, &huge).await;
    assert!(got.contains("08P01") && got.contains("limit"), "{got:?}");
    w.wait_ended(3);
    gw.stop().await;
    // What came before the oversized message is on the record; the message itself is not.
    let recorded: String = w
        .sessions()
        .iter()
        .map(|s| export(&w, s["id"].as_str().expect("id")))
        .collect();
    assert!(
        recorded.contains("select 'fits-the-limit' as m"),
        "{recorded}"
    );
    assert!(!recorded.contains("over-the-limit"), "{recorded}");
    let ended: Vec<String> = w
        .siem_events()
        .iter()
        .filter(|e| e["action"] == "session_end")
        .map(|e| e["reason"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        ended,
        vec![
            "protocol_violation",
            "protocol_violation",
            "protocol_violation"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_counts_real_sessions_and_the_audit_export_is_signed_and_audited() {
    let w = World::new();
    let gw = InProcess::start(&w).await;
    let grant = w.grant("alice", "30m");
    for n in 0..2 {
        let out = output(w.ssh("alice", "web-01", &[], &[&format!("echo run-{n}")])).await;
        assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    }
    w.wait_ended(2);
    gw.stop().await;

    // The report sees both sessions on web-01, by one person, from one grant.
    let r: Value = serde_json::from_str(&w.cli_ok(&[
        "report", "--since", "1d", "--period", "day", "--format", "json",
    ]))
    .expect("report --format json is JSON");
    validate("report.schema.json", &r);
    assert_eq!(r["totals"]["events"], 2, "{r:#}");
    assert_eq!(r["totals"]["grants"], 1);
    assert_eq!(r["totals"]["unique_users"], 1);
    assert!(r["totals"]["mean_time_between_events_seconds"].is_number());
    assert_eq!(r["totals"]["outside_windows"], 2, "no windows configured");
    assert_eq!(r["per_system"].as_array().map(Vec::len), Some(1));
    let web = &r["per_system"][0];
    assert_eq!(web["target"], "web-01");
    assert_eq!(web["protocol"], "ssh");
    assert_eq!(web["events"], 2);
    assert_eq!(web["unique_users"], 1);
    let buckets = r["per_period"].as_array().expect("per_period");
    assert!(
        (1..=2).contains(&buckets.len()),
        "a day's range: {buckets:?}"
    );
    let bucketed: u64 = buckets
        .iter()
        .map(|b| b["events"].as_u64().expect("n"))
        .sum();
    assert_eq!(bucketed, 2);

    // The CSV is one tidy table: every row has the header's columns.
    let csv = w.cli_ok(&["report", "--since", "1d", "--format", "csv"]);
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().expect("header").split(',').collect();
    assert_eq!(header[0], "section");
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    for row in &rows {
        assert_eq!(row.len(), header.len(), "{row:?}");
    }
    let events = header.iter().position(|h| *h == "events").expect("events");
    let system = rows
        .iter()
        .find(|r| r[0] == "system")
        .expect("a system row");
    assert_eq!((system[1], system[events]), ("web-01", "2"));
    assert_eq!(rows.iter().filter(|r| r[0] == "total").count(), 1);
    w.cli_ok(&["report", "--since", "1d"]);

    // The export: content, manifest and signature; verify says OK.
    let out = w.path("export");
    let out_s = out.to_str().expect("utf-8 path");
    let listed = w.cli_ok(&[
        "audit-export",
        "--since",
        "1d",
        "--format",
        "json",
        "--out",
        out_s,
    ]);
    assert_eq!(listed.lines().count(), 3, "{listed}");
    let manifest: Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("manifest.json")).expect("manifest.json"),
    )
    .expect("manifest is JSON");
    validate("metadata-export-manifest.schema.json", &manifest);
    assert_eq!(manifest["rows"], 2);
    assert!(out.join("manifest.json.sig").exists());
    let content_path = out.join(manifest["file"].as_str().expect("file"));
    let content: Value =
        serde_json::from_str(&std::fs::read_to_string(&content_path).expect("content"))
            .expect("content is JSON");
    validate("metadata-export.schema.json", &content);
    for s in content["sessions"].as_array().expect("sessions") {
        assert_eq!(s["grant_id"], grant.as_str());
        assert_eq!(s["incident_id"], "INC-7");
        assert_eq!(s["justification"], "disk full on /var");
        assert_eq!(s["end_reason"], "client_closed");
    }
    let ok = w.cli(&["audit-export", "verify", out_s]);
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok.stderr));
    assert!(text(&ok.stdout).contains("OK"), "{}", text(&ok.stdout));

    // Evidence is never overwritten.
    let again = w.cli(&[
        "audit-export",
        "--since",
        "1d",
        "--format",
        "csv",
        "--out",
        out_s,
    ]);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        text(&again.stderr).contains("never overwritten"),
        "{}",
        text(&again.stderr)
    );

    // One flipped byte in the content is TAMPERED, exit 3.
    writable(&content_path);
    let mut bytes = std::fs::read(&content_path).expect("read");
    let i = bytes.len() / 2;
    bytes[i] ^= 0x01;
    std::fs::write(&content_path, bytes).expect("tamper");
    let bad = w.cli(&["audit-export", "verify", out_s]);
    assert_eq!(bad.status.code(), Some(3), "{}", text(&bad.stderr));
    assert!(
        text(&bad.stdout).contains("TAMPERED"),
        "{}",
        text(&bad.stdout)
    );
    assert!(text(&bad.stdout).contains("content modified"));

    // Auditing the auditors: each export that was written is a SIEM event.
    let exported: Vec<Value> = w
        .siem_events()
        .into_iter()
        .filter(|e| e["action"] == "metadata_exported")
        .collect();
    assert_eq!(exported.len(), 1, "only the export that was written");
    assert!(exported[0]["actor"]
        .as_str()
        .expect("actor")
        .starts_with("operator:"));
    assert!(exported[0]["message"]
        .as_str()
        .expect("message")
        .contains("2 sessions"));
    validate_all_events(&w);
}
