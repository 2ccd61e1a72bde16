//! The workflow around access: check-config, the two-person workflow over the SSH control
//! channel, webhook alerts, reviews, JIT credentials, the JSON API, rotation after a grant, and
//! reports.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::*;

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
    // An operator's revoke from the CLI is the same event: it carries the request's
    // correlation id, not the grant's own id.
    let created = w
        .siem_events()
        .into_iter()
        .find(|e| e["action"] == "grant_created" && e["request_id"] == req2.as_str())
        .expect("the grant of the second request");
    let gid = created["grant_id"].as_str().expect("grant id").to_string();
    w.cli_ok(&["grant", "revoke", &gid, "--reason", "incident closed"]);
    let revoked = w
        .siem_events()
        .into_iter()
        .find(|e| e["action"] == "grant_revoked" && e["grant_id"] == gid.as_str())
        .expect("the CLI revoke's event");
    assert_eq!(revoked["correlation_id"], req2.as_str(), "{revoked}");
    assert_eq!(revoked["request_id"], req2.as_str(), "{revoked}");
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
    // An operator's revoke on the gateway host alerts too, though the CLI has no worker.
    let grant = w.sessions()[0]["grant_id"]
        .as_str()
        .expect("grant id")
        .to_string();
    let out = w.cli(&["grant", "revoke", &grant, "--reason", "incident over"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_for("the CLI revoke's alert", Duration::from_secs(5), || {
        slack_hook
            .bodies()
            .into_iter()
            .find(|(_, b)| b.contains("was revoked") && b.contains("operator:"))
    });
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

    // A sign-off that leaves a question unanswered is refused, naming each one left.
    let (code, _, err) = control(
        &w,
        "dave",
        "breakglass",
        &format!(
            "review {req} --findings vacuum stuck on a lock --root-cause missing index on orders --thresholds-met no"
        ),
    )
    .await;
    assert_eq!(code, 1, "{err}");
    for q in [
        "--thresholds-note",
        "--escalation-possible",
        "--actions-taken",
        "--procedure-update",
    ] {
        assert!(err.contains(q), "{q} unanswered: {err}");
    }
    assert!(!err.contains("--root-cause:"), "{err}");
    let (code, out, err) = control(
        &w,
        "dave",
        "breakglass",
        &format!(
            "review {req} --findings vacuum stuck on a lock --root-cause missing index on orders \
             --thresholds-met yes --escalation-possible no --escalation-note 'the DBA on call was paged twice' \
             --actions-taken killed the vacuum --procedure-update yes --procedure-change 'add the index check to the runbook'"
        ),
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    let signed = w.wait_event("review signed", |e| e["action"] == "review_signed");
    assert_eq!(signed["root_cause"], "missing index on orders");
    // Every answer is a field of the SIEM event and of the immutable review record.
    assert_eq!(signed["thresholds_met"], true, "{signed}");
    assert_eq!(signed["escalation_possible"], false, "{signed}");
    assert_eq!(signed["actions_taken"], "killed the vacuum", "{signed}");
    assert_eq!(signed["procedure_update"], true, "{signed}");
    assert_eq!(
        signed["procedure_change"], "add the index check to the runbook",
        "{signed}"
    );
    let review_id = signed["review_id"].as_str().expect("review id").to_string();
    let stored = w
        .path("data/recordings/reviews")
        .join(&req)
        .join(format!("{review_id}.json"));
    let doc: Value =
        serde_json::from_str(&std::fs::read_to_string(&stored).expect("review in the store"))
            .expect("json");
    assert_eq!(doc["signed_by"], "dave");
    assert_eq!(doc["answers"]["thresholds_met"], true, "{doc}");
    assert_eq!(
        doc["answers"]["actions_taken"], "killed the vacuum",
        "{doc}"
    );
    let (code, _, err) = control(
        &w,
        "dave",
        "breakglass",
        &format!(
            "review {req} --findings x --root-cause y --thresholds-met yes --escalation-possible no \
             --actions-taken z --procedure-update no"
        ),
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
