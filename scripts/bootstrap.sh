#!/usr/bin/env bash
# Installs what the relay and its tests need, and nothing that is already there.
#   scripts/bootstrap.sh run    a virtual environment with the relay
#   scripts/bootstrap.sh test   the same plus dev tools, and the system packages the tests drive
# System packages come from apt when missing and running as root; otherwise it says what to install.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-run}
venv=.venv
python=${PYTHON:-python3}

need_apt=()
want() {  # want COMMAND PACKAGE: the package that provides a missing command
  command -v "$1" >/dev/null 2>&1 || need_apt+=("$2")
}

install_system_packages() {
  ((${#need_apt[@]})) || return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "bootstrap: installing ${need_apt[*]} with apt-get" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  else
    echo "bootstrap: missing system packages: ${need_apt[*]}" >&2
    echo "bootstrap: install them (Debian/Ubuntu: sudo apt-get install ${need_apt[*]}) and retry" >&2
    exit 1
  fi
}

"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || {
  echo "bootstrap: Python 3.11 or newer is needed as '$python' (set PYTHON=...)" >&2
  exit 1
}
"$python" -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
# Opus audio: the relay loads the system's libopus when a client first asks for Opus.
ldconfig -p 2>/dev/null | grep -q 'libopus\.so\.0' || need_apt+=(libopus0)

if [ "$mode" = test ]; then
  want redis-server redis-server
  want chromium chromium
  want espeak-ng espeak-ng
  want sox sox
  want promtool prometheus
  want firefox-esr firefox-esr
  want node nodejs
  want npm npm
fi
install_system_packages

if [ "$mode" = test ]; then
  # The Node test drivers: the Firefox page test's (tests/firefox), the @openai/agents
  # client's (tests/agents) and openai-node's Realtime clients over wss:// (tests/openai_node,
  # which also installs Node 22 from the `node` package: the native-WebSocket client needs it);
  # each installed again when its lock file changes.
  for npm_dir in tests/firefox tests/agents tests/openai_node; do
    lock=$npm_dir/package-lock.json
    npm_stamp="$npm_dir/node_modules/.installed-$(sha256sum "$lock" | cut -c1-16)"
    if [ ! -f "$npm_stamp" ]; then
      npm ci --prefix "$npm_dir" --no-audit --no-fund --loglevel=error
      touch "$npm_stamp"
    fi
  done
fi

extras="[demo]"  # the local upstream's speech recognizer, for the no-key demo
[ "$mode" = test ] && extras="[dev]"
digest=$(sha256sum pyproject.toml | cut -c1-16)
stamp="$venv/.installed-$digest$extras"
installed() { [ -f "$venv/.installed-$digest$1" ]; }
# A dev install serves `run` too; a changed pyproject.toml installs again.
if ! installed "$extras" && ! { [ "$mode" = run ] && installed "[dev]"; }; then
  [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".$extras"
  rm -f "$venv"/.installed-*
  touch "$stamp"
fi
