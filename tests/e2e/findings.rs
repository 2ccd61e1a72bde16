//! Automated audit findings over real sessions: an `rm -rf` over real `ssh` and a psql
//! `DELETE` without `WHERE` are found at their moments; a harmless session has none.

use std::time::Duration;

use serde_json::Value;

use super::support::*;

fn findings(w: &World) -> Vec<Value> {
    let out = w.cli_ok(&["findings", "--since", "1d", "--format", "json"]);
    serde_json::from_str::<Value>(&out)
        .expect("findings json")
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destructive_commands_are_found_and_a_harmless_session_has_none() {
    let w = World::with(Opts {
        extra_config: "[findings]\nodd_hours = \"off\"\n".into(),
        ..Default::default()
    });
    let gw = InProcess::start(&w).await;
    w.grant("alice", "30m");
    for cmd in [
        "echo first-visit",
        "echo harmless",
        "rm -rf /tmp/bg-findings-x",
    ] {
        let out = output(w.ssh("alice", "web-01", &[], &[cmd])).await;
        assert!(out.status.success(), "{cmd}: {}", text(&out.stderr));
    }
    w.wait_ended(3);
    // The gateway indexes ended sessions by itself and sends their findings to the SIEM.
    let event = w.wait_event("the rm -rf finding event", |e| {
        e["action"] == "finding" && e["reason"] == "destructive"
    });
    assert_eq!(event["severity"], "high", "{event}");
    assert!(
        event["offset_ms"].is_u64() && event["channel"].is_u64(),
        "{event}"
    );
    let mut sessions = w.sessions();
    sessions.sort_by_key(|s| s["started_at"].as_str().unwrap_or("").to_string());
    let ids: Vec<String> = sessions
        .iter()
        .map(|s| s["id"].as_str().expect("id").to_string())
        .collect();
    // The search index (which the rules read) is filled shortly after a session ends.
    let found = wait_for("the rm -rf finding", Duration::from_secs(30), || {
        let f = findings(&w);
        f.iter()
            .any(|f| f["rule"] == "destructive" && f["session_id"] == ids[2].as_str())
            .then_some(f)
    });
    let rm = found
        .iter()
        .find(|f| f["rule"] == "destructive")
        .expect("destructive");
    assert_eq!(rm["severity"], "high");
    assert!(
        rm["detail"]
            .as_str()
            .is_some_and(|d| d.contains("rm -rf /tmp/bg-findings-x")),
        "{rm}"
    );
    assert!(
        rm["offset_seconds"].is_number() && rm["channel"].is_number(),
        "the moment: {rm}"
    );
    // The first visit is new to alice; the second harmless one has nothing.
    assert!(
        found
            .iter()
            .any(|f| f["rule"] == "new_target" && f["session_id"] == ids[0].as_str()),
        "{found:?}"
    );
    let harmless: Vec<&Value> = found
        .iter()
        .filter(|f| f["session_id"] == ids[1].as_str())
        .collect();
    assert!(
        harmless.is_empty(),
        "a harmless session has no findings: {harmless:?}"
    );
    // CSV carries the same rows.
    let csv = w.cli_ok(&["findings", "--since", "1d", "--format", "csv"]);
    assert!(
        csv.lines()
            .next()
            .is_some_and(|h| h.starts_with("at,severity,rule,session")),
        "{csv}"
    );
    assert!(csv.contains("destructive"), "{csv}");
    gw.stop().await;
    // One event per finding, however many indexers saw the session.
    let events: Vec<Value> = w
        .siem_events()
        .into_iter()
        .filter(|e| e["action"] == "finding")
        .collect();
    let ids: std::collections::BTreeSet<&str> = events
        .iter()
        .filter_map(|e| e["event_id"].as_str())
        .collect();
    assert_eq!(ids.len(), events.len(), "{events:?}");
    validate_all_events(&w);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_without_where_is_found_at_its_moment() {
    let (_pg, _pgdir, w, gw, _certs) = super::pg::pg_world("", true).await;
    let (_req, secret) = super::pg::pg_credential(&w, "30m").await;
    let out = output(super::pg::psql_cmd(
        &w,
        &secret,
        "create table t(x int); insert into t values (1); delete from t where x = 2; delete from t",
    ))
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    w.wait_ended(1);
    let found = wait_for("the DELETE finding", Duration::from_secs(30), || {
        let f = findings(&w);
        f.iter().any(|f| f["rule"] == "destructive").then_some(f)
    });
    let del: Vec<&Value> = found
        .iter()
        .filter(|f| f["rule"] == "destructive")
        .collect();
    assert_eq!(del.len(), 1, "only the DELETE without WHERE: {del:?}");
    assert!(
        del[0]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("DELETE without WHERE")),
        "{:?}",
        del[0]
    );
    assert!(del[0]["offset_seconds"].is_number(), "{:?}", del[0]);
    gw.stop().await;
}
