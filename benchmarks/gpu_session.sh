#!/usr/bin/env bash
# Everything that needs an NVIDIA GPU, in one go: the whole test suite on the cuda backend,
# then every benchmark against PyTorch / cuRAND measured in the same run. Logs go to $OUT
# (or ./out) so they survive a timeout.
#
#   bash benchmarks/gpu_session.sh            # on the GPU machine, from the repository root
#   bash benchmarks/gpu_session.sh tests      # only the suite; `benchmarks` for only the benchmarks
#
# Test dependencies missing there can travel as wheels in .whl/ (see the device notes).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-out}"
mkdir -p "$out"
if ! python3 -c "import hypothesis, pytest, ml_dtypes" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD:$PWD/benchmarks:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 MLMETAL_DEVICE=cuda
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader | tee "$out/tests.log"

part="${1:-all}"
if [ "$part" != benchmarks ]; then
    # pytest-xdist where installed (the lent machines have it): the whole suite took 126 s in 13
    # processes on an H100 (2026-12-07), well inside one 10-minute device call.
    workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n $(( $(nproc) > 13 ? 13 : $(nproc) ))")
    timeout 540 python3 -m pytest tests -q -p no:cacheprovider -rfE $workers 2>&1 | tee -a "$out/tests.log" | tail -15
fi
[ "$part" = tests ] && exit 0
while read -r bench args; do
    echo "== $bench $args"
    echo "== $bench $args" >> "$out/benchmarks.log"
    timeout 240 python3 "benchmarks/$bench.py" $args 2>&1 | tee -a "$out/benchmarks.log" | tail -25
done <<EOF
bench_runtime
bench_random
bench_nn_conv
bench_nn_ops
bench_training --only style,unet,dcgan,gan,style-full,unet-full
bench_training --only style-full,unet-full --precision high --profile
bench_training --only style-full,unet-full --precision highest,high --autocast bfloat16
bench_nn_conv --dtype bfloat16
bench_predicate
bench_strategies --chart $out/strategies-cuda.png
bench_soak --device cuda --steps 10000
bench_replay
EOF
# The denoiser under two matmul precision policies and under bfloat16 autocast, same seed: the
# PSNR each reaches.
for run in "--precision highest" "--precision high" "--autocast bfloat16"; do
    echo "== mlmetal denoise $run" | tee -a "$out/benchmarks.log"
    timeout 240 python3 -m mlmetal denoise --device cuda $run --no-progress \
        --out "$out/denoise-${run##* }" 2>&1 | tee -a "$out/benchmarks.log" | tail -3
done
