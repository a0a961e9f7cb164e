#!/usr/bin/env bash
# Spark GPU discovery script: prints the GPUs this executor may hand to tasks as
#   {"name": "gpu", "addresses": ["0", "1"]}
# Spark runs it once when an executor (or a standalone worker) starts, named by
# spark.{executor,worker}.resource.gpu.discoveryScript.
#
# Where CUDA_VISIBLE_DEVICES is set (by a scheduler, or by hand), its entries
# are the addresses, so a task is never given a GPU its process cannot see; the
# encoder turns an address back into torch's numbering (deltavec/embed/udf.py,
# cuda_ordinal). Otherwise the addresses are nvidia-smi's indices, which inside a
# container are the GPUs the container runtime exposed. No GPU: no addresses, and
# Spark refuses to start an executor that asked for one, which is the clear
# failure we want.
set -euo pipefail

ids=()
if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
    IFS=',' read -r -a ids <<< "${CUDA_VISIBLE_DEVICES}"
elif command -v nvidia-smi > /dev/null 2>&1; then
    # A failing nvidia-smi (driver not loaded) fails the script, and the executor with it.
    listed="$(nvidia-smi --query-gpu=index --format=csv,noheader)"
    mapfile -t ids <<< "${listed}"
fi

addresses=""
for id in "${ids[@]}"; do
    id="${id//[[:space:]]/}"
    if [[ -n "${id}" ]]; then
        addresses+="${addresses:+, }\"${id}\""
    fi
done
printf '{"name": "gpu", "addresses": [%s]}\n' "${addresses}"
