"""Screenshots of the MLflow UI for a real search, as a user sees it (headless Chromium).

    python docs/screenshots.py sqlite:////path/to/mlflow.db [--experiment imram] [--search NAME] [--out docs/img]

Starts `mlflow ui` on 127.0.0.1 for that store, opens the experiment's runs table (child runs
expanded) and its chart view, and writes runs.png and charts.png. Needs Debian's `chromium`
(apt-get install chromium)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shoot(browser: str, url: str, out: Path, size: str = "1800,1100") -> None:
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size={size}", "--virtual-time-budget=60000", "--run-all-compositor-stages-before-draw",
                    f"--screenshot={out}", url],
                   check=True, capture_output=True, timeout=180)
    print(f"wrote {out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("uri")
    p.add_argument("--experiment", default="imram")
    p.add_argument("--search", default="", help="the search (tune.name) to show; default: the newest")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "img"))
    args = p.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        sys.exit("needs chromium: apt-get install chromium")
    from mlflow.tracking import MlflowClient

    exp = MlflowClient(args.uri).get_experiment_by_name(args.experiment)
    if exp is None:
        sys.exit(f"no experiment {args.experiment!r} in {args.uri}")
    port = free_port()
    ui = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", args.uri, "--host", "127.0.0.1",
                           "--port", str(port), "--workers", "1"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          env=dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"))
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(base + "/health", timeout=2)
                break
            except Exception:
                if time.time() > deadline:
                    sys.exit("mlflow ui did not start")
                time.sleep(0.5)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        client = MlflowClient(args.uri)
        which = f" and attributes.run_name = '{args.search}'" if args.search else ""
        search = client.search_runs([exp.experiment_id], filter_string=f"tags.`imram.kind` = 'search'{which}",
                                    order_by=["attributes.start_time DESC"], max_results=1)
        if not search:
            sys.exit(f"no search in experiment {args.experiment!r}")
        trials = client.search_runs([exp.experiment_id],
                                    filter_string=f"tags.`mlflow.parentRunId` = '{search[0].info.run_id}'")
        ids = urllib.parse.quote(json.dumps([t.info.run_id for t in trials]))
        shoot(browser, f"{base}/#/experiments/{exp.experiment_id}/runs", out / "mlflow_runs.png")
        # MLflow's compare page: the trials' params and metrics side by side, parallel coordinates
        shoot(browser, f"{base}/#/compare-runs?runs={ids}&experiments={urllib.parse.quote(json.dumps([exp.experiment_id]))}",
              out / "mlflow_compare.png", size="1800,2200")
        shoot(browser, f"{base}/#/experiments/{exp.experiment_id}/runs?compareRunsMode=CHART", out / "mlflow_charts.png")
    finally:
        ui.terminate()
        ui.wait(timeout=20)


if __name__ == "__main__":
    main()
