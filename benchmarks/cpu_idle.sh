#!/usr/bin/env bash
# The CPU benchmarks the README's performance table and the recall board quote, run in one go on an idle
# machine (nothing else heavy running): recall training speed at 1 and 2 threads, FNA beside the official code,
# and one attention call at N = 257 / 1025 / 4096. CSVs go to ${OUT:-benchmarks/results}; then
# `python benchmarks/perf_table.py --write README.md`. About 15 minutes on 2 cores.
#
#   bash benchmarks/cpu_idle.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${OUT:-benchmarks/results}"
py="${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python)}"
mkdir -p "$out"
uptime
rm -f "$out/recall_train.csv"
for threads in 1 2; do
    "$py" benchmarks/recall_train.py --preset cpu-n5 --threads "$threads" --steps 20 --rounds 3 --csv "$out/recall_train.csv"
done
"$py" benchmarks/official_fna.py --threads-list 1,2 --csv "$out/official_fna_cpu.csv"
"$py" benchmarks/attention.py --sizes 257,1025,4096 --threads 2 --no-memory \
    --methods "exact,fna:m=64,fna:m=64,pinv=newton,fna:m=64,landmarks=random" --csv "$out/attention_cpu.csv"
uptime
