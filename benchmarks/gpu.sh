#!/usr/bin/env bash
# Run the attention and ViT benchmarks on one CUDA GPU in one short call (a few minutes on an H100):
# fp32, fp16 and bf16 attention, FNA through torch.compile, fp32 and bf16 ViTs, all timed with CUDA events.
# CSVs and the printed tables go to ${OUT:-benchmarks/out}. Python: $PYTHON, else .venv/bin/python, else python.
#
#   bash benchmarks/gpu.sh
#   OUT=/tmp/res bash benchmarks/gpu.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
out_dir="${OUT:-benchmarks/out}"
mkdir -p "$out_dir"

if [[ -n "${PYTHON:-}" ]]; then
    py="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
    py=.venv/bin/python
else
    py=python
fi

if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L
else
    echo "nvidia-smi not found" >&2
fi
"$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "torch sees no CUDA device")'

start=$SECONDS
sizes=1024,2048,4096,8192,16384

step() {  # step NAME ARGS...: run one benchmark, keep its table next to its CSV
    local name=$1
    shift
    echo "== $name ($((SECONDS - start)) s elapsed)"
    if ! "$py" "$@" --device cuda --csv "$out_dir/$name.csv" 2>"$out_dir/$name.log" | tee "$out_dir/$name.txt"; then
        echo "== $name failed; last lines of $out_dir/$name.log:" >&2
        tail -n 20 "$out_dir/$name.log" >&2
        return 1
    fi
}

step attention_fp32 benchmarks/attention.py --sizes "$sizes" --dtype float32 --repeats 20
step attention_fp16 benchmarks/attention.py --sizes "$sizes" --dtype float16 --repeats 20
step attention_bf16 benchmarks/attention.py --sizes "$sizes" --dtype bfloat16 --repeats 20
# torch.compile of the FNA call (one compile per size and method, so two sizes only)
step attention_bf16_compiled benchmarks/attention.py --sizes 4096,16384 --dtype bfloat16 --repeats 20 \
    --methods exact,fna:m=64,fna:m=64,landmarks=random --compile --no-memory
step vit_fp32 benchmarks/vit.py --sizes 224,448,896 --dtype float32 --repeats 20
step vit_bf16 benchmarks/vit.py --sizes 224,448,896 --dtype bfloat16 --repeats 20

echo "== done in $((SECONDS - start)) s; results in $out_dir"
