//! Break-glass accounts disabled between events: a PostgreSQL target with
//! `disable_between_grants` keeps its role NOLOGIN until a grant starts, LOGIN while the grant
//! (and its rotation) needs it, and NOLOGIN again after; each switch is on the record.

use std::process::{Command, Stdio};
use std::time::Duration;

use super::pg::{pg_credential, pg_world_with, PgOpts};
use super::support::*;

fn can_login(pg: &Postgres) -> String {
    let out = pg.psql(
        "postgres",
        &pg.superuser_password,
        "SELECT rolcanlogin FROM pg_roles WHERE rolname = 'bg_dba'",
    );
    text(&out.stdout).trim().to_string()
}

/// Polls `f` until it holds or `timeout` passes.
fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    f()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_break_glass_role_can_log_in_only_while_a_grant_needs_it() {
    let (pg, _pgdir, w, gw, _certs) = pg_world_with(PgOpts {
        sql: "CREATE ROLE bg_keeper LOGIN SUPERUSER PASSWORD 'keeper-pw'",
        target: "disable_between_grants = true\nadmin_login = \"bg_keeper\"",
        ..Default::default()
    })
    .await;
    w.vault_set_with(&["orders-db", "--admin"], "keeper-pw");
    // Between grants: NOLOGIN, so even the right password does not get in directly.
    wait_for("the role switched off", Duration::from_secs(20), || {
        (can_login(&pg) == "f").then_some(())
    });
    let direct = pg.psql("bg_dba", "initial-bg-password", "select 1");
    assert!(!direct.status.success());
    assert!(
        text(&direct.stderr).contains("not permitted to log in"),
        "{}",
        text(&direct.stderr)
    );
    let out = w.cli_ok(&["vault", "verify", "orders-db"]);
    assert!(out.contains("it is NOLOGIN now"), "{out}");
    let out = w.cli(&["check-config", w.config_path.to_str().expect("path")]);
    assert!(
        text(&out.stdout).contains(
            "orders-db: bg_keeper switches bg_dba between LOGIN and NOLOGIN (NOLOGIN now)"
        ),
        "{}",
        text(&out.stdout)
    );

    // A grant starts: the role is on before the approver hears back.
    let (req, secret) = pg_credential(&w, "30m").await;
    assert_eq!(can_login(&pg), "t", "LOGIN once the grant exists");
    let direct = pg.psql("bg_dba", "initial-bg-password", "select 1");
    assert!(direct.status.success(), "{}", text(&direct.stderr));
    let mut c = Command::new(require("psql", "postgresql-client"));
    c.arg(format!(
        "host=127.0.0.1 port={} user=alice dbname=orders-db sslmode=disable",
        w.pg_port
    ))
    .args(["-XAtc", "select 40+2"])
    .env("PGPASSWORD", &secret)
    .env("PGCONNECT_TIMEOUT", "10")
    .stdin(Stdio::null());
    let out = output(c).await;
    assert_eq!(text(&out.stdout).trim(), "42", "{}", text(&out.stderr));

    // The grant ends: rotation (which logs in as the role), then NOLOGIN again.
    let (code, _, err) = control(
        &w,
        "alice",
        "breakglass",
        &format!("revoke {req} --reason done"),
    )
    .await;
    assert_eq!(code, 0, "{err}");
    w.wait_event("rotation", |e| {
        e["action"] == "credential_rotated" && e["outcome"] == "success"
    });
    let off = wait_until(Duration::from_secs(20), || can_login(&pg) == "f");
    assert!(
        off,
        "the role switched off again; account events: {:?}",
        w.siem_events()
            .into_iter()
            .filter(|e| e["action"]
                .as_str()
                .is_some_and(|a| a.starts_with("account_")))
            .map(|e| format!("{} {} {}", e["action"], e["outcome"], e["message"]))
            .collect::<Vec<_>>()
    );
    let enabled = w.wait_event("enabled", |e| e["action"] == "account_enabled");
    assert_eq!(enabled["outcome"], "success", "{enabled}");
    assert_eq!(enabled["target"], "orders-db");
    let disabled: Vec<_> = w
        .siem_events()
        .into_iter()
        .filter(|e| e["action"] == "account_disabled" && e["outcome"] == "success")
        .collect();
    assert!(
        disabled.len() >= 2,
        "off at start and after the grant: {disabled:?}"
    );

    // A role switched on by hand between grants is switched off again within about 30 s.
    let out = pg.psql(
        "postgres",
        &pg.superuser_password,
        "ALTER ROLE bg_dba LOGIN",
    );
    assert!(out.status.success());
    wait_for(
        "the hand-made LOGIN undone",
        Duration::from_secs(90),
        || (can_login(&pg) == "f").then_some(()),
    );
    gw.stop().await;
    validate_all_events(&w);
}
