//! Text from people is data: escape sequences and Slack markup in a reason are refused at
//! input on the SSH control channel, the JSON API and the CLI; text that reached the state file
//! anyway shows as text in `status`, in the Slack webhook body and in the CLI; the CLI names its
//! operator from the OS, not from `USER`; and a stranger gets one 404 for another's session.

use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

use super::support::*;

/// An OSC 52 clipboard write, a cursor sequence and Slack's channel-wide mention.
const OSC52: &str = "\x1b]52;c;ZXZpbA==\x07";

/// Waits for a Slack body containing `needle`; returns its `text`.
fn slack_text(hook: &HttpReceiver, needle: &str) -> String {
    let (_, body) = wait_for(
        &format!("a Slack body with `{needle}`"),
        Duration::from_secs(5),
        || hook.bodies().into_iter().find(|(_, b)| b.contains(needle)),
    );
    let v: Value = serde_json::from_str(&body).expect("slack body is JSON");
    v["text"].as_str().expect("text").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escape_injection_is_refused_at_input_and_shown_as_text() {
    let slack = HttpReceiver::start(vec![200]).await;
    let w = World::with(Opts {
        extra_config: format!(
            "[alerts]\nwebhooks = [{{ url = \"http://127.0.0.1:{}/slack\", format = \"slack\" }}]\n",
            slack.port
        ),
        ..Default::default()
    });
    let gw = InProcess::start(&w).await;

    // Refused at input over real ssh: the error names the field and the character.
    let evil = format!("request web-01 --reason {OSC52} <!channel> --incident INC-1");
    let (code, out, err) = control(&w, "alice", "breakglass", &evil).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("reason contains a control character (U+001B)"),
        "{out}{err}"
    );
    let (code, out, err) = control(
        &w,
        "alice",
        "breakglass",
        "request web-01 --reason ok --incident INC-\u{202E}1",
    )
    .await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("incident contains a bidirectional override (U+202E)"),
        "{err}"
    );
    // A misspelt option is refused, not silently defaulted.
    let (code, out, err) = control(
        &w,
        "alice",
        "breakglass",
        "request web-01 --reason ok --incident INC-1 --severty low",
    )
    .await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("unknown option --severty for request (known: --reason, --incident, --severity, --scenario, --for, --emergency)"), "{err}");

    // ... and over the JSON API with the real curl.
    let alice = api_token(&w, "alice").await;
    let (code, body) = api(
        &w,
        Some(&alice),
        "POST",
        "/api/v1/requests",
        Some(json!({"target": "web-01", "reason": format!("{OSC52} <!channel>"), "incident": "INC-1"})),
    )
    .await;
    assert_eq!(code, 400, "{body}");
    assert_eq!(
        body["error"], "reason contains a control character (U+001B)",
        "{body}"
    );
    let (code, body) = api(
        &w,
        Some(&alice),
        "POST",
        "/api/v1/requests",
        Some(json!({"target": "web-01", "reason": "line\nbreak", "incident": "INC-1"})),
    )
    .await;
    assert_eq!(code, 400, "{body}");
    assert_eq!(
        body["error"], "reason contains a control character (U+000A)",
        "{body}"
    );
    // A reason too long for every event, alert and status line that repeats it.
    let (code, body) = api(
        &w,
        Some(&alice),
        "POST",
        "/api/v1/requests",
        Some(json!({"target": "web-01", "reason": "x".repeat(1001), "incident": "INC-1"})),
    )
    .await;
    assert_eq!(code, 400, "{body}");
    assert_eq!(
        body["error"], "reason is longer than 1000 characters",
        "{body}"
    );
    // No request was created by any refusal.
    let (_, body) = api(&w, Some(&alice), "GET", "/api/v1/requests", None).await;
    assert_eq!(body["requests"], json!([]), "{body}");

    // Slack markup alone is text: accepted, and inert in the Slack body.
    let (code, out, err) = control(
        &w,
        "alice",
        "breakglass",
        "request web-01 --reason '<!channel> see <https://evil.example|Approve> & more' --incident INC-2",
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    let req = request_id(&out);
    let t = slack_text(&slack, &req);
    assert!(
        t.contains("&lt;!channel&gt; see &lt;https://evil.example|Approve&gt; &amp; more"),
        "{t}"
    );
    assert!(!t.contains('<') && !t.contains('>'), "{t}");

    // Text that reached the state file before input was checked (written here straight into
    // SQLite) shows as text: in status and requests over ssh, and in the Slack body.
    rusqlite::Connection::open(w.path("data/state.sqlite"))
        .expect("open the state file")
        .execute(
            "UPDATE requests SET justification = ?1, incident_id = ?2 WHERE id = ?3",
            rusqlite::params![format!("{OSC52}stolen <!here>"), "INC-\x1b[2J\u{9b}9", req],
        )
        .expect("plant escapes");
    for cmd in ["status", "requests"] {
        let (code, out, err) = control(&w, "bob", "breakglass", cmd).await;
        assert_eq!(code, 0, "{out}{err}");
        assert!(
            out.contains("\\u{1b}]52;c;ZXZpbA==\\u{7}stolen <!here>"),
            "{cmd}: {out}"
        );
        assert!(out.contains("INC-\\u{1b}[2J\\u{9b}9"), "{cmd}: {out}");
        assert!(
            !out.contains('\x1b') && !out.contains('\u{9b}') && !out.contains('\x07'),
            "{cmd} printed a raw control character: {out:?}"
        );
    }
    let (code, out, err) = control(&w, "bob", "breakglass", &format!("approve {req}")).await;
    assert_eq!(code, 0, "{out}{err}");
    let t = slack_text(&slack, "approved");
    assert!(t.contains("INC-\\u{1b}[2J\\u{9b}9"), "{t}");
    assert!(
        !t.contains('\x1b') && !t.contains('\u{9b}'),
        "raw control in Slack: {t:?}"
    );

    // The JSON API (what the web UI renders, with its own HTML escaping) carries the stored
    // text as data, unchanged; only its JSON encoding escapes it.
    let bob = api_token(&w, "bob").await;
    let (code, body) = api(&w, Some(&bob), "GET", "/api/v1/grants", None).await;
    assert_eq!(code, 200, "{body}");
    let g = body["grants"]
        .as_array()
        .expect("grants")
        .iter()
        .find(|g| g["request_id"] == req.as_str())
        .cloned()
        .expect("the grant");
    assert_eq!(g["incident_id"], "INC-\x1b[2J\u{9b}9");

    // The CLI refuses it too, and its operator is the real uid's name whatever USER says.
    let cli = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_breakglass"))
            .args(args)
            .envs(S3_ENV)
            .env("BREAKGLASS_CONFIG", &w.config_path)
            .env("RUST_LOG", "warn")
            .env("USER", "mallory")
            .env("SUDO_USER", "mallory")
            .env_remove("SUDO_UID")
            .output()
            .expect("run breakglass")
    };
    let add = [
        "grant", "add", "--person", "alice", "--target", "web-01", "--reason",
    ];
    let out = cli(&[&add[..], &[&format!("{OSC52}x"), "--incident", "INC-3"]].concat());
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains("--reason contains a control character (U+001B)"),
        "{}",
        text(&out.stderr)
    );
    let out = cli(&[&add[..], &["fix", "--incident", "INC-3"]].concat());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_string();
    let me = text(
        &Command::new("id")
            .arg("-un")
            .output()
            .expect("id -un")
            .stdout,
    )
    .trim()
    .to_string();
    let e = w.wait_event("the CLI grant's event", |e| {
        e["action"] == "grant_created" && e["grant_id"] == id.as_str()
    });
    assert_eq!(e["actor"], format!("operator:{me}"), "{e}");
    assert_ne!(me, "mallory");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_get_one_404_for_sessions_they_may_not_see() {
    let w = World::new();
    let gw = InProcess::start(&w).await;
    w.grant("alice", "30m");
    let out = output(w.ssh("alice", "web-01", &[], &["echo hi"])).await;
    assert_eq!(text(&out.stdout), "hi\n", "{}", text(&out.stderr));
    w.wait_ended(1);

    let alice = api_token(&w, "alice").await;
    let carol = api_token(&w, "carol").await;
    let (code, body) = api(&w, Some(&alice), "GET", "/api/v1/sessions", None).await;
    assert_eq!(code, 200, "{body}");
    let id = body["sessions"][0]["id"]
        .as_str()
        .expect("alice's session")
        .to_string();
    // The owner finds it by a prefix.
    let (code, body) = api(
        &w,
        Some(&alice),
        "GET",
        &format!("/api/v1/sessions/{}", &id[..8]),
        None,
    )
    .await;
    assert_eq!(code, 200, "{body}");

    // carol (no reviewer, auditor or admin role) gets the same answer for alice's session,
    // its prefix, its channel and an id that names nothing.
    let paths = [
        format!("/api/v1/sessions/{id}"),
        format!("/api/v1/sessions/{}", &id[..8]),
        format!("/api/v1/sessions/{}", &id[..1]),
        format!("/api/v1/sessions/{id}/channels/0/cast"),
        format!("/api/v1/sessions/{id}/channels/0/sql"),
        "/api/v1/sessions/ffffffff-ffff-ffff-ffff-ffffffffffff".to_string(),
    ];
    let mut bodies = Vec::new();
    for p in &paths {
        let (code, body) = api(&w, Some(&carol), "GET", p, None).await;
        assert_eq!(code, 404, "{p}: {body}");
        assert!(
            !body.to_string().contains("alice") && !body.to_string().contains(&id[..8]),
            "{p}: {body}"
        );
        bodies.push(body);
    }
    assert!(bodies.windows(2).all(|b| b[0] == b[1]), "{bodies:?}");
    // No look that was refused is on the record as a view.
    assert!(!w
        .siem_events()
        .iter()
        .any(|e| e["action"] == "recording_viewed" && e["actor"] == "carol"));

    // Reviews: alice sees her grant's open review over ssh; carol sees none of it.
    let (code, out, err) = control(&w, "alice", "breakglass", "reviews").await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("alice"), "{out}");
    let (code, out, err) = control(&w, "carol", "breakglass", "reviews").await;
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains("alice"), "{out}");
    let (code, body) = api(&w, Some(&carol), "GET", "/api/v1/reviews", None).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["reviews"], json!([]), "{body}");
    gw.stop().await;
}
