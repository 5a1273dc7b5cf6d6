#!/usr/bin/env bash
# Run a command inside mtkit's virtual environment, building it first when it is absent.
#
#   bash tools/with-env.sh mtkit run recipes/quickstart.yaml
#   bash tools/with-env.sh pytest
#
# The environment lives outside the clone, keyed by a hash of every pin (constraints.txt) and of the
# pyproject.toml files that name the dependencies (mtkit and the plugin packages under plugins/), in
# ${MTKIT_VENV_ROOT:-~/.cache/mtkit}/venv-<hash>; it is reused while they are unchanged and built from nothing
# when it is absent. torch and torchvision come from the package registry's regular builds: the machine's local
# CPU-only torch wheel (PIP_FIND_LINKS, /etc/pip.conf) cannot load torchvision's compiled ops, so pip runs here
# without that find-links folder and without any pip config file.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${MTKIT_PYTHON:-python3}"
plugins=()
for p in "$repo"/plugins/*/pyproject.toml; do [ -f "$p" ] && plugins+=("$(dirname "$p")"); done
key="$(cd "$repo" && cat constraints.txt pyproject.toml plugins/*/pyproject.toml 2>/dev/null | sha256sum | cut -c1-16)"
root="${MTKIT_VENV_ROOT:-$HOME/.cache/mtkit}"
venv="$root/venv-$key"
export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1
unset PIP_FIND_LINKS PIP_EXTRA_INDEX_URL PIP_NO_INDEX || true
editables=(-e "$repo[test]")
for p in "${plugins[@]}"; do editables+=(-e "$p"); done
# Run a pip step silently; on failure show its whole output (build backends print pages of warnings otherwise).
quiet() {
  local log
  log="$(mktemp)"
  "$@" >"$log" 2>&1 || { cat "$log" >&2; rm -f "$log"; exit 1; }
  rm -f "$log"
}
if [ ! -f "$venv/.complete" ]; then
  echo "mtkit: building the environment in $venv (first time only: ~1-2 min, ~5 GB)" >&2
  start=$(date +%s)
  rm -rf "$venv"
  mkdir -p "$root"
  "$py" -m venv "$venv"
  quiet "$venv/bin/python" -m pip install -q --upgrade pip
  quiet "$venv/bin/python" -m pip install -q -c "$repo/constraints.txt" setuptools wheel
  quiet "$venv/bin/python" -m pip install -q -c "$repo/constraints.txt" "${editables[@]}"
  quiet "$venv/bin/python" -m pip install -q --no-deps -c "$repo/constraints.txt" torchattacks
  touch "$venv/.complete"
  echo "mtkit: environment ready in $(( $(date +%s) - start )) s" >&2
fi
# (Re)point the editable installs at this clone (a venv reused by another clone): cheap, no dependencies touched.
# (from /: a build folder's mtkit.egg-info in the clone would shadow the installed metadata)
if ! (cd / && "$venv/bin/python" - "$repo" "${plugins[@]}") <<'EOF' 2>/dev/null
import json, re, sys
from importlib import metadata

repo, *plugins = sys.argv[1:]
wanted = {"mtkit": repo}
for p in plugins:
    text = open(f"{p}/pyproject.toml").read()
    wanted[re.search(r'^name\s*=\s*"([^"]+)"', text, re.M).group(1)] = p
for name, path in wanted.items():
    text = metadata.distribution(name).read_text("direct_url.json")
    if json.loads(text)["url"] != f"file://{path}":
        sys.exit(1)
EOF
then
  echo "mtkit: pointing the environment's editable installs at $repo" >&2
  quiet "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation "${editables[@]}"
fi
export PATH="$venv/bin:$PATH" VIRTUAL_ENV="$venv"
cd "$repo"
exec "$@"
