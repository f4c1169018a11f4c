"""Checkpoint folders in the run's storage: what a complete one holds, finding the newest and
the best (across attempts of a run), and pruning the ones failed attempts left behind."""

from __future__ import annotations

import json
import re
from typing import Any

CKPT_TAG = "ds"
STATE_FILE = "train_state.json"
WEIGHTS_FILE = "model_fp32.pt"


def scan_checkpoints(storage, name: str) -> list[dict[str, Any]]:
    """Complete checkpoints in the run's storage folder, oldest first: each
    {"path", "name", "epochs_done", "rsum", "state"}. A folder missing the training state, the
    weights, the model states or any rank's ZeRO partition (a crash during upload) is skipped."""
    import pyarrow.fs as pafs

    fs = storage.filesystem()
    run = storage.run_path(name)
    try:
        entries = fs.get_file_info(pafs.FileSelector(run, allow_not_found=True))
    except (FileNotFoundError, OSError):
        return []
    out = []
    for e in entries:
        if e.type != pafs.FileType.Directory or not e.base_name.startswith("checkpoint_"):
            continue
        try:
            files = {f.path[len(e.path) + 1:]: f.size
                     for f in fs.get_file_info(pafs.FileSelector(e.path, recursive=True))
                     if f.type == pafs.FileType.File}
            if STATE_FILE not in files or WEIGHTS_FILE not in files:
                continue
            with fs.open_input_stream(f"{e.path}/{STATE_FILE}") as f:
                state = json.loads(f.read())
        except (OSError, ValueError):
            continue
        need = [f"{CKPT_TAG}/mp_rank_00_model_states.pt"]
        if state.get("zero_stage", 0) > 0:
            need += [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(state.get("world_size", 1))]
        if not all(any(f.endswith(n) for f in files) for n in need):
            continue
        recorded = state.get("files", {})  # every rank's files and sizes, written before upload
        if any(files.get(path) not in sizes for path, sizes in recorded.items()):
            continue  # a file is missing or was cut short: not a whole checkpoint
        hist = state.get("history") or [{}]
        out.append({"path": e.path, "name": e.base_name, "epochs_done": int(state.get("epochs_done", 0)),
                    "rsum": float(hist[-1].get("rsum", float("-inf"))), "metrics": hist[-1], "state": state})
    out.sort(key=lambda c: (c["epochs_done"], c["name"]))
    return out


def prune_checkpoints(storage, name: str, keep: int, checkpoints: list[dict[str, Any]]) -> None:
    """Keep the ``keep`` best by dev rsum and the latest (Ray already prunes the checkpoints of
    one fit; this also covers those left by earlier, failed attempts). Folders that Ray's run
    snapshot still references are never deleted."""
    fs = storage.filesystem()
    snap = f"{storage.run_path(name)}/checkpoint_manager_snapshot.json"
    referenced: set[str] = set()
    try:
        with fs.open_input_stream(snap) as f:
            referenced = set(re.findall(r"checkpoint_[0-9][0-9_.:-]*", f.read().decode()))
    except (FileNotFoundError, OSError):
        pass
    if not checkpoints:
        return
    best = sorted(checkpoints, key=lambda c: c["rsum"], reverse=True)[:keep]
    keep_names = {c["name"] for c in best} | {checkpoints[-1]["name"]} | referenced
    for c in checkpoints:
        if c["name"] not in keep_names:
            try:
                fs.delete_dir(c["path"])
            except OSError:
                pass
