//! SSH benchmark, side by side in one run against baselines on the same machine:
//!
//! - bulk throughput: `ssh HOST 'head -c N /dev/zero'` through the gateway (recording on),
//!   direct to sshd, and through OpenSSH ProxyJump (`ssh -J`); prints MB/s and ratios;
//!   with OpenSSH's default client ciphers, then with aes256-gcm forced on every client leg;
//! - keystroke round trip: one line typed into `cat` on a pty and read back, p50/p99, through
//!   the gateway and direct, on a quiet machine and while another session of the same path
//!   pushes bulk data.
//!
//! Run with `cargo bench --bench ssh` (BENCH_BYTES overrides the 1 GB default, BENCH_RUNS the
//! 5 interleaved runs per path, BENCH_KEYS the 300 keystrokes, BENCH_PIN the pinning, see
//! benches/common; BENCH_GATEWAY_WRAP runs the gateway under a profiler, as in benches/idle).
//! Nothing here asserts a speed: it measures and prints.

#[path = "../tests/e2e/support.rs"]
#[allow(dead_code)]
mod support;

#[allow(dead_code)]
mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

use common::env_num;

/// The cipher OpenSSH clients are made to use on every client leg for the second set of bulk
/// runs (the gateway's upstream leg picks its own).
const FORCED_CIPHER: &str = "aes256-gcm@openssh.com";

/// Base ssh arguments for direct (non-gateway) connections with alice's key.
fn direct_args(w: &World) -> Vec<String> {
    w.ssh_args("alice")
}

fn time_bulk(mut c: Command, bytes: u64) -> Duration {
    let start = Instant::now();
    let out = c.stdout(Stdio::piped()).output().expect("run ssh");
    let took = start.elapsed();
    assert!(
        out.status.success(),
        "bulk transfer failed: {}",
        text(&out.stderr)
    );
    assert_eq!(out.stdout.len() as u64, bytes, "all bytes arrived");
    took
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    let idx = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[idx.min(v.len() - 1)]
}

/// Types `n` lines into `cat` on a remote pty and times each echo.
fn keystroke_rtt(mut c: Command, n: usize) -> Vec<Duration> {
    let mut child = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start ssh");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    // Wait for the remote side to be ready.
    loop {
        line.clear();
        if stdout.read_line(&mut line).expect("read") == 0 {
            panic!("ssh ended before READY");
        }
        if line.contains("READY") {
            break;
        }
    }
    let mut rtts = Vec::with_capacity(n);
    for i in 0..n {
        let probe = format!("k{i}");
        let start = Instant::now();
        stdin
            .write_all(format!("{probe}\n").as_bytes())
            .expect("write");
        stdin.flush().expect("flush");
        loop {
            line.clear();
            if stdout.read_line(&mut line).expect("read") == 0 {
                panic!("ssh ended early");
            }
            if line.trim_end() == probe {
                break;
            }
        }
        rtts.push(start.elapsed());
    }
    let _ = child.kill();
    let _ = child.wait();
    rtts
}

/// p50 and p99 of keystroke round trips through `make(remote)`, with `bulk` (another
/// session of the same path reading zeros as fast as it can) running meanwhile when given.
fn keystrokes(make: &dyn Fn(&str) -> Command, n: usize, bulk: Option<Command>) -> [Duration; 2] {
    let mut load = bulk.map(|mut c| {
        c.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the bulk session")
    });
    let mut v = keystroke_rtt(make("stty -echo; echo READY; cat"), n);
    if let Some(child) = load.as_mut() {
        let still_running = child.try_wait().expect("bulk session").is_none();
        assert!(
            still_running,
            "the bulk session ended before the keystrokes did"
        );
        let _ = child.kill();
        let _ = child.wait();
    }
    [percentile(&mut v, 0.5), percentile(&mut v, 0.99)]
}

fn main() {
    let bytes = env_num("BENCH_BYTES", 1_000_000_000);
    let runs = env_num("BENCH_RUNS", 5).max(1) as usize;
    common::print_machine();
    let w = World::new();
    // Direct and ProxyJump paths log in with alice's own key.
    std::fs::copy(w.path("alice.pub"), w.path("authorized_keys")).expect("authorized_keys");
    // sshd (started above) keeps every CPU; this process and its clients move to the load
    // CPUs, the gateway to the proxy CPUs.
    let pin = common::Pinning::apply();
    let (gw, gw_pid) = common::start_gateway(&w);
    pin.proxy(gw_pid);
    w.grant("alice", "2h");
    let user = current_user();
    let cmd = format!("head -c {bytes} /dev/zero");
    let port = w.sshd.port.to_string();
    let target = format!("{user}@127.0.0.1");

    // Each path takes the client options (a forced cipher, -tt) and the remote command.
    let ssh_gateway = |opts: &[&str], cmd: &str| {
        let mut c = w.ssh("alice", "web-01", opts, &[cmd]);
        c.stdin(Stdio::null());
        c
    };
    let ssh_direct = |opts: &[&str], cmd: &str| {
        let mut c = Command::new("ssh");
        c.args(direct_args(&w))
            .args(opts)
            .args(["-p", &port, &target, cmd])
            .stdin(Stdio::null());
        c
    };
    // What `ssh -J` does, spelled out so the jump leg gets the same options and key.
    let ssh_jump = |opts: &[&str], cmd: &str| {
        let mut c = Command::new("ssh");
        let jump_opts: Vec<&str> = opts.iter().copied().filter(|o| *o != "-tt").collect();
        let jump_cmd = format!(
            "ssh {} {} -p {port} -W %h:%p {target}",
            direct_args(&w).join(" "),
            jump_opts.join(" "),
        );
        c.args(direct_args(&w))
            .args(opts)
            .args(["-o", &format!("ProxyCommand={jump_cmd}")])
            .args(["-p", &port, &target, cmd])
            .stdin(Stdio::null());
        c
    };

    // Keystrokes first, on a quiet machine: right after gigabytes of recordings the kernel's
    // writeback competes for the two cores and skews the tail (seen: p99 10 ms).
    let n = env_num("BENCH_KEYS", 300) as usize;
    let stream = "cat /dev/zero";
    println!("keystroke round trip ({n} lines into cat on a pty; p50 p99):");
    for (label, loaded, target) in [("quiet", false, "100µs"), ("under bulk", true, "1ms")] {
        let g = keystrokes(
            &|r| ssh_gateway(&["-tt"], r),
            n,
            loaded.then(|| ssh_gateway(&[], stream)),
        );
        let d = keystrokes(
            &|r| ssh_direct(&["-tt"], r),
            n,
            loaded.then(|| ssh_direct(&[], stream)),
        );
        println!(
            "  {label:<10} direct {:?} {:?}  gateway {:?} {:?}  added by the gateway: p50 {:?} p99 {:?} (target p99 <= {target})",
            d[0],
            d[1],
            g[0],
            g[1],
            g[0].saturating_sub(d[0]),
            g[1].saturating_sub(d[1])
        );
    }

    // Random data does not compress: it shows the cost of recording when LZ4 cannot help.
    let random_bytes = bytes.min(256_000_000);
    let random_file = w.path("random.bin");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&random_file).expect("create"));
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut buf = vec![0u8; 1 << 20];
        let mut left = random_bytes as usize;
        while left > 0 {
            for b in buf.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = (x >> 32) as u8;
            }
            let n = left.min(buf.len());
            f.write_all(&buf[..n]).expect("write");
            left -= n;
        }
    }
    let random_cmd = format!("cat {}", random_file.display());

    let mbps = |n: u64, t: Duration| n as f64 / 1e6 / t.as_secs_f64();
    let forced = ["-c", FORCED_CIPHER];
    for (label, cmd, n) in [
        ("zeros (head -c N /dev/zero)", cmd.as_str(), bytes),
        ("random data (cat FILE)", random_cmd.as_str(), random_bytes),
    ] {
        for (ciphers, opts, target) in [
            ("OpenSSH default client ciphers", &[][..], "1.5x"),
            (
                "aes256-gcm forced on every client leg",
                &forced[..],
                "1.25x",
            ),
        ] {
            println!(
                "bulk {label}, {ciphers}: {} MB per run, {runs} runs per path, interleaved",
                n / 1_000_000
            );
            let (mut g, mut d, mut j) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..runs {
                d.push(time_bulk(ssh_direct(opts, cmd), n));
                j.push(time_bulk(ssh_jump(opts, cmd), n));
                g.push(time_bulk(ssh_gateway(opts, cmd), n));
            }
            let rate = |v: &[Duration]| v.iter().map(|t| mbps(n, *t)).collect::<Vec<f64>>();
            let (gr, dr, jr) = (rate(&g), rate(&d), rate(&j));
            common::print_spread("direct", &dr, "MB/s");
            common::print_spread("ProxyJump", &jr, "MB/s");
            common::print_spread("gateway+rec", &gr, "MB/s");
            let m = |v: &[f64]| common::spread(v).0;
            println!(
                "  ratio gateway/ProxyJump = {:.2}x (target >= {target}), gateway/direct = {:.2}x (medians)",
                m(&gr) / m(&jr),
                m(&gr) / m(&dr)
            );
            println!(
                "  per pair of neighbouring runs: gateway/ProxyJump {}",
                common::pair_ratios(&gr, &jr)
            );
        }
    }
    common::stop_gateway(gw, gw_pid);
}
