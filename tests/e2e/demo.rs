//! `breakglass demo`: the playground starts, every command it prints works when run as
//! printed (with the request and session ids it produced filled in), and Ctrl-C removes it.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncBufReadExt;

use super::support::*;

async fn sh(cmd: &str) -> std::process::Output {
    let mut c = std::process::Command::new("sh");
    c.args(["-c", cmd]).stdin(Stdio::null());
    output(c).await
}

/// Sends the demo Ctrl-C if the test ends early, so a failing run leaves no target running.
struct Interrupt(Option<u32>);

impl Drop for Interrupt {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = std::process::Command::new("kill")
                .args(["-INT", &pid.to_string()])
                .status();
            std::thread::sleep(Duration::from_secs(2));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_starts_and_its_printed_commands_work() {
    require("sshd", "openssh-server");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_breakglass"))
        .arg("demo")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("demo");
    // What the demo says on stderr, kept to name why it did not start.
    let mut stderr = child.stderr.take().expect("stderr");
    let said = tokio::spawn(async move {
        let mut buf = Vec::new();
        let _ = tokio::io::AsyncReadExt::read_to_end(&mut stderr, &mut buf).await;
        String::from_utf8_lossy(&buf).into_owned()
    });
    let mut interrupt = Interrupt(child.id());
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut printed = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Ok(Some(l)) = lines.next_line().await {
            let done = l.starts_with("Ctrl-C stops");
            printed.push(l);
            if done {
                break;
            }
        }
    })
    .await
    .expect("the demo prints its commands");
    if !printed.iter().any(|l| l.starts_with("Ctrl-C stops")) {
        let _ = child.wait().await;
        panic!(
            "the demo did not start: {printed:?}; it said: {}",
            said.await.unwrap_or_default()
        );
    }
    let dir = printed[0]
        .split("playground in ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .unwrap_or_else(|| panic!("the playground's dir: {printed:?}"))
        .to_string();
    assert!(std::path::Path::new(&dir).is_dir());
    let commands: Vec<String> = printed
        .iter()
        .filter_map(|l| l.trim_start().strip_prefix("$ ").map(str::to_string))
        .collect();
    // scripts/test.sh installs PostgreSQL's server, so the demo has its PostgreSQL target.
    assert_eq!(commands.len(), 11, "{printed:?}");

    // 1. request
    let out = sh(&commands[0]).await;
    assert!(
        out.status.success(),
        "{}: {}",
        commands[0],
        text(&out.stderr)
    );
    let req = request_id(&text(&out.stdout));
    // 2. approve, with the id step 1 printed
    let out = sh(&commands[1].replace("R-ID", &req)).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("approved"),
        "{}",
        text(&out.stdout)
    );
    // 3. the target, through the gateway
    let out = sh(&commands[2]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("hello from web-01"),
        "{}",
        text(&out.stdout)
    );
    // 4. list, replay, verify
    let out = sh(&commands[3]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let list = text(&out.stdout);
    let session = list
        .lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("a session in {list}"))
        .to_string();
    let out = sh(&commands[4].replace("SESSION", &session)).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("hello from web-01"), "replay");
    let out = sh(&commands[5]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("OK"), "{}", text(&out.stdout));
    // 5. a login link for the web UI
    let out = sh(&commands[6]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("/login#"),
        "{}",
        text(&out.stdout)
    );
    // 6. psql to orders-db through the gateway
    let out = sh(&commands[7]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let req = request_id(&text(&out.stdout));
    let out = sh(&commands[8].replace("R-ID", &req)).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = sh(&commands[9].replace("R-ID", &req)).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let credential = text(&out.stdout);
    let password = credential
        .lines()
        .find_map(|l| l.strip_prefix("password: "))
        .unwrap_or_else(|| panic!("a password in {credential}"))
        .to_string();
    // The demo's break-glass role is not a superuser, yet reads what an incident needs.
    let psql = commands[10]
        .replace("THE_ONE_TIME_PASSWORD", &password)
        .replace(
            "-c 'select 40+2'",
            "-c 'select 40+2' -c 'select rolsuper from pg_roles where rolname = current_user' -c 'select count(*) > 0 from pg_stat_activity'",
        );
    assert!(psql.contains("rolsuper"), "{psql}");
    let out = sh(&psql).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines: Vec<String> = text(&out.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .collect();
    assert!(lines.iter().any(|l| l == "42"), "{lines:?}");
    assert!(lines.iter().any(|l| l == "f"), "not a superuser: {lines:?}");
    assert!(
        lines.iter().any(|l| l == "t"),
        "sees the backends: {lines:?}"
    );

    // Ctrl-C: everything stops and the playground is gone.
    let pid = child.id().expect("pid");
    let _ = std::process::Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status();
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the demo stops on Ctrl-C")
        .expect("wait");
    interrupt.0 = None;
    assert!(status.success(), "{status}");
    assert!(!std::path::Path::new(&dir).exists(), "{dir} removed");
}
