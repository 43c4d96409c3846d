#!/usr/bin/env bash
# Pre-trains small Lory language models on real text and compares them with a dense model
# (examples/pretrain/README.md): dense, Lory with random batching, Lory with similarity batching,
# on the same training tokens and seed. Writes results.md, loss.png, routing_<run>.png,
# generations.md and checkpoints to the output folder (default runs/pretrain/).
#
# Installs what it needs first:
#  - the Debian packages whose text is the corpus (fortunes in four languages, Python's
#    documentation, C headers), through apt-get (as root, or with sudo) unless --no-apt;
#  - torch (python/requirements.txt) when missing, the example's requirements
#    (examples/pretrain/requirements.txt: numpy, faiss-cpu, matplotlib) when missing;
#  - this clone's lory_torch with `pip install --no-build-isolation .` when `import lory_torch`
#    fails, or always with --reinstall.
#
#   usage: scripts/pretrain.sh [--venv DIR] [--no-apt] [--reinstall] [pretrain.py options]
#     scripts/pretrain.sh                               # the CPU comparison (about 10 minutes on 2 cores)
#     scripts/pretrain.sh --smoke --out build/pretrain-smoke   # CI: a tiny configuration
#     scripts/pretrain.sh --preset large --device cuda  # a larger model on a GPU
# --venv DIR: create (if needed) and use a virtual environment that sees the system's packages
# (so an installed torch is reused) instead of the current python3. Environment: PYTHON (the
# interpreter, default python3), MAX_JOBS (compiler processes for the extension build).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
py=${PYTHON:-python3}
apt=1
reinstall=0
venv=""
args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --venv) venv=${2:?--venv needs a folder}; shift 2 ;;
    --no-apt) apt=0; shift ;;
    --reinstall) reinstall=1; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
start=$(date +%s)

# The packages the corpus reads (examples/pretrain/corpus.py).
debs=(fortune-mod fortunes fortunes-de fortunes-es fortunes-it python3-doc libc6-dev linux-libc-dev)
if [[ $apt == 1 ]]; then
  missing=()
  for d in "${debs[@]}"; do
    dpkg-query -W -f='${Status}' "$d" 2>/dev/null | grep -q "install ok installed" || missing+=("$d")
  done
  if [[ ${#missing[@]} -gt 0 ]]; then
    sudo=""
    if [[ $(id -u) != 0 ]]; then
      command -v sudo >/dev/null || { echo "error: installing ${missing[*]} needs root (or sudo); or pass --no-apt" >&2; exit 1; }
      sudo=sudo
    fi
    echo "== apt-get install ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

if [[ -n $venv ]]; then
  if [[ ! -x $venv/bin/python ]]; then
    echo "== creating the virtual environment $venv (it sees the system's packages)"
    "$py" -m venv --system-site-packages "$venv"
    # A new venv's own setuptools may predate bdist_wheel's move into setuptools.
    "$venv/bin/python" -m pip install --quiet wheel
  fi
  py=$venv/bin/python
fi

if ! "$py" -c "import torch" >/dev/null 2>&1; then
  echo "== installing torch (python/requirements.txt)"
  "$py" -m pip install --quiet -r python/requirements.txt
fi
if ! "$py" -c "import numpy, faiss, matplotlib" >/dev/null 2>&1; then
  echo "== installing examples/pretrain/requirements.txt"
  "$py" -m pip install --quiet -r examples/pretrain/requirements.txt
fi
if [[ $reinstall == 1 ]] || ! (cd /tmp && "$py" -c "import lory_torch, lory_torch._C") >/dev/null 2>&1; then
  export PATH="/usr/local/cuda/bin:$PATH"
  if ! "$py" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    export LORY_TORCH_CPU_ONLY=${LORY_TORCH_CPU_ONLY:-1}  # no GPU: the CPU ops are all that can run
  fi
  echo "== pip install --no-build-isolation . (lory_torch; compiles the extension, a few minutes)"
  MAX_JOBS=${MAX_JOBS:-2} "$py" -m pip install --quiet --no-build-isolation --no-deps . 2>&1 | grep -vE "Running pip as" || true
  (cd /tmp && "$py" -c "import lory_torch._C") || { echo "error: lory_torch did not install" >&2; exit 1; }
fi
echo "== setup: $(( $(date +%s) - start )) s"

"$py" examples/pretrain/pretrain.py "${args[@]}"
