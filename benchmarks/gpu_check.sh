#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU, CuPy and PyTorch, in one go
# (about 7 minutes on one H100; each step has a time limit, so it ends within 8):
#
#   1. install the project (pip install -e . --no-deps);
#   2. run the CuPy cases of the test suite on the GPU (pytest -k cupy);
#   3. time every registered model in minicnn (CuPy) against PyTorch on the same
#      GPU (benchmarks/bench_gpu.py: each engine in fresh processes, alternated
#      over rounds, synchronised timers, warm-up; medians and per-round ratios);
#   4. train on the real CIFAR-10 for a short while: lenet for 5 epochs, and one
#      epoch of airnet's recipe (--model airnet --width 32 ...).
#
# Every step's output goes to the screen and to a log in the log folder ($OUT
# if set, else runs/gpu-check); summary.txt there says what passed. The exit
# code is 0 only if every step passed. Where CuPy sees no GPU it stops at once
# (exit code 2), before installing or writing anything.
#
#   bash benchmarks/gpu_check.sh               # on the GPU machine
#   bash benchmarks/gpu_check.sh --smoke       # anywhere: the script itself, end to end
#
# CIFAR-10 comes from --data-dir DIR, else MINICNN_DATA, else the parts that
# ../shared/tools/device-data staged under .device-data/p*/ (gathered here into
# .device-data/cifar-10-batches-py; see ../shared/DEVICE.md for carrying them to
# the GPU machine). Without it, step 4 is skipped and says so.
#
# --smoke runs every step without a GPU, in seconds, to show that the script
# works but for the GPU itself: the install goes into a throwaway virtual
# environment (the current one is left as it is), the tests, the benchmark and
# the training use the test suite's CuPy stand-in (tests/fake_cupy.py, NumPy
# underneath; MINICNN_FAKE_CUPY), PyTorch runs on the CPU, and everything is
# tiny. tests/test_gpu_check.py runs it.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

smoke=0
data_dir=""
while (($#)); do
    case "$1" in
        --smoke) smoke=1 ;;
        --data-dir) data_dir="${2:?--data-dir needs a folder}"; shift ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        *) echo "gpu_check: unknown option $1 (use --smoke, --data-dir DIR)" >&2; exit 2 ;;
    esac
    shift
done

python=${PYTHON:-python}
if ((!smoke)) && ! "$python" -c "import cupy, sys; sys.exit(cupy.cuda.runtime.getDeviceCount() < 1)" \
        2> /dev/null; then                  # nothing installed or written where it cannot run
    echo "gpu_check: CuPy sees no GPU here; run it on the GPU machine, or use --smoke" >&2
    exit 2
fi

logs="${OUT:-runs/gpu-check}"
mkdir -p "$logs"
logs=$(cd "$logs" && pwd)
summary="$logs/summary.txt"
: > "$summary"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
device_data="${DEVICE_DATA:-.device-data}"
failures=0

# step NAME LIMIT COMMAND...: run it with a time limit, tee its output to NAME.log,
# record the outcome in summary.txt.
step() {
    local name=$1 limit=$2
    shift 2
    echo "=== $name: $* (limit ${limit}s)" | tee "$logs/$name.log"
    local started=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$logs/$name.log"
    local code=${PIPESTATUS[0]}
    local took=$((SECONDS - started))
    local outcome="passed"
    if ((code == 124 || code == 137)); then
        outcome="STOPPED at its ${limit}s limit"
    elif ((code != 0)); then
        outcome="FAILED (exit code $code)"
    fi
    ((code == 0)) || failures=$((failures + 1))
    echo "$name: $outcome in ${took}s" | tee -a "$summary"
}

skip() {
    echo "$1: skipped ($2)" | tee -a "$summary"
}

if ((smoke)); then
    echo "gpu_check: SMOKE run (no GPU: the CuPy stand-in, PyTorch on the CPU, tiny sizes)" \
        | tee -a "$summary"
    export MINICNN_FAKE_CUPY=tests.fake_cupy
fi

# Steps that are shell functions run in a child bash (timeout runs programs, not
# functions): they and what they read are exported.
export smoke logs python
# --- 0. what this machine is ------------------------------------------------------------
show_environment() {
    date -u
    command -v nvidia-smi > /dev/null && nvidia-smi || echo "nvidia-smi: not here"
    "$python" - <<'EOF'
import platform, sys
print("python", sys.version.split()[0], platform.machine())
for name in ("numpy", "cupy", "torch"):
    try:
        module = __import__(name)
        print(name, module.__version__, module.__file__)
    except Exception as exc:                      # any failure to import: say so, go on
        print(name, "not importable:", exc)
try:
    import torch
    print("torch sees CUDA:", torch.cuda.is_available(),
          torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
except Exception as exc:
    print("torch CUDA check failed:", exc)
from minicnn import backend
print("minicnn backend auto ->", backend.use("auto"),
      "(MINICNN_FAKE_CUPY=" + repr(__import__("os").environ.get("MINICNN_FAKE_CUPY")) + ")")
EOF
}
export -f show_environment
step 0-environment 60 bash -c show_environment

# --- 1. install ---------------------------------------------------------------------------
install_project() {
    if ((smoke)); then              # the same command, in a throwaway environment
        rm -rf "$logs/smoke-venv"
        "$python" -m venv --system-site-packages --without-pip "$logs/smoke-venv" || return 1
        python="$logs/smoke-venv/bin/python"
    fi
    # offline first (the build tools already here), else as ../shared/DEVICE.md says
    "$python" -m pip install -e . --no-deps --no-build-isolation --no-index \
        || "$python" -m pip install -e . --no-deps || return 1
    (cd / && PYTHONPATH= "$python" -c "import minicnn; print('installed: minicnn',
minicnn.__version__, 'from', minicnn.__file__)")
}
export -f install_project
step 1-install 120 bash -c install_project
if ((smoke)) && [ -x "$logs/smoke-venv/bin/python" ]; then
    python="$logs/smoke-venv/bin/python"
fi

# --- 2. the CuPy cases of the test suite -------------------------------------------------
if ((smoke)); then
    tests=(tests/test_cupy_paths.py -k "study or command_line")
else
    tests=(-k cupy)
fi
cupy_tests() {               # the CuPy cases skip where CuPy sees no GPU: refuse that here
    "$python" -c "from minicnn import backend; import sys; sys.exit(0 if backend.cupy_available()
else 'CuPy or a GPU is not usable here: the CuPy cases would only skip')" || return 1
    "$python" -m pytest -q -p no:cacheprovider -rs "$@"
}
export -f cupy_tests
export python
step 2-cupy-tests 170 bash -c 'cupy_tests "$@"' cupy_tests "${tests[@]}"

# --- 3. minicnn against PyTorch on the GPU -----------------------------------------------
if ((smoke)); then
    bench=(--smoke --rounds 1 --batch 4 --infer-batch 4 --warmup 0 --seconds 0.01)
else
    bench=(--rounds 4 --warmup 0.75 --seconds 0.75)
fi
step 3-bench 150 "$python" benchmarks/bench_gpu.py "${bench[@]}" --json "$logs/bench.json"

# --- 4. a short training run on the real CIFAR-10 ----------------------------------------
find_data() {
    if [ -n "$data_dir" ]; then echo "$data_dir"; return; fi
    if [ -n "${MINICNN_DATA:-}" ]; then echo "$MINICNN_DATA"; return; fi
    local gathered="$device_data/cifar-10-batches-py"
    if compgen -G "$device_data/p*/cifar-10-batches-py" > /dev/null; then
        mkdir -p "$gathered"
        cp -l "$device_data"/p*/cifar-10-batches-py/* "$gathered/" 2> /dev/null \
            || cp "$device_data"/p*/cifar-10-batches-py/* "$gathered/"
    fi
    if [ -f "$gathered/test_batch" ]; then echo "$gathered"; fi
}
data=$(find_data)
if [ -z "$data" ]; then
    skip 4-train "no CIFAR-10: give --data-dir, set MINICNN_DATA, or stage .device-data"
else
    echo "gpu_check: CIFAR-10 from $data" | tee -a "$summary"
    if ((smoke)); then
        lenet=(--epochs 1 --batch-size 16 --limit 64)
        airnet=(--width 2 --epochs 1 --batch-size 16 --limit 64)
    else
        lenet=(--epochs 5)
        airnet=(--width 32 --epochs 1 --batch-size 256 --lr 0.2 --momentum 0.9 --nesterov
                --weight-decay 5e-4 --no-decay-norm-bias --schedule linear --warmup 0.2
                --label-smoothing 0.2 --crop-padding 2 --tta --seed 0)
    fi
    step 4-train-lenet 75 "$python" examples/train_cifar.py --backend cupy --data-dir "$data" \
        --model lenet "${lenet[@]}" --no-progress --force --out "$logs/lenet_gpu.npz"
    step 4-train-airnet 75 "$python" examples/train_cifar.py --backend cupy --data-dir "$data" \
        --model airnet "${airnet[@]}" --no-progress --force --out "$logs/airnet_gpu.npz"
fi

if ((smoke)); then rm -rf "$logs/smoke-venv"; fi
echo "=== summary ($logs/summary.txt)"
cat "$summary"
((failures == 0))
