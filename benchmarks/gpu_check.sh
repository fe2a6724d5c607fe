#!/usr/bin/env bash
# The prepared device run for the runtime issue (one call of the `device` tool, timeout_s 600; its
# steps are capped at 100 + 280 + 160 s to stay inside that): versions; the compiled kernels
# against the torch reference at every width, scheme and dtype; the Triton kernels at Mixtral-8x7B
# layer shapes, timed against bf16 experts and the HBM bandwidth; a sweep of tile candidates
# against the shipped ones. Run from the repository root on the lent GPU machine (its python3 has
# torch, triton and transformers; nothing is installed):
#     bash benchmarks/gpu_check.sh          # logs and JSON go to $OUT (or runs/gpu here)
set -uo pipefail
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
OUT="${OUT:-runs/gpu}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
cd benchmarks || exit 1
# Correctness of the compiled kernels (the tests check only the interpreter's results).
timeout 100 python3 moe_kernel.py --device cuda --part check --scale 4 --tokens 3,300 2>&1 | tee "$OUT/check.log"
cp results/moe_kernel_check_cuda.json "$OUT/" 2>/dev/null || echo "no results/moe_kernel_check_cuda.json written"
# Every row also carries max_rel_err, the kernel's output against the torch reference.
timeout 280 python3 moe_kernel.py --device cuda --repeats 20 2>&1 | tee "$OUT/moe_kernel.log"
cp results/moe_kernel_cuda.json "$OUT/" 2>/dev/null || echo "no results/moe_kernel_cuda.json written"
# Tile candidates (compiles 24 candidates; the shipped ones come first in every group).
timeout 160 python3 moe_kernel.py --device cuda --part sweep --tokens 1,8,4096 --repeats 10 2>&1 | tee "$OUT/sweep.log"
cp results/moe_kernel_sweep_cuda.json "$OUT/" 2>/dev/null || echo "no results/moe_kernel_sweep_cuda.json written"
