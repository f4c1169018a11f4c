#!/usr/bin/env bash
# The MLflow tracking server of a hand-started cluster, on the head: bound to 127.0.0.1 (only the
# head's trial drivers log to it; you reach the UI with `ssh -L 5000:127.0.0.1:5000 HEAD`).
#   cluster/start_mlflow.sh [STORE_DIR] [ARTIFACTS] [PORT]
# STORE_DIR holds the sqlite backend store (default ~/imram-mlflow); ARTIFACTS is where the
# server keeps artifacts (default STORE_DIR/artifacts; an s3:// prefix works, with the head's
# own AWS credentials). Runs in the foreground: start it under nohup, tmux or systemd.
set -euo pipefail
store="${1:-$HOME/imram-mlflow}"
mkdir -p "$store"
store="$(cd "$store" && pwd)"
artifacts="${2:-$store/artifacts}"
port="${3:-5000}"
# One worker and no job-execution workers: 2 processes, ~0.5 GB (STACK_NOTES).
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
exec mlflow server --backend-store-uri "sqlite:///$store/mlflow.db" \
    --artifacts-destination "$artifacts" --host 127.0.0.1 --port "$port" --workers 1
