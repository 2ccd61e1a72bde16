//! The web UI and its API: login links, roles, CSRF, the OpenAPI document, and the UI itself
//! driven in Debian's headless Chromium (tests/e2e/web_ui.mjs, playwright-core from npm).

use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use super::support::*;

/// One HTTP call with the real `curl`: (status, Set-Cookie session value if any, JSON body).
async fn call(
    w: &World,
    cookie: Option<&str>,
    csrf: bool,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Option<String>, Value) {
    let mut c = Command::new(require("curl", "curl"));
    c.args(["-s", "-i", "-X", method])
        .arg(format!("http://127.0.0.1:{}{path}", w.http_port));
    if let Some(k) = cookie {
        c.args(["-H", &format!("Cookie: bg_session={k}")]);
    }
    if csrf {
        c.args(["-H", "X-Breakglass-CSRF: 1"]);
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
    let raw = text(&out.stdout);
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let code: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("a status line in {raw}"));
    let set = head.lines().find_map(|l| {
        let l = l
            .strip_prefix("set-cookie: ")
            .or_else(|| l.strip_prefix("Set-Cookie: "))?;
        let v = l.strip_prefix("bg_session=")?.split(';').next()?;
        (!v.is_empty()).then(|| v.to_string())
    });
    let body = serde_json::from_str(body).unwrap_or(Value::Null);
    check_openapi(method, path, code, &body);
    (code, set, body)
}

/// `ssh breakglass@gw login` as `person`: the link's URL and its secret.
async fn login_link(w: &World, person: &str) -> (String, String) {
    let (code, out, err) = control(w, person, "breakglass", "login").await;
    assert_eq!(code, 0, "login link for {person}: {out}{err}");
    let url = out
        .lines()
        .find(|l| l.starts_with("http://") || l.starts_with("https://"))
        .unwrap_or_else(|| panic!("a link in {out}"))
        .trim()
        .to_string();
    let secret = url
        .split_once("/login#")
        .expect("a /login# link")
        .1
        .to_string();
    (url, secret)
}

/// Logs in with a fresh link; returns the session cookie.
async fn log_in(w: &World, person: &str) -> String {
    let (_, secret) = login_link(w, person).await;
    let (code, cookie, body) = call(
        w,
        None,
        false,
        "POST",
        "/api/v1/login",
        Some(serde_json::json!({ "token": secret })),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    cookie.expect("a session cookie")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_links_work_once_and_expire_and_roles_hold_on_the_api() {
    let w = World::new();
    // mallory is an auditor here; the world's config is written before its dir is known.
    let cfg = std::fs::read_to_string(&w.config_path).expect("config");
    std::fs::write(
        &w.config_path,
        format!(
            "{cfg}\n[[people]]\nname = \"mallory\"\nssh_key_files = [\"{}\"]\nroles = [\"auditor\"]\n\n[web]\nlogin_link_ttl = \"2s\"\n",
            w.path("mallory.pub").display()
        ),
    )
    .expect("config");
    let gw = InProcess::start(&w).await;

    // Nobody gets in without logging in.
    let (code, _, body) = call(&w, None, false, "GET", "/api/v1/sessions", None).await;
    assert_eq!(code, 401, "{body}");
    assert!(
        body["error"].as_str().unwrap_or("").contains("login"),
        "{body}"
    );

    // A link works once.
    let (_, secret) = login_link(&w, "bob").await;
    let login = Some(serde_json::json!({ "token": secret }));
    let (code, cookie, body) = call(&w, None, false, "POST", "/api/v1/login", login.clone()).await;
    assert_eq!(code, 200, "{body}");
    let bob = cookie.expect("cookie");
    let (code, cookie, body) = call(&w, None, false, "POST", "/api/v1/login", login).await;
    assert_eq!(code, 401, "{body}");
    assert!(cookie.is_none());
    assert!(
        body["error"]
            .as_str()
            .unwrap_or("")
            .contains("already used"),
        "{body}"
    );
    // A forged one never.
    let (code, _, body) = call(
        &w,
        None,
        false,
        "POST",
        "/api/v1/login",
        Some(serde_json::json!({ "token": "forged" })),
    )
    .await;
    assert_eq!(code, 401, "{body}");
    // A malformed body, an unknown query parameter and an unknown path get the same JSON error
    // object as every other refusal, with the reason.
    let (code, _, body) = call(
        &w,
        None,
        false,
        "POST",
        "/api/v1/login",
        Some(serde_json::json!({ "token": "x", "admin": true })),
    )
    .await;
    assert_eq!(code, 422, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or("")
            .contains("unknown field"),
        "{body}"
    );
    let (code, _, body) = call(&w, None, false, "GET", "/api/v1/nope", None).await;
    assert_eq!(code, 404, "{body}");
    assert_eq!(body["error"], "no such path: /api/v1/nope", "{body}");
    // A link expires: wait out its two seconds (time must pass; nothing to synchronise with).
    let (_, secret) = login_link(&w, "alice").await;
    std::thread::sleep(Duration::from_millis(2300));
    let (code, cookie, body) = call(
        &w,
        None,
        false,
        "POST",
        "/api/v1/login",
        Some(serde_json::json!({ "token": secret })),
    )
    .await;
    assert_eq!(code, 401, "{body}");
    assert!(cookie.is_none());
    assert!(
        body["error"].as_str().unwrap_or("").contains("expired"),
        "{body}"
    );
    // The login is on the record, with the person it names.
    w.wait_event("web_login event", |e| {
        e["action"] == "web_login" && e["actor"] == "bob"
    });

    // alice asks for access.
    let (code, out, err) = control(
        &w,
        "alice",
        "breakglass",
        "request web-01 --reason disk full --incident INC-77",
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    let req = request_id(&out);
    let approve = format!("/api/v1/requests/{req}/approve");

    // An auditor cannot approve: not from the browser, not with a token, not over SSH.
    let mallory = log_in(&w, "mallory").await;
    let (code, _, body) = call(&w, Some(&mallory), true, "POST", &approve, None).await;
    assert_eq!(code, 403, "{body}");
    assert!(
        body["error"].as_str().unwrap_or("").contains("read-only"),
        "{body}"
    );
    let (code, out, err) = control(&w, "mallory", "breakglass", &format!("approve {req}")).await;
    assert_ne!(code, 0, "{out}");
    assert!(format!("{out}{err}").contains("read-only"), "{out}{err}");
    let token = api_token(&w, "mallory").await;
    let (code, body) = api(&w, Some(&token), "POST", &approve, None).await;
    assert_eq!(code, 403, "{body}");
    // ... but reads everything.
    let (code, _, body) = call(&w, Some(&mallory), false, "GET", "/api/v1/sessions", None).await;
    assert_eq!(code, 200, "{body}");

    // Nobody approves their own request through the UI.
    let (_, secret) = login_link(&w, "alice").await;
    let (code, alice, body) = call(
        &w,
        None,
        false,
        "POST",
        "/api/v1/login",
        Some(serde_json::json!({ "token": secret })),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let alice = alice.expect("cookie");
    let (code, _, body) = call(&w, Some(&alice), true, "POST", &approve, None).await;
    assert_eq!(code, 403, "{body}");
    assert!(
        body["error"].as_str().unwrap_or("").contains("own request"),
        "{body}"
    );
    // alice sees only her own sessions.
    let (code, _, body) = call(
        &w,
        Some(&alice),
        false,
        "GET",
        "/api/v1/sessions?person=bob",
        None,
    )
    .await;
    assert_eq!(code, 403, "{body}");

    // A cookie alone never writes: the browser must send the CSRF header.
    let (code, _, body) = call(&w, Some(&bob), false, "POST", &approve, None).await;
    assert_eq!(code, 403, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or("")
            .contains("x-breakglass-csrf"),
        "{body}"
    );
    let (code, _, body) = call(&w, Some(&bob), true, "POST", &approve, None).await;
    assert_eq!(code, 200, "{body}");
    w.wait_event("approval by bob", |e| {
        e["action"] == "request_approved" && e["actor"] == "bob"
    });

    // Auditors export session metadata with a signed manifest; others may not.
    let (code, _, body) = call(
        &w,
        Some(&bob),
        false,
        "GET",
        "/api/v1/audit-export?since=1d",
        None,
    )
    .await;
    assert_eq!(code, 403, "{body}");
    let (code, _, body) = call(
        &w,
        Some(&mallory),
        false,
        "GET",
        "/api/v1/audit-export?since=1d&format=csv",
        None,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let manifest: Value =
        serde_json::from_str(body["manifest_text"].as_str().expect("manifest text")).expect("json");
    validate("metadata-export-manifest.schema.json", &manifest);
    assert_eq!(manifest, body["manifest"]);
    // The manifest's signature verifies with the gateway's keys, and the content matches it.
    let keys = breakglass::signing::Signer::load_or_create(&w.path("data/keys"))
        .expect("keys")
        .all;
    let sig = serde_json::to_vec(&body["signature"]).expect("sig");
    let content = body["content"].as_str().expect("content");
    let verdict = breakglass::audit_export::verify(
        body["manifest_text"].as_str().expect("manifest").as_bytes(),
        Some(&sig),
        Some((
            body["file_name"].as_str().expect("name"),
            content.as_bytes(),
        )),
        &keys,
    );
    assert!(verdict.is_ok(), "{verdict:?}");
    w.wait_event("the auditor's export", |e| {
        e["action"] == "metadata_exported" && e["actor"] == "mallory"
    });

    // Logging out ends the session on the server, not just in the browser.
    let (code, _, body) = call(&w, Some(&mallory), true, "POST", "/api/v1/logout", None).await;
    assert_eq!(code, 200, "{body}");
    let (code, _, body) = call(&w, Some(&mallory), false, "GET", "/api/v1/sessions", None).await;
    assert_eq!(code, 401, "{body}");

    // Every path in the OpenAPI document is served (a 401/400/404-with-message, never a
    // router 404 or 405), and the document is the one the server serves.
    let (code, _, doc) = call(&w, None, false, "GET", "/api/v1/openapi.json", None).await;
    assert_eq!(code, 200);
    assert!(
        doc["openapi"].as_str().unwrap_or("").starts_with("3."),
        "{doc}"
    );
    let paths = doc["paths"].as_object().expect("paths");
    assert!(paths.len() >= 15, "{}", paths.len());
    for (path, ops) in paths {
        for method in ops.as_object().expect("operations").keys() {
            let concrete = path.replace("{id}", "nope").replace("{ch}", "0");
            let (code, _, body) = call(
                &w,
                Some(&bob),
                true,
                &method.to_uppercase(),
                &concrete,
                Some(serde_json::json!({})),
            )
            .await;
            assert_ne!(code, 405, "{method} {path}: {body}");
            assert!(
                !body["error"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with("no such path"),
                "{method} {path} is not routed: {body}"
            );
        }
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_ui_in_headless_chromium_replays_searches_approves_and_signs_off() {
    let chromium = require("chromium", "chromium");
    let node = require("node", "nodejs");
    let web_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("web");
    assert!(
        web_dir.join("node_modules/playwright-core").is_dir()
            && web_dir
                .join("node_modules/asciinema-player/dist/bundle/asciinema-player.min.js")
                .is_file(),
        "front-end packages missing: run `npm ci --prefix web` (scripts/test.sh does)"
    );
    // A PostgreSQL target next to the SSH one, so the page shows both kinds of session.
    let web_config = format!(
        "[web]\nplayer_dir = \"{}\"\n",
        web_dir
            .join("node_modules/asciinema-player/dist/bundle")
            .display()
    );
    let (_pg, _pgdir, w, gw, _certs) = super::pg::pg_world_with(super::pg::PgOpts {
        client_tls: true,
        more: &web_config,
        ..Default::default()
    })
    .await;
    w.grant("alice", "30m");

    // alice works in a shell on web-01 through the gateway.
    let steps = serde_json::json!([
        {"expect": "[$#] $", "timeout": 15},
        {"send": "export PS1='bg$ '\r"},
        {"expect": "bg\\$ $"},
        {"send": "echo web-$((6*7))-ok\r"},
        {"expect": "web-42-ok"},
        // Markup typed at the shell: the command list must show it as text.
        {"expect": "bg\\$ $"},
        {"send": "echo '<img src=x onerror=window.__pwned=2><b>cmd</b>'\r"},
        {"expect": "cmd</b>\r\n"},
        {"expect": "bg\\$ $"},
        {"send": "exit\r"},
        {"wait_exit": 10}
    ]);
    let out = w.pty_ssh("alice", "web-01", steps).await;
    assert!(out.status.success(), "pty session: {}", text(&out.stdout));
    w.wait_ended(1);
    let session = last_session_id(&w);

    // alice runs a statement and a failing one through the gateway with psql, two queries.
    let (_, secret) = super::pg::pg_credential(&w, "30m").await;
    let mut psql = Command::new(require("psql", "postgresql-client"));
    psql.arg(format!(
        "host=127.0.0.1 port={} user=alice dbname=orders-db sslmode=require",
        w.pg_port
    ))
    .args([
        "-XAt",
        "-c",
        "select 40+2",
        "-c",
        "select * from nosuch",
        // Markup in a statement: the SQL timeline and the search hits show it as text.
        "-c",
        "select '<img src=x onerror=window.__pwned=3><b>sql</b>'",
    ])
    .env("PGPASSWORD", &secret)
    .stdin(std::process::Stdio::null());
    let out = output(psql).await;
    assert_eq!(
        text(&out.stdout).lines().next(),
        Some("42"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stderr).contains("\"nosuch\" does not exist"),
        "{}",
        text(&out.stderr)
    );
    w.wait_ended(2);
    let pg_session = last_session_id(&w);
    assert_ne!(pg_session, session);

    // A request waiting for bob, and the review of alice's grant.
    let (code, out, err) = control(
        &w,
        "alice",
        "breakglass",
        "request web-01 --reason follow-up check <img src=x onerror=window.__pwned=1> & <b>bold</b> --incident INC-78",
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    let req = request_id(&out);
    let (code, out, err) = control(&w, "bob", "breakglass", "reviews").await;
    assert_eq!(code, 0, "{err}");
    let review = out
        .lines()
        .find(|l| l.contains("alice") && l.contains("web-01"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("a review of alice's grant in {out}"))
        .to_string();

    // The session page lists the session's audit findings; the CLI computes the same ones.
    let findings: Vec<Value> =
        serde_json::from_str(&w.cli_ok(&["findings", "--since", "1d", "--format", "json"]))
            .expect("findings json");
    let session_findings = findings
        .iter()
        .filter(|f| f["session_id"] == session.as_str())
        .count();

    let (url, _) = login_link(&w, "bob").await;
    let artifacts = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/web-artifacts");
    // Screenshots of an earlier run must not pass for this one's.
    let _ = std::fs::remove_dir_all(&artifacts);
    let mut c = Command::new(node);
    c.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e/web_ui.mjs"))
        .env("BASE", format!("http://127.0.0.1:{}", w.http_port))
        .env("LOGIN_URL", &url)
        .env("SESSION_ID", &session)
        .env("SESSION_FINDINGS", session_findings.to_string())
        .env("OUTPUT_TEXT", "web-42-ok")
        .env("COMMAND_TEXT", "echo web-$((6*7))-ok")
        .env("PG_SESSION_ID", &pg_session)
        .env("PG_SQL", "select 40+2")
        .env("PG_ERROR", "42P01")
        .env("REQUEST_ID", &req)
        .env("REVIEW_ID", &review)
        .env("ARTIFACTS", &artifacts)
        .env("WEB_DIR", &web_dir)
        .env("CHROMIUM", &chromium);
    let out = output(c).await;
    assert!(
        out.status.success(),
        "web UI test failed (screenshots in {}):\n{}{}",
        artifacts.display(),
        text(&out.stdout),
        text(&out.stderr)
    );
    for shot in [
        "1-login",
        "2-session-replay",
        "3-search-results",
        "3b-sql-timeline",
        "3b-sql-timeline-search-hit",
        "4-approve",
        "5-sign-off",
    ] {
        assert!(
            artifacts.join(format!("{shot}.png")).is_file(),
            "{shot}.png"
        );
    }

    // The API behind those pages answers what its OpenAPI document says (`call` checks every
    // body against it): the session page, the signed review, the report, the person's status.
    let bob = log_in(&w, "bob").await;
    let (code, _, page) = call(
        &w,
        Some(&bob),
        false,
        "GET",
        &format!("/api/v1/sessions/{session}"),
        None,
    )
    .await;
    assert_eq!(code, 200, "{page}");
    assert_eq!(page["integrity"]["verdict"], "ok", "{page}");
    assert_eq!(page["grant"]["person"], "alice", "{page}");
    assert!(
        page["channels"][0]["commands"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c.to_string().contains("web-$((6*7))-ok"))),
        "{page}"
    );
    let (code, _, reviews) = call(&w, Some(&bob), false, "GET", "/api/v1/reviews", None).await;
    assert_eq!(code, 200, "{reviews}");
    let (code, _, report) = call(
        &w,
        Some(&bob),
        false,
        "GET",
        "/api/v1/reports?since=1d&period=day",
        None,
    )
    .await;
    assert_eq!(code, 200, "{report}");
    assert_eq!(report["totals"]["events"], 2, "{report}");
    let (code, _, status) = call(&w, Some(&bob), false, "GET", "/api/v1/status", None).await;
    assert_eq!(code, 200, "{status}");
    assert_eq!(status["person"], "bob", "{status}");

    // What bob did in the browser is on the record, as bob.
    w.wait_event("bob's replay", |e| {
        e["action"] == "recording_viewed"
            && e["actor"] == "bob"
            && e["session_id"] == session.as_str()
            && e["reason"]
                .as_str()
                .unwrap_or("")
                .contains("replayed channel")
    });
    w.wait_event("bob's approval", |e| {
        e["action"] == "request_approved" && e["actor"] == "bob" && e["request_id"] == req.as_str()
    });
    w.wait_event("bob's sign-off", |e| {
        e["action"] == "review_signed" && e["actor"] == "bob"
    });
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_listener_speaks_tls_and_login_links_are_https() {
    let w = World::new();
    let (cert, key) = self_signed_cert(w.path("").as_path());
    let cfg = std::fs::read_to_string(&w.config_path).expect("config");
    std::fs::write(
        &w.config_path,
        format!(
            "{cfg}\n[web]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
            cert.display(),
            key.display()
        ),
    )
    .expect("config");
    let gw = InProcess::start(&w).await;
    let (url, secret) = login_link(&w, "bob").await;
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    let curl = |args: &[&str]| {
        let mut c = Command::new(require("curl", "curl"));
        c.args(["-s", "-i", "--cacert"]).arg(&cert).args(args);
        c
    };
    let base = format!("https://127.0.0.1:{}", w.http_port);
    let out = output(curl(&[&format!("{base}/healthz")])).await;
    let got = text(&out.stdout);
    assert!(
        got.starts_with("HTTP/1.1 200"),
        "{got}{}",
        text(&out.stderr)
    );
    let out = output(curl(&[
        "-X",
        "POST",
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        &serde_json::json!({ "token": secret }).to_string(),
        &format!("{base}/api/v1/login"),
    ]))
    .await;
    let got = text(&out.stdout);
    let cookie = got
        .lines()
        .find(|l| {
            l.to_ascii_lowercase()
                .starts_with("set-cookie: bg_session=")
        })
        .unwrap_or_else(|| panic!("a session cookie in {got}"));
    // Over TLS the cookie is Secure, HttpOnly and SameSite=Strict.
    for attr in ["Secure", "HttpOnly", "SameSite=Strict"] {
        assert!(cookie.contains(attr), "{cookie}");
    }
    // Plain HTTP on the TLS port gets nowhere.
    let out = output({
        let mut c = Command::new(require("curl", "curl"));
        c.args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "5",
        ])
        .arg(format!("http://127.0.0.1:{}/healthz", w.http_port));
        c
    })
    .await;
    assert_eq!(text(&out.stdout), "000");
    gw.stop().await;
}
