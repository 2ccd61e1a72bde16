#!/usr/bin/env bash
# Runs every benchmark of breakglass in one invocation and prints one table of their summary
# lines (medians, min/max, ratios against the baselines run side by side). Installs what the
# benches need first (the test script's programs, plus pgbouncer).
#   scripts/bench.sh            all benches (ssh, pg, idle, cluster)
#   scripts/bench.sh ssh pg     only those
# BENCH_RUNS, BENCH_BYTES, BENCH_SECONDS, BENCH_CLIENTS are passed through (see each bench).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/test.sh --no-run >/dev/null
if ! command -v pgbouncer >/dev/null 2>&1 && [ ! -x /usr/sbin/pgbouncer ]; then
  echo "installing: pgbouncer" >&2
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get install -y -q pgbouncer >&2
fi

benches=("$@")
[ ${#benches[@]} -eq 0 ] && benches=(ssh pg idle cluster)
out="target/bench-$(date -u +%Y%m%dT%H%M%SZ).txt"
mkdir -p target
for b in "${benches[@]}"; do
  echo "== cargo bench --bench $b" | tee -a "$out"
  cargo bench --bench "$b" 2>/dev/null | tee -a "$out"
done
echo
echo "summary (full output in $out):"
grep -E '^(machine:|pinning:|== |pgbench|psql|bulk|keystroke|  quiet|  under bulk|grant check|ssh session setup|idle sessions|[a-z].*:$|  [a-zA-Z+ ]+ +median|  ratio|  per pair|  added by|  [0-9]+ idle|  before any|  a fresh)' "$out" || true
