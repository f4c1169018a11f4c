"""Credentials stay in the environment of the processes that use them: a training run on S3
storage succeeds while its secret is in no Ray object, no stored object, no export and no file of
Ray's session folder (logs and state)."""

from __future__ import annotations

import pytest
from conftest import SECRET_MARKER, assert_no_secret, ray_session_dir
from train_helpers import tiny_config

pytestmark = pytest.mark.slow


def test_s3_training_run_leaves_the_secret_nowhere(ray_cluster, s3_bucket, tmp_path):
    import os

    import boto3
    import ray

    from imram_dist.train.driver import build_trainer, prepare_data, train

    assert os.environ["AWS_SECRET_ACCESS_KEY"] == SECRET_MARKER  # the credential the workers use
    cfg = tiny_config(tmp_path / "cache", f"s3://{s3_bucket}/secret-runs", "secrets",
                      **{"train.epochs": 1, "run.export_path": str(tmp_path / "export" / "best.pt")})
    root, _, _ = prepare_data(cfg)
    shipped = ray.cloudpickle.dumps(build_trainer(cfg, root))  # what goes to Train's controller
    assert SECRET_MARKER.encode() not in shipped and b"testing" not in shipped

    out = train(cfg)
    assert out.best_metrics["rsum"] > 0 and out.history[-1]["epoch"] == 1

    s3 = boto3.client("s3")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="secret-runs/")["Contents"]]
    assert any(k.endswith("model_fp32.pt") for k in keys)
    for key in keys:
        assert SECRET_MARKER.encode() not in s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read(), key
    assert assert_no_secret(tmp_path / "export", ray_session_dir()) > 10
