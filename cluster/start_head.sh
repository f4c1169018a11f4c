#!/usr/bin/env bash
# Head node of a hand-started imram-dist cluster (no cluster launcher, no Kubernetes).
#
#   export RAY_AUTH_TOKEN=$(ray get-auth-token --generate)   # once; give the same token to every node
#   cluster/start_head.sh                                       # on the head machine
#   cluster/start_worker.sh HEAD_IP:6379                        # on each GPU machine
#   cluster/start_mlflow.sh                                     # on the head machine
#
# The head trains nothing: Ray sees no GPUs on it, and it is the only node offering the custom
# resource `trial_driver` that Tune's trial drivers take 0.01 of. The dashboard (and the Jobs API
# behind it) listens on 127.0.0.1 only; reach it with `ssh -L 8265:127.0.0.1:8265 HEAD`.
# Extra arguments go to `ray start` (the local test passes its own ports, --temp-dir, --num-cpus
# and --block). Stop with `ray stop` on each machine.
set -euo pipefail
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
exec ray start --head --num-gpus=0 --resources='{"trial_driver": 100}' \
    --dashboard-host=127.0.0.1 "$@"
