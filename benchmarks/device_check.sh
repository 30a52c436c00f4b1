#!/usr/bin/env bash
# The GPU check: on a machine with one or more CUDA GPUs, runs every CUDA test (pytest -m cuda) and the
# benchmarks in their short GPU mode within 8 minutes, and writes ONE Markdown table of figures to stdout and
# to $OUT/device_check.md ($OUT set) or reports/device_check.md; the steps' logs go next to it.
#
#   bash benchmarks/device_check.sh            # on the GPU machine; exit 1 if a CUDA test failed
#   bash benchmarks/device_check.sh --dry-run  # anywhere: lists the steps, exits 0
#
# Installs nothing beyond requirements.txt: `make install` when .venv is missing (DEVICE_CHECK_PYTHON names
# another interpreter that already has them). The steps and the table: benchmarks/device_check.py.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

dry_run=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) dry_run=1 ;;
        -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "device_check.sh: unknown argument '$arg' (use --dry-run or no argument)" >&2; exit 2 ;;
    esac
done

export YOLO_OFFLINE=1 HF_HUB_OFFLINE=1 DVC_NO_ANALYTICS=1 YOLO_CONFIG_DIR="$PWD/.ultralytics" MPLBACKEND=Agg
python="${DEVICE_CHECK_PYTHON:-.venv/bin/python}"

if [ "$dry_run" = 1 ]; then
    if [ ! -x "$python" ]; then
        echo "would run: make install (no $python yet)"
        python=python3
    fi
    exec "$python" benchmarks/device_check.py --dry-run
fi

if [ ! -x "$python" ]; then
    echo "[device check] no $python: make install (requirements.txt only)"
    make install
fi
export PATH="$(dirname "$python"):$PATH"  # torchrun and pytest of the same environment

echo "[device check] device:"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=index,name,driver_version,memory.total,power.limit,clocks.max.sm --format=csv || true
    nvidia-smi --query-gpu=index,name,utilization.gpu,memory.used --format=csv,noheader || true
else
    echo "nvidia-smi not found"
fi
exec "$python" benchmarks/device_check.py
