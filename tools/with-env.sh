#!/usr/bin/env bash
# Run a command inside mtkit's virtual environment, building it first when it is absent.
#
#   bash tools/with-env.sh mtkit run recipes/quickstart.yaml
#   bash tools/with-env.sh pytest
#
# The environment lives outside the clone, keyed by a hash of constraints.txt (every pin), in
# ${MTKIT_VENV_ROOT:-~/.cache/mtkit}/venv-<hash>; it is reused while the pins are unchanged. torch and
# torchvision come from the package registry's regular builds: the machine's local CPU-only torch wheel
# (PIP_FIND_LINKS, ~/.config/pip/pip.conf) cannot load torchvision's compiled ops, so pip runs here without
# that find-links folder and without the user's pip config files.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${MTKIT_PYTHON:-python3}"
key="$(sha256sum < "$repo/constraints.txt" | cut -c1-16)"
root="${MTKIT_VENV_ROOT:-$HOME/.cache/mtkit}"
venv="$root/venv-$key"
export PIP_CONFIG_FILE=/dev/null
unset PIP_FIND_LINKS PIP_EXTRA_INDEX_URL PIP_NO_INDEX || true
if [ ! -f "$venv/.complete" ]; then
  echo "mtkit: building the environment in $venv (first time only: ~2 min, ~5 GB)" >&2
  start=$(date +%s)
  rm -rf "$venv"
  mkdir -p "$root"
  "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -c "$repo/constraints.txt" "setuptools<81" wheel
  (cd "$repo" && "$venv/bin/python" -m pip install -q -c constraints.txt -e ".[test]")
  touch "$venv/.complete"
  echo "mtkit: environment ready in $(( $(date +%s) - start )) s" >&2
fi
# (Re)point the editable install at this clone: cheap, no dependencies touched.
if ! "$venv/bin/python" -c "import mtkit, sys; sys.exit(0 if mtkit.__file__.startswith('$repo/') else 1)" 2>/dev/null; then
  (cd "$repo" && "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e .)
fi
export PATH="$venv/bin:$PATH" VIRTUAL_ENV="$venv"
cd "$repo"
exec "$@"
