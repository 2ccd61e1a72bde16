//! The store test suite, run against both implementations: every check takes a `&dyn Store`,
//! and [`suite!`] makes one test per check for a store constructor. The race checks take two
//! handles on the same data (for PostgreSQL, two pools: two nodes).

use std::sync::Arc;

use chrono::{DateTime, Duration, TimeZone, Utc};

use super::*;

/// One `#[tokio::test]` per check. `$open` is an async expression giving
/// `(guard, Arc<dyn Store>, Arc<dyn Store>)`: two handles on one fresh store.
macro_rules! suite {
    ($open:expr) => {
        crate::state::conformance::suite!(@tests $open;
            grants_round_trip_and_revoke,
            active_grant_is_preferred_over_newer_revoked_one,
            sessions_filter,
            login_links_work_once_and_only_before_they_expire,
            search_and_session_filters_find_the_right_rows,
            requests_approvals_and_denials,
            reviews_are_opened_once_signed_once_and_alerted_once,
            incidents_keep_reports_one_cab_review_and_one_alert_per_item,
            the_ledger_keeps_write_order_and_final_entries,
            vault_slots_promote,
            node_leases_renew_and_leave,
        );
        crate::state::conformance::suite!(@races $open;
            one_approver_racing_itself_is_recorded_once,
            two_approvers_racing_for_the_last_approval_make_one_grant,
            a_login_link_raced_from_two_nodes_works_once,
            two_nodes_taking_over_one_dead_node_split_its_sessions,
            nodes_racing_to_create_one_vault_entry_make_one,
        );
    };
    (@tests $open:expr; $($name:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let (_guard, a, _b) = $open.await;
            crate::state::conformance::$name(&*a).await;
        }
    )*};
    (@races $open:expr; $($name:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let (_guard, a, b) = $open.await;
            crate::state::conformance::$name(a, b).await;
        }
    )*};
}
pub(crate) use suite;

fn t0() -> DateTime<Utc> {
    Utc.timestamp_millis_opt(1_700_000_000_000)
        .single()
        .expect("valid ts")
}

fn new_grant(person: &str, target: &str, now: DateTime<Utc>, mins: i64) -> NewGrant {
    NewGrant {
        person: person.into(),
        target: target.into(),
        reason: "disk full".into(),
        incident_id: "INC-1".into(),
        created_by: "operator".into(),
        created_at: now,
        expires_at: now + Duration::minutes(mins),
    }
}

fn session(i: usize, proto: &str, person: &str, grant: &str, now: DateTime<Utc>) -> SessionRow {
    SessionRow {
        id: format!("s{i}"),
        protocol: proto.into(),
        person: person.into(),
        target: "web-01".into(),
        grant_id: grant.into(),
        client_addr: "127.0.0.1:1".into(),
        started_at: now + Duration::minutes(i as i64),
        deadline: now + Duration::hours(1),
        ended_at: None,
        end_reason: None,
        bytes_in: 0,
        bytes_out: 0,
        recording_prefix: format!("p/{i}"),
        node_id: "n1".into(),
    }
}

fn new_request(now: DateTime<Utc>) -> NewRequest {
    NewRequest {
        person: "alice".into(),
        target: "web-01".into(),
        justification: "disk full".into(),
        incident_id: "INC-7".into(),
        severity: "sev1".into(),
        scenario: "production_outage".into(),
        duration: std::time::Duration::from_secs(1800),
        created_at: now,
        expires_at: now + Duration::hours(1),
        emergency: false,
    }
}

pub async fn grants_round_trip_and_revoke(store: &dyn Store) {
    let now = t0();
    let g = store
        .create_grant(new_grant("alice", "web-01", now, 30))
        .await
        .expect("create");
    let found = store
        .grant_for("alice", "web-01", now)
        .await
        .expect("q")
        .expect("some");
    assert_eq!(found, g);
    assert_eq!(found.state_at(now), GrantState::Active);
    assert_eq!(
        found.state_at(now + Duration::minutes(30)),
        GrantState::Expired
    );
    assert!(store
        .grant_for("bob", "web-01", now)
        .await
        .expect("q")
        .is_none());
    let r = store
        .revoke_grant(&g.id[..8], "op", "done", now)
        .await
        .expect("revoke");
    assert_eq!(r.state_at(now), GrantState::Revoked);
    assert!(matches!(
        store.revoke_grant(&g.id, "op", "again", now).await,
        Err(StateError::AlreadyRevoked(_))
    ));
    let revs = store
        .revocations(std::slice::from_ref(&g.id))
        .await
        .expect("revs");
    assert_eq!(revs.len(), 1);
    assert!(store.list_grants(Some(now)).await.expect("list").is_empty());
    assert_eq!(store.list_grants(None).await.expect("list").len(), 1);
    assert!(matches!(
        store.find_grant("nope").await,
        Err(StateError::NoSuchGrant(_))
    ));
}

pub async fn active_grant_is_preferred_over_newer_revoked_one(store: &dyn Store) {
    let now = Utc::now();
    let active = store
        .create_grant(new_grant("a", "t", now, 60))
        .await
        .expect("c");
    let later = store
        .create_grant(new_grant("a", "t", now + Duration::seconds(1), 60))
        .await
        .expect("c");
    store
        .revoke_grant(&later.id, "op", "x", now)
        .await
        .expect("r");
    let g = store
        .grant_for("a", "t", now)
        .await
        .expect("q")
        .expect("some");
    assert_eq!(g.id, active.id);
}

pub async fn sessions_filter(store: &dyn Store) {
    let now = t0();
    for (i, person) in ["alice", "bob", "alice"].iter().enumerate() {
        store
            .insert_session(&session(i, "ssh", person, "g", now))
            .await
            .expect("insert");
    }
    let f = SessionFilter {
        person: Some("alice".into()),
        since: Some(now + Duration::seconds(30)),
        ..Default::default()
    };
    let rows = store.list_sessions(&f).await.expect("list");
    assert_eq!(
        rows.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        vec!["s2"]
    );
    store
        .finish_session(
            "s2",
            &SessionEnd {
                ended_at: now,
                end_reason: "client closed".into(),
                bytes_in: 5,
                bytes_out: 7,
            },
        )
        .await
        .expect("finish");
    assert_eq!(store.unfinished_sessions().await.expect("u").len(), 2);
    let s = store.find_session("s2").await.expect("find").expect("some");
    assert_eq!((s.bytes_in, s.bytes_out), (5, 7));
    assert!(matches!(
        store.find_session("s").await,
        Err(StateError::Ambiguous(_))
    ));
    assert!(store
        .find_session_of("s2", "bob")
        .await
        .expect("find")
        .is_none());
    assert_eq!(
        store.unsealed_sessions().await.expect("unsealed").len(),
        1,
        "ended, not sealed"
    );
    store.set_sealed("s2", true).await.expect("seal");
    assert!(store
        .unsealed_sessions()
        .await
        .expect("unsealed")
        .is_empty());
}

pub async fn login_links_work_once_and_only_before_they_expire(store: &dyn Store) {
    let now = Utc::now();
    let exp = now + Duration::minutes(5);
    store
        .put_login_link("h1", "alice", now, exp)
        .await
        .expect("put");
    store
        .put_login_link("h2", "bob", now, exp)
        .await
        .expect("put");
    let cases = [
        ("h1", now, LinkUse::Person("alice".into())),
        ("h1", now, LinkUse::AlreadyUsed),
        ("nope", now, LinkUse::Unknown),
        ("h2", exp, LinkUse::Expired),
    ];
    for (hash, at, want) in cases {
        assert_eq!(
            store.use_login_link(hash, at).await.expect("use"),
            want,
            "{hash}"
        );
    }
    store
        .put_api_token("t1", "alice", now, exp)
        .await
        .expect("token");
    assert_eq!(
        store.api_token_person("t1", now).await.expect("who"),
        Some("alice".into())
    );
    store.end_api_token("t1", now).await.expect("end");
    assert_eq!(store.api_token_person("t1", now).await.expect("who"), None);
}

pub async fn search_and_session_filters_find_the_right_rows(store: &dyn Store) {
    let now = Utc::now();
    let g = store
        .create_grant(NewGrant {
            incident_id: "INC-9".into(),
            ..new_grant("alice", "db-01", now, 60)
        })
        .await
        .expect("grant");
    for (i, (proto, grant)) in [("ssh", "other"), ("postgres", g.id.as_str())]
        .iter()
        .enumerate()
    {
        store
            .insert_session(&session(i, proto, "alice", grant, now))
            .await
            .expect("insert");
        store
            .finish_session(
                &format!("s{i}"),
                &SessionEnd {
                    ended_at: now + Duration::minutes(10),
                    end_reason: "closed".into(),
                    bytes_in: 1,
                    bytes_out: 1,
                },
            )
            .await
            .expect("finish");
    }
    let ids = |rows: Vec<SessionRow>| rows.into_iter().map(|r| r.id).collect::<Vec<_>>();
    let cases = [
        (SessionFilter::default(), vec!["s1", "s0"]),
        (
            SessionFilter {
                protocol: Some("ssh".into()),
                ..Default::default()
            },
            vec!["s0"],
        ),
        (
            SessionFilter {
                incident: Some("INC-9".into()),
                ..Default::default()
            },
            vec!["s1"],
        ),
        (
            SessionFilter {
                review: Some(ReviewFilter::None),
                ..Default::default()
            },
            vec!["s1", "s0"],
        ),
        (
            SessionFilter {
                limit: Some(1),
                offset: Some(1),
                ..Default::default()
            },
            vec!["s0"],
        ),
    ];
    for (f, want) in cases {
        assert_eq!(
            ids(store.list_sessions(&f).await.expect("list")),
            want,
            "{f:?}"
        );
    }
    assert_eq!(store.unindexed_sessions(10).await.expect("u").len(), 2);
    let entry = |t: f64, kind: &str, text: &str| SearchEntry {
        channel: 0,
        time: t,
        kind: kind.into(),
        text: text.into(),
    };
    assert!(store
        .index_session_text("s0", vec![entry(1.5, "command", "rm -rf /tmp/x_1")], now)
        .await
        .expect("index"));
    assert!(store
        .index_session_text("s1", vec![entry(2.0, "sql", "DROP TABLE orders")], now)
        .await
        .expect("index"));
    // A second index of the same session is a no-op, and says so.
    assert!(!store
        .index_session_text("s1", vec![entry(3.0, "sql", "DROP TABLE twice")], now)
        .await
        .expect("index"));
    assert!(store.unindexed_sessions(10).await.expect("u").is_empty());
    let hits = store
        .search_text("drop table", &SessionFilter::default())
        .await
        .expect("search");
    assert_eq!(hits.len(), 1);
    assert_eq!(
        (hits[0].session.id.as_str(), hits[0].entry.time),
        ("s1", 2.0)
    );
    // LIKE wildcards in the needle are literal.
    let hits = store
        .search_text("x_1", &SessionFilter::default())
        .await
        .expect("search");
    assert_eq!(hits.len(), 1);
    assert!(store
        .search_text("x%", &SessionFilter::default())
        .await
        .expect("search")
        .is_empty());
}

pub async fn requests_approvals_and_denials(store: &dyn Store) {
    let now = Utc::now();
    let r = store
        .create_request(new_request(now))
        .await
        .expect("create");
    assert_eq!(
        store
            .list_requests(Some(RequestStatus::Pending))
            .await
            .expect("l")[0]
            .id,
        r.id
    );
    match store.approve(&r.id, "bob", 2, now).await.expect("approve") {
        Approval::Recorded { have, need, .. } => assert_eq!((have, need), (1, 2)),
        other => panic!("not recorded: {other:?}"),
    }
    assert!(matches!(
        store.approve(&r.id, "bob", 2, now).await,
        Err(StateError::AlreadyApproved { .. })
    ));
    let grant = match store
        .approve(&r.id[..6], "carol", 2, now)
        .await
        .expect("ok")
    {
        Approval::Granted { request, grant } => {
            assert_eq!(request.status, RequestStatus::Approved);
            assert_eq!(request.approvals.len(), 2);
            grant
        }
        other => panic!("not granted: {other:?}"),
    };
    assert_eq!(grant.created_by, "approved:bob,carol");
    assert_eq!(grant.request_id.as_deref(), Some(r.id.as_str()));
    assert!(matches!(
        store.deny(&r.id, "dave", "late", now).await,
        Err(StateError::NotPending { .. })
    ));
    let d = store
        .create_request(new_request(now))
        .await
        .expect("create");
    let denied = store.deny(&d.id, "bob", "no", now).await.expect("deny");
    assert_eq!(denied.status, RequestStatus::Denied);
    let e = store
        .create_request(NewRequest {
            expires_at: now + Duration::seconds(1),
            ..new_request(now)
        })
        .await
        .expect("create");
    let expired = store
        .expire_requests(now + Duration::seconds(2))
        .await
        .expect("expire");
    assert_eq!(
        expired.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        [e.id.as_str()]
    );
    let ev = StoredEvent {
        id: "e1".into(),
        correlation_id: r.id.clone(),
        event_type: "requested".into(),
        event_data: serde_json::json!({"k": 1}),
        actor: "alice".into(),
        created_at: t0(),
    };
    store.append_event(&ev).await.expect("event");
    assert_eq!(store.events(&r.id).await.expect("events"), vec![ev]);
}

pub async fn incidents_keep_reports_one_cab_review_and_one_alert_per_item(store: &dyn Store) {
    let now = t0();
    assert!(store.incident_reports("INC-1").await.expect("r").is_empty());
    for (i, at) in [now + Duration::minutes(5), now].into_iter().enumerate() {
        store
            .add_incident_report(&IncidentReportRow {
                id: format!("IR-{i}"),
                incident_id: "INC-1".into(),
                created_by: "operator:root".into(),
                created_at: at,
                sha256: "ab".repeat(32),
            })
            .await
            .expect("report");
    }
    let reports = store.incident_reports("INC-1").await.expect("r");
    assert_eq!(
        reports.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        ["IR-1", "IR-0"],
        "oldest first"
    );
    assert!(store.incident_reports("INC-2").await.expect("r").is_empty());
    assert_eq!(store.cab_review("INC-1").await.expect("cab"), None);
    let cab = CabReview {
        incident_id: "INC-1".into(),
        signed_by: "erin".into(),
        signed_at: now,
        outcome: "accepted".into(),
        notes: "fine".into(),
    };
    store.sign_cab(&cab).await.expect("cab");
    assert!(matches!(
        store
            .sign_cab(&CabReview {
                signed_by: "mallory".into(),
                ..cab.clone()
            })
            .await,
        Err(StateError::CabAlreadySigned(_))
    ));
    assert_eq!(store.cab_review("INC-1").await.expect("cab"), Some(cab));
    assert!(store
        .take_incident_alert("INC-1", "report", now)
        .await
        .expect("a"));
    assert!(!store
        .take_incident_alert("INC-1", "report", now)
        .await
        .expect("a"));
    assert!(store
        .take_incident_alert("INC-1", "cab", now)
        .await
        .expect("a"));
    assert_eq!(store.rotation_of("g-none").await.expect("rot"), None);
    store
        .rotation_done("g-1", "db", "password rotated", now)
        .await
        .expect("rot");
    assert_eq!(
        store.rotation_of("g-1").await.expect("rot"),
        Some(("password rotated".to_string(), now))
    );
}

pub async fn reviews_are_opened_once_signed_once_and_alerted_once(store: &dyn Store) {
    let now = t0();
    let review = Review {
        id: "rv-1".into(),
        correlation_id: "R-1".into(),
        grant_id: "g-1".into(),
        person: "alice".into(),
        target: "web-01".into(),
        scenario: "production_outage".into(),
        emergency: true,
        approvers: vec!["bob".into(), "carol".into()],
        opened_at: now,
        due_at: now + Duration::hours(1),
        overdue_alerted: false,
        signed_by: None,
        signed_at: None,
        findings: None,
        root_cause: None,
        answers: None,
    };
    let (r, fresh) = store.open_review(&review).await.expect("open");
    assert!(fresh);
    assert_eq!(r, review);
    let (_, fresh) = store
        .open_review(&Review {
            id: "rv-2".into(),
            ..review.clone()
        })
        .await
        .expect("open again");
    assert!(!fresh, "one review per grant");
    assert_eq!(store.open_reviews().await.expect("open").len(), 1);
    let later = now + Duration::hours(2);
    assert_eq!(
        store.take_overdue_reviews(later).await.expect("take").len(),
        1
    );
    assert!(store
        .take_overdue_reviews(later)
        .await
        .expect("take")
        .is_empty());
    let answers = ReviewAnswers {
        thresholds_met: true,
        thresholds_note: String::new(),
        escalation_possible: false,
        escalation_note: "the on-call DBA was unreachable".into(),
        actions_taken: "killed the stuck vacuum".into(),
        procedure_update: true,
        procedure_change: "page the second DBA".into(),
    };
    let signed = store
        .sign_review("g-1", "dave", "fine", "disk", &answers, later)
        .await
        .expect("sign");
    assert_eq!(signed.signed_by.as_deref(), Some("dave"));
    assert_eq!(signed.answers.as_ref(), Some(&answers));
    assert_eq!(
        store.find_review("rv-1").await.expect("find").answers,
        Some(answers.clone())
    );
    assert!(matches!(
        store
            .sign_review("rv-1", "eve", "x", "y", &answers, later)
            .await,
        Err(StateError::AlreadySigned(_))
    ));
    assert!(store.open_reviews().await.expect("open").is_empty());
    // An abbreviated request id finds the review, as README promises for every id.
    let (_, _) = store
        .open_review(&Review {
            id: "rv-3".into(),
            correlation_id: "R-9f00aa".into(),
            grant_id: "g-3".into(),
            ..review.clone()
        })
        .await
        .expect("open a second");
    assert_eq!(
        store.find_review("R-9f0").await.expect("by prefix").id,
        "rv-3"
    );
    assert!(matches!(
        store.find_review("R-").await,
        Err(StateError::Ambiguous(_))
    ));
    assert!(matches!(
        store.find_review("R-nothing").await,
        Err(StateError::NoSuchReview(_))
    ));
}

pub async fn the_ledger_keeps_write_order_and_final_entries(store: &dyn Store) {
    let e = |key: &str, sha: &str, chained: Option<u64>| LedgerEntry {
        key: key.into(),
        size: 3,
        sha256: sha.into(),
        chained: chained.map(|p| (p, format!("link{p}"))),
    };
    store
        .record_objects("s", &[e("start", "a", Some(0)), e("c2", "spool", None)])
        .await
        .expect("record");
    store
        .record_objects("s", &[e("c1", "b", Some(1)), e("c2", "c", Some(2))])
        .await
        .expect("record");
    // A chained entry is final: a later write of the same key changes nothing.
    store
        .record_objects("s", &[e("c1", "forged", None)])
        .await
        .expect("record");
    let got = store.recorded_objects("s").await.expect("ledger");
    assert_eq!(
        got.iter()
            .map(|e| (e.key.as_str(), e.sha256.as_str()))
            .collect::<Vec<_>>(),
        [("start", "a"), ("c1", "b"), ("c2", "c")]
    );
    assert!(store.recorded_objects("other").await.expect("l").is_empty());
}

pub async fn vault_slots_promote(store: &dyn Store) {
    let now = t0();
    store
        .vault_put("db", "current", "old", now)
        .await
        .expect("put");
    store
        .vault_put("db", "pending", "new", now)
        .await
        .expect("put");
    store.vault_promote("db", now).await.expect("promote");
    assert_eq!(
        store.vault_get("db", "current").await.expect("get"),
        Some("new".into())
    );
    assert_eq!(store.vault_get("db", "pending").await.expect("get"), None);
    let g = store
        .create_grant(new_grant("alice", "db", now, 1))
        .await
        .expect("grant");
    store
        .put_credential(&g, "SCRAM-SHA-256$x", now)
        .await
        .expect("cred");
    assert_eq!(
        store.credential(&g.id).await.expect("cred").map(|c| c.0),
        Some("SCRAM-SHA-256$x".into())
    );
    let due = store
        .grants_to_rotate(now + Duration::minutes(2))
        .await
        .expect("due");
    assert_eq!(due.len(), 1);
    store
        .rotation_done(&g.id, "db", "rotated", now)
        .await
        .expect("done");
    assert!(store
        .grants_to_rotate(now + Duration::minutes(2))
        .await
        .expect("due")
        .is_empty());
    store.touch_key("SHA256:x", "alice", now).await.expect("k");
    assert_eq!(store.key_usage().await.expect("k").len(), 1);
}

/// Runs `n` copies of `f` at once on alternating handles and returns their results.
async fn race<T: Send + 'static>(
    a: Arc<dyn Store>,
    b: Arc<dyn Store>,
    n: usize,
    f: impl Fn(Arc<dyn Store>, usize) -> futures::future::BoxFuture<'static, T>,
) -> Vec<T> {
    let barrier = Arc::new(tokio::sync::Barrier::new(n));
    let mut tasks = Vec::new();
    for i in 0..n {
        let store = if i % 2 == 0 { a.clone() } else { b.clone() };
        let fut = f(store, i);
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            fut.await
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("task"));
    }
    out
}

pub async fn one_approver_racing_itself_is_recorded_once(a: Arc<dyn Store>, b: Arc<dyn Store>) {
    let now = Utc::now();
    for round in 0..5 {
        let r = a.create_request(new_request(now)).await.expect("create");
        let id = r.id.clone();
        let results = race(a.clone(), b.clone(), 4, move |s, _| {
            let id = id.clone();
            Box::pin(async move { s.approve(&id, "bob", 2, now).await })
        })
        .await;
        let ok = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(ok, 1, "round {round}: {results:?}");
        for r in &results {
            if let Err(e) = r {
                assert!(
                    matches!(e, StateError::AlreadyApproved { .. }),
                    "round {round}: {e}"
                );
            }
        }
        let after = a.find_request(&r.id).await.expect("find");
        assert_eq!(after.approvals.len(), 1, "round {round}");
        assert_eq!(after.status, RequestStatus::Pending);
    }
}

pub async fn two_approvers_racing_for_the_last_approval_make_one_grant(
    a: Arc<dyn Store>,
    b: Arc<dyn Store>,
) {
    let now = Utc::now();
    for round in 0..5 {
        let r = a.create_request(new_request(now)).await.expect("create");
        a.approve(&r.id, "bob", 2, now).await.expect("first");
        let id = r.id.clone();
        let results = race(a.clone(), b.clone(), 2, move |s, i| {
            let id = id.clone();
            Box::pin(async move {
                let who = ["carol", "dave"][i];
                s.approve(&id, who, 2, now).await
            })
        })
        .await;
        let granted = results
            .iter()
            .filter(|r| matches!(r, Ok(Approval::Granted { .. })))
            .count();
        assert_eq!(granted, 1, "round {round}: {results:?}");
        assert!(
            results
                .iter()
                .any(|r| matches!(r, Err(StateError::NotPending { .. }))),
            "round {round}: {results:?}"
        );
        let grants: Vec<Grant> = a
            .list_grants(None)
            .await
            .expect("grants")
            .into_iter()
            .filter(|g| g.request_id.as_deref() == Some(r.id.as_str()))
            .collect();
        assert_eq!(grants.len(), 1, "round {round}");
    }
}

pub async fn a_login_link_raced_from_two_nodes_works_once(a: Arc<dyn Store>, b: Arc<dyn Store>) {
    let now = Utc::now();
    a.put_login_link("race", "alice", now, now + Duration::minutes(5))
        .await
        .expect("put");
    let results = race(a, b, 4, move |s, _| {
        Box::pin(async move { s.use_login_link("race", now).await.expect("use") })
    })
    .await;
    let used = results
        .iter()
        .filter(|r| matches!(r, LinkUse::Person(_)))
        .count();
    assert_eq!(used, 1, "{results:?}");
}

fn beat(node: &str, at: DateTime<Utc>, secs: i64) -> NodeRow {
    NodeRow {
        node_id: node.into(),
        started_at: t0(),
        renewed_at: at,
        expires_at: at + Duration::seconds(secs),
        draining: false,
        live_sessions: 2,
        version: "0.1.0".into(),
    }
}

pub async fn node_leases_renew_and_leave(store: &dyn Store) {
    assert!(store.nodes().await.expect("nodes").is_empty());
    store.heartbeat(&beat("b", t0(), 10)).await.expect("b");
    store.heartbeat(&beat("a", t0(), 10)).await.expect("a");
    let mut renewed = beat("a", t0() + Duration::seconds(3), 10);
    renewed.draining = true;
    renewed.live_sessions = 0;
    store.heartbeat(&renewed).await.expect("renew");
    // A store may stamp the lease with its own clock; the lease length and the rest stay.
    let now = store.now().await.expect("now");
    let nodes = store.nodes().await.expect("nodes");
    let plain = |n: &NodeRow| {
        (
            n.node_id.clone(),
            n.started_at,
            n.draining,
            n.live_sessions,
            n.version.clone(),
            n.expires_at - n.renewed_at,
        )
    };
    assert_eq!(
        nodes.iter().map(plain).collect::<Vec<_>>(),
        [&renewed, &beat("b", t0(), 10)].map(plain)
    );
    for n in &nodes {
        assert!(
            n.renewed_at == t0()
                || n.renewed_at == t0() + Duration::seconds(3)
                || (n.renewed_at - now).num_seconds().abs() < 5,
            "stamped by the caller or by the store's clock: {n:?}"
        );
    }
    store.leave("b").await.expect("leave");
    let ids: Vec<String> = store
        .nodes()
        .await
        .expect("nodes")
        .into_iter()
        .map(|n| n.node_id)
        .collect();
    assert_eq!(ids, ["a"]);

    // Adoption moves only the unsealed sessions of the named node.
    let now = t0();
    for (i, node) in [(1, "dead"), (2, "dead"), (3, "alive")] {
        let mut s = session(i, "ssh", "alice", "g", now);
        s.node_id = node.into();
        store.insert_session(&s).await.expect("insert");
    }
    store.set_sealed("s2", true).await.expect("seal");
    let got = store.adopt_sessions("dead", "a").await.expect("adopt");
    assert_eq!(
        got.iter()
            .map(|s| (s.id.as_str(), s.node_id.as_str()))
            .collect::<Vec<_>>(),
        [("s1", "a")]
    );
    assert!(store
        .adopt_sessions("dead", "a")
        .await
        .expect("again")
        .is_empty());
    let s3 = store.find_session("s3").await.expect("find").expect("s3");
    assert_eq!(s3.node_id, "alive");
}

pub async fn two_nodes_taking_over_one_dead_node_split_its_sessions(
    a: Arc<dyn Store>,
    b: Arc<dyn Store>,
) {
    let now = Utc::now();
    for i in 0..20 {
        let mut s = session(i, "ssh", "alice", "g", now);
        s.node_id = "dead".into();
        a.insert_session(&s).await.expect("insert");
    }
    let results = race(a.clone(), b, 4, move |s, i| {
        Box::pin(async move {
            s.adopt_sessions("dead", &format!("taker{i}"))
                .await
                .expect("adopt")
        })
    })
    .await;
    let mut ids: Vec<String> = results.iter().flatten().map(|s| s.id.clone()).collect();
    ids.sort();
    let before = ids.len();
    ids.dedup();
    assert_eq!(
        before, 20,
        "every session adopted exactly once: {results:?}"
    );
    assert_eq!(ids.len(), 20);
    for (i, r) in results.iter().enumerate() {
        assert!(r.iter().all(|s| s.node_id == format!("taker{i}")));
    }
}

pub async fn nodes_racing_to_create_one_vault_entry_make_one(a: Arc<dyn Store>, b: Arc<dyn Store>) {
    let now = Utc::now();
    let results = race(a.clone(), b, 4, move |s, i| {
        Box::pin(async move {
            let won = s
                .vault_put_new("spool-key", "current", &format!("blob-{i}"), now)
                .await
                .expect("put_new");
            (i, won)
        })
    })
    .await;
    let winners: Vec<usize> = results.iter().filter(|r| r.1).map(|r| r.0).collect();
    assert_eq!(winners.len(), 1, "{results:?}");
    assert_eq!(
        a.vault_get("spool-key", "current").await.expect("get"),
        Some(format!("blob-{}", winners[0]))
    );
}
