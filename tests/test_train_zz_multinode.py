"""Two Ray "nodes" (ray.cluster_utils.Cluster: head + one node, 1 CPU each): the 2 workers
land on different nodes and training completes. Runs in a subprocess with its own cluster so
it never meets the session's shared one."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {tests!r})
    import ray
    from ray.cluster_utils import Cluster
    from train_helpers import tiny_config
    from imram_dist.train.driver import train

    cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 1}})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address)
    try:
        cfg = tiny_config({cache!r}, {storage!r}, "twonode", **{{"train.epochs": 1}})
        out = train(cfg)
        nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        print("RESULT " + json.dumps({{"workers": out.best_metrics["worker_nodes"].split(","),
                                      "nodes": nodes, "epochs": len(out.history),
                                      "export": out.local_export_path}}))
    finally:
        ray.shutdown()
        cluster.shutdown()
""")


def test_two_nodes(tmp_path):
    import os

    tests = os.path.dirname(os.path.abspath(__file__))
    script = SCRIPT.format(tests=tests, cache=str(tmp_path / "cache"), storage=str(tmp_path / "runs"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=400)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    res = json.loads(line[len("RESULT "):])
    assert len(res["nodes"]) == 2
    assert len(set(res["workers"])) == 2 and set(res["workers"]) == set(res["nodes"]), res
    assert res["epochs"] == 1 and os.path.exists(res["export"])
