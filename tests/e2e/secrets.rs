//! Secrets typed at real no-echo prompts (`read -s`, `openssl passwd`, `su`) through a real
//! `ssh -tt` session never reach the record: not the recording, the extracted commands, the
//! SIEM file, the spool, the state store, the search API or the export. The record says that
//! a secret was entered, when, and how many bytes.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::support::*;

/// Every file under `dir` whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &str) -> Vec<String> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(b) = std::fs::read(&p) {
                if b.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                    hits.push(p.display().to_string());
                }
            }
        }
    }
    hits
}

/// A throwaway account with a known password for the `su` prompt (the target is this
/// machine's own sshd, logged in as the test's user).
fn throwaway_account(password: &str) -> String {
    let name = throwaway_user("bgsecretvictim");
    let mut c = Command::new(require("chpasswd", "passwd"))
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("chpasswd");
    use std::io::Write;
    c.stdin
        .take()
        .expect("stdin")
        .write_all(format!("{name}:{password}\n").as_bytes())
        .expect("write chpasswd");
    assert!(c.wait().expect("chpasswd").success(), "chpasswd");
    name
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_typed_at_no_echo_prompts_never_reach_the_record() {
    let read_secret = "Hunter2-read-s";
    let openssl_secret = "Openssl-Pw-1";
    let su_secret = "Su-Secret-93x";
    // Typed at an echoing password prompt with a backspace in it: the terminal echoes
    // `\b \b` for the erase, and what follows it must be masked too.
    let (edited_head, edited_tail) = ("Ech0ed", "Bksp-Tail-77");
    let victim = throwaway_account(su_secret);
    let w = World::with(Opts {
        extra_limits: "flush_interval = \"100ms\"".into(),
        extra_config: "[siem]\nactions = true\n".into(),
        ..Default::default()
    });
    let gw = InProcess::start(&w).await;
    w.grant("alice", "30m");
    // `su-$((1+1))ok` so the expect does not match the echo of the command line itself.
    let su = format!("su -s /bin/sh nobody -c 'su -c \"echo su-$((1+1))ok\" {victim}'\r");
    let steps = serde_json::json!([
        {"expect": "[$#] $", "timeout": 15},
        {"send": "export PS1='bg$ '\r"},
        {"expect": "bg\\$ $"},
        {"send": "echo before-secret-$((6*7))\r"},
        {"expect": "before-secret-42"},
        {"send": "read -s -p 'Password: ' pw; echo; echo got-${#pw}\r"},
        {"expect": "Password: $"},
        {"send": format!("{read_secret}\r")},
        {"expect": "got-14"},
        {"send": "openssl passwd -6\r"},
        {"expect": "Password: $"},
        {"send": format!("{openssl_secret}\r")},
        {"expect": "Verifying - Password: $"},
        {"send": format!("{openssl_secret}\r")},
        {"expect": "\\$6\\$"},
        {"send": "read -p 'Password: ' pw2; echo got2-${#pw2}\r"},
        {"expect": "Password: $"},
        {"send": format!("{edited_head}-X\x7f{edited_tail}\r")},
        {"expect": "got2-19"},
        {"send": su},
        {"expect": "Password: $"},
        {"send": format!("{su_secret}\r")},
        {"expect": "su-2ok"},
        {"send": "echo after-secret\r"},
        // The prompt before `exit`: a line typed ahead while the shell quits may never be
        // echoed, and the guard then (rightly) redacts it.
        {"expect": "after-secret\r\n"},
        {"expect": "bg\\$ $"},
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
    w.wait_ended(1);
    let id = last_session_id(&w);

    // The commands around the secrets are extracted; each secret is a redaction entry.
    let meta = session_meta(&w, &id);
    let commands = meta["channels"][0]["commands"]
        .as_array()
        .expect("commands")
        .clone();
    let texts: Vec<&str> = commands
        .iter()
        .map(|c| c["text"].as_str().expect("text"))
        .collect();
    for want in [
        "echo before-secret-$((6*7))",
        "openssl passwd -6",
        "echo after-secret",
    ] {
        assert!(texts.contains(&want), "{want} extracted: {texts:?}");
    }
    let redacted: Vec<(String, u64)> = commands
        .iter()
        .filter(|c| !c["redacted"].is_null())
        .map(|c| {
            (
                c["redacted"]["kind"].as_str().expect("kind").to_string(),
                c["redacted"]["bytes"].as_u64().expect("bytes"),
            )
        })
        .collect();
    let want: Vec<(String, u64)> = [
        read_secret.len(),
        openssl_secret.len(),
        openssl_secret.len(),
        edited_head.len() + 3 + edited_tail.len(),
        su_secret.len(),
    ]
    .iter()
    .map(|n| ("no-echo".to_string(), *n as u64))
    .collect();
    // KNOWN GAP (issue 12): under heavy load (the flood test beside it) the final `exit` was
    // seen redacted (4 bytes): its echo is judged late. That errs on the safe side (a command
    // hidden, no secret shown), so it is tolerated here, and only for that last line.
    let mut redacted = redacted;
    let exit_redacted =
        redacted.len() == want.len() + 1 && redacted.last() == Some(&("no-echo".to_string(), 4));
    if exit_redacted {
        eprintln!("the final `exit` was redacted (its echo was judged late under load)");
        redacted.pop();
    }
    assert_eq!(redacted, want, "{texts:?}");

    // The SIEM got the commands and the redactions (so delivery happened) ...
    let events = wait_for(
        "the redaction and the last command in the SIEM file",
        Duration::from_secs(15),
        || {
            let f = w.siem_events();
            let n = f
                .iter()
                .filter(|e| {
                    e["command"]
                        .as_str()
                        .is_some_and(|c| c.starts_with("[redacted no-echo"))
                })
                .count();
            let last = f.iter().any(|e| e["command"] == "echo after-secret");
            (n == 5 + usize::from(exit_redacted) && last).then_some(f)
        },
    );
    assert!(events.iter().any(|e| e["command"] == "openssl passwd -6"));

    // ... the search API finds the commands but never a secret ...
    let bob = api_token(&w, "bob").await;
    let (code, body) = api(
        &w,
        Some(&bob),
        "GET",
        "/api/v1/search?q=before-secret",
        None,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["hits"].as_array().map(Vec::len), Some(1), "{body}");
    for secret in [
        read_secret,
        openssl_secret,
        su_secret,
        edited_head,
        edited_tail,
    ] {
        // The search text goes into the `recording_searched` SIEM event, so search for all
        // but the first character: the index would match it, the data dir must not hold it.
        let (code, body) = api(
            &w,
            Some(&bob),
            "GET",
            &format!("/api/v1/search?q={}", &secret[1..]),
            None,
        )
        .await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["hits"], Value::Array(vec![]), "{secret}: {body}");
        // Only shell-safe characters: q is put in the URL as it is.
        assert!(secret
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-'));
    }
    // The web page of the session shows the redaction, not the secret.
    let (code, page) = api(
        &w,
        Some(&bob),
        "GET",
        &format!("/api/v1/sessions/{id}"),
        None,
    )
    .await;
    assert_eq!(code, 200, "{page}");
    let page = page.to_string();
    assert!(page.contains("[redacted no-echo: 14 bytes]"), "{page}");
    gw.stop().await;

    // ... and the export: the `i` events carry the marker with the time and byte count.
    let cast = export(&w, &id);
    assert!(
        cast.contains("[redacted no-echo: "),
        "redaction marker in the cast"
    );
    assert!(
        cast.contains("echo before-secret"),
        "typed command in the cast"
    );

    for secret in [
        read_secret,
        openssl_secret,
        su_secret,
        edited_head,
        edited_tail,
    ] {
        assert!(!cast.contains(secret), "{secret} in the export");
        let hits = files_containing(&w.path("data"), secret);
        assert!(hits.is_empty(), "{secret} found in {hits:?}");
        let exported = files_containing(w.path("").as_path(), secret);
        assert!(exported.is_empty(), "{secret} found in {exported:?}");
    }
}
