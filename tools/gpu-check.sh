#!/usr/bin/env bash
# One command that proves a GPU machine runs mtkit. See --help.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
usage() {
  cat <<'TXT'
usage: bash tools/gpu-check.sh [--python PY] [--install WHEELS] [--out DIR] [--parts LIST] [--allow-cpu]
       bash tools/gpu-check.sh --wheels DIR

On a CUDA machine, in at most 20 minutes on one H100 (each part has its limit), it runs:
  tests       the GPU subset of the test suite (pytest -m gpu --device cuda: every perturbation and plugin
              attack, warping and the depth loss, batched augmentation, the precision/compile modes, a tiny
              train -> evaluate -> mtkit run pipeline, each on the GPU)
  quickstart  mtkit run recipes/quickstart.yaml from an empty cache, timed end to end
  bench       mtkit bench on the GPU (training steps at 64x192 and the paper's 640x192, precision modes at
              640x192, attack sweeps, the depth loss), against the GPU's own bf16 matmul peak
  torchrun    a 2-process torchrun: DDP training, sharded evaluation of its checkpoint, and the same evaluation
              in one process; the rows must be equal (NCCL with >= 2 GPUs, else gloo, two ranks on one GPU)
  jobs        mtkit run --jobs 2 of a tiny recipe against --jobs 1 (each job on a GPU with its share of the
              memory and cores); the rows must be equal
  plan        mtkit run --plan of the tiny recipe on the GPU, each stage timed under its phase's math policy
It writes DIR/summary.json (device, torch, timings, pass/fail per part), DIR/bench-<card>.json (pytest-benchmark's
JSON, for benchmarks/baselines/gpu-<card>.json) and a log per part (DIR default runs/gpu-check), prints a table
and exits 1 when a part failed (2: no GPU).

Options:
  --python PY      run in an existing environment where mtkit's dependencies are importable (a GPU machine
                   that cannot reach the package registry) instead of tools/with-env.sh's
  --install DIR    first install the wheels in DIR (made with --wheels) into a folder on PYTHONPATH for PY
  --wheels DIR     on a machine with the registry: download the wheels a GPU image with torch, torchvision,
                   timm, pytest and the scientific stack lacks (pydantic, segmentation-models-pytorch,
                   cityscapesScripts, imagecorruptions, torchattacks and their small dependencies; CPython 3.12,
                   manylinux x86-64) and build mtkit's and the plugins' wheels, then stop
  --out DIR        where the summary and logs go
  --parts LIST     comma-separated subset of tests,quickstart,bench,torchrun,jobs,plan
  --allow-cpu      run without a GPU (checks the check itself; the tests part runs tests/test_device.py)
TXT
}
python="" install="" wheels=""
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --python) python="$2"; shift 2 ;;
    --install) install="$2"; shift 2 ;;
    --wheels) wheels="$2"; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
if [ -n "$wheels" ]; then
  if ! mkdir -p "$wheels" 2>/dev/null || [ ! -w "$wheels" ]; then
    echo "gpu-check: cannot write wheels to $wheels (not a writable folder): give --wheels a folder you can write" >&2
    exit 2
  fi
  # pins from constraints.txt; --no-deps: each dependency the GPU image lacks is named here
  # typing_extensions: pydantic_core 2.50 imports typing_extensions.Sentinel (>= 4.14), which older images lack;
  # submitit, cloudpickle: the jobs of `mtkit run --jobs` (the jobs part)
  # hypothesis, sortedcontainers, pytest-timeout: the test extras the suite's collection and its timeouts need
  pkgs=(pydantic pydantic_core annotated-types typing-inspection typing_extensions segmentation_models_pytorch
        cityscapesScripts coloredlogs humanfriendly pyquaternion appdirs imagecorruptions torchattacks
        hypothesis sortedcontainers pytest-timeout submitit cloudpickle)
  PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= python3 -m pip download -q --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -c "$repo/constraints.txt" -d "$wheels" "${pkgs[@]}"
  # built from a copy: setuptools leaves build/ folders behind in the source tree
  src="$(mktemp -d)"
  git -C "$repo" ls-files -z | (cd "$repo" && xargs -0 cp --parents -t "$src")
  bash "$repo/tools/with-env.sh" python -m pip wheel -q --no-deps --no-build-isolation -w "$(cd "$wheels" && pwd)" \
    "$src" "$src"/plugins/*/ >/dev/null
  rm -rf "$src"
  echo "gpu-check: wheels in $wheels ($(du -sh "$wheels" | cut -f1)); on the GPU machine:"
  echo "  bash tools/gpu-check.sh --python python3 --install $wheels"
  exit 0
fi
if [ -n "$install" ]; then
  site="${TMPDIR:-/tmp}/mtkit-site"
  "${python:-python3}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" "$install"/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
cd "$repo"
if [ -n "$python" ]; then
  exec "$python" "$repo/tools/gpu_check.py" "${args[@]}"
fi
exec bash "$repo/tools/with-env.sh" python "$repo/tools/gpu_check.py" "${args[@]}"
