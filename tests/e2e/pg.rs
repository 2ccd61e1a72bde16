//! PostgreSQL through the gateway with real `psql`, `pgbench` and clusters, and the helpers
//! that set up a PostgreSQL target for the other areas.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_through_the_gateway_with_tls_scram_and_a_jit_credential() {
    let (_pg, _pgdir, w, gw, _certs) = pg_world("", true).await;
    let (_req, secret) = pg_credential(&w, "30m").await;

    let psql = |user: &str, password: &str, sslmode: &str, sql: &str| {
        let mut c = Command::new(require("psql", "postgresql-client"));
        c.arg(format!(
            "host=127.0.0.1 port={} user={user} dbname=orders-db sslmode={sslmode}",
            w.pg_port
        ))
        .args(["-XAtc", sql])
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(std::process::Stdio::null());
        c
    };
    let out = output(psql("alice", &secret, "require", "select 40+2")).await;
    assert_eq!(text(&out.stdout).trim(), "42", "{}", text(&out.stderr));
    let out = output(psql(
        "alice",
        &secret,
        "require",
        "create table t(x int); insert into t values (1),(2); select count(*) from t",
    ))
    .await;
    assert_eq!(
        text(&out.stdout).lines().last(),
        Some("2"),
        "{}",
        text(&out.stderr)
    );

    // verify-full: the client checks the gateway's certificate.
    let mut c = Command::new(require("psql", "postgresql-client"));
    c.arg(format!(
        "host=127.0.0.1 port={} user=alice dbname=orders-db sslmode=verify-full sslrootcert={}",
        w.pg_port,
        _certs.path().join("cert.pem").display()
    ))
    .args(["-XAtc", "select 6*7"])
    .env("PGPASSWORD", &secret)
    .stdin(std::process::Stdio::null());
    let out = output(c).await;
    assert_eq!(
        text(&out.stdout).trim(),
        "42",
        "verify-full: {}",
        text(&out.stderr)
    );
    let out = output(psql("alice", &secret, "require", "select * from nosuch")).await;
    assert!(
        text(&out.stderr).contains("nosuch"),
        "{}",
        text(&out.stderr)
    );
    let out = output(psql("alice", &secret, "require", "copy t to stdout")).await;
    assert_eq!(text(&out.stdout), "1\n2\n", "{}", text(&out.stderr));

    for (user, pw, mode, want) in [
        (
            "alice",
            "wrong-password",
            "require",
            "password authentication failed",
        ),
        ("alice", secret.as_str(), "disable", "requires TLS"),
        (
            "bob",
            "whatever",
            "require",
            "password authentication failed",
        ),
    ] {
        let out = output(psql(user, pw, mode, "select 1")).await;
        assert!(!out.status.success(), "{user}/{mode} must be refused");
        assert!(
            text(&out.stderr).contains(want),
            "{user}/{mode}: {}",
            text(&out.stderr)
        );
    }
    w.wait_ended(5);
    gw.stop().await;

    let sessions = w.sessions();
    let pgs: Vec<&Value> = sessions
        .iter()
        .filter(|s| s["protocol"] == "postgres")
        .collect();
    assert_eq!(pgs.len(), 5, "{sessions:?}");
    for s in pgs {
        assert!(
            s["bytes_in"].as_u64().unwrap_or(0) > 0 && s["bytes_out"].as_u64().unwrap_or(0) > 0,
            "{s}"
        );
        let id = s["id"].as_str().expect("id");
        let out = w.cli(&["verify", id]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    }
    // Every session exports as a SQL timeline that validates against its schema.
    let mut all = Vec::new();
    for s in &sessions {
        let jsonl = export(&w, s["id"].as_str().expect("id"));
        assert!(
            !jsonl.contains(&secret),
            "the credential is not on the record"
        );
        for line in jsonl.lines() {
            let e: Value = serde_json::from_str(line).expect("JSONL");
            validate("sql-event.schema.json", &e);
            all.push(e);
        }
    }
    assert!(all.iter().any(|e| e["event"] == "query"
        && e["sql"]
            .as_str()
            .is_some_and(|q| q.contains("create table t"))));
    assert!(all
        .iter()
        .any(|e| e["event"] == "complete" && e["command_tag"] == "INSERT 0 2"));
    assert!(all
        .iter()
        .any(|e| e["event"] == "error" && e["error"]["sqlstate"] == "42P01"));
    assert!(
        all.iter()
            .any(|e| e["event"] == "copy" && e["copy_direction"] == "out" && e["rows"] == 2),
        "{all:#?}"
    );
    let timeline = w.cli_ok(&["replay", sessions[0]["id"].as_str().expect("id")]);
    assert!(
        timeline.contains("->"),
        "replay prints the statement timeline: {timeline}"
    );

    // A reviewer finds the statement by its text, and the hit says where in which session.
    let gw = InProcess::start(&w).await;
    let bob = api_token(&w, "bob").await;
    let (code, body) = api(
        &w,
        Some(&bob),
        "GET",
        "/api/v1/search?q=CREATE%20TABLE%20t",
        None,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let hits = body["hits"].as_array().expect("hits");
    assert_eq!(hits.len(), 1, "{body}");
    let hit = &hits[0];
    assert_eq!(
        (hit["kind"].as_str(), hit["protocol"].as_str()),
        (Some("sql"), Some("postgres"))
    );
    let sid = hit["session_id"].as_str().expect("session");
    let (code, body) = api(
        &w,
        Some(&bob),
        "GET",
        &format!("/api/v1/sessions/{sid}/channels/{}/sql", hit["channel"]),
        None,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let at = body["events"]
        .as_array()
        .expect("events")
        .iter()
        .find(|e| {
            e["sql"]
                .as_str()
                .is_some_and(|q| q.contains("create table t"))
        })
        .expect("the statement in the timeline");
    assert_eq!(
        at["time"], hit["time"],
        "the hit points at the statement's moment"
    );
    // An error is in the timeline of its session, for the UI to highlight.
    let (code, body) = api(&w, Some(&bob), "GET", "/api/v1/search?q=nosuch", None).await;
    assert_eq!(code, 200, "{body}");
    let sid = body["hits"][0]["session_id"]
        .as_str()
        .expect("a hit for nosuch");
    let (_, body) = api(
        &w,
        Some(&bob),
        "GET",
        &format!("/api/v1/sessions/{sid}/channels/0/sql"),
        None,
    )
    .await;
    assert!(
        body["events"]
            .as_array()
            .is_some_and(|ev| ev.iter().any(|e| e["event"] == "error")),
        "{body}"
    );
    gw.stop().await;
    validate_all_events(&w);
}

/// How [`pg_world_with`] sets up the cluster and the gateway.
#[derive(Default)]
pub(crate) struct PgOpts<'a> {
    /// Extra `[limits]` lines.
    pub(crate) limits: &'a str,
    /// Whether the gateway's PostgreSQL listener presents a certificate (and requires TLS).
    pub(crate) client_tls: bool,
    /// Extra `[postgres]` lines.
    pub(crate) postgres: &'a str,
    /// The cluster runs with `ssl = on` and this certificate and key.
    pub(crate) server_tls: Option<(&'a std::path::Path, &'a std::path::Path)>,
    /// Lines before initdb's own in the cluster's `pg_hba.conf`.
    pub(crate) hba_first: &'a str,
    /// SQL the superuser runs once the cluster is up (more roles).
    pub(crate) sql: &'a str,
    /// Extra lines for the `orders-db` target.
    pub(crate) target: &'a str,
    /// More config (e.g. `[[targets]]`); `{pg_port}` becomes the cluster's port.
    pub(crate) more: &'a str,
    /// More (target, password) pairs for the vault.
    pub(crate) vault: &'a [(&'a str, &'a str)],
}

/// A PostgreSQL target behind the gateway: a real cluster, a TLS certificate, the vault
/// password, and alice approved with a fetched JIT credential. Returns (cluster, world,
/// gateway, certificate dir).
pub(crate) async fn pg_world(
    extra_limits: &str,
    tls: bool,
) -> (
    Postgres,
    tempfile::TempDir,
    World,
    InProcess,
    tempfile::TempDir,
) {
    pg_world_with(PgOpts {
        limits: extra_limits,
        client_tls: tls,
        ..Default::default()
    })
    .await
}

/// [`pg_world`] with more options.
pub(crate) async fn pg_world_with(
    opts: PgOpts<'_>,
) -> (
    Postgres,
    tempfile::TempDir,
    World,
    InProcess,
    tempfile::TempDir,
) {
    let pgdir = tempfile::tempdir().expect("tempdir");
    let pg = Postgres::start_with(
        pgdir.path(),
        PgServerOpts {
            tls: opts.server_tls,
            hba_first: opts.hba_first,
            ..Default::default()
        },
    );
    for sql in [
        "CREATE ROLE bg_dba LOGIN SUPERUSER PASSWORD 'initial-bg-password'",
        opts.sql,
    ] {
        if sql.is_empty() {
            continue;
        }
        let out = pg.psql("postgres", &pg.superuser_password, sql);
        assert!(out.status.success(), "{sql}: {}", text(&out.stderr));
    }
    let certs = tempfile::tempdir().expect("tempdir");
    let (cert, key) = self_signed_cert(certs.path());
    let w = World::with(Opts {
        extra_limits: opts.limits.to_string(),
        extra_config: format!(
            "[siem]\nactions = true\n\n[postgres]\n{}{}\n\n[[targets]]\nname = \"orders-db\"\nprotocol = \"postgres\"\naddress = \"127.0.0.1:{}\"\nlogin = \"bg_dba\"\napprovers = [\"bob\"]\n{}\n\n{}\n",
            if opts.client_tls {
                format!("tls_cert = \"{}\"\ntls_key = \"{}\"\n", cert.display(), key.display())
            } else {
                String::new()
            },
            opts.postgres,
            pg.port,
            opts.target,
            opts.more.replace("{pg_port}", &pg.port.to_string()),
        ),
        ..Default::default()
    });
    w.vault_set("orders-db", "initial-bg-password");
    for (target, password) in opts.vault {
        w.vault_set(target, password);
    }
    let gw = InProcess::start(&w).await;
    (pg, pgdir, w, gw, certs)
}

/// alice's JIT credential for a fresh approved request on orders-db lasting `duration`.
pub(crate) async fn pg_credential(w: &World, duration: &str) -> (String, String) {
    pg_credential_for(w, "orders-db", duration).await
}

/// alice's JIT credential for a fresh approved request on `target` lasting `duration`.
pub(crate) async fn pg_credential_for(w: &World, target: &str, duration: &str) -> (String, String) {
    let (_, out, _) = control(
        w,
        "alice",
        "breakglass",
        &format!("request {target} --reason locked table --incident INC-61 --for {duration}"),
    )
    .await;
    let req = request_id(&out);
    control(w, "bob", "breakglass", &format!("approve {req}")).await;
    let (_, out, _) = control(w, "alice", "breakglass", &format!("credential {req}")).await;
    (
        req,
        out.lines()
            .find_map(|l| l.strip_prefix("password: "))
            .expect("password")
            .to_string(),
    )
}

pub(crate) fn psql_cmd(w: &World, password: &str, sql: &str) -> Command {
    psql_cmd_to(w, "orders-db", password, sql)
}

/// `psql -XAtc SQL` as alice through the gateway (TLS) to `target`.
pub(crate) fn psql_cmd_to(w: &World, target: &str, password: &str, sql: &str) -> Command {
    let mut c = Command::new(require("psql", "postgresql-client"));
    c.arg(format!(
        "host=127.0.0.1 port={} user=alice dbname={target} sslmode=require",
        w.pg_port
    ))
    .args(["-XAtc", sql])
    .env("PGPASSWORD", password)
    .env("PGCONNECT_TIMEOUT", "10")
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped());
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_sessions_get_warnings_and_are_cut_at_the_deadline_and_on_revoke() {
    let (pg, _pgdir, w, gw, _certs) = pg_world(
        "warn_before = [\"2s\"]\ncheckpoint_interval = \"500ms\"",
        true,
    )
    .await;
    // Deadline: a 4 s grant; a long query is cut with FATAL 57P01 after a NOTICE.
    let (_req, secret) = pg_credential(&w, "4s").await;
    let mut child = psql_cmd(&w, &secret, "select pg_sleep(30)")
        .spawn()
        .expect("psql");
    w.wait_event("pg session start", |e| {
        e["action"] == "session_start" && e["protocol"] == "postgres"
    });
    let (code, _out, err) = wait_exit(&mut child, Duration::from_secs(15));
    assert_ne!(code, Some(0));
    assert!(err.contains("deadline was reached"), "{err}");
    assert!(
        err.contains("this session ends in 2s"),
        "the NOTICE warning came first: {err}"
    );
    let expired = w.wait_event("pg expiry", |e| {
        e["action"] == "session_expired" && e["protocol"] == "postgres"
    });
    let deadline =
        chrono::DateTime::parse_from_rfc3339(expired["deadline"].as_str().expect("deadline"))
            .expect("rfc3339");
    let end = w.wait_event("pg end", |e| {
        e["action"] == "session_end" && e["protocol"] == "postgres"
    });
    let ended = chrono::DateTime::parse_from_rfc3339(end["timestamp"].as_str().expect("ts"))
        .expect("rfc3339");
    let late = ended.signed_duration_since(deadline);
    eprintln!("postgres session ended {late} after its deadline");
    assert!(late <= chrono::Duration::milliseconds(1000), "{late}");
    // The query stops with the session: no backend still sleeps on the target.
    let sleeping = || {
        let out = pg.psql(
            "postgres",
            &pg.superuser_password,
            "select count(*) from pg_stat_activity where query = 'select pg_sleep(30)' and state = 'active'",
        );
        text(&out.stdout).trim().to_string()
    };
    wait_for(
        "the cut session's query to stop on the target",
        Duration::from_secs(5),
        || (sleeping() == "0").then_some(()),
    );
    // Its chain head reached the SIEM while it ran, as for SSH.
    let cp = w.wait_event("pg checkpoint", |e| {
        e["action"] == "recording_checkpoint" && e["protocol"] == "postgres"
    });
    assert_eq!(cp["session_id"], end["session_id"]);
    assert!(cp["objects"].as_u64().is_some_and(|n| n >= 1), "{cp}");

    // Revoke: the session ends within a second with the reason.
    let (req, secret) = pg_credential(&w, "30m").await;
    let mut child = psql_cmd(&w, &secret, "select pg_sleep(30)")
        .spawn()
        .expect("psql");
    wait_for("the second pg session", Duration::from_secs(10), || {
        (w.siem_events()
            .iter()
            .filter(|e| e["action"] == "session_start" && e["protocol"] == "postgres")
            .count()
            >= 2)
            .then_some(())
    });
    let (code, _, _) = control(
        &w,
        "alice",
        "breakglass",
        &format!("revoke {req} --reason done"),
    )
    .await;
    assert_eq!(code, 0);
    let revoked = Instant::now();
    let (code, _out, err) = wait_exit(&mut child, Duration::from_secs(10));
    eprintln!(
        "postgres session cut {:?} after the revoke",
        revoked.elapsed()
    );
    assert!(revoked.elapsed() <= Duration::from_millis(1000));
    assert_ne!(code, Some(0));
    assert!(err.contains("revoked"), "{err}");
    wait_for(
        "the revoked session's query to stop on the target",
        Duration::from_secs(5),
        || (sleeping() == "0").then_some(()),
    );
    gw.stop().await;
    validate_all_events(&w);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_cancel_reaches_the_backend_through_the_gateway() {
    let (pg, _pgdir, w, gw, _certs) = pg_world("", true).await;
    let (_req, secret) = pg_credential(&w, "30m").await;
    cancel_through_the_gateway(&pg, &w, "orders-db", &secret);
    gw.stop().await;
}

/// Runs `select pg_sleep(30)` with psql through the gateway to `target`, presses Ctrl-C once
/// it runs upstream, and checks that the backend cancelled it.
fn cancel_through_the_gateway(pg: &Postgres, w: &World, target: &str, secret: &str) {
    let child = sleep_upstream(pg, w, target, secret);
    press_ctrl_c(child);
}

/// psql running `select pg_sleep(30)` through the gateway to `target`, once the query runs
/// upstream.
fn sleep_upstream(pg: &Postgres, w: &World, target: &str, secret: &str) -> std::process::Child {
    let child = psql_cmd_to(w, target, secret, "select pg_sleep(30)")
        .spawn()
        .expect("psql");
    w.wait_event("pg session start", |e| {
        e["action"] == "session_start" && e["protocol"] == "postgres" && e["target"] == target
    });
    // Wait until the query runs upstream, then press Ctrl-C (SIGINT) in psql.
    wait_for("pg_sleep to run", Duration::from_secs(10), || {
        let out = pg.psql(
            "postgres",
            &pg.superuser_password,
            "select count(*) from pg_stat_activity where query like 'select pg_sleep%'",
        );
        (text(&out.stdout).trim() == "1").then_some(())
    });
    child
}

/// Sends psql SIGINT (Ctrl-C) and checks that the backend cancelled its query.
fn press_ctrl_c(mut child: std::process::Child) {
    let sent = Instant::now();
    let st = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(st.success());
    let (code, _out, err) = wait_exit(&mut child, Duration::from_secs(10));
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "cancelled, not timed out"
    );
    assert_ne!(code, Some(0));
    assert!(
        err.contains("canceling statement due to user request"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_with_a_pinned_certificate_reaches_a_hostssl_only_target() {
    // The cluster has ssl = on with a self-signed certificate for 127.0.0.1 and refuses
    // bg_dba without TLS; the target pins that certificate as its ca_file.
    let tls = tempfile::tempdir().expect("tempdir");
    let (cert, key) = self_signed_cert(tls.path());
    let pinned = |name: &str, address: &str, mode: &str| {
        format!(
            "[[targets]]\nname = \"{name}\"\nprotocol = \"postgres\"\naddress = \"{address}\"\nlogin = \"bg_dba\"\napprovers = [\"bob\"]\ntls = \"{mode}\"\nca_file = \"{}\"\n",
            cert.display()
        )
    };
    let more = format!(
        "{}\n[[targets]]\nname = \"orders-plain\"\nprotocol = \"postgres\"\naddress = \"127.0.0.1:{{pg_port}}\"\nlogin = \"bg_dba\"\napprovers = [\"bob\"]\n",
        // The certificate names 127.0.0.1, not localhost: `require` does not check the name.
        pinned("orders-by-name", "localhost:{pg_port}", "require"),
    );
    let (pg, _pgdir, w, gw, _certs) = pg_world_with(PgOpts {
        client_tls: true,
        server_tls: Some((&cert, &key)),
        hba_first: "hostnossl all bg_dba all reject",
        target: &format!("tls = \"verify-full\"\nca_file = \"{}\"", cert.display()),
        more: &more,
        vault: &[
            ("orders-by-name", "initial-bg-password"),
            ("orders-plain", "initial-bg-password"),
        ],
        ..Default::default()
    })
    .await;
    let ssl = "select ssl from pg_stat_ssl where pid = pg_backend_pid()";
    for target in ["orders-db", "orders-by-name"] {
        let (_req, secret) = pg_credential_for(&w, target, "30m").await;
        let out = output(psql_cmd_to(&w, target, &secret, ssl)).await;
        assert_eq!(
            text(&out.stdout).trim(),
            "t",
            "{target}: the target sees an encrypted connection: {}",
            text(&out.stderr)
        );
    }
    // Without tls, the target's pg_hba.conf refuses the gateway, and the client is told.
    let (_req, secret) = pg_credential_for(&w, "orders-plain", "30m").await;
    let out = output(psql_cmd_to(&w, "orders-plain", &secret, "select 1")).await;
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("cannot reach target orders-plain") && err.contains("no encryption"),
        "{err}"
    );
    // Cancel goes to the target on a plain connection, which it accepts even so.
    let (req, secret) = pg_credential(&w, "30m").await;
    cancel_through_the_gateway(&pg, &w, "orders-db", &secret);
    w.wait_ended(3);
    // Rotation after the grant ends logs in over TLS too (the target refuses it otherwise).
    let (code, _, _) = control(
        &w,
        "alice",
        "breakglass",
        &format!("revoke {req} --reason done"),
    )
    .await;
    assert_eq!(code, 0);
    let ev = w.wait_event("rotation", |e| {
        e["action"] == "credential_rotated" && e["target"] == "orders-db"
    });
    assert_eq!(ev["outcome"], "success", "{ev}");
    gw.stop().await;
    let old = pg.psql("bg_dba", "initial-bg-password", "select 1");
    assert!(!old.status.success(), "the old password no longer logs in");
    w.cli_ok(&["vault", "verify", "orders-db"]);
    validate_all_events(&w);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_refuses_a_certificate_outside_ca_file_with_a_clear_fatal() {
    let tls = tempfile::tempdir().expect("tempdir");
    let (cert, key) = self_signed_cert(tls.path());
    let other = tempfile::tempdir().expect("tempdir");
    let (wrong, _) = self_signed_cert(other.path());
    // A server that answers N to SSLRequest, as PostgreSQL with ssl = off does.
    let no_tls = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let no_tls_port = no_tls.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for mut s in no_tls.incoming().flatten() {
            let mut req = [0u8; 8];
            if s.read_exact(&mut req).is_ok() {
                let _ = s.write_all(b"N");
            }
            let _ = s.read_to_end(&mut Vec::new());
        }
    });
    let target = |name: &str, address: &str, ca: &std::path::Path| {
        format!(
            "[[targets]]\nname = \"{name}\"\nprotocol = \"postgres\"\naddress = \"{address}\"\nlogin = \"bg_dba\"\napprovers = [\"bob\"]\ntls = \"verify-full\"\nca_file = \"{}\"\n",
            ca.display()
        )
    };
    let more = [
        target("orders-wrong-ca", "127.0.0.1:{pg_port}", &wrong),
        target("orders-by-name", "localhost:{pg_port}", &cert),
        target("orders-no-tls", &format!("127.0.0.1:{no_tls_port}"), &cert),
    ]
    .join("\n");
    let (_pg, _pgdir, w, gw, _certs) = pg_world_with(PgOpts {
        client_tls: true,
        server_tls: Some((&cert, &key)),
        target: &format!("tls = \"verify-full\"\nca_file = \"{}\"", cert.display()),
        more: &more,
        vault: &[
            ("orders-wrong-ca", "initial-bg-password"),
            ("orders-by-name", "initial-bg-password"),
            ("orders-no-tls", "initial-bg-password"),
        ],
        ..Default::default()
    })
    .await;
    for (target, want) in [
        // UnknownIssuer or BadSignature, depending on whether the other CA shares the name.
        ("orders-wrong-ca", "invalid peer certificate: "),
        ("orders-by-name", "not valid for name"),
        (
            "orders-no-tls",
            "does not accept TLS (it answered 'N' to SSLRequest)",
        ),
    ] {
        let (_req, secret) = pg_credential_for(&w, target, "30m").await;
        let out = output(psql_cmd_to(&w, target, &secret, "select 1")).await;
        let err = text(&out.stderr);
        eprintln!("{target}: {}", err.trim());
        assert!(!out.status.success(), "{target} must be refused");
        assert!(
            err.contains(&format!("FATAL:  cannot reach target {target}")) && err.contains(want),
            "{target}: {err}"
        );
    }
    // No session started, each refusal is on the SIEM record as the upstream's doing, and the
    // gateway still serves the correctly pinned target.
    let (_req, secret) = pg_credential(&w, "30m").await;
    let out = output(psql_cmd(&w, &secret, "select 6*7")).await;
    assert_eq!(text(&out.stdout).trim(), "42", "{}", text(&out.stderr));
    w.wait_ended(1);
    gw.stop().await;
    let events = w.siem_events();
    let denied: Vec<&Value> = events
        .iter()
        .filter(|e| e["action"] == "session_denied" && e["reason"] == "upstream_unreachable")
        .collect();
    assert_eq!(denied.len(), 3, "{denied:#?}");
    assert!(
        denied.iter().all(|e| e["side"] == "upstream"),
        "{denied:#?}"
    );
    assert_eq!(
        events
            .iter()
            .filter(|e| e["action"] == "session_start")
            .count(),
        1
    );
    validate_all_events(&w);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_upstream_needs_an_opt_in_and_verified_tls_and_trust_logins_work() {
    let tls = tempfile::tempdir().expect("tempdir");
    let (cert, key) = self_signed_cert(tls.path());
    let target = |name: &str, login: &str, extra: &str| {
        format!(
            "[[targets]]\nname = \"{name}\"\nprotocol = \"postgres\"\naddress = \"127.0.0.1:{{pg_port}}\"\nlogin = \"{login}\"\napprovers = [\"bob\"]\n{extra}\n"
        )
    };
    let opted_in = format!(
        "tls = \"verify-full\"\nca_file = \"{}\"\nallow_password_auth = true",
        cert.display()
    );
    let more = target("orders-md5", "bg_md5", "")
        + &target("orders-md5-tls", "bg_md5", &opted_in)
        + &target("orders-trust", "bg_trust", "");
    let (pg, _pgdir, w, gw, _certs) = pg_world_with(PgOpts {
        client_tls: true,
        server_tls: Some((&cert, &key)),
        // The first matching line wins: md5 for bg_md5, no password at all for bg_trust.
        hba_first: "host all bg_md5 127.0.0.1/32 md5\nhost all bg_trust 127.0.0.1/32 trust",
        sql: "SET password_encryption = 'md5'; \
              CREATE ROLE bg_md5 LOGIN PASSWORD 'md5-bg-password'; \
              CREATE ROLE bg_trust LOGIN",
        more: &more,
        vault: &[
            ("orders-md5", "md5-bg-password"),
            ("orders-md5-tls", "md5-bg-password"),
            ("orders-trust", "not-asked-for"),
        ],
        ..Default::default()
    })
    .await;
    // With an md5 hash stored and an md5 line, the server asks for md5 (not SCRAM).
    let out = pg.psql(
        "postgres",
        &pg.superuser_password,
        "select rolpassword like 'md5%' from pg_authid where rolname = 'bg_md5'",
    );
    assert_eq!(text(&out.stdout).trim(), "t", "{}", text(&out.stderr));
    // Without the opt-in the gateway does not answer md5, and says why.
    let (_req, secret) = pg_credential_for(&w, "orders-md5", "30m").await;
    let out = output(psql_cmd_to(
        &w,
        "orders-md5",
        &secret,
        "select current_user",
    ))
    .await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("asked for an md5 password; refused"),
        "{}",
        text(&out.stderr)
    );
    for (target, role) in [("orders-md5-tls", "bg_md5"), ("orders-trust", "bg_trust")] {
        let (_req, secret) = pg_credential_for(&w, target, "30m").await;
        let out = output(psql_cmd_to(&w, target, &secret, "select current_user")).await;
        assert_eq!(
            text(&out.stdout).trim(),
            role,
            "{target}: {}",
            text(&out.stderr)
        );
    }
    w.wait_ended(2);
    gw.stop().await;
    validate_all_events(&w);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_notify_passes_through_the_relay_and_is_recorded() {
    let (pg, _pgdir, w, gw, _certs) = pg_world("", false).await;
    let (_req, secret) = pg_credential(&w, "30m").await;
    // psql: the notification comes back in the same session.
    let mut c = Command::new(require("psql", "postgresql-client"));
    c.arg(format!(
        "host=127.0.0.1 port={} user=alice dbname=orders-db sslmode=disable",
        w.pg_port
    ))
    .args(["-X", "-c", "LISTEN ch", "-c", "NOTIFY ch, 'hi'"])
    .env("PGPASSWORD", &secret)
    .stdin(std::process::Stdio::null());
    let out = output(c).await;
    let said = text(&out.stdout) + &text(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("Asynchronous notification \"ch\" with payload \"hi\" received"),
        "{said}"
    );
    // tokio-postgres: an idle listener gets a NOTIFY sent by another backend, outside the
    // gateway — the target speaks first, with no request to answer.
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1")
        .port(w.pg_port)
        .user("alice")
        .password(secret.as_str())
        .dbname("orders-db");
    let (client, mut conn) = cfg
        .connect(tokio_postgres::NoTls)
        .await
        .expect("tokio-postgres through the gateway");
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    let task = tokio::spawn(async move {
        while let Some(m) = futures::future::poll_fn(|cx| conn.poll_message(cx)).await {
            if let Ok(tokio_postgres::AsyncMessage::Notification(n)) = m {
                let _ = tx
                    .send((n.channel().to_string(), n.payload().to_string()))
                    .await;
            }
        }
    });
    client.batch_execute("LISTEN jobs").await.expect("listen");
    let out = pg.psql(
        "postgres",
        &pg.superuser_password,
        "NOTIFY jobs, 'from-another-backend'",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let got = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("the notification arrives within 10 s");
    assert_eq!(
        got,
        Some(("jobs".to_string(), "from-another-backend".to_string()))
    );
    drop(client);
    let _ = task.await;
    w.wait_ended(2);
    gw.stop().await;
    let mut queries = Vec::new();
    for s in w.sessions() {
        for line in export(&w, s["id"].as_str().expect("id")).lines() {
            let e: Value = serde_json::from_str(line).expect("json");
            validate("sql-event.schema.json", &e);
            if e["event"] == "query" {
                queries.push(e["sql"].as_str().unwrap_or_default().to_string());
            }
        }
    }
    for q in ["LISTEN ch", "NOTIFY ch, 'hi'", "LISTEN jobs"] {
        assert!(queries.iter().any(|s| s == q), "{q} in {queries:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_over_the_limit_get_fatal_53300_and_logins_in_progress_do_not_count() {
    let (pg, _pgdir, w, gw, _certs) = pg_world("max_connections = 1", true).await;
    let (_req, secret) = pg_credential(&w, "30m").await;
    let connect = || std::net::TcpStream::connect(("127.0.0.1", w.pg_port)).expect("connect");
    // Connections that have not logged in take no session place: with two of them idle, one
    // session still gets in.
    let idle: Vec<std::net::TcpStream> = (0..2).map(|_| connect()).collect();
    let sleeper = sleep_upstream(&pg, &w, "orders-db", &secret);
    // The running session holds the only place: the next one is told why, after logging in,
    // whether it starts with an SSLRequest or a plain startup packet.
    for mode in ["require", "disable"] {
        let mut c = Command::new(require("psql", "postgresql-client"));
        c.arg(format!(
            "host=127.0.0.1 port={} user=alice dbname=orders-db sslmode={mode}",
            w.pg_port
        ))
        .args(["-XAtc", "select 1"])
        .env("PGPASSWORD", &secret)
        .stdin(std::process::Stdio::null());
        let out = output(c).await;
        let err = text(&out.stderr);
        eprintln!("sslmode={mode}: {}", err.trim());
        assert!(!out.status.success());
        if mode == "require" {
            assert!(err.contains("too many clients already"), "{mode}: {err}");
        } else {
            // Without TLS the gateway refuses before that.
            assert!(err.contains("requires TLS"), "{mode}: {err}");
        }
    }
    // Ctrl-C still works: a cancel request is not a session.
    press_ctrl_c(sleeper);
    drop(idle);
    let t = Instant::now();
    let said = wait_for("psql to get through again", Duration::from_secs(10), || {
        let out = psql_cmd(&w, &secret, "select 6*7").output().expect("psql");
        out.status.success().then(|| text(&out.stdout))
    });
    assert_eq!(said.trim(), "42");
    eprintln!("served again {:?} after the session ended", t.elapsed());
    w.wait_ended(2);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_postgres_input_gets_a_clear_error_and_no_panic() {
    use std::io::{Read, Write};
    let (_pg, _pgdir, w, gw, _certs) =
        pg_world("login_grace = \"1s\"\nmax_connections = 4", true).await;
    let connect = || std::net::TcpStream::connect(("127.0.0.1", w.pg_port)).expect("connect");
    let read_all = |mut s: std::net::TcpStream| {
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut v = Vec::new();
        let _ = s.read_to_end(&mut v);
        String::from_utf8_lossy(&v).into_owned()
    };
    // An unsupported protocol version gets FATAL 0A000.
    let mut s = connect();
    s.write_all(&[0, 0, 0, 8, 0, 2, 0, 0]).expect("write");
    let got = read_all(s);
    assert!(
        got.contains("0A000") && got.contains("unsupported frontend protocol"),
        "{got:?}"
    );
    // A malformed startup length: the connection is closed without a reply.
    let mut s = connect();
    s.write_all(&[0, 0, 0, 3]).expect("write");
    assert_eq!(read_all(s), "");
    // A client that stalls mid-startup is dropped after login_grace.
    let s = connect();
    let t = Instant::now();
    assert_eq!(read_all(s), "");
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "dropped after the 1 s grace, not the read timeout"
    );
    // The gateway still serves after all of that.
    let (_req, secret) = pg_credential(&w, "30m").await;
    let out = output(psql_cmd(&w, &secret, "select 7*6")).await;
    assert_eq!(text(&out.stdout).trim(), "42");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_runs_through_the_gateway_in_every_query_mode() {
    let (_pg, _pgdir, w, gw, _certs) = pg_world("", true).await;
    let (_req, secret) = pg_credential(&w, "30m").await;
    let conn = format!(
        "host=127.0.0.1 port={} user=alice dbname=orders-db sslmode=require",
        w.pg_port
    );
    let pgbench = |args: &[&str]| {
        let mut c = Command::new(pg_bin("pgbench"));
        c.args(args)
            .arg(&conn)
            .env("PGPASSWORD", &secret)
            .stdin(std::process::Stdio::null());
        c
    };
    let out = output(pgbench(&["-i", "-s", "1", "-q"])).await;
    assert!(out.status.success(), "pgbench -i: {}", text(&out.stderr));
    for mode in ["simple", "extended", "prepared"] {
        for script in [&["-S"][..], &[][..]] {
            let mut args = vec!["-n", "-c", "2", "-t", "20", "-M", mode];
            args.extend_from_slice(script);
            let out = output(pgbench(&args)).await;
            let said = text(&out.stdout);
            assert!(
                out.status.success(),
                "pgbench {args:?}: {}{said}",
                text(&out.stderr)
            );
            assert!(
                said.contains("number of transactions actually processed: 40/40"),
                "{args:?}: {said}"
            );
        }
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_protocol_with_binary_parameters_and_copy_in_are_recorded() {
    // Without a certificate the listener speaks plain TCP (for clients behind a TLS proxy).
    let (_pg, _pgdir, w, gw, _certs) = pg_world("", false).await;
    let (_req, secret) = pg_credential(&w, "30m").await;
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1")
        .port(w.pg_port)
        .user("alice")
        .password(secret.as_str())
        .dbname("orders-db");
    let (client, conn) = cfg
        .connect(tokio_postgres::NoTls)
        .await
        .expect("tokio-postgres through the gateway");
    let task = tokio::spawn(conn);
    // tokio-postgres uses Parse/Bind/Execute with binary parameters.
    let row = client
        .query_one("select $1::int4 + 1, $2::text", &[&41i32, &"hello"])
        .await
        .expect("query");
    assert_eq!(row.get::<_, i32>(0), 42);
    assert_eq!(row.get::<_, String>(1), "hello");
    client
        .batch_execute("create table c(x int)")
        .await
        .expect("create");
    drop(client);
    let _ = task.await;
    // psql: COPY FROM STDIN and a meta-command.
    let mut c = Command::new(require("psql", "postgresql-client"));
    c.arg(format!(
        "host=127.0.0.1 port={} user=alice dbname=orders-db sslmode=disable",
        w.pg_port
    ))
    .args([
        "-X",
        "-c",
        "\\copy c from stdin",
        "-c",
        "\\d c",
        "-c",
        "select sum(x) from c",
    ])
    .env("PGPASSWORD", &secret)
    .stdin(std::process::Stdio::piped())
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped());
    let mut child = c.spawn().expect("psql");
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(b"1\n2\n3\n\\.\n")
            .expect("write");
    }
    let out = child.wait_with_output().expect("psql");
    let said = text(&out.stdout);
    assert!(out.status.success(), "{said}{}", text(&out.stderr));
    assert!(said.contains("Table \"public.c\""), "\\d works: {said}");
    assert!(said.contains(" 6"), "COPY in landed: {said}");
    w.wait_ended(2);
    gw.stop().await;
    let mut all = Vec::new();
    for s in w.sessions() {
        for line in export(&w, s["id"].as_str().expect("id")).lines() {
            let e: Value = serde_json::from_str(line).expect("json");
            validate("sql-event.schema.json", &e);
            all.push(e);
        }
    }
    // Each statement is also a BREAK_GLASS_ACTION SIEM event ([siem] actions = true).
    let sqls = [
        "select $1::int4 + 1, $2::text",
        "create table c(x int)",
        "select sum(x) from c",
    ];
    // Action events are spooled in batches, beside the session's own events.
    let statements: Vec<Value> = wait_for("statement events", Duration::from_secs(15), || {
        let s: Vec<Value> = w
            .siem_events()
            .into_iter()
            .filter(|e| e["action"] == "statement")
            .collect();
        sqls.iter()
            .all(|q| s.iter().any(|e| e["command"] == *q))
            .then_some(s)
    });
    for e in &statements {
        validate("siem-event.schema.json", e);
        assert_eq!(e["event_type"], "BREAK_GLASS_ACTION");
        assert_eq!(e["protocol"], "postgres");
    }
    let bind = all
        .iter()
        .find(|e| e["event"] == "bind" && e["params"].as_array().is_some_and(|p| p.len() == 2))
        .expect("a bind with two parameters");
    assert_eq!(
        bind["params"][0]["format"], 1,
        "binary parameter kept: {bind}"
    );
    assert_eq!(
        bind["params"][0]["base64"], "AAAAKQ==",
        "41 as int4: {bind}"
    );
    assert!(
        all.iter()
            .any(|e| e["event"] == "copy" && e["copy_direction"] == "in" && e["rows"] == 3),
        "{all:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_oversized_messages_after_login_get_fatal_08p01() {
    use breakglass::pg::{scram, wire};
    let (_pg, _pgdir, w, gw, _certs) = pg_world_with(PgOpts {
        postgres: "max_message = \"4KiB\"",
        ..Default::default()
    })
    .await;
    let (_req, secret) = pg_credential(&w, "30m").await;
    // A hand-rolled client: startup, SCRAM, then a bad message.
    async fn login(port: u16, secret: &str) -> tokio::net::TcpStream {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        let body = b"user\0alice\0database\0orders-db\0\0";
        let mut pkt = ((8 + body.len()) as i32).to_be_bytes().to_vec();
        pkt.extend_from_slice(&wire::PROTOCOL_3.to_be_bytes());
        pkt.extend_from_slice(body);
        wire::send(&mut s, &pkt).await.expect("startup");
        let mut ex = None;
        loop {
            let m = wire::read_message(&mut s, 1 << 20).await.expect("message");
            let b = m.body();
            match (
                m.tag,
                b.get(..4)
                    .map(|c| i32::from_be_bytes([c[0], c[1], c[2], c[3]])),
            ) {
                (b'R', Some(10)) => {
                    let (e, first) = scram::ClientExchange::start(secret, scram::Binding::None);
                    let mut p = b"SCRAM-SHA-256\0".to_vec();
                    p.extend_from_slice(&(first.len() as i32).to_be_bytes());
                    p.extend_from_slice(first.as_bytes());
                    wire::send(&mut s, &wire::message(b'p', &p))
                        .await
                        .expect("send");
                    ex = Some(e);
                }
                (b'R', Some(11)) => {
                    let e = ex.as_mut().expect("exchange");
                    let fin = e
                        .respond(&String::from_utf8_lossy(&b[4..]))
                        .expect("respond");
                    wire::send(&mut s, &wire::message(b'p', fin.as_bytes()))
                        .await
                        .expect("send");
                }
                (b'Z', _) => return s,
                (b'E', _) => panic!("login refused: {}", String::from_utf8_lossy(b)),
                _ => {}
            }
        }
    }
    async fn fatal_after(mut s: tokio::net::TcpStream, bytes: &[u8]) -> String {
        use tokio::io::AsyncReadExt;
        wire::send(&mut s, bytes).await.expect("send");
        let mut v = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut v)).await;
        String::from_utf8_lossy(&v).into_owned()
    }
    let s = login(w.pg_port, &secret).await;
    let got = fatal_after(s, &wire::message(b'Z', b"")).await;
    assert!(
        got.contains("08P01") && got.contains("unknown frontend message type"),
        "{got:?}"
    );
    // postgres.max_message = 4KiB: a query whose message is exactly 4096 bytes long (the
    // length field counts itself, not the type byte) runs; one byte more ends the session.
    let query = |marker: &str, len: usize| {
        let head = format!("select '{marker}' as m, '");
        let pad = len - 4 - head.len() - 2;
        let sql = format!("{head}{}'\0", "x".repeat(pad));
        let m = wire::message(b'Q', sql.as_bytes());
        assert_eq!(m.len(), len + 1);
        m
    };
    let mut s = login(w.pg_port, &secret).await;
    wire::send(&mut s, &query("fits-the-limit", 4096))
        .await
        .expect("send");
    let mut said = Vec::new();
    loop {
        let m = wire::read_message(&mut s, 1 << 20).await.expect("reply");
        said.push(m.tag);
        if m.tag == b'Z' {
            break;
        }
    }
    assert_eq!(said, b"TDCZ", "row description, row, complete, ready");
    let got = fatal_after(s, &query("over-the-limit", 4097)).await;
    assert!(
        got.contains("08P01")
            && got.contains("message of 4097 bytes is over the 4096-byte limit")
            && got.contains("postgres.max_message"),
        "{got:?}"
    );
    let s = login(w.pg_port, &secret).await;
    let mut huge = vec![b'Q'];
    huge.extend_from_slice(&(200_000_000i32).to_be_bytes());
    let got = fatal_after(s, &huge).await;
    assert!(got.contains("08P01") && got.contains("limit"), "{got:?}");
    w.wait_ended(3);
    gw.stop().await;
    // What came before the oversized message is on the record; the message itself is not.
    let recorded: String = w
        .sessions()
        .iter()
        .map(|s| export(&w, s["id"].as_str().expect("id")))
        .collect();
    assert!(
        recorded.contains("select 'fits-the-limit' as m"),
        "{recorded}"
    );
    assert!(!recorded.contains("over-the-limit"), "{recorded}");
    let ended: Vec<String> = w
        .siem_events()
        .iter()
        .filter(|e| e["action"] == "session_end")
        .map(|e| e["reason"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        ended,
        vec![
            "protocol_violation",
            "protocol_violation",
            "protocol_violation"
        ]
    );
}
