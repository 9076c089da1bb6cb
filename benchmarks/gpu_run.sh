#!/usr/bin/env bash
# The GPU check as the device tool runs it, from the repository root, with timeout_s 540 (the run
# stops itself after --budget 450 s plus interpreter start-up; JSON, .md and log land in $OUT):
#
#   bash benchmarks/gpu_run.sh                              # every section
#   bash benchmarks/gpu_run.sh --sections environment,decode  # arguments go on to gpu.py
#   bash benchmarks/gpu_run.sh --sections environment,decode --decode-big-only  # 7B rows only (~3 min)
#   bash benchmarks/gpu_run.sh --decode-small-only          # every section, decode without the 7B rows
#
# Optional: an xformers wheel left untracked in the repository root (e.g. xformers-0.0.35-py39-none-
# manylinux_2_28_x86_64.whl, 3.1 MiB; never commit it) travels with the working tree and is
# installed offline into /tmp first, so the attention section compares it too. 0.0.35's kernels are
# built for torch 2.10 + CUDA 12.8; on a CUDA 13 image the section records whether they load.
set -o pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then  # carried wheels of packages the image lacks (none needed now)
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
for whl in xformers-*.whl; do
  [ -f "$whl" ] && pip install -q --no-deps --no-index --target /tmp/xformers "$whl" && export PYTHONPATH=/tmp/xformers${PYTHONPATH:+:$PYTHONPATH}
done
PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 python3 benchmarks/gpu.py --budget 450 --out "$OUT/gpu.json" "$@" 2>&1 | tee "$OUT/gpu.log"
