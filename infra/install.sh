#!/usr/bin/env bash
# Installs what is missing for a local run and for the test suite. Idempotent, and fast when done:
#   - Java 17 + Maven, dovecot for the IMAP tests and chromium for the dashboard test (apt-get, only
#     when absent)
#   - the Python package with its [test] extra (pip install -e '.[test]', only when pyproject.toml
#     changed since the last install or an import fails)
#   - the Kafka broker jars from Maven Central (infra/kafka/kafka.sh fetch, skipped when present)
# Writes the Python interpreter to use into $POSTBUS_STATE/python (the Makefile reads it).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
state="${POSTBUS_STATE:-$repo/.state}"
mkdir -p "$state"

say() { echo "[install] $*" >&2; }

# ---- system packages (only what is genuinely missing) ----------------------------------------
apt_pkgs=()
command -v java >/dev/null 2>&1 || apt_pkgs+=(openjdk-17-jre-headless)
command -v mvn >/dev/null 2>&1 || apt_pkgs+=(maven)
# a real IMAP server for the bounce-mailbox tests (started on loopback by the tests themselves)
command -v dovecot >/dev/null 2>&1 || [ -x /usr/sbin/dovecot ] || apt_pkgs+=(dovecot-imapd)
# Debian's chromium for the dashboard's browser test (Playwright drives it: its own browser download
# does not work here), only when absent
[ -x /usr/bin/chromium ] || apt_pkgs+=(chromium)

# ---- Python 3.11: the one on PATH if pip may install into it, else a venv in .venv ---------------
pick_python() {
  local cand
  for cand in "${PYTHON:-}" python3.11 python3 python; do
    [ -n "$cand" ] || continue
    command -v "$cand" >/dev/null 2>&1 || continue
    "$cand" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' 2>/dev/null || continue
    "$cand" -c 'import sys; print(sys.executable)'; return 0
  done
  return 1
}
externally_managed() {
  "$1" -c 'import sys, sysconfig, os
std = sysconfig.get_path("stdlib")
in_venv = sys.prefix != sys.base_prefix
sys.exit(0 if (not in_venv and os.path.exists(os.path.join(std, "EXTERNALLY-MANAGED"))) else 1)'
}

if [ -x "$repo/.venv/bin/python" ]; then
  py="$repo/.venv/bin/python"
else
  py="$(pick_python || true)"
  if [ -z "$py" ]; then
    apt_pkgs+=(python3.11 python3.11-venv)
  elif externally_managed "$py" && ! "$py" -c 'import venv, ensurepip' 2>/dev/null; then
    apt_pkgs+=(python3.11-venv)
  fi
fi

if [ ${#apt_pkgs[@]} -gt 0 ]; then
  say "apt-get install ${apt_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  sudo_cmd=(); [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -q
  "${sudo_cmd[@]}" apt-get install -y -q --no-install-recommends "${apt_pkgs[@]}"
fi

if [ ! -x "$repo/.venv/bin/python" ]; then
  [ -n "$py" ] || py="$(pick_python)"
  if externally_managed "$py"; then
    say "system Python is externally managed: creating a virtualenv in .venv"
    "$py" -m venv "$repo/.venv"
    py="$repo/.venv/bin/python"
  fi
fi
echo "$py" >"$state/python"

# ---- the Python package -------------------------------------------------------------------
stamp="$state/install.stamp"
want="$(cat pyproject.toml | sha256sum | cut -d' ' -f1) $repo $py"
imports="import services, faust, aiokafka, fastavro, fastapi, uvicorn, clickhouse_connect, chdb, aiosmtplib, \
prometheus_client, httpx, pydantic_settings, cryptography, email_validator, pytest, pytest_asyncio, \
pytest_timeout, aiosmtpd, ruff"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$py" -c "$imports" 2>/dev/null; then
  say "python package up to date ($py)"
else
  say "pip install -e '.[test]' ($py)"
  "$py" -m pip install -q --disable-pip-version-check --root-user-action=ignore -e '.[test]'
  "$py" -c "$imports"
  echo "$want" >"$stamp"
fi

# ---- Kafka broker jars ------------------------------------------------------------------------
if [ -f infra/kafka/lib/.complete ] && [ infra/kafka/lib/.complete -nt infra/kafka/pom.xml ]; then
  say "kafka jars present"
else
  say "fetching the Kafka broker jars (Maven Central)"
  bash infra/kafka/kafka.sh fetch
fi
say "done"
