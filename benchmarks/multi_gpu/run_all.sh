#!/usr/bin/env bash
# Every multi-GPU measurement of issue 14 on one host, from the repository root:
#
#     bash benchmarks/multi_gpu/run_all.sh GPUS [OUT] [SCRIPT...]    # GPUS: 1, 2, 4 or 8; OUT default: $OUT
#
# One torchrun per measurement; each writes OUT/<name>.json (meta: device, driver, torch, CUDA, NCCL, the
# command, the NVLS variables) and OUT/<name>.log. SCRIPT... picks some of: correctness replacements kill
# delay bandwidth step_time (default: all; kill and delay need 2 GPUs or more). A failing run does not stop
# the others; the exit status says whether any failed. EXTRA_ARGS is appended to every command (e.g.
# EXTRA_ARGS=--small for a CPU smoke run of this script with gloo).
set -uo pipefail
GPUS=${1:?usage: run_all.sh GPUS [OUT] [SCRIPT...]}
OUT=${2:-${OUT:?pass OUT or set \$OUT}}
shift $(( $# < 2 ? $# : 2 ))
NAMES=${*:-correctness replacements kill delay bandwidth step_time}

# NVLink multicast stays off (NCCL's NVLS, torch's symmetric memory, NVSHMEM).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT"
{
    date -u +%Y-%m-%dT%H:%M:%SZ
    if command -v nvidia-smi > /dev/null; then
        nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
        nvidia-smi topo -m
    fi
    python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl',
               torch.cuda.nccl.version() if torch.cuda.is_available() else None)"
} > "$OUT/versions.txt" 2>&1

LAST=$((GPUS - 1))
status=0
run() {  # run NAME SCRIPT [ARGS...]
    local name=$1 script=$2
    shift 2
    echo "== $name: torchrun --standalone --nproc-per-node $GPUS -m benchmarks.multi_gpu.$script $* ${EXTRA_ARGS:-} --out $OUT/$name.json"
    # shellcheck disable=SC2086  # EXTRA_ARGS is a list of words
    torchrun --standalone --nproc-per-node "$GPUS" -m "benchmarks.multi_gpu.$script" "$@" ${EXTRA_ARGS:-} --out "$OUT/$name.json" \
        > "$OUT/$name.log" 2>&1 || { status=1; echo "   $name failed: tail of $OUT/$name.log"; tail -n 20 "$OUT/$name.log"; }
}
for name in $NAMES; do
    case $name in
        correctness) run correctness correctness ;;
        replacements) run replacements replacements ;;
        kill | delay)
            if [ "$GPUS" -lt 2 ]; then echo "== $name: skipped (needs 2 GPUs or more)"; continue; fi
            if [ "$name" = kill ]; then
                run kill replacements --migrations 40 --at 20 --kill-rank "$LAST" --migration-timeout-s 10
            else
                run delay replacements --migrations 40 --at 20 --delay-rank "$LAST" --delay-s 20 --migration-timeout-s 10
            fi ;;
        bandwidth) run bandwidth bandwidth ;;
        step_time) run step_time step_time ;;
        *) echo "unknown measurement $name; pick from: correctness replacements kill delay bandwidth step_time"; status=2 ;;
    esac
done
exit $status
