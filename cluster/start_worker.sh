#!/usr/bin/env bash
# A GPU worker of a hand-started imram-dist cluster (see start_head.sh): joins the head at
# HEAD_IP:PORT and offers all its GPUs (detected by Ray) and CPUs. Needs the head's token in
# RAY_AUTH_TOKEN (or ~/.ray/auth_token). Extra arguments go to `ray start`.
set -euo pipefail
if [[ $# -lt 1 || "$1" == -* ]]; then
    echo "usage: $0 HEAD_IP:PORT [ray start options]" >&2
    exit 2
fi
address="$1"; shift
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
# Multi-node NCCL: not loopback, not docker bridges; a dead peer raises instead of hanging.
export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-^lo,docker}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
exec ray start --address="$address" "$@"
