//! What every bench prints the same way: the machine it ran on, and median/min/max plus the
//! ratio of each pair of neighbouring runs (interleaved runs of two paths), so a reader sees
//! how much a figure moved within one invocation.

/// The machine: cores, CPU model and the flags that decide crypto speed.
pub fn print_machine() {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let flags: Vec<&str> = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("flags"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']))
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let wanted = ["aes", "pclmulqdq", "sha_ni", "vaes", "avx2", "avx512f"];
    let have: Vec<String> = wanted
        .iter()
        .map(|f| format!("{f}={}", if flags.contains(f) { "yes" } else { "no" }))
        .collect();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("machine: {cores} cores, {model}; {}", have.join(" "));
}

/// Median, min and max (`v` non-empty).
pub fn spread(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    (s[s.len() / 2], s[0], s[s.len() - 1])
}

/// `a[i] / b[i]` for each pair of runs made next to each other.
pub fn pair_ratios(a: &[f64], b: &[f64]) -> String {
    a.iter()
        .zip(b)
        .map(|(x, y)| format!("{:.2}", x / y))
        .collect::<Vec<_>>()
        .join(" ")
}

/// One line: `label  median X unit  min Y  max Z`.
pub fn print_spread(label: &str, v: &[f64], unit: &str) {
    let (m, lo, hi) = spread(v);
    // Seconds and other small figures need more than one decimal.
    let p = if m.abs() < 10.0 { 3 } else { 1 };
    println!("  {label:<16} median {m:>9.p$} {unit}  min {lo:>9.p$}  max {hi:>9.p$}");
}

/// A numeric setting from the environment (`BENCH_RUNS=7`), or `default`.
pub fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Where the load generator and the proxies run. With `BENCH_PIN=1` (or `auto`, the default,
/// on a machine with at least 4 cores) the bench process (and so every client it starts:
/// ssh, pgbench, psql) is pinned to the upper half of the CPUs and each proxy (the gateway,
/// pgbouncer) to the lower half; the targets (sshd, PostgreSQL) keep every CPU. On 2 cores
/// `auto` leaves everything unpinned: half the machine would be one core for the gateway.
pub struct Pinning {
    proxy: Option<String>,
}

impl Pinning {
    /// Pins this process (call it after the targets started, before any client) and says so.
    pub fn apply() -> Pinning {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let want = std::env::var("BENCH_PIN").unwrap_or_else(|_| "auto".into());
        let on = match want.as_str() {
            "1" | "on" | "yes" => cores >= 2,
            "auto" => cores >= 4,
            _ => false,
        };
        if !on {
            println!(
                "pinning: off ({cores} cores, BENCH_PIN={want}; BENCH_PIN=1 pins the load generator away from the proxy)"
            );
            return Pinning { proxy: None };
        }
        let half = cores / 2;
        let proxy = format!("0-{}", half - 1);
        let load = format!("{half}-{}", cores - 1);
        let me = std::process::id().to_string();
        taskset(&load, &me);
        println!("pinning: load generator on CPUs {load}, proxies on CPUs {proxy}");
        Pinning { proxy: Some(proxy) }
    }

    /// Moves a started proxy (every thread of `pid`) to the proxy CPUs.
    pub fn proxy(&self, pid: u32) {
        if let Some(cpus) = &self.proxy {
            taskset(cpus, &pid.to_string());
        }
    }
}

fn taskset(cpus: &str, pid: &str) {
    let out = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, pid])
        .output()
        .expect("taskset (util-linux)");
    assert!(
        out.status.success(),
        "taskset -a -p -c {cpus} {pid}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The `[postgres]` listener (with TLS when `cert_key` is given) and an `orders-db` target at
/// `pg_port` logging in as `bg_dba`, for a gateway config.
pub fn pg_config(cert_key: Option<(&std::path::Path, &std::path::Path)>, pg_port: u16) -> String {
    let listener = match cert_key {
        Some((cert, key)) => format!(
            "[postgres]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n\n",
            cert.display(),
            key.display()
        ),
        None => String::new(),
    };
    format!(
        "{listener}[[targets]]\nname = \"orders-db\"\nprotocol = \"postgres\"\naddress = \"127.0.0.1:{pg_port}\"\nlogin = \"bg_dba\"\napprovers = [\"bob\"]\n"
    )
}

/// Grants alice `orders-db` for 2 h and fetches her JIT password over the SSH control
/// channel, as a DBA does.
pub fn pg_credential(w: &super::support::World) -> String {
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
    let out = w
        .ssh(
            "alice",
            "breakglass",
            &[],
            &[&format!("credential {}", grant.trim())],
        )
        .output()
        .expect("credential");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("password: "))
        .expect("the control channel printed no password")
        .to_string()
}

/// The gateway (release build), or under `BENCH_GATEWAY_WRAP` (a profiler such as
/// `heaptrack -o FILE`): the child, and the gateway's own pid (the newest process serving
/// this config).
pub fn start_gateway(w: &super::support::World) -> (std::process::Child, u32) {
    let exe = env!("CARGO_BIN_EXE_breakglass");
    // `{n}` in the wrapper is the gateway's start count (one profile file per start).
    static STARTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let wrap = std::env::var("BENCH_GATEWAY_WRAP")
        .unwrap_or_default()
        .replace("{n}", &n.to_string());
    let mut words = wrap.split_whitespace();
    let mut c = match words.next() {
        Some(tool) => {
            let mut c = std::process::Command::new(tool);
            c.args(words).arg(exe);
            c
        }
        None => std::process::Command::new(exe),
    };
    let child = c
        .args(["serve", "--config"])
        .arg(&w.config_path)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(w.path("gateway.log")).expect("log"))
        .spawn()
        .expect("start gateway");
    super::support::wait_port(w.gw_port);
    let out = std::process::Command::new("pgrep")
        .args(["-n", "-f"])
        .arg(format!("serve --config {}", w.config_path.display()))
        .output()
        .expect("pgrep");
    let pid = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(child.id());
    (child, pid)
}

/// Stops the gateway with SIGTERM (a profiler writes its file) and waits for it.
pub fn stop_gateway(mut child: std::process::Child, pid: u32) {
    let _ = std::process::Command::new("kill")
        .arg(pid.to_string())
        .status();
    let _ = child.wait();
}
