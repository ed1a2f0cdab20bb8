#!/usr/bin/env bash
# kvblend's CUDA paths in one prepared run, for when a GPU machine is lent.
#
#   bash scripts/gpu_check.sh                 # on the GPU machine, from the repository root
#   DEVICE=cpu SHAPE=tiny bash scripts/gpu_check.sh   # the same steps on a CPU, in a minute (a dry run)
#
# 1. installs kvblend (no dependencies) over the machine's own torch, triton and transformers, plus
#    the wheels carried in .whl/ for packages the machine lacks (as of 2026-11: pydantic,
#    pydantic-core, annotated-types, typing-inspection and gguf; `pip download --no-deps` them for
#    its Python, see the device tool's README);
# 2. runs the Triton kernels' tests against their torch references on the device;
# 3. saves a random-weight Llama of SHAPE (8b: Llama-3-8B's shape in bf16; 1b: Llama-3.2-1B's;
#    tiny) with a byte-level tokenizer, and runs `kvblend bench` on it: full prefill, reuse and
#    blend TTFT on contexts cut from the bundled MuSiQue passages. Random weights make the speed
#    figures real and the quality ones meaningless (quality is measured on CPU with the real model).
# vLLM's CUDA build is not installed here: its wheel is larger than what such a machine can be sent.
# Results go to $OUT (the device tool's folder) or out/gpu.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
SHAPE=${SHAPE:-8b}
OUT=${OUT:-out/gpu}
SITE=${SITE:-/tmp/kvblend-site}
mkdir -p "$OUT"

extra=()
if compgen -G ".whl/*.whl" >/dev/null; then extra=(.whl/*.whl); fi
$PY -m pip install -q --no-index --no-deps --no-build-isolation --upgrade --target "$SITE" . "${extra[@]}"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
KVBLEND=("$PY" -c "from kvblend.cli import app; app()")

{ nvidia-smi || true; $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"; } \
  2>&1 | tee "$OUT/machine.txt"

if [ "$DEVICE" != cpu ]; then  # on a CPU the kernel tests run under Triton's interpreter in the test suite
  $PY -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tee "$OUT/kernel_tests.txt"
fi

MODEL="${TMPDIR:-/tmp}/kvblend-random-$SHAPE"
$PY - "$MODEL" "$SHAPE" "$DEVICE" <<'EOF'
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, "tests")
from tiny import byte_tokenizer

folder, shape, device = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
shapes = {  # hidden, layers, heads, kv heads, MLP width
    "8b": (4096, 32, 32, 8, 14336), "1b": (2048, 16, 32, 8, 8192), "tiny": (256, 4, 8, 2, 1024)}
hidden, layers, heads, kv_heads, mlp = shapes[shape]
if not (folder / "config.json").exists():
    tok = byte_tokenizer()
    cfg = AutoConfig.for_model(
        model_type="llama", vocab_size=len(tok), hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=32768, rope_theta=500000.0,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
print(folder)
EOF

dtype=bfloat16; [ "$DEVICE" = cpu ] && dtype=float32
contexts=4096,8192; [ "$SHAPE" = tiny ] && contexts=1024
"${KVBLEND[@]}" bench --model "$MODEL" --device "$DEVICE" --dtype "$dtype" --context-tokens "$contexts" \
  --ratios 0.05,0.15,0.3 --repeats 5 --json "$OUT/bench_$SHAPE.json" 2>&1 | tee "$OUT/bench_$SHAPE.txt"
echo "gpu_check: done; results in $OUT"
