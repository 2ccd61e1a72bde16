//! PostgreSQL benchmark, side by side in one run:
//!
//! - `pgbench -S -M prepared` (select-only) TPS direct to PostgreSQL, through pgbouncer
//!   (session pooling, no recording) without and with client TLS, through the gateway with
//!   client TLS + SCRAM and every message recorded, and through a second gateway listening in
//!   plain TCP (the deployment with TLS terminated at a proxy in front). The gateway and
//!   pgbouncer+TLS both terminate TLS from the client and talk plain TCP to PostgreSQL;
//! - `psql` reading 500,000 rows (`SELECT * FROM pgbench_accounts LIMIT 500000`), direct and
//!   through the TLS gateway: seconds per run.
//!
//! Prints medians, min/max and the ratios against the targets; asserts nothing. Run with
//! `cargo bench --bench pg` (needs Debian's `pgbouncer`; BENCH_SECONDS, BENCH_CLIENTS override
//! 10 s and 8 clients, BENCH_RUNS the 5 interleaved runs per path, BENCH_PIN the pinning, see
//! benches/common).

#[path = "../tests/e2e/support.rs"]
#[allow(dead_code)]
mod support;

#[allow(dead_code)]
mod common;

use std::process::{Command, Stdio};

use support::*;

use common::env_num;

/// Seconds for psql to read 500,000 rows (results to /dev/null).
fn psql_rows(conn: &str, password: &str) -> f64 {
    let start = std::time::Instant::now();
    let out = Command::new(pg_bin("psql"))
        .args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-o",
            "/dev/null",
            "-c",
            "SELECT * FROM pgbench_accounts LIMIT 500000",
        ])
        .arg(conn)
        .env("PGPASSWORD", password)
        .stdin(Stdio::null())
        .output()
        .expect("psql");
    let took = start.elapsed().as_secs_f64();
    assert!(out.status.success(), "psql failed: {}", text(&out.stderr));
    took
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
    common::print_machine();
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
    let direct_conn = direct.clone();
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

    // The gateways, release build: one with the same TLS certificate, one in plain TCP; both
    // log in upstream with the break-glass password.
    let pin = common::Pinning::apply();
    for name in ["pgbouncer", "pgbouncer-tls"] {
        if let Ok(pid) = std::fs::read_to_string(dir.path().join(format!("{name}.pid"))) {
            pin.proxy(pid.trim().parse().expect("pgbouncer pid"));
        }
    }
    let w = World::with(Opts {
        extra_config: common::pg_config(Some((&cert, &key)), pg.port),
        ..Default::default()
    });
    w.vault_set("orders-db", "bench-password");
    let gw = Process::start(&w);
    pin.proxy(gw.child.id());
    let secret = common::pg_credential(&w);
    let via_gateway = format!(
        "host=127.0.0.1 port={} user=alice dbname=orders-db sslmode=require",
        w.pg_port
    );
    let w_plain = World::with(Opts {
        extra_config: common::pg_config(None, pg.port),
        ..Default::default()
    });
    w_plain.vault_set("orders-db", "bench-password");
    let gw_plain = Process::start(&w_plain);
    pin.proxy(gw_plain.child.id());
    let secret_plain = common::pg_credential(&w_plain);
    let via_plain_gateway = format!(
        "host=127.0.0.1 port={} user=alice dbname=orders-db sslmode=disable",
        w_plain.pg_port
    );

    println!("pgbench -S -M prepared, {clients} clients, {seconds} s per run, interleaved");
    let runs: [(&str, &str, &str); 5] = [
        ("direct", &direct, "bench-password"),
        ("pgbouncer", &via_bouncer, "bench-password"),
        ("pgbouncer+tls", &via_tls_bouncer, "bench-password"),
        ("gateway+tls+rec", &via_gateway, &secret),
        ("gateway+rec", &via_plain_gateway, &secret_plain),
    ];
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
    let [direct, bouncer_plain, bouncer_tls, gateway, gateway_plain] = [0, 1, 2, 3, 4].map(med);
    println!(
        "  ratio gateway+tls/pgbouncer+tls = {:.2}x (target >= 1.3x), gateway+tls/pgbouncer = {:.2}x (target >= 1.0x), gateway/direct = {:.2}x (medians)",
        gateway / bouncer_tls,
        gateway / bouncer_plain,
        gateway / direct
    );
    println!(
        "  ratio plain gateway/pgbouncer = {:.2}x (both plain TCP; target >= 1.2x, medians)",
        gateway_plain / bouncer_plain
    );
    println!(
        "  per pair of neighbouring runs: gateway+tls/pgbouncer+tls {}; gateway+tls/pgbouncer {}; plain gateway/pgbouncer {}",
        common::pair_ratios(&tps_of(3), &tps_of(2)),
        common::pair_ratios(&tps_of(3), &tps_of(1)),
        common::pair_ratios(&tps_of(4), &tps_of(1))
    );

    println!("psql reading 500000 rows (to /dev/null), {n_runs} runs per path, interleaved");
    let (mut rd, mut rg) = (Vec::new(), Vec::new());
    for _ in 0..n_runs {
        rd.push(psql_rows(&direct_conn, "bench-password"));
        rg.push(psql_rows(&via_gateway, &secret));
    }
    common::print_spread("direct", &rd, "s");
    common::print_spread("gateway+tls+rec", &rg, "s");
    println!(
        "  ratio gateway/direct time = {:.2}x (medians; target <= 1.1x); per pair: {}",
        common::spread(&rg).0 / common::spread(&rd).0,
        common::pair_ratios(&rg, &rd)
    );
    drop((gw, gw_plain));
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
