//! What a new user hits first, each with the fix that removes it: a ready known_hosts line, the
//! product in the SSH banner, abbreviated ids everywhere (and an unknown id an error), a
//! minimum grant length, reasons without quotes, help that says what the product is, and the
//! example config's optional lines valid when uncommented.

use std::process::Command;

use super::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_show_prints_a_known_hosts_line_that_ssh_trusts_strictly() {
    let w = World::new();
    let gw = InProcess::start(&w).await;
    let shown = w.cli_ok(&["keys", "show"]);
    let prefix = format!("[127.0.0.1]:{} ", w.gw_port);
    let line = shown
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("a known_hosts line starting {prefix}: {shown}"));
    let known = w.path("strict_known_hosts");
    std::fs::write(&known, format!("{line}\n")).expect("known_hosts");
    // Strict checking with only that file: ssh accepts the gateway with no prompt.
    let out = output({
        let mut c = Command::new(require("ssh", "openssh-client"));
        c.args(["-F", "/dev/null", "-i"])
            .arg(w.path("alice"))
            .args([
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
                "BatchMode=yes",
            ])
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", known.display()))
            .args(["-p", &w.gw_port.to_string(), "breakglass@127.0.0.1", "help"]);
        c
    })
    .await;
    assert!(
        out.status.success(),
        "strict host key checking with the printed line: {}",
        text(&out.stderr)
    );
    // The banner names the product, not the SSH library and its version.
    let banner = tokio::task::spawn_blocking({
        let port = w.gw_port;
        move || {
            use std::io::BufRead;
            let s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
            let mut line = String::new();
            std::io::BufReader::new(s)
                .read_line(&mut line)
                .expect("banner");
            line
        }
    })
    .await
    .expect("banner task");
    assert_eq!(banner.trim_end(), "SSH-2.0-breakglass");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abbreviated_ids_work_and_unknown_ones_fail() {
    let w = World::new();
    let gw = InProcess::start(&w).await;
    let (code, out, err) = control(
        &w,
        "alice",
        "breakglass",
        "request web-01 --reason disk full --incident INC-7 --for 30m",
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    let req = request_id(&out);
    let short = &req[..6];
    let out = w.cli_ok(&["events", "--correlation", short, "--format", "json"]);
    let events: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert!(
        events
            .as_array()
            .is_some_and(|a| a.iter().any(|e| e["event_type"] == "request_created")),
        "events of {short}: {out}"
    );
    let out = w.cli(&["events", "--correlation", "R-0000000000"]);
    assert_eq!(out.status.code(), Some(1), "an unknown id fails");
    assert!(
        text(&out.stderr).contains("no request or grant matches"),
        "{}",
        text(&out.stderr)
    );
    gw.stop().await;
}

#[test]
fn grants_have_a_minimum_length_and_reasons_need_no_quotes() {
    let w = World::new();
    // The tests' own config allows 1 s grants; the default minimum is a minute.
    let strict = std::fs::read_to_string(&w.config_path)
        .expect("config")
        .replace("min_grant_ttl = \"1s\"", "");
    let strict_path = w.path("strict.toml");
    std::fs::write(&strict_path, strict).expect("write");
    let strict_path = strict_path.display().to_string();
    let out = w.cli(&[
        "grant",
        "add",
        "--config",
        &strict_path,
        "--person",
        "alice",
        "--target",
        "web-01",
        "--for",
        "1s",
        "--reason",
        "x",
        "--incident",
        "INC-1",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("at least 1m (limits.min_grant_ttl)"),
        "{}",
        text(&out.stderr)
    );
    // Several words after --reason, as on the control channel.
    w.cli_ok(&[
        "grant",
        "add",
        "--config",
        &strict_path,
        "--person",
        "alice",
        "--target",
        "web-01",
        "--for",
        "5m",
        "--reason",
        "disk",
        "full",
        "on",
        "var",
        "--incident",
        "INC-2",
    ]);
    let list = w.cli_ok(&[
        "grant",
        "list",
        "--config",
        &strict_path,
        "--format",
        "json",
    ]);
    assert!(list.contains("\"disk full on var\""), "{list}");
}

#[test]
fn help_says_what_the_product_is() {
    let out = Command::new(env!("CARGO_BIN_EXE_breakglass"))
        .arg("--help")
        .output()
        .expect("help");
    let help = text(&out.stdout);
    assert!(help.contains("SSH and PostgreSQL"), "{help}");
    let out = Command::new(env!("CARGO_BIN_EXE_breakglass"))
        .args(["grant", "--help"])
        .output()
        .expect("help");
    let help = text(&out.stdout);
    assert!(!help.contains("come later"), "{help}");
}

#[test]
fn the_example_configs_optional_listener_is_valid_uncommented() {
    let w = World::new();
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/breakglass.toml"
    ))
    .expect("example");
    let line = "# postgres = \"127.0.0.1:6432\"";
    assert!(
        example.contains(line),
        "the example still offers the PostgreSQL listener"
    );
    let on = example.replacen(line, "postgres = \"127.0.0.1:6432\"", 1);
    let path = w.path("example-on.toml");
    std::fs::write(&path, on).expect("write");
    let out = w.cli(&["check-config", "--offline", path.to_str().expect("path")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_verify_shows_postgresqls_own_reason() {
    let (_pg, _pgdir, w, gw, _certs) = super::pg::pg_world("", false).await;
    w.cli_ok(&["vault", "verify", "orders-db"]);
    w.vault_set("orders-db", "not-the-password");
    let out = w.cli(&["vault", "verify", "orders-db"]);
    assert!(!out.status.success());
    let said = text(&out.stderr);
    assert!(
        said.contains("password authentication failed"),
        "PostgreSQL's own text: {said}"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_verify_accepts_the_pending_password_of_a_rotation_cut_short() {
    let (pg, _pgdir, w, gw, _certs) = super::pg::pg_world("", false).await;
    // A rotation cut short after it set the new password on the target, before it promoted
    // it in the vault: the vault holds it as "pending", the target has it.
    let cfg = w.config();
    let kek = breakglass::vault::kek(&cfg.kek).expect("kek");
    let handle = breakglass::server::Gateway::build(cfg)
        .await
        .expect("gateway");
    let pending = breakglass::vault::Secret::new("Pending-Pw-31".to_string());
    handle
        .store
        .vault_put(
            "orders-db",
            "pending",
            &kek.seal("orders-db", &pending).expect("seal"),
            breakglass::clock::now(),
        )
        .await
        .expect("vault_put");
    let out = pg.psql(
        "postgres",
        &pg.superuser_password,
        "ALTER ROLE bg_dba PASSWORD 'Pending-Pw-31'",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = w.cli(&["vault", "verify", "orders-db"]);
    let said = text(&out.stdout) + &text(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("pending password for orders-db logs in as bg_dba"),
        "{said}"
    );
    // Neither the current nor the pending one: a failure with PostgreSQL's own reason.
    let out = pg.psql(
        "postgres",
        &pg.superuser_password,
        "ALTER ROLE bg_dba PASSWORD 'neither-of-them'",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = w.cli(&["vault", "verify", "orders-db"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("password authentication failed"),
        "{}",
        text(&out.stderr)
    );
    gw.stop().await;
}
