#!/usr/bin/env bash
# Runs every test of breakglass: unit tests and the end-to-end tests against real OpenSSH,
# real asciinema and friends. Installs the programs the tests need when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v sshd >/dev/null 2>&1 || [ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
command -v scp >/dev/null 2>&1 || need+=(openssh-client)
command -v asciinema >/dev/null 2>&1 || need+=(asciinema)
command -v script >/dev/null 2>&1 || need+=(bsdutils)
command -v python3 >/dev/null 2>&1 || need+=(python3)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v psql >/dev/null 2>&1 || need+=(postgresql-client)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
[ -x /usr/sbin/rsyslogd ] || need+=(rsyslog)
ls /usr/lib/*/rsyslog/lmnsd_ossl.so >/dev/null 2>&1 || need+=(rsyslog-openssl)
# The web UI tests drive Debian's headless Chromium; npm fetches asciinema-player and
# playwright-core (pinned by web/package-lock.json).
[ -x /usr/bin/chromium ] || need+=(chromium)
[ -x /usr/bin/chromedriver ] || need+=(chromium-driver)
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v npm >/dev/null 2>&1 || need+=(npm)
# tests/e2e/deploy.rs checks deploy/haproxy/haproxy.cfg with `haproxy -c`.
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}" >&2
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# sshd needs its privilege-separation directory even when started by hand.
if [ ! -d /run/sshd ]; then
  if [ "$(id -u)" -eq 0 ]; then mkdir -p /run/sshd; else sudo mkdir -p /run/sshd; fi
fi

# pip into the Python that runs the tests; a Debian system Python marks itself externally
# managed, so the second try says so (the packages go to /usr/local, not to Debian's own).
pip_install() {
  python3 -m pip --version >/dev/null 2>&1 || {
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
  }
  python3 -m pip install -q --disable-pip-version-check "$@" >&2 \
    || python3 -m pip install -q --disable-pip-version-check --break-system-packages "$@" >&2
}

# The S3 tests run moto's S3 server (with Object Lock); boto3 comes with it.
if ! command -v moto_server >/dev/null 2>&1 || ! python3 -c "import boto3" >/dev/null 2>&1; then
  echo "installing: moto[server] (PyPI)" >&2
  pip_install 'moto[server]'
fi

# tests/e2e/deploy.rs validates deploy/kubernetes/ with kubernetes-validate (it bundles the
# Kubernetes schemas: no cluster and no network needed) and reads the YAML with PyYAML.
if ! command -v kubernetes-validate >/dev/null 2>&1 || ! python3 -c "import yaml" >/dev/null 2>&1; then
  echo "installing: kubernetes-validate, PyYAML (PyPI)" >&2
  pip_install kubernetes-validate PyYAML
fi

# Front-end packages from the npm registry, exactly as locked; nothing third-party is committed.
if ! [ -f web/node_modules/.package-lock.json ] || ! cmp -s web/package-lock.json web/node_modules/.lock-installed; then
  echo "installing: web/ front-end packages (npm ci)" >&2
  npm ci --prefix web --no-audit --no-fund --loglevel=error >&2
  cp web/package-lock.json web/node_modules/.lock-installed
fi

cargo test "$@"
