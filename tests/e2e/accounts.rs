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

/// Whether the held key `key` (a private key file) logs in to the target as `login` directly.
fn direct_ssh(w: &World, key: &std::path::Path, login: &str) -> bool {
    Command::new(require("ssh", "openssh-client"))
        .args([
            "-F",
            "/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
        ])
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
        ])
        .arg("-i")
        .arg(key)
        .args(["-p", &w.sshd.port.to_string()])
        .arg(format!("{login}@127.0.0.1"))
        .arg("true")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("ssh")
        .success()
}

/// The base64 body of a public key file.
pub(crate) fn blob(pub_file: &std::path::Path) -> String {
    std::fs::read_to_string(pub_file)
        .expect("pub key")
        .split_whitespace()
        .nth(1)
        .expect("key body")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_held_ssh_key_is_in_authorized_keys_only_while_a_grant_needs_it() {
    let login = throwaway_user("bgkeyholder");
    let w = World::with(Opts {
        held_key: true,
        key_admin: true,
        login: Some(login.clone()),
        ..Default::default()
    });
    let ak = w.path("authorized_keys");
    let held = w.path("gateway_held_key");
    let admin_blob = blob(&w.path("gateway_admin_key.pub"));
    assert!(
        direct_ssh(&w, &held, &login),
        "the key logs in before the gateway starts"
    );
    let gw = InProcess::start(&w).await;

    // Between grants: the held key's line is gone, so the key itself does not get in.
    wait_for("the held key taken out", Duration::from_secs(20), || {
        let ak = std::fs::read_to_string(&ak).expect("authorized_keys");
        (!ak.contains(&blob(&held.with_extension("pub")))).then_some(())
    });
    assert!(
        !direct_ssh(&w, &held, &login),
        "no authorized key between grants"
    );
    let left = std::fs::read_to_string(&ak).expect("authorized_keys");
    assert!(left.contains(&admin_blob), "other lines are kept: {left}");
    let out = w.cli(&["check-config", w.config_path.to_str().expect("path")]);
    assert!(
        text(&out.stdout).contains(&format!(
            "web-01: {} puts the held key of {login} into its authorized_keys and takes it out (KEY-OUT now)",
            current_user()
        )),
        "{}",
        text(&out.stdout)
    );

    let out = w.cli_ok(&["vault", "verify", "web-01"]);
    assert!(out.contains("(it is KEY-OUT now)"), "{out}");

    // A grant starts: the key is back before `grant add` returns, and a session logs in with it.
    let grant = w.grant("alice", "30m");
    assert!(
        std::fs::read_to_string(&ak)
            .expect("authorized_keys")
            .contains(&blob(&held.with_extension("pub"))),
        "the held key is in while the grant lasts"
    );
    let out = output(w.ssh("alice", "web-01", &[], &["id -un"])).await;
    assert_eq!(text(&out.stdout).trim(), login, "{}", text(&out.stderr));
    w.wait_ended(1);

    // The grant ends: rotation swaps the key (logging in with the old one), then the new key
    // is taken out too. Neither key gets in between grants.
    w.cli_ok(&["grant", "revoke", &grant, "--reason", "done"]);
    let rotated = w.wait_event("rotation", |e| {
        e["action"] == "credential_rotated" && e["target"] == "web-01"
    });
    assert_eq!(rotated["outcome"], "success", "{rotated}");
    wait_for("the rotated key taken out", Duration::from_secs(20), || {
        let ak = std::fs::read_to_string(&ak).expect("authorized_keys");
        let lines: Vec<&str> = ak.lines().filter(|l| !l.trim().is_empty()).collect();
        (lines.len() == 1 && lines[0].contains(&admin_blob)).then_some(())
    });
    assert!(!direct_ssh(&w, &held, &login), "the old key is out");
    let events = w.siem_events();
    let switched: Vec<_> = events
        .iter()
        .filter(|e| {
            e["action"]
                .as_str()
                .is_some_and(|a| a.starts_with("account_"))
        })
        .collect();
    assert!(
        switched
            .iter()
            .any(|e| e["action"] == "account_enabled" && e["outcome"] == "success"),
        "{switched:?}"
    );
    assert!(
        switched
            .iter()
            .filter(|e| e["action"] == "account_disabled" && e["outcome"] == "success")
            .count()
            >= 2,
        "off at start and after the grant: {switched:?}"
    );
    assert!(
        switched.iter().all(|e| e["protocol"] == "ssh"),
        "{switched:?}"
    );
    gw.stop().await;
    validate_all_events(&w);
}
