//! Idle-session memory and SSH session setup, measured against a real sshd and a real
//! PostgreSQL:
//!
//! - the gateway's RSS (from /proc) with N idle SSH sessions open (pty shells, every byte
//!   recorded), then with N idle PostgreSQL sessions (client TLS, SCRAM, recorded), each
//!   opened from this process (russh and tokio-postgres clients); printed against the targets
//!   (96 MiB and 48 MiB for 1,000);
//! - SSH session setup (connect, authenticate, grant check, recording open, upstream login,
//!   a command's first byte): sessions per second through the gateway and through OpenSSH
//!   ProxyJump, interleaved runs.
//!
//! Run with `cargo bench --bench idle` (BENCH_IDLE overrides 1000 sessions, BENCH_SETUP the
//! 50 sessions per setup run, BENCH_RUNS the 5 interleaved setup runs; BENCH_GATEWAY_WRAP runs
//! the gateway under a profiler, e.g. `heaptrack -o /tmp/idle-{n}`). Asserts nothing.

#[path = "../tests/e2e/support.rs"]
#[allow(dead_code)]
mod support;

#[allow(dead_code)]
mod common;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;

use common::env_num;

/// The gateway's resident set size in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Waits until the RSS has not moved by more than 1% over a second (allocator settling).
fn settled_rss(pid: u32) -> u64 {
    let mut last = rss_kib(pid);
    for _ in 0..30 {
        std::thread::sleep(Duration::from_secs(1));
        let now = rss_kib(pid);
        if now.abs_diff(last) * 100 <= last {
            return now;
        }
        last = now;
    }
    last
}

struct AcceptAny;

impl russh::client::Handler for AcceptAny {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        _key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

/// One SSH session through the gateway with a pty shell, returned once the shell printed
/// something (its prompt): the session is open upstream and recorded.
async fn idle_shell(
    port: u16,
    key: Arc<russh::keys::PrivateKey>,
) -> (
    russh::client::Handle<AcceptAny>,
    russh::Channel<russh::client::Msg>,
) {
    let config = Arc::new(russh::client::Config {
        inactivity_timeout: None,
        ..Default::default()
    });
    let mut handle = russh::client::connect(config, ("127.0.0.1", port), AcceptAny)
        .await
        .expect("connect to the gateway");
    let auth = handle
        .authenticate_publickey("web-01", russh::keys::PrivateKeyWithHashAlg::new(key, None))
        .await
        .expect("authenticate");
    assert!(auth.success(), "alice's key is refused");
    let mut ch = handle.channel_open_session().await.expect("session");
    ch.request_pty(false, "xterm", 80, 24, 0, 0, &[])
        .await
        .expect("pty");
    ch.request_shell(false).await.expect("shell");
    loop {
        match ch.wait().await {
            Some(russh::ChannelMsg::Data { .. }) => break,
            Some(russh::ChannelMsg::Eof | russh::ChannelMsg::Close) | None => {
                panic!("the shell ended before its prompt")
            }
            Some(_) => {}
        }
    }
    (handle, ch)
}

/// `n` SSH sessions run one after another (`ssh ... true`): sessions per second.
fn setup_rate(make: &dyn Fn() -> Command, n: u64) -> f64 {
    let start = Instant::now();
    for _ in 0..n {
        let out = make().output().expect("ssh");
        assert!(out.status.success(), "ssh failed: {}", text(&out.stderr));
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let n = env_num("BENCH_IDLE", 1000) as usize;
    let dir = tempfile::tempdir().expect("tempdir");
    let pg = Postgres::start_with(
        dir.path(),
        PgServerOpts {
            settings: &["max_connections=1200"],
            ..Default::default()
        },
    );
    let out = pg.psql(
        "postgres",
        &pg.superuser_password,
        "CREATE ROLE bg_dba LOGIN PASSWORD 'bench-password'",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let (cert, key) = self_signed_cert(dir.path());
    let w = World::with(Opts {
        extra_limits: format!("max_connections = {}\npreauth_per_source = 64\n", n + 100),
        sshd_extra: format!("MaxStartups {0}:100:{0}\nMaxSessions {0}\n", n + 100),
        extra_config: common::pg_config(Some((&cert, &key)), pg.port),
        ..Default::default()
    });
    w.vault_set("orders-db", "bench-password");
    let (gw, pid) = common::start_gateway(&w);
    w.grant("alice", "2h");
    let secret = common::pg_credential(&w);
    common::print_machine();

    // Session setup first, while the gateway is otherwise idle.
    let setup_n = env_num("BENCH_SETUP", 50);
    let runs = env_num("BENCH_RUNS", 5).max(1);
    let gw_port = w.gw_port;
    let via_gateway = || {
        let mut c = w.ssh("alice", "web-01", &[], &["true"]);
        c.stdout(Stdio::null());
        c
    };
    // The baseline logs in with alice's own key; the jump leg is spelled out as `ssh -J`
    // does it, so both legs get the same options and key (as in benches/ssh.rs).
    std::fs::copy(w.path("alice.pub"), w.path("authorized_keys")).expect("authorized_keys");
    let user = current_user();
    let via_jump = || {
        let mut c = Command::new("ssh");
        let jump_cmd = format!(
            "ssh {} -p {} -W %h:%p {user}@127.0.0.1",
            w.ssh_args("alice").join(" "),
            w.sshd.port
        );
        c.args(w.ssh_args("alice"))
            .args(["-o", &format!("ProxyCommand={jump_cmd}")])
            .args([
                "-p",
                &w.sshd.port.to_string(),
                &format!("{user}@127.0.0.1"),
                "true",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        c
    };
    let (mut gw_rates, mut jump_rates) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        gw_rates.push(setup_rate(&via_gateway, setup_n));
        jump_rates.push(setup_rate(&via_jump, setup_n));
    }
    println!("ssh session setup, {setup_n} sequential `ssh … true` per run, interleaved");
    common::print_spread("gateway", &gw_rates, "sessions/s");
    common::print_spread("proxyjump", &jump_rates, "sessions/s");
    println!(
        "  ratio gateway/proxyjump = {:.2}x (medians; target >= 1.0x); per pair: {}",
        common::spread(&gw_rates).0 / common::spread(&jump_rates).0,
        common::pair_ratios(&gw_rates, &jump_rates)
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let base = settled_rss(pid);
    println!("idle sessions, {n} of each kind, gateway RSS sampled from /proc/{pid}/status");
    println!("  before any session: {:.1} MiB", base as f64 / 1024.0);
    let key = Arc::new(russh::keys::load_secret_key(w.path("alice"), None).expect("alice's key"));
    let started = Instant::now();
    let shells = rt.block_on(async {
        let gate = Arc::new(tokio::sync::Semaphore::new(16));
        let mut tasks = Vec::new();
        for _ in 0..n {
            let (gate, key) = (gate.clone(), key.clone());
            tasks.push(tokio::spawn(async move {
                let _p = gate.acquire_owned().await.expect("gate");
                idle_shell(gw_port, key).await
            }));
        }
        let mut shells = Vec::new();
        for t in tasks {
            shells.push(t.await.expect("shell task"));
        }
        shells
    });
    let opened = started.elapsed();
    let ssh_rss = settled_rss(pid);
    let ssh_delta = ssh_rss.saturating_sub(base);
    println!(
        "  {n} idle ssh pty shells (opened in {:.1} s): RSS {:.1} MiB, {:.1} MiB over idle, {:.0} KiB per session; target <= 96 MiB in all for 1000",
        opened.as_secs_f64(),
        ssh_rss as f64 / 1024.0,
        ssh_delta as f64 / 1024.0,
        ssh_delta as f64 / n as f64
    );
    drop(shells);
    // A fresh gateway for the PostgreSQL sessions: memory the SSH sessions freed but the
    // allocator kept would hide theirs.
    common::stop_gateway(gw, pid);
    let (gw, pid) = common::start_gateway(&w);
    let base = settled_rss(pid);
    println!(
        "  a fresh gateway before any session: {:.1} MiB",
        base as f64 / 1024.0
    );

    let tls = breakglass::pg::upstream::tls_config(&std::fs::read(&cert).expect("cert"), false)
        .expect("client tls");
    let target = w.config().targets.remove("orders-db").expect("orders-db");
    let conn = format!(
        "host=127.0.0.1 port={} user=alice dbname=orders-db sslmode=require password={secret}",
        w.pg_port
    );
    let started = Instant::now();
    let clients = rt.block_on(async {
        let gate = Arc::new(tokio::sync::Semaphore::new(16));
        let mut tasks = Vec::new();
        for _ in 0..n {
            let gate = gate.clone();
            let tls = breakglass::pg::upstream::PostgresTls(tls.clone(), target.clone());
            let conn = conn.clone();
            tasks.push(tokio::spawn(async move {
                let _p = gate.acquire_owned().await.expect("gate");
                let (client, connection) = tokio_postgres::connect(&conn, tls)
                    .await
                    .expect("connect through the gateway");
                tokio::spawn(connection);
                let row = client.query_one("SELECT 1", &[]).await.expect("select");
                assert_eq!(row.get::<_, i32>(0), 1);
                client
            }));
        }
        let mut clients = Vec::new();
        for t in tasks {
            clients.push(t.await.expect("pg task"));
        }
        clients
    });
    let opened = started.elapsed();
    let pg_rss = settled_rss(pid);
    let pg_delta = pg_rss.saturating_sub(base);
    println!(
        "  {n} idle postgres TLS sessions (opened in {:.1} s): RSS {:.1} MiB, {:.1} MiB over idle, {:.0} KiB per session; target <= 48 MiB in all for 1000",
        opened.as_secs_f64(),
        pg_rss as f64 / 1024.0,
        pg_delta as f64 / 1024.0,
        pg_delta as f64 / n as f64
    );
    drop(clients);
    drop(rt);
    common::stop_gateway(gw, pid);
}
