//! Cluster benchmark, side by side in one run on the same machine:
//!
//! - grant check plus session start latency: one `ssh alice@GW web-01 true` (connect, auth,
//!   grant check in the state store, recording open, upstream login, exit) against a
//!   single-node gateway with the SQLite state store and against one node of a cluster with
//!   the PostgreSQL state store (its own port, not through HAProxy); prints median, min, max
//!   and the PostgreSQL/SQLite ratio;
//! - session setup rate through HAProxy: K concurrent clients each doing back-to-back
//!   `ssh ... web-01 true` through HAProxy for T seconds, against a 1-node and a 3-node
//!   cluster (both running at once, runs interleaved); prints sessions/s, failures and the
//!   3-node/1-node ratio.
//!
//! Run with `cargo bench --bench cluster` (needs `haproxy`, PostgreSQL's `initdb` and moto, as
//! the cluster e2e test does; BENCH_RUNS overrides the 5 setup-rate runs per cluster,
//! BENCH_LATENCY_RUNS the 20 latency runs per path, BENCH_CLIENTS the 8 clients, BENCH_SECONDS
//! the 10 s per setup-rate run). Nothing here asserts a speed: it measures and prints.

#[path = "../tests/e2e/support.rs"]
#[allow(dead_code)]
mod support;

#[allow(dead_code)]
mod common;

#[path = "../tests/e2e/cluster.rs"]
#[allow(dead_code)]
mod cluster;

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cluster::Cluster;
use support::*;

use common::env_num;

fn median<T: PartialOrd + Copy>(v: &[T]) -> T {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).expect("comparable"));
    v[v.len() / 2]
}

fn min_max<T: PartialOrd + Copy>(v: &[T]) -> (T, T) {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).expect("comparable"));
    (v[0], v[v.len() - 1])
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Runs one session start to end; returns how long it took, or the failure.
fn time_session(mut c: Command) -> Result<Duration, String> {
    let start = Instant::now();
    let out = c
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("run ssh");
    let took = start.elapsed();
    if out.status.success() {
        Ok(took)
    } else {
        Err(format!("{}: {}", out.status, text(&out.stderr).trim()))
    }
}

/// One setup-rate run: `clients` threads, each starting sessions back to back until `seconds`
/// have passed; (sessions/s, successes, failures, first failure).
fn setup_rate(c: &Cluster, clients: u64, seconds: u64) -> (f64, u64, u64, Option<String>) {
    let ok = AtomicU64::new(0);
    let failed = AtomicU64::new(0);
    let first_failure = Mutex::new(None);
    let start = Instant::now();
    let until = start + Duration::from_secs(seconds);
    std::thread::scope(|s| {
        for _ in 0..clients {
            s.spawn(|| {
                while Instant::now() < until {
                    match time_session(c.ssh_cmd(c.lb_ssh, "alice", "web-01", &["true"])) {
                        Ok(_) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            first_failure.lock().expect("lock").get_or_insert(e);
                        }
                    }
                }
            });
        }
    });
    // Sessions still in flight at the deadline finish and count: divide by the whole span.
    let took = start.elapsed();
    let ok = ok.load(Ordering::Relaxed);
    (
        ok as f64 / took.as_secs_f64(),
        ok,
        failed.load(Ordering::Relaxed),
        first_failure.into_inner().expect("lock"),
    )
}

fn pair_ratios(num: &[f64], den: &[f64]) -> String {
    num.iter()
        .zip(den)
        .map(|(n, d)| format!("{:.2}", n / d))
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let runs = env_num("BENCH_RUNS", 5).max(1) as usize;
    common::print_machine();
    let lat_runs = env_num("BENCH_LATENCY_RUNS", 20).max(1) as usize;
    let clients = env_num("BENCH_CLIENTS", 8).max(1);
    let seconds = env_num("BENCH_SECONDS", 10).max(1);

    // 1. Grant check plus session start latency, SQLite single node vs one PostgreSQL node.
    let w = World::new();
    let _gw = Process::start(&w);
    w.grant("alice", "30m");
    let c1 = Cluster::start(1).await;
    c1.w.grant("alice", "30m");
    let sqlite = || w.ssh("alice", "web-01", &[], &["true"]);
    let pg = || c1.ssh_cmd(c1.nodes[0].ssh, "alice", "web-01", &["true"]);
    // Warm-up: host keys into known_hosts, connection pools and caches filled.
    time_session(sqlite()).expect("SQLite warm-up session");
    time_session(pg()).expect("PostgreSQL warm-up session");
    let (mut s, mut p) = (Vec::new(), Vec::new());
    for i in 0..lat_runs {
        // Alternate which path goes first so neither always follows the other.
        let mut one = |sqlite_first: bool| {
            if sqlite_first {
                s.push(time_session(sqlite()).expect("SQLite session"));
            } else {
                p.push(time_session(pg()).expect("PostgreSQL session"));
            }
        };
        one(i % 2 == 0);
        one(i % 2 != 0);
    }
    let (s, p): (Vec<f64>, Vec<f64>) = (
        s.into_iter().map(ms).collect(),
        p.into_iter().map(ms).collect(),
    );
    println!(
        "grant check + session start: one `ssh alice@GW web-01 true`, {lat_runs} runs per path, \
         interleaved, after one warm-up each"
    );
    for (label, v) in [
        ("SQLite, single node", &s),
        ("PostgreSQL, cluster node", &p),
    ] {
        let (lo, hi) = min_max(v);
        println!(
            "  {label:<26} median {:>7.1} ms  min {lo:>7.1} ms  max {hi:>7.1} ms",
            median(v)
        );
    }
    println!(
        "  ratio PostgreSQL/SQLite (medians) = {:.2}x",
        median(&p) / median(&s)
    );
    println!("  per pair of neighbouring runs: {}", pair_ratios(&p, &s));
    println!(
        "  (the paths also differ in more than the state store: the cluster node records to \
         moto S3 with Object Lock and sends SIEM events to a webhook; the single node records \
         to a local directory)"
    );
    drop(_gw);

    // 2. Session setup rate through HAProxy, 1 node vs 3 nodes, both clusters up at once.
    let c3 = Cluster::start(3).await;
    c3.w.grant("alice", "30m");
    for c in [&c1, &c3] {
        time_session(c.ssh_cmd(c.lb_ssh, "alice", "web-01", &["true"]))
            .expect("warm-up session through HAProxy");
    }
    let clusters: [(&str, &Cluster); 2] = [("1 node ", &c1), ("3 nodes", &c3)];
    let mut rates = [Vec::new(), Vec::new()];
    let mut totals = [(0u64, 0u64, None::<String>), (0, 0, None)];
    for run in 0..runs {
        // Alternate which cluster goes first.
        let order = if run % 2 == 0 { [0, 1] } else { [1, 0] };
        for k in order {
            let (rate, ok, failed, first) = setup_rate(clusters[k].1, clients, seconds);
            rates[k].push(rate);
            totals[k].0 += ok;
            totals[k].1 += failed;
            if totals[k].2.is_none() {
                totals[k].2 = first;
            }
        }
    }
    println!(
        "session setup rate through HAProxy: {clients} clients, back-to-back \
         `ssh alice@LB web-01 true`, {seconds} s per run, {runs} runs per cluster, interleaved"
    );
    println!(
        "  (this host has {} cores: 3 nodes on one host measure the shared state store's \
         overhead, not scale-out)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    for (k, (label, _)) in clusters.iter().enumerate() {
        let (lo, hi) = min_max(&rates[k]);
        let (ok, failed, first) = &totals[k];
        println!(
            "  {label}  median {:>6.1} sessions/s  min {lo:>6.1}  max {hi:>6.1}  \
             ({ok} ok, {failed} failed)",
            median(&rates[k])
        );
        if let Some(e) = first {
            println!("    first failure: {e}");
        }
    }
    println!(
        "  ratio 3 nodes/1 node (medians) = {:.2}x",
        median(&rates[1]) / median(&rates[0])
    );
    println!(
        "  per pair of neighbouring runs: {}",
        pair_ratios(&rates[1], &rates[0])
    );
}
