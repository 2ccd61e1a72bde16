//! Operational logs tell each session's story: every line a session writes, in either
//! protocol, carries its `session_id`, `protocol`, `person` and `target` (the session span),
//! so one `grep session_id=…` of the gateway's log finds the whole session, start to end.

use super::pg::{pg_credential, pg_world, psql_cmd};
use super::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_grep_of_the_log_tells_each_session_start_to_end_in_both_protocols() {
    let (_pg, _pgdir, w, gw, _certs) = pg_world("", true).await;
    let (_req, secret) = pg_credential(&w, "30m").await;
    w.grant("alice", "30m");
    // The gateway as its own process, so its log is the one a person would grep.
    gw.stop().await;
    let mut proc = Process::start(&w);
    wait_port(w.pg_port);
    wait_port(w.gw_port);
    let out = output(w.ssh("alice", "web-01", &[], &["echo via-ssh"])).await;
    assert!(out.status.success(), "ssh: {}", text(&out.stderr));
    let out = output(psql_cmd(&w, &secret, "select 1")).await;
    assert!(out.status.success(), "psql: {}", text(&out.stderr));
    w.wait_ended(2);
    proc.kill9();

    let log = std::fs::read_to_string(w.path("gateway.log")).expect("gateway log");
    assert!(
        !log.contains('\u{1b}'),
        "a log written to a file must have no colour codes (they break grep)"
    );
    let sessions = w.sessions();
    assert_eq!(sessions.len(), 2, "{sessions:?}");
    let mut protocols = Vec::new();
    for s in &sessions {
        let id = s["id"].as_str().expect("id");
        let protocol = s["protocol"].as_str().expect("protocol");
        let target = s["target"].as_str().expect("target");
        let person = s["person"].as_str().expect("person");
        let story: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(&format!("session_id={id}")))
            .collect();
        let has = |what: &str| story.iter().any(|l| l.contains(what));
        assert!(
            has("session started") && has("session ended"),
            "session {id} ({protocol}): its lines do not tell start and end:\n{}\n--- whole log:\n{log}",
            story.join("\n")
        );
        for l in &story {
            for field in [
                format!("protocol=\"{protocol}\""),
                format!("person={person}"),
                format!("target={target}"),
            ] {
                assert!(l.contains(&field), "line without {field}: {l}");
            }
        }
        protocols.push(protocol.to_string());
    }
    protocols.sort();
    assert_eq!(protocols, ["postgres", "ssh"]);
}
