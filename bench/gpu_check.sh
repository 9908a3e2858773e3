#!/usr/bin/env bash
# koala's GPU check, in one go on a CUDA host that has its own torch and no network (about 5 minutes on one H100/H200):
#   1. the CUDA-only tests (CUDA graphs decode as eager; speculative equals autoregressive in each dtype; a replay's
#      outputs survive the next; draft trees under CUDA graphs),
#   2. `bench/decode.py --device cuda` on the default target: the cost by width, then autoregressive, the best chain
#      and the best draft tree under CUDA graphs (compile mode) and eager, as JSON.
#
# Prepare here (network): bash ../shared/offline-bundle.sh pydantic==2.12.5 pydantic-core==2.41.5 \
#     annotated-types==0.7.0 typing-inspection==0.4.2          (the wheels the host lacks, and the target's GGUF)
# Run there, from the project root, with .bundle carried:  bash bench/gpu_check.sh [OUT_DIR]
# Environment: DRAFTER (default truncate:4), DTYPES (default bfloat16), MODES (default compile,eager), PROMPTS (8),
# DEVICE (default cuda; cpu runs the same steps here as a dry run), PYTHON (default python3).
set -euo pipefail
py=${PYTHON:-python3}
out=${1:-${OUT:-runs/gpu-check}}
device=${DEVICE:-cuda}
mkdir -p "$out"
site=${KOALA_SITE:-$HOME/site}
if [ -d .bundle/whl ]; then
  "$py" -m pip install -q --no-index --no-deps --target "$site" .bundle/whl/*.whl
  export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
target=${TARGET:-smollm2-135m-instruct}
if [ -f .bundle/smol.part.aa ]; then
  target="$out/SmolLM2-135M-Instruct.Q4_1.gguf"
  [ -f "$target" ] || cat .bundle/smol.part.* > "$target"
  if [ -f .bundle/smol.sha256 ]; then
    echo "$(cat .bundle/smol.sha256)  $target" | sha256sum -c --quiet -
  fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 KOALA_CACHE=${KOALA_CACHE:-$out/cache}
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')" | tee "$out/env.txt"

start=$(date +%s)
echo "== CUDA-only tests"
"$py" -m pytest -q -p no:cacheprovider tests/koala/engine/test_compiled.py tests/koala/engine/test_tree.py \
  -k "cuda" --junitxml="$out/cuda-tests.xml" 2>&1 | tail -n 15 | tee "$out/cuda-tests.txt" || true

echo "== decode: autoregressive, chain, tree ($device)"
timeout ${DECODE_TIMEOUT:-330} "$py" bench/decode.py --target "$target" --device "$device" \
  --dtypes "${DTYPES:-bfloat16}" --modes "${MODES:-compile,eager}" --drafter "${DRAFTER:-truncate:4}" \
  --prompts "${PROMPTS:-8}" --out "$out/decode-$device.json" 2>&1 | tail -n 40 | tee "$out/decode.txt"
echo "== done in $(( $(date +%s) - start )) s; JSON: $out/decode-$device.json"
