#!/usr/bin/env bash
# The suite's quick subset (no browser, no Node.js) on the oldest and on the newest uvicorn and
# websockets in app/transport/fast.py's table of tested releases, each in a throwaway virtual
# environment: the fast transport extends both libraries' internals, and this is how a release
# gets into that table (and how CI sees one that no longer fits).
#   scripts/test-versions.sh                     the oldest pair, then the newest
#   scripts/test-versions.sh 0.53.0 16.1.1       one pair: try a release before adding it
# Arguments after `--` go to pytest (e.g. `-- tests/test_legs.py`). Needs what `make test` needs.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
pytest_args=()
pairs=()
while (($#)); do
  if [ "$1" = -- ]; then
    shift
    pytest_args=("$@")
    break
  fi
  pairs+=("$1")
  shift
done

if ((${#pairs[@]} == 0)); then
  # The table's oldest and newest releases, read without importing the app.
  read -r -a pairs < <("$python" - <<'EOF'
import ast

def table(name: str) -> list[str]:
    tree = ast.parse(open("app/transport/fast.py").read())
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == name:
            versions = [ast.literal_eval(item) for item in node.value.args[0].elts]
            return sorted(versions, key=lambda v: tuple(int(p) for p in v.split(".")))
    raise SystemExit(f"test-versions: no {name} in app/transport/fast.py")

uvicorn, websockets = table("TESTED_UVICORN"), table("TESTED_WEBSOCKETS")
print(uvicorn[0], websockets[0], uvicorn[-1], websockets[-1])
EOF
  )
fi
if ((${#pairs[@]} % 2)); then
  echo "test-versions: give versions in pairs: UVICORN WEBSOCKETS" >&2
  exit 2
fi

venv=$(mktemp -d "${TMPDIR:-/tmp}/realtime-relay-versions.XXXXXX")
trap 'rm -rf "$venv"' EXIT
"$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
echo "== test-versions: installing the project in $venv"
timeout 900 "${pip[@]}" -e ".[dev]"

status=0
for ((i = 0; i < ${#pairs[@]}; i += 2)); do
  uvicorn=${pairs[i]} websockets=${pairs[i + 1]}
  echo "== test-versions: uvicorn $uvicorn, websockets $websockets"
  # --no-deps: openai[realtime] (a test dependency) caps websockets below 16; the relay does not.
  timeout 300 "${pip[@]}" --no-deps "uvicorn==$uvicorn" "websockets==$websockets"
  started=$SECONDS
  if ! timeout 2400 "$venv/bin/python" -m pytest -m "not browser and not node" -q \
    "${pytest_args[@]}"; then
    status=1
  fi
  echo "== test-versions: uvicorn $uvicorn, websockets $websockets: $((SECONDS - started)) s"
done
exit "$status"
