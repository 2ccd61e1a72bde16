//! `breakglass drill`: a rehearsal end to end through the running gateway against a real sshd
//! target, with a second person approving over the control channel; and drills that fail,
//! naming the step, when the target is down or a SIEM sink cannot be reached.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncBufReadExt;

use super::support::*;

/// Starts `breakglass drill web-01` as alice; returns the child and the request id it waits
/// on, with every line it printed so far.
async fn start_drill(
    w: &World,
) -> (
    tokio::process::Child,
    String,
    Vec<String>,
    tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
) {
    start_drill_on(w, "web-01").await
}

pub(crate) async fn start_drill_on(
    w: &World,
    target: &str,
) -> (
    tokio::process::Child,
    String,
    Vec<String>,
    tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
) {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_breakglass"))
        .args(["drill", target, "--key"])
        .arg(w.path("alice"))
        .args([
            "--for",
            "4s",
            "--step-timeout",
            "15s",
            "--approval-timeout",
            "60s",
        ])
        .env("BREAKGLASS_CONFIG", &w.config_path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("drill");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut seen = Vec::new();
    let req = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(l)) = lines.next_line().await {
            seen.push(l.clone());
            if let Some(rest) = l.split(" approve ").nth(1) {
                return Some(rest.trim().to_string());
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
    .unwrap_or_else(|| panic!("the drill waits for an approval: {seen:?}"));
    (child, req, seen, lines)
}

/// The rest of the drill's output and its exit code.
pub(crate) async fn finish(
    mut child: tokio::process::Child,
    mut seen: Vec<String>,
    mut lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
) -> (Option<i32>, String) {
    tokio::time::timeout(Duration::from_secs(120), async {
        while let Ok(Some(l)) = lines.next_line().await {
            seen.push(l);
        }
    })
    .await
    .expect("the drill finishes");
    let status = child.wait().await.expect("wait");
    (status.code(), seen.join("\n"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_passes_end_to_end_with_a_second_person_approving() {
    let hook = HttpReceiver::start(vec![200]).await;
    let w = World::with(Opts {
        extra_config: format!(
            "[alerts]\nwebhooks = [{{ url = \"http://127.0.0.1:{}/hook\", format = \"json\" }}]\n",
            hook.port
        ),
        ..Default::default()
    });
    let gw = InProcess::start(&w).await;
    let (child, req, seen, lines) = start_drill(&w).await;
    // The drill never approves itself: bob does, as in a real event.
    let (code, out, err) = control(&w, "bob", "breakglass", &format!("approve {req}")).await;
    assert_eq!(code, 0, "{out}{err}");
    let (code, out) = finish(child, seen, lines).await;
    eprintln!("{out}");
    assert_eq!(code, Some(0), "{out}");
    for step in [
        "ok    request",
        "ok    approval",
        "ok    session",
        "ok    deadline cut",
        "ok    verify",
        "ok    siem delivery",
        "ok    alert",
        "ok    rotation",
        "ok    review opened",
        "time to access (request to first byte on the target):",
        "drill PASSED",
    ] {
        assert!(out.contains(step), "{step}: {out}");
    }
    assert!(out.contains("approved by bob"), "{out}");
    // The drill is tagged as one: its request's scenario says so.
    let events = w.cli_ok(&["events", "--correlation", &req, "--format", "json"]);
    let v: serde_json::Value = serde_json::from_str(&events).expect("json");
    assert!(
        v.as_array()
            .expect("events")
            .iter()
            .any(|e| e["event_type"] == "request_created" && e["event_data"]["scenario"] == "drill"),
        "{events}"
    );
    let finished = w.wait_event("drill_finished", |e| e["action"] == "drill_finished");
    assert_eq!(finished["outcome"], "success", "{finished}");
    assert!(
        finished["time_to_access_ms"].as_u64().is_some(),
        "{finished}"
    );
    // Reports count the drill apart from real incidents.
    let report = w.cli_ok(&[
        "report", "--since", "1d", "--period", "day", "--format", "json",
    ]);
    let r: serde_json::Value = serde_json::from_str(&report).expect("report json");
    validate("report.schema.json", &r);
    assert_eq!(
        r["totals"]["events"], 0,
        "drill sessions are not incidents: {report}"
    );
    assert_eq!(r["totals"]["grants"], 0, "{report}");
    assert_eq!(r["drills"]["drills"], 1, "{report}");
    assert_eq!(r["drills"]["passed"], 1, "{report}");
    assert_eq!(r["drills"]["pass_rate_pct"], 100.0, "{report}");
    assert_eq!(r["drills"]["sessions"], 2, "{report}");
    assert!(
        r["drills"]["median_time_to_access_seconds"]
            .as_f64()
            .is_some(),
        "{report}"
    );
    assert!(r["drills"]["last_passed"]["web-01"].is_string(), "{report}");
    gw.stop().await;
    validate_all_events(&w);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_against_a_stopped_target_fails_at_the_session_step() {
    let mut w = World::new();
    let gw = InProcess::start(&w).await;
    w.sshd.stop();
    let (child, req, seen, lines) = start_drill(&w).await;
    control(&w, "bob", "breakglass", &format!("approve {req}")).await;
    let (code, out) = finish(child, seen, lines).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("FAIL  session"), "{out}");
    assert!(out.contains("drill FAILED at step `session`"), "{out}");
    let finished = w.wait_event("drill_finished", |e| e["action"] == "drill_finished");
    assert_eq!(finished["outcome"], "failure", "{finished}");
    assert_eq!(finished["reason"], "session", "{finished}");
    let report = w.cli_ok(&["report", "--since", "1d", "--format", "json"]);
    let r: serde_json::Value = serde_json::from_str(&report).expect("report json");
    assert_eq!(
        (
            r["drills"]["failed"].as_u64(),
            r["drills"]["passed"].as_u64()
        ),
        (Some(1), Some(0)),
        "{report}"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_with_an_unreachable_siem_sink_fails_naming_it() {
    let dead = free_port();
    let w = World::with(Opts {
        extra_config: format!(
            "[siem]\n\n[[siem.sinks]]\nname = \"collector\"\nkind = \"webhook\"\nurl = \"http://127.0.0.1:{dead}/siem\"\ntimeout = \"1s\"\n"
        ),
        ..Default::default()
    });
    let gw = InProcess::start(&w).await;
    let (child, req, seen, lines) = start_drill(&w).await;
    control(&w, "bob", "breakglass", &format!("approve {req}")).await;
    let (code, out) = finish(child, seen, lines).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("FAIL  siem delivery"), "{out}");
    assert!(out.contains("sink `collector`"), "{out}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_without_a_recent_passed_drill_raises_drill_overdue() {
    let hook = HttpReceiver::start(vec![200]).await;
    let w = World::with(Opts {
        extra_config: format!(
            "[drills]\nevery = \"90d\"\n\n[alerts]\nwebhooks = [{{ url = \"http://127.0.0.1:{}/hook\", format = \"json\" }}]\n",
            hook.port
        ),
        ..Default::default()
    });
    let gw = InProcess::start(&w).await;
    for target in ["web-01", "web-02"] {
        let e = w.wait_event("drill_overdue", |e| {
            e["action"] == "drill_overdue" && e["target"] == target
        });
        assert!(
            e["message"]
                .as_str()
                .is_some_and(|m| m.contains("never passed a drill")),
            "{e}"
        );
    }
    // Custodians hear of it.
    wait_for("the overdue alert", Duration::from_secs(10), || {
        hook.bodies()
            .iter()
            .any(|(_, b)| b.contains("DRILL OVERDUE for web-01"))
            .then_some(())
    });
    gw.stop().await;
    validate_all_events(&w);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_against_a_real_postgresql_target_passes() {
    use super::pg::{pg_world_with, PgOpts};
    let (pg, _pgdir, w, gw, _certs) = pg_world_with(PgOpts {
        sql: "CREATE ROLE bg_keeper LOGIN SUPERUSER PASSWORD 'keeper-pw'",
        target: "disable_between_grants = true\nadmin_login = \"bg_keeper\"",
        ..Default::default()
    })
    .await;
    w.vault_set_with(&["orders-db", "--admin"], "keeper-pw");
    // The role is off between grants before the drill starts.
    wait_for("the role switched off", Duration::from_secs(20), || {
        let out = pg.psql(
            "postgres",
            &pg.superuser_password,
            "SELECT rolcanlogin FROM pg_roles WHERE rolname = 'bg_dba'",
        );
        (text(&out.stdout).trim() == "f").then_some(())
    });
    let (child, req, seen, lines) = start_drill_on(&w, "orders-db").await;
    let (code, out, err) = control(&w, "bob", "breakglass", &format!("approve {req}")).await;
    assert_eq!(code, 0, "{out}{err}");
    let (code, out) = finish(child, seen, lines).await;
    eprintln!("{out}");
    assert_eq!(code, Some(0), "{out}");
    for step in [
        "ok    account off",
        "ok    session",
        "ok    deadline cut",
        "ok    verify",
        "ok    rotation",
        "password rotated",
        "drill PASSED",
    ] {
        assert!(out.contains(step), "{step}: {out}");
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_request_keeps_the_two_person_rule_and_its_own_incident_id() {
    let w = World::new();
    let gw = InProcess::start(&w).await;
    // web-02 allows emergency self-service, but never for a drill.
    let (code, _, err) = control(
        &w,
        "alice",
        "breakglass",
        "request web-02 --reason rehearsal --incident DRILL-1 --scenario drill --emergency",
    )
    .await;
    assert_eq!(code, 1);
    assert!(err.contains("never uses emergency self-service"), "{err}");
    // A real incident cannot be filed as a drill.
    let (code, _, err) = control(
        &w,
        "alice",
        "breakglass",
        "request web-01 --reason db down --incident INC-9 --scenario drill",
    )
    .await;
    assert_eq!(code, 1);
    assert!(err.contains("starts with DRILL-"), "{err}");
    let (code, out, err) = control(
        &w,
        "alice",
        "breakglass",
        "request web-01 --reason rehearsal --incident DRILL-2 --scenario drill",
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_against_an_ssh_key_target_with_an_admin_passes_and_leaves_the_key_out() {
    let login = throwaway_user("bgdrillkey");
    let w = World::with(Opts {
        held_key: true,
        key_admin: true,
        login: Some(login.clone()),
        ..Default::default()
    });
    let ak = w.path("authorized_keys");
    let held = w.path("gateway_held_key").with_extension("pub");
    let gw = InProcess::start(&w).await;
    wait_for("the held key taken out", Duration::from_secs(20), || {
        let now = std::fs::read_to_string(&ak).expect("authorized_keys");
        (!now.contains(&super::accounts::blob(&held))).then_some(())
    });
    let between = std::fs::read_to_string(&ak).expect("authorized_keys");
    let (child, req, seen, lines) = start_drill_on(&w, "web-01").await;
    let (code, out, err) = control(&w, "bob", "breakglass", &format!("approve {req}")).await;
    assert_eq!(code, 0, "{out}{err}");
    let (code, out) = finish(child, seen, lines).await;
    eprintln!("{out}");
    assert_eq!(code, Some(0), "{out}");
    for step in [
        "ok    account off",
        "KEY-OUT between grants",
        "ok    session",
        "ok    rotation",
        "drill PASSED",
    ] {
        assert!(out.contains(step), "{step}: {out}");
    }
    // After the drill (and its rotation, which swaps the held key) authorized_keys is back to
    // what it held between grants: no key of the gateway's is in it.
    wait_for(
        "the held key out after the drill",
        Duration::from_secs(20),
        || (std::fs::read_to_string(&ak).expect("authorized_keys") == between).then_some(()),
    );
    gw.stop().await;
    validate_all_events(&w);
}
