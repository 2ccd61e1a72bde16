//! PostgreSQL benchmark, side by side in one run: `pgbench -S` (select-only) TPS direct to
//! PostgreSQL, through pgbouncer (session pooling, no recording) without and with client TLS,
//! and through the gateway (TLS + SCRAM, every message recorded). The gateway/pgbouncer+TLS
//! ratio is the like-for-like one: both terminate TLS from the client and talk plain TCP to
//! PostgreSQL. Prints TPS and the ratios; asserts nothing.
//!
//! Run with `cargo bench --bench pg` (needs Debian's `pgbouncer`; BENCH_SECONDS, BENCH_CLIENTS
//! override 10 s and 8 clients, BENCH_RUNS the 5 interleaved runs per path).

#[path = "../tests/e2e/support.rs"]
#[allow(dead_code)]
mod support;

#[allow(dead_code)]
mod common;

use std::process::{Command, Stdio};

use support::*;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// (TPS, average latency in ms) of one pgbench -S run.
fn tps(conn: &str, password: &str, seconds: u64, clients: u64) -> (f64, f64) {
    let out = Command::new(pg_bin("pgbench"))
        .args([
            "-n",
            "-S",
            "-M",
            "prepared",
            "-c",
            &clients.to_string(),
            "-j",
            "2",
            "-T",
            &seconds.to_string(),
        ])
        .arg(conn)
        .env("PGPASSWORD", password)
        .stdin(Stdio::null())
        .output()
        .expect("pgbench");
    let said = text(&out.stdout);
    assert!(
        out.status.success(),
        "pgbench failed: {}{said}",
        text(&out.stderr)
    );
    let num = |prefix: &str| {
        said.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    (num("tps = "), num("latency average = "))
}

fn main() {
    let seconds = env_num("BENCH_SECONDS", 10);
    let clients = env_num("BENCH_CLIENTS", 8);
    let dir = tempfile::tempdir().expect("tempdir");
    let pg = Postgres::start(dir.path());
    let out = pg.psql(
        "postgres",
        &pg.superuser_password,
        "CREATE ROLE bg_dba LOGIN SUPERUSER PASSWORD 'bench-password'",
    );
    assert!(out.status.success());
    let direct = format!(
        "host=127.0.0.1 port={} user=bg_dba dbname=postgres sslmode=disable",
        pg.port
    );
    let out = Command::new(pg_bin("pgbench"))
        .args(["-i", "-s", "10", "-q"])
        .arg(&direct)
        .env("PGPASSWORD", "bench-password")
        .output()
        .expect("pgbench -i");
    assert!(out.status.success(), "{}", text(&out.stderr));

    // pgbouncer in session pooling mode, no recording: one instance in plain TCP, one that
    // requires client TLS with the same certificate as the gateway.
    let (cert, key) = self_signed_cert(dir.path());
    let users = dir.path().join("userlist.txt");
    std::fs::write(&users, "\"bg_dba\" \"bench-password\"\n").expect("userlist");
    let bouncer_ini = |name: &str, port: u16, extra: &str| {
        let ini = dir.path().join(format!("{name}.ini"));
        std::fs::write(
            &ini,
            format!(
                "[databases]\npostgres = host=127.0.0.1 port={} dbname=postgres\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nauth_type = scram-sha-256\nauth_file = {}\npool_mode = session\nmax_client_conn = 100\ndefault_pool_size = 20\nunix_socket_dir =\nlogfile = {}\npidfile = {}\n{extra}",
                pg.port,
                users.display(),
                dir.path().join(format!("{name}.log")).display(),
                dir.path().join(format!("{name}.pid")).display(),
            ),
        )
        .expect("ini");
        ini
    };
    let bouncer_port = free_port();
    let ini = bouncer_ini("pgbouncer", bouncer_port, "");
    let tls_bouncer_port = free_port();
    let tls_ini = bouncer_ini(
        "pgbouncer-tls",
        tls_bouncer_port,
        &format!(
            "client_tls_sslmode = require\nclient_tls_cert_file = {}\nclient_tls_key_file = {}\n",
            cert.display(),
            key.display()
        ),
    );
    let find = || {
        ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
    };
    if find().is_none() {
        eprintln!("installing pgbouncer from Debian");
        let _ = Command::new("sh")
            .args([
                "-c",
                "DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer >/dev/null",
            ])
            .status();
    }
    let pgbouncer = find().expect("pgbouncer is missing: apt-get install pgbouncer");
    let _ = Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(dir.path())
        .status();
    let start_bouncer = |ini: &std::path::Path, port: u16| {
        let child = Command::new("runuser")
            .args(["-u", "postgres", "--", pgbouncer])
            .arg(ini)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start pgbouncer");
        wait_port(port);
        child
    };
    let mut bouncer = start_bouncer(&ini, bouncer_port);
    let mut tls_bouncer = start_bouncer(&tls_ini, tls_bouncer_port);
    let via_bouncer =
        format!("host=127.0.0.1 port={bouncer_port} user=bg_dba dbname=postgres sslmode=disable");
    let via_tls_bouncer = format!(
        "host=127.0.0.1 port={tls_bouncer_port} user=bg_dba dbname=postgres sslmode=require"
    );
    // It really requires TLS.
    let out = Command::new(pg_bin("pgbench"))
        .args(["-n", "-S", "-t", "1"])
        .arg(via_tls_bouncer.replace("sslmode=require", "sslmode=disable"))
        .env("PGPASSWORD", "bench-password")
        .output()
        .expect("pgbench");
    assert!(
        !out.status.success(),
        "pgbouncer-tls must refuse plain clients"
    );

    // The gateway, release build, with the same TLS certificate and the break-glass password.
    let w = World::with(Opts {
        extra_config: format!(
            "[postgres]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n\n[[targets]]\nname = \"orders-db\"\nprotocol = \"postgres\"\naddress = \"127.0.0.1:{}\"\nlogin = \"bg_dba\"\napprovers = [\"bob\"]\n",
            cert.display(),
            key.display(),
            pg.port
        ),
        ..Default::default()
    });
    w.vault_set("orders-db", "bench-password");
    let _gw = Process::start(&w);
    let grant = w.cli_ok(&[
        "grant",
        "add",
        "--person",
        "alice",
        "--target",
        "orders-db",
        "--for",
        "2h",
        "--reason",
        "bench",
        "--incident",
        "BENCH",
    ]);
    // The JIT credential comes over the SSH control channel, as for a DBA.
    let out = w
        .ssh(
            "alice",
            "breakglass",
            &[],
            &[&format!("credential {}", grant.trim())],
        )
        .output()
        .expect("credential");
    let secret = text(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("password: "))
        .expect("password")
        .to_string();
    let via_gateway = format!(
        "host=127.0.0.1 port={} user=alice dbname=orders-db sslmode=require",
        w.pg_port
    );

    println!("pgbench -S -M prepared, {clients} clients, {seconds} s per run, interleaved");
    let runs: [(&str, &str, &str); 4] = [
        ("direct", &direct, "bench-password"),
        ("pgbouncer", &via_bouncer, "bench-password"),
        ("pgbouncer+tls", &via_tls_bouncer, "bench-password"),
        ("gateway+rec", &via_gateway, &secret),
    ];
    common::print_machine();
    let n_runs = env_num("BENCH_RUNS", 5).max(1);
    let mut results: Vec<Vec<(f64, f64)>> = vec![Vec::new(); runs.len()];
    for _ in 0..n_runs {
        for (i, (_, conn, password)) in runs.iter().enumerate() {
            results[i].push(tps(conn, password, seconds, clients));
        }
    }
    let tps_of = |i: usize| results[i].iter().map(|r| r.0).collect::<Vec<f64>>();
    for (i, (name, _, _)) in runs.iter().enumerate() {
        common::print_spread(name, &tps_of(i), "TPS");
        let lat: f64 = results[i].iter().map(|r| r.1).sum::<f64>() / results[i].len() as f64;
        println!("  {:<16} avg latency {lat:.3} ms", "");
    }
    let med = |i: usize| common::spread(&tps_of(i)).0;
    let [direct, bouncer_plain, bouncer_tls, gateway] = [0, 1, 2, 3].map(med);
    println!(
        "  ratio gateway/pgbouncer+tls = {:.2}x (both TLS), gateway/pgbouncer = {:.2}x (pgbouncer plain), gateway/direct = {:.2}x (medians)",
        gateway / bouncer_tls,
        gateway / bouncer_plain,
        gateway / direct
    );
    println!(
        "  per pair of neighbouring runs: gateway/pgbouncer+tls {}; gateway/pgbouncer {}",
        common::pair_ratios(&tps_of(3), &tps_of(2)),
        common::pair_ratios(&tps_of(3), &tps_of(1))
    );
    // runuser forks: stop pgbouncer itself (by its pid file), then reap runuser.
    for (b, name) in [
        (&mut bouncer, "pgbouncer"),
        (&mut tls_bouncer, "pgbouncer-tls"),
    ] {
        if let Ok(pid) = std::fs::read_to_string(dir.path().join(format!("{name}.pid"))) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
        let _ = b.wait();
    }
}
