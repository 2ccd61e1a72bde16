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
    println!("  {label:<16} median {m:>9.1} {unit}  min {lo:>9.1}  max {hi:>9.1}");
}
