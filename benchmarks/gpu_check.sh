#!/usr/bin/env bash
# GPU check of the performance work, about 10 minutes on one H100 or H200, installing nothing:
#
#   PYTHONPATH=src bash benchmarks/gpu_check.sh
#
# 1. env     the card (torch.cuda.get_device_name), torch/CUDA, which optional modules are present
# 2. tests   the CUDA-marked tests (pytest -m cuda): bf16 autocast vs fp32, compile vs eager, a training
#            run on the GPU with at most one host-device sync per step, a sync-free sampling loop
# 3. train   the official 256-over-64 architecture: training-step throughput in fp32, bf16, bf16
#            channels_last and compiled bf16 (compile time apart), MFU against the card's bf16 peak,
#            peak memory, and a single-level 256 px UNet of the same widths
# 4. sample  sampling latency per step of the official 256 model and the tiny preset (batched guidance
#            vs two forwards, fp32 vs bf16)
# 5. archs   benchmarks/architectures.py on the GPU (issue 19): the training and guided sampling step of
#            the architectures users bring, fp32 / bf16 / bf16 channels_last, each path in its own
#            process, ratios with spreads, the bf16 path's MFU; rows print as they finish (150 s limit)
#
# Each part runs under its own time limit and is skipped, with the reason, when what it needs is
# missing (no GPU, pytest absent, a module matryoshka imports absent). Results: $OUT if set (the device
# tool's output folder), else ./gpu_check_out: gpu_check.md (everything) and one log per part.
set -u

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
out="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$out"
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
report="$out/gpu_check.md"
python="${PYTHON:-python}"
started=$(date +%s)

{
  echo "# gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  echo "commit: $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown); host: $(hostname); $(nproc) CPUs"
  echo
} > "$report"

# part NAME SECONDS COMMAND...: run with a time limit, keep its log, append it to the report.
part() {
  local name="$1" limit="$2"
  shift 2
  local begin=$(date +%s)
  echo ">>> $name (limit ${limit} s)" >&2
  timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  local took=$(( $(date +%s) - begin ))
  {
    cat "$out/$name.log"
    echo
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
      echo "**$name: stopped at its ${limit} s limit** (the lines above are what it finished)"
    else
      echo "_${name}: exit status ${rc}, ${took} s_"
    fi
    echo
  } >> "$report"
  echo "<<< $name: exit ${rc}, ${took} s" >&2
  return "$rc"
}

skip() {
  printf '## %s\n\nskipped: %s\n\n' "$1" "$2" >> "$report"
  echo "--- $1 skipped: $2" >&2
}

gpu=1
if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  gpu=0
fi

part env 60 "$python" "$here/gpu_check.py" env
package_ok=$?

if [ "$gpu" -eq 0 ]; then
  skip tests "no CUDA device visible to torch"
  skip train "no CUDA device visible to torch"
  skip sample "no CUDA device visible to torch"
  skip archs "no CUDA device visible to torch"
elif [ "$package_ok" -ne 0 ]; then
  skip tests "matryoshka does not import (see env: a module it needs is missing)"
  skip train "matryoshka does not import"
  skip sample "matryoshka does not import"
  skip archs "matryoshka does not import"
else
  if "$python" -c "import pytest" 2>/dev/null; then
    # Every test file with CUDA-marked tests (tests/test_performance_paths.py and any others).
    mapfile -t cuda_files < <(grep -l "mark.cuda" "$root"/tests/test_*.py)
    { echo "## CUDA tests"; echo; echo '```'; } >> "$report"
    part tests 130 "$python" -m pytest -q -rs -m cuda -p no:cacheprovider "${cuda_files[@]}"
    echo '```' >> "$report"
  else
    skip tests "pytest is not installed (nothing is installed by this script)"
  fi
  part train 220 "$python" "$here/gpu_check.py" train
  part sample 100 "$python" "$here/gpu_check.py" sample
  { echo "## Every architecture (benchmarks/architectures.py --device cuda)"; echo; } >> "$report"
  part archs 150 "$python" "$here/architectures.py" --device cuda --archs tiny three_level video_tiny official256 \
    official64 --paths fp32 bf16 bf16+cl --rounds 5 --calls 5 --threads 4 --official-batch 4
fi

total=$(( $(date +%s) - started ))
echo "total: ${total} s" >> "$report"
echo "report: $report (total ${total} s)" >&2
