#!/usr/bin/env bash
# What the benchmark needs beyond `make install` (run by `make bench`; idempotent, fast when done):
#   - Postfix's smtp-sink test server: Debian package postfix, preseeded "No configuration" so that no
#     mail system is set up; it is never started as one (checked below), only smtp-sink is used
#   - py-spy (the [bench] extra of pyproject.toml)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
state="${POSTBUS_STATE:-$repo/.state}"
py="$(cat "$state/python" 2>/dev/null || command -v python3)"
say() { echo "[bench-install] $*" >&2; }
sudo_cmd=(); [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)

if ! command -v smtp-sink >/dev/null 2>&1 && [ ! -x /usr/sbin/smtp-sink ]; then
  say "apt-get install postfix (for smtp-sink; debconf: No configuration, no mail system)"
  echo "postfix postfix/main_mailer_type select No configuration" | "${sudo_cmd[@]}" debconf-set-selections
  "${sudo_cmd[@]}" apt-get update -q
  "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postfix
fi
# the package must not have left a mail system running (its master daemon)
if pgrep -f '^/usr/lib/postfix/sbin/master' >/dev/null 2>&1; then
  say "a Postfix mail system (master) is running on this machine: the benchmark only wants smtp-sink;"
  say "stop it with 'postfix stop' (and 'systemctl disable postfix') if this machine is not a mail server"
  exit 1
fi

if [ -x "$(dirname "$py")/py-spy" ] || command -v py-spy >/dev/null 2>&1; then
  say "smtp-sink and py-spy present"
else
  say "pip install -e '.[bench]' (py-spy)"
  "$py" -m pip install -q --disable-pip-version-check --root-user-action=ignore -e "$repo[bench]"
fi
