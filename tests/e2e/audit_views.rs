//! Auditing the auditors and the audit pipeline itself: a search over recordings is a
//! `recording_searched` event spooled before its results are served (and no event, no
//! results), and `BREAK_GLASS_ACTION` events the SIEM spool refuses are counted and put on the
//! record as `actions_dropped` before the session's end event.

use serde_json::Value;

use super::support::*;

/// Makes the gateway's SIEM spool refuse the events `when` matches (an SQL condition on the
/// row being inserted), as a full disk would; undone by [`allow`].
fn refuse(w: &World, name: &str, when: &str) {
    rusqlite::Connection::open(w.path("data/siem-spool.sqlite"))
        .expect("open the spool")
        .execute_batch(&format!(
            "CREATE TRIGGER {name} BEFORE INSERT ON events WHEN {when} \
             BEGIN SELECT RAISE(ABORT, 'disk full'); END;"
        ))
        .expect("trigger");
}

fn allow(w: &World, name: &str) {
    rusqlite::Connection::open(w.path("data/siem-spool.sqlite"))
        .expect("open the spool")
        .execute_batch(&format!("DROP TRIGGER {name};"))
        .expect("drop trigger");
}

/// The SIEM file's events, each once: delivery is at-least-once, and a duplicate carries the
/// same `event_id`.
fn events(w: &World) -> Vec<Value> {
    let mut seen = std::collections::HashSet::new();
    w.siem_events()
        .into_iter()
        .filter(|e| seen.insert(e["event_id"].as_str().unwrap_or_default().to_string()))
        .collect()
}

fn searched(w: &World) -> Vec<Value> {
    events(w)
        .into_iter()
        .filter(|e| e["action"] == "recording_searched")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_search_is_on_the_record_before_its_results_and_fails_closed() {
    let w = World::new();
    let gw = InProcess::start(&w).await;
    w.grant("alice", "30m");
    w.grant("bob", "30m");
    for (who, cmd) in [
        ("alice", "echo needle-alice"),
        ("bob", "echo needle-bob"),
        ("alice", "echo hay"),
    ] {
        let out = output(w.ssh(who, "web-01", &[], &[cmd])).await;
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    w.wait_ended(3);
    let bob = api_token(&w, "bob").await;
    let alice = api_token(&w, "alice").await;

    // A reviewer's search: the event is in the SIEM file as soon as the answer is (the file
    // is written before the event is acknowledged, and the event before the answer).
    let (code, body) = api(&w, Some(&bob), "GET", "/api/v1/search?q=needle", None).await;
    assert_eq!(code, 200, "{body}");
    let hits = body["hits"].as_array().expect("hits");
    assert_eq!(hits.len(), 2, "{body}");
    let mut served: Vec<&str> = hits
        .iter()
        .map(|h| h["session_id"].as_str().expect("session id"))
        .collect();
    let events = searched(&w);
    assert_eq!(events.len(), 1, "{events:#?}");
    let e = &events[0];
    assert_eq!(e["actor"], "bob");
    assert_eq!(e["query"], "needle");
    assert_eq!(e["event_type"], "BREAK_GLASS_ACCESS");
    let mut recorded: Vec<&str> = e["session_ids"]
        .as_array()
        .expect("session_ids")
        .iter()
        .map(|s| s.as_str().expect("id"))
        .collect();
    served.sort_unstable();
    recorded.sort_unstable();
    assert_eq!(recorded, served, "the event names every session served");

    // An engineer sees only their own sessions, and the event says so.
    let (code, body) = api(&w, Some(&alice), "GET", "/api/v1/search?q=needle", None).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["hits"].as_array().map(Vec::len), Some(1), "{body}");
    let own = body["hits"][0]["session_id"].clone();
    let events = searched(&w);
    let e = events.last().expect("alice's search");
    assert_eq!(e["actor"], "alice");
    assert_eq!(e["session_ids"], Value::Array(vec![own]));
    assert!(
        e["message"]
            .as_str()
            .is_some_and(|m| m.contains("person=alice")),
        "{e}"
    );
    // A search without hits is a view too.
    let (code, body) = api(&w, Some(&bob), "GET", "/api/v1/search?q=nowhere", None).await;
    assert_eq!(code, 200, "{body}");
    let events = searched(&w);
    assert_eq!(
        events.last().expect("event")["session_ids"],
        Value::Array(vec![])
    );

    // Control characters and over-long text are refused, before anything is searched.
    let before = searched(&w).len();
    for q in ["needle%01", "needle%0Aforged", &"n".repeat(1001)] {
        let (code, body) = api(
            &w,
            Some(&bob),
            "GET",
            &format!("/api/v1/search?q={q}"),
            None,
        )
        .await;
        assert_eq!(code, 400, "{q}: {body}");
    }
    assert_eq!(searched(&w).len(), before);

    // No record, no results: when the spool refuses the event, the search fails and says why.
    refuse(
        &w,
        "refuse_searches",
        "NEW.body LIKE '%\"action\":\"recording_searched\"%'",
    );
    let (code, body) = api(&w, Some(&bob), "GET", "/api/v1/search?q=needle", None).await;
    assert_eq!(code, 503, "{body}");
    assert!(body.get("hits").is_none(), "{body}");
    let err = body["error"].as_str().unwrap_or("");
    assert!(
        err.contains("audit record of this search could not be written")
            && err.contains("disk full"),
        "{body}"
    );
    assert!(!body.to_string().contains("needle-"), "{body}");
    assert_eq!(searched(&w).len(), before, "nothing was recorded");
    // Views fail the same way, through the same path.
    refuse(
        &w,
        "refuse_views",
        "NEW.body LIKE '%\"action\":\"recording_viewed\"%'",
    );
    let sid = served[0];
    let (code, body) = api(
        &w,
        Some(&bob),
        "GET",
        &format!("/api/v1/sessions/{sid}"),
        None,
    )
    .await;
    assert_eq!(code, 503, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("audit record of this view could not be written")),
        "{body}"
    );
    allow(&w, "refuse_views");
    allow(&w, "refuse_searches");
    let (code, body) = api(&w, Some(&bob), "GET", "/api/v1/search?q=needle", None).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(searched(&w).len(), before + 1);

    gw.stop().await;
    validate_all_events(&w);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn action_events_the_spool_refuses_are_counted_on_the_record() {
    let w = World::with(Opts {
        extra_config: "[siem]\nactions = true\n".into(),
        ..Default::default()
    });
    let gw = InProcess::start(&w).await;
    w.grant("alice", "30m");
    // The spool refuses every BREAK_GLASS_ACTION event, and only those.
    refuse(&w, "refuse_actions", "NEW.is_action = 1");
    let steps = serde_json::json!([
        {"expect": "[$#] $", "timeout": 15},
        {"send": "export PS1='bg$ '\r"},
        {"expect": "bg\\$ $"},
        {"send": "echo one-$((1+1))\r"},
        {"expect": "one-2"},
        {"send": "echo three-$((1+2))\r"},
        {"expect": "three-3"},
        {"send": "exit\r"},
        {"wait_exit": 10}
    ]);
    let out = w.pty_ssh("alice", "web-01", steps).await;
    assert!(out.status.success(), "{}", text(&out.stdout));
    w.wait_ended(1);
    gw.stop().await;

    let events = events(&w);
    let id = events
        .iter()
        .find(|e| e["action"] == "session_end")
        .and_then(|e| e["session_id"].as_str())
        .expect("session end")
        .to_string();
    assert!(
        !events
            .iter()
            .any(|e| e["event_type"] == "BREAK_GLASS_ACTION"),
        "the spool refused them all: {events:#?}"
    );
    let meta = session_meta(&w, &id);
    let commands = meta["channels"][0]["commands"]
        .as_array()
        .expect("commands")
        .len();
    assert!(commands >= 3, "{meta}");
    // Every one of them is counted, on the record before the session's end event.
    let at = |action: &str| {
        events
            .iter()
            .position(|e| e["action"] == action && e["session_id"] == id.as_str())
            .unwrap_or_else(|| panic!("no {action} event: {events:#?}"))
    };
    let dropped = &events[at("actions_dropped")];
    assert!(at("actions_dropped") < at("session_end"));
    assert_eq!(
        dropped["actions_dropped"].as_u64(),
        Some(commands as u64),
        "{dropped}"
    );
    assert_eq!(dropped["outcome"], "failure");
    assert_eq!(dropped["reason"], "action_queue");
    assert_eq!(dropped["person"], "alice");
    // The incident's event history has it too.
    let history = w.cli_ok(&[
        "events",
        "--correlation",
        dropped["correlation_id"].as_str().expect("correlation id"),
        "--format",
        "json",
    ]);
    let history: Vec<Value> = serde_json::from_str(&history).expect("events JSON");
    assert!(
        history.iter().any(|e| e["event_type"] == "actions_dropped"),
        "{history:#?}"
    );
    validate_all_events(&w);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_psql_statement_is_a_siem_event_or_counted_as_dropped() {
    let (_pg, _pgdir, w, gw, _certs) = super::pg::pg_world("", true).await;
    let (_req, secret) = super::pg::pg_credential(&w, "30m").await;
    // The spool refuses the batches holding `select 150` to `select 159` (as a full disk
    // would, now and then); whatever else shared a batch with them is lost with them.
    refuse(
        &w,
        "refuse_some",
        "NEW.is_action = 1 AND NEW.body LIKE '%\"command\":\"select 15_\"%'",
    );
    let mut c = super::pg::psql_cmd(&w, &secret, "select 0");
    for i in 1..300 {
        c.args(["-c", &format!("select {i}")]);
    }
    let out = output(c).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).lines().count(), 300);
    w.wait_ended(1);
    gw.stop().await;

    let sessions = w.sessions();
    let id = sessions[0]["id"].as_str().expect("id").to_string();
    let timeline = export(&w, &id);
    let recorded = timeline
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["event"] == "query")
        .count();
    assert_eq!(recorded, 300, "the recording holds every statement");
    let events = events(&w);
    let shipped = events
        .iter()
        .filter(|e| e["action"] == "statement" && e["session_id"] == id.as_str())
        .count();
    let dropped: Vec<&Value> = events
        .iter()
        .filter(|e| e["action"] == "actions_dropped" && e["session_id"] == id.as_str())
        .collect();
    assert_eq!(dropped.len(), 1, "{dropped:#?}");
    let lost = dropped[0]["actions_dropped"].as_u64().expect("count") as usize;
    println!(
        "{recorded} statements recorded, {shipped} shipped to the SIEM, {lost} counted as dropped"
    );
    assert!(lost >= 10, "select 150..159 were refused: {lost}");
    assert_eq!(
        shipped + lost,
        recorded,
        "every statement is shipped or counted ({shipped} shipped, {lost} lost)"
    );
    validate_all_events(&w);
}
