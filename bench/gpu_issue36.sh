#!/usr/bin/env bash
# Every GPU figure issue 36 needs, in ONE device call (about 9 minutes of the lent machine's time).
#
# First, here:   bash devtools/gpu_wheels.sh      (wheels into .whl/, trimmed ComfyUI 0.3.75 into .gpu/comfyui,
#                                                  a PyAV stand-in into .gpu/stubs; prints what travels, < 64 MiB)
# Then the device call (the `run` tool):
#     command:   bash bench/gpu_issue36.sh
#     carry:     [".whl", ".gpu"]
#     timeout_s: 600
# What comes back under $OUT (7 files, at most 8 may):
#     env.txt            nvidia-smi, torch's version and device, the ComfyUI used, which packages import
#     entropy.log        python3 -m bench.bench_entropy_attention --skip-quality      (1024² and 2048²)
#     tiled_bf16.log     python3 -m bench.bench_tiled_vae                             (bf16, up to 4096²)
#     tiled_fp32.log     python3 -m bench.bench_tiled_vae --fp32 --sizes 2048
#     tiled_profile.log  python3 -m bench.bench_tiled_vae --profile --sizes 4096      (bf16, torch.profiler)
#     kgen.log           python3 -m bench.bench_kgen_probe
#     summary.txt        each step's exit status and seconds (124/137: it hit its time box)
# Each step has its own time box (`timeout`), cut further so the steps after it keep their minimum share of the
# total (TOTAL_S, default 540 s), so one hang cannot eat the rest. Every log ends with its run's JSON line.
#
# A CPU rehearsal of the script's logic (small sizes, --cpu, the help of the benchmarks owned elsewhere; ONLY
# names the steps to run, TOTAL_S the whole budget):
#     OUT=/tmp/gpu36 GPU_SMOKE=1 PY=.venv/bin/python SITE=/tmp/site-smoke bash bench/gpu_issue36.sh
#     OUT=/tmp/gpu36 GPU_SMOKE=1 PY=.venv/bin/python SITE=/tmp/site-smoke ONLY="tiled_bf16 tiled_profile" bash bench/gpu_issue36.sh
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:?OUT must name the folder the logs go to (the device machine sets it)}
mkdir -p "$OUT"
PY=${PY:-python3}
SITE=${SITE:-/tmp/site}
TOTAL_S=${TOTAL_S:-540}
START=$(date +%s)
export PYTHONUNBUFFERED=1
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"

# (i) The carried wheels (the device README's recipe), into $SITE.
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    && export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" \
    || { echo "wheel install failed" | tee -a "$SUMMARY"; exit 1; }
fi

# (ii) ComfyUI: the trimmed copy that travels (.gpu/comfyui), else $ZIMAGE_COMFYUI_DIR, else .comfyui/.
if [ -f .gpu/comfyui/comfy/sd.py ]; then
  export ZIMAGE_COMFYUI_DIR="$REPO/.gpu/comfyui"
elif [ -n "${ZIMAGE_COMFYUI_DIR:-}" ] && [ -f "$ZIMAGE_COMFYUI_DIR/comfy/sd.py" ]; then
  :
elif [ -f .comfyui/comfy/sd.py ]; then
  export ZIMAGE_COMFYUI_DIR="$REPO/.comfyui"
else
  echo "no ComfyUI: run devtools/gpu_wheels.sh here and carry .gpu" | tee -a "$SUMMARY"
  exit 1
fi
# PyAV: comfy_api imports it at start; where it is missing, the stand-in (after everything else on the path).
if ! "$PY" -c 'import av' >/dev/null 2>&1 && [ -d .gpu/stubs/av ]; then
  export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$REPO/.gpu/stubs"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

{
  echo "date: $(date -u +%FT%TZ)"
  echo "host: $(uname -m), $(nproc) cpus"
  (timeout 30 nvidia-smi || echo "no nvidia-smi") 2>&1
  timeout 60 "$PY" -c 'import torch; print(torch.__version__); print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")' 2>&1
  "$PY" --version 2>&1
  echo "ZIMAGE_COMFYUI_DIR=$ZIMAGE_COMFYUI_DIR"
  echo "PYTHONPATH=$PYTHONPATH"
  timeout 60 "$PY" - <<'EOF' 2>&1
import importlib
for name in ("torchsde", "trampoline", "av", "einops", "transformers", "tokenizers", "sentencepiece", "safetensors",
             "aiohttp", "yaml", "PIL", "scipy", "psutil", "matplotlib", "pynvml"):
    try:
        m = importlib.import_module(name)
        print(f"{name} {getattr(m, '__version__', '')} {getattr(m, '__file__', '')}")
    except Exception as e:  # noqa: BLE001
        print(f"{name} MISSING: {e!r}")
EOF
} >"$OUT/env.txt" 2>&1
echo "setup $(($(date +%s) - START)) s" | tee -a "$SUMMARY"

# (iii) The runs. step NAME CAP_S RESERVE_S CMD...: time box min(CAP_S, time left - RESERVE_S), RESERVE_S being the
# least the steps after this one keep.
step() {
  local name=$1 cap=$2 reserve=$3
  shift 3
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then
    return
  fi
  local left=$((TOTAL_S - ($(date +%s) - START)))
  local box=$((left - reserve < cap ? left - reserve : cap))
  if [ "$box" -lt 20 ]; then
    echo "$name: skipped, ${left} s left of ${TOTAL_S}" | tee -a "$SUMMARY"
    return
  fi
  echo "=== $name: $* (time box ${box} s)" | tee "$OUT/$name.log"
  local t0=$(date +%s)
  timeout -k 10 "$box" "$@" 2>&1 | tee -a "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "$name: rc=$rc, $(($(date +%s) - t0)) s (box ${box} s): $*" | tee -a "$SUMMARY"
}

if [ -n "${GPU_SMOKE:-}" ]; then  # the CPU rehearsal: same steps, small and short
  step entropy 400 200 "$PY" -m bench.bench_entropy_attention --cpu --quick --skip-quality --keep-ratios 0.4
  step tiled_bf16 200 140 "$PY" -m bench.bench_tiled_vae --cpu --nano-sizes 128 --sizes 128 --tile 64
  step tiled_fp32 120 80 "$PY" -m bench.bench_tiled_vae --cpu --fp32 --nano-sizes 128 --sizes 128 --tile 64
  step tiled_profile 300 20 "$PY" -m bench.bench_tiled_vae --cpu --profile --sizes 128 --tile 64 --profile-rows 8
  step kgen 30 0 "$PY" -m bench.bench_kgen_probe --help
else
  step entropy 180 300 "$PY" -m bench.bench_entropy_attention --skip-quality
  step tiled_bf16 110 200 "$PY" -m bench.bench_tiled_vae
  step tiled_fp32 60 140 "$PY" -m bench.bench_tiled_vae --fp32 --sizes 2048
  step tiled_profile 90 60 "$PY" -m bench.bench_tiled_vae --profile --sizes 4096
  step kgen 150 0 "$PY" -m bench.bench_kgen_probe
fi
echo "total $(($(date +%s) - START)) s" | tee -a "$SUMMARY"
