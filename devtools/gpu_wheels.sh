#!/usr/bin/env bash
# Prepare, HERE (a machine with pip and the network), what bench/gpu_issue36.sh needs on the lent GPU machine,
# which has torch 2.11 (cu130), Python 3.12 and many packages but no ComfyUI and no network:
#
#   .whl/                 wheels of the Python packages that ComfyUI 0.3.75's in-process import needs and the
#                         GPU image lacks (/work/.library/device/KINDS.md lists what it has): torchsde (comfy.samplers,
#                         via comfy.k_diffusion.sampling) and its trampoline. `av` (PyAV, imported by comfy_api.latest)
#                         is missing there too, but its wheel alone is 36 MB (bundled FFmpeg): over the 64 MiB the
#                         working tree may take with it. The benchmarks never touch video, so a stub stands in (below).
#                         Not needed in-process: comfyui-frontend-package, -workflow-templates, -embedded-docs (the
#                         server's), alembic/SQLAlchemy (app.database), spandrel/kornia (comfy_extras nodes the benchmarks
#                         do not import), pydantic (comfy_api_nodes). The rest of requirements.txt is in the image.
#   .gpu/comfyui/         ComfyUI 0.3.75 (a copy of .comfyui/) trimmed to what `import comfy.sd, nodes, comfy_extras`
#                         needs: no __pycache__, tests, or tokenizer files of other models (17 MB); the Z-Image
#                         tokenizer (qwen25_tokenizer) stays, for the k_gen probe's nano text encoder.
#   .gpu/stubs/av/        a stand-in for PyAV: its module names import, and any use says PyAV is not installed.
#
# Both folders are ignored (.whl/ by .gitignore, .gpu/ added to .git/info/exclude here), so they travel only when
# the device call names them in `carry`: [".whl", ".gpu"]. Run from the repo root:  bash devtools/gpu_wheels.sh
# It prints the size of what travels (tracked and untracked-not-ignored files + .whl + .gpu) against 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${COMFYUI_SRC:-.comfyui}
PY=${PYTHON:-python3}

mkdir -p .git/info
touch .git/info/exclude
grep -qx '/.gpu/' .git/info/exclude || echo '/.gpu/' >>.git/info/exclude
grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >>.git/info/exclude

# 1. Wheels (pure Python, py3-none-any; the platform flags are the device README's, for any future binary one).
mkdir -p .whl
WHEELS=("torchsde==0.2.6" "trampoline==0.1.2")
for spec in "${WHEELS[@]}"; do
  name=${spec%%==*}
  if ls .whl/"${name}"-*.whl >/dev/null 2>&1; then
    echo "have $(ls .whl/"${name}"-*.whl)"
    continue
  fi
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$spec"
done
ls -l .whl

# 2. The trimmed ComfyUI.
if [ ! -f "$SRC/comfy/sd.py" ] || [ ! -f "$SRC/nodes.py" ]; then
  echo "no ComfyUI at $SRC (set COMFYUI_SRC, or run install.py to provision .comfyui/)" >&2
  exit 1
fi
rm -rf .gpu/comfyui
mkdir -p .gpu/comfyui
tar -C "$SRC" -cf - \
  --exclude='__pycache__' --exclude='*.pyc' --exclude='./.git' --exclude='./tests' --exclude='./tests-unit' \
  --exclude='./script_examples' --exclude='./custom_nodes/*' --exclude='./output/*' --exclude='./temp/*' \
  --exclude='./user/*' \
  --exclude='./comfy/text_encoders/llama_tokenizer' --exclude='./comfy/text_encoders/t5_tokenizer' \
  --exclude='./comfy/text_encoders/t5_pile_tokenizer' --exclude='./comfy/text_encoders/ace_lyrics_tokenizer' \
  --exclude='./comfy/text_encoders/hydit_clip_tokenizer' --exclude='./comfy/text_encoders/byt5_tokenizer' \
  --exclude='./comfy/sd1_tokenizer' \
  . | tar -C .gpu/comfyui -xf -
mkdir -p .gpu/comfyui/custom_nodes

# 3. The PyAV stand-in (used on the GPU machine only when `import av` fails there).
mkdir -p .gpu/stubs/av/subtitles
cat >.gpu/stubs/av/__init__.py <<'EOF'
"""Stand-in for PyAV on the lent GPU machine (devtools/gpu_wheels.sh): ComfyUI's comfy_api imports it at start,
the benchmarks never use video. Every name exists; using one raises."""


class _Missing:
    def __init__(self, *args, **kwargs):
        raise ImportError("PyAV is not installed here (a stand-in module from devtools/gpu_wheels.sh)")


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return type(name, (_Missing,), {})


def open(*args, **kwargs):  # noqa: A001 - PyAV's own name
    raise ImportError("PyAV is not installed here (a stand-in module from devtools/gpu_wheels.sh)")
EOF
for mod in container.py subtitles/__init__.py subtitles/stream.py; do
  echo 'from av import __getattr__  # noqa: F401 - any name is a class that raises when used' >.gpu/stubs/av/$mod
done

# 4. What travels, against the device's 64 MiB.
tracked=$(git ls-files -z | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
untracked=$(git ls-files -z --others --exclude-standard | xargs -0 -r stat -c %s | awk '{s+=$1} END {print s+0}')
carried=$(find .whl .gpu -type f -print0 | xargs -0 stat -c %s | awk '{s+=$1} END {print s+0}')
total=$((tracked + untracked + carried))
printf 'travels: tracked %.1f MiB + untracked-not-ignored %.1f MiB + .whl/.gpu %.1f MiB = %.1f MiB (limit 64 MiB)\n' \
  "$(echo "$tracked / 1048576" | bc -l)" "$(echo "$untracked / 1048576" | bc -l)" \
  "$(echo "$carried / 1048576" | bc -l)" "$(echo "$total / 1048576" | bc -l)"
if [ "$total" -gt $((64 * 1048576)) ]; then
  echo "over 64 MiB: the device call would be refused" >&2
  exit 1
fi
