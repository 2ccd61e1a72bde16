//! SSH sessions end to end: exec and interactive shells replayed by asciinema, denials, host
//! keys, revoke and deadline cuts, a SIGKILLed gateway, scp/sftp, several channels, and a
//! gateway-held key.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::*;

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
