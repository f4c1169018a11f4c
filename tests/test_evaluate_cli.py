"""End to end: an authors'-format checkpoint on a tiny converted precomp dataset, through
``python -m imram_dist.evaluate``, and the CLI's errors for bad input."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from imram_dist.config import ModelConfig

WORDS = "a man dog cat runs sits on the grass red blue ball with two people street car".split()
N_TEST, R, D, E, WD = 10, 5, 16, 24, 8


def _caption(rng: np.random.Generator) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(3, 9)))) + "."


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    from imram_dist.data import Vocabulary

    base = tmp_path_factory.mktemp("evalcli")
    src = base / "f30k_precomp"
    src.mkdir()
    rng = np.random.default_rng(0)
    np.save(src / "test_ims.npy", rng.normal(size=(N_TEST, R, D)).astype(np.float32))
    (src / "test_caps.txt").write_text("\n".join(_caption(rng) for _ in range(5 * N_TEST)) + "\n")
    (src / "test_ids.txt").write_text("\n".join(str(1000 + i) for i in range(N_TEST)) + "\n")
    np.save(src / "dev_ims.npy", rng.normal(size=(6, R, D)).astype(np.float32))  # 1:1 split
    (src / "dev_caps.txt").write_text("\n".join(_caption(rng) for _ in range(6)) + "\n")
    vocab = Vocabulary(WORDS + ["."])
    vocab_path = base / "f30k_precomp_vocab.json"
    vocab.save(str(vocab_path))
    out = base / "shards"
    subprocess.run([sys.executable, "-m", "imram_dist.data", "convert-precomp", str(src), str(out),
                    "--vocab", str(vocab_path), "--samples-per-shard", "4", "--dtype", "float32"],
                   check=True, capture_output=True)

    # The authors' model_best.pth.tar: DataParallel keys, argparse options, epoch, best_rsum.
    from imram_dist.model import IMRAM

    torch.manual_seed(0)
    cfg = ModelConfig(image_dim=D, embed_size=E, word_dim=WD, vocab_size=len(vocab), steps=3, lambda_softmax=9.0)
    model = IMRAM(cfg).eval()
    opt = argparse.Namespace(
        data_name="f30k_precomp", model_mode="full_IMRAM", iteration_step=3, lambda_softmax=9.0, embed_size=E,
        img_dim=D, word_dim=WD, vocab_size=len(vocab), num_layers=1, bi_gru=True, raw_feature_norm="clipped_l2norm",
        precomp_enc_type="basic", no_imgnorm=False, no_txtnorm=False, no_IMRAM_norm=True, margin=0.2,
        max_violation=True, batch_size=128, learning_rate=2e-4,
    )
    ckpt = base / "model_best.pth.tar"
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}, "opt": opt,
                "epoch": 12, "best_rsum": 123.4}, ckpt)
    bad = base / "wide.pth.tar"
    wide = IMRAM(ModelConfig(image_dim=2 * D, embed_size=E, word_dim=WD, vocab_size=len(vocab))).eval()
    torch.save({"model": {f"module.{k}": v for k, v in wide.state_dict().items()},
                "opt": argparse.Namespace(**{**vars(opt), "img_dim": 2 * D}), "epoch": 1, "best_rsum": 0.0}, bad)
    return {"root": out, "ckpt": ckpt, "wide": bad, "model": model, "base": base}


def test_reference_checkpoint_end_to_end(dataset, tmp_path):
    from imram_dist.data import load_eval_split
    from imram_dist.evaluate import retrieval_metrics

    js, sims, rep = tmp_path / "out.json", tmp_path / "sims.npy", tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "imram_dist.evaluate", "--reference", str(dataset["ckpt"]), "--data",
         str(dataset["root"]), "--split", "test", "--protocol", "f30k", "--workers", "2", "--json", str(js),
         "--save-sims", str(sims), "--report", str(rep), "--no-progress", "eval.block_images=3",
         "eval.block_captions=7", "eval.report_queries=4"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "image->text" in proc.stdout and "rsum" in proc.stdout
    out = json.loads(js.read_text())
    assert out["protocol"] == "f30k" and out["images"] == N_TEST and out["captions"] == 5 * N_TEST
    assert out["workers"] == 2 and out["pairs"] == 5 * N_TEST ** 2
    # Independent check: the same model scored in one shot, metrics from the saved matrix.
    split = load_eval_split(str(dataset["root"]), "test", dtype="float32")
    m = dataset["model"]
    with torch.no_grad():
        direct = m.similarity(m.encode_images(split.regions), m.encode_captions(split.tokens, split.lengths),
                              split.lengths).numpy()
    saved = np.load(sims)
    np.testing.assert_allclose(saved, direct, atol=1e-5, rtol=0)
    assert out["metrics"] == pytest.approx(retrieval_metrics(saved, np.arange(5 * N_TEST) // 5))
    report = json.loads((rep / "report.json").read_text())
    assert len(report["image_to_text"]) == 4 and len(report["text_to_image"]) == 4
    q = report["image_to_text"][0]
    assert len(q["top"]) == 5 and q["image_id"].startswith("10") and q["top"][0]["text"]
    assert "| rank |" in (rep / "report.md").read_text()


def _main(args: list[str], capsys) -> tuple[int, str]:
    from imram_dist.evaluate.cli import main

    rc = main(args + ["--no-progress"])
    return rc, capsys.readouterr().err


def test_cli_errors(dataset, capsys):
    ref, root = str(dataset["ckpt"]), str(dataset["root"])
    rc, err = _main(["--reference", ref, "--data", root, "--split", "testall"], capsys)
    assert rc == 2 and "split 'testall' is not in" in err and "test" in err
    rc, err = _main(["--reference", ref, "--data", root, "--split", "dev", "--protocol", "f30k"], capsys)
    assert rc == 2 and "5 captions per image" in err
    rc, err = _main(["--reference", str(dataset["wide"]), "--data", root, "--split", "test"], capsys)
    assert rc == 2 and "32-dim region features" in err and "16-dim" in err
    rc, err = _main(["--reference", str(dataset["base"] / "missing.pth.tar"), "--data", root], capsys)
    assert rc == 2 and "does not exist" in err
    rc, err = _main(["--reference", ref, "--data", root, "eval.block_imgs=3"], capsys)
    assert rc == 2 and "unknown config key" in err
    rc, err = _main(["--reference", ref, "--data", str(dataset["base"] / "nowhere")], capsys)
    assert rc == 2 and "dataset" in err
    # the convention of every CLI: flags are shorthands for keys, errors name both
    rc, err = _main(["--data", root], capsys)
    assert rc == 2 and "give exactly one model: --checkpoint PATH (eval.checkpoint)" in err and "got 0" in err
    rc, err = _main(["--reference", ref, f"eval.checkpoint={ref}", "--data", root], capsys)
    assert rc == 2 and "got 2" in err
    rc, err = _main(["--reference", ref, "--data", root, "--workers", "0"], capsys)
    assert rc == 2 and "eval.workers: expected at least 1, got 0" in err
    rc, err = _main(["--reference", ref, "--data", root, "--split"], capsys)
    assert rc == 2 and "--split needs a value (it sets eval.split)" in err
    rc, err = _main(["--reference", ref, "--data", root, "--worker", "2"], capsys)
    assert rc == 2 and "unknown flag '--worker'" in err


def test_cli_flags_are_config_keys(capsys):
    from imram_dist.config import parse_cli
    from imram_dist.evaluate.cli import SHORTHANDS, main

    by_flags = parse_cli(["--checkpoint", "m.pt", "--split", "dev", "--workers", "3", "--no-progress",
                          "--json", "o.json"], "imram_dist.evaluate", "", SHORTHANDS)
    by_keys = parse_cli(["eval.checkpoint=m.pt", "eval.split=dev", "eval.workers=3", "eval.progress=false",
                         "eval.json_path=o.json"], "imram_dist.evaluate", "", SHORTHANDS)
    assert by_flags == by_keys and by_flags.eval.workers == 3 and by_flags.eval.progress is False
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m imram_dist.evaluate [--config PRESET_OR_FILE] [--checkpoint CHECKPOINT]")
    assert "--no-progress" in out and "eval.progress  (default True)" in out and "eval.model_uri=''" in out


def test_cli_one_to_one_and_inference_checkpoint(dataset, tmp_path, capsys, monkeypatch):
    """A 1:1 split with auto protocol, from an imram-dist inference checkpoint (in-process)."""
    from imram_dist.data import read_manifest
    from imram_dist.model import save_inference_checkpoint

    path = tmp_path / "export" / "model_best.pt"
    vocab = read_manifest(str(dataset["root"])).load_vocab()
    save_inference_checkpoint(path, dataset["model"], {"note": "test"}, vocab.to_json())
    js = tmp_path / "o.json"
    from imram_dist.evaluate.cli import main

    rc = main(["--checkpoint", str(path.parent), "--data", str(dataset["root"]), "--split", "dev",
               "--json", str(js), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    out = json.loads(js.read_text())
    assert out["protocol"] == "1to1" and out["images"] == 6 and out["captions"] == 6
    assert 0 <= out["metrics"]["rsum"] <= 600
    assert out["precision"] == "fp32"
    assert out["device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # eval.device=auto
    assert not any("bf16" in note for note in out["notes"])
    # eval.precision=bf16: scored in bf16, recorded in the output, with a note that says to use fp32
    # where torch can only emulate bf16 matmuls on this CPU (an AVX2-only x86 CPU); the second run
    # pretends the opposite of what this CPU is, so both branches run on every machine
    from imram_dist.model import kernels

    slow_here = out["device"] == "cpu" and not kernels.cpu_bf16_matmul_native()
    for slow in (slow_here, not slow_here and out["device"] == "cpu"):
        monkeypatch.setattr(kernels, "cpu_bf16_matmul_native", lambda slow=slow: not slow)
        rc = main(["--checkpoint", str(path.parent), "--data", str(dataset["root"]), "--split", "dev",
                   "--json", str(js), "--no-progress", "eval.precision=bf16"])
        assert rc == 0, capsys.readouterr().err
        printed = capsys.readouterr().out
        assert "pairs/s scoring in bf16" in printed
        saved = json.loads(js.read_text())
        assert saved["precision"] == "bf16"
        noted = [n for n in saved["notes"] if n.startswith("eval.precision=bf16: this CPU has no bf16 matmul")]
        assert len(noted) == slow and ("use fp32 on this machine" in noted[0] if slow else True), saved["notes"]
        assert (f"note: {noted[0]}" in printed) if slow else "eval.precision=bf16" not in printed
    rc = main(["--checkpoint", str(path.parent), "--data", str(dataset["root"]), "--split", "dev",
               "--no-progress", "eval.precision=fp16"])
    assert rc == 2 and "eval.precision" in capsys.readouterr().err


def test_model_registry_uri(dataset, tmp_path, monkeypatch):
    """models:/name@alias resolves to the consolidated checkpoint logged as a run artifact."""
    import mlflow

    from imram_dist.evaluate.loading import load_model
    from imram_dist.model import save_inference_checkpoint

    monkeypatch.chdir(tmp_path)  # the default artifact root (./mlruns) lands here
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    ckpt = tmp_path / "export" / "model_best.pt"
    save_inference_checkpoint(ckpt, dataset["model"], {"note": "registry"}, None)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("eval-registry")
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(ckpt), artifact_path="model")
        source = mlflow.get_artifact_uri("model")
    client = mlflow.MlflowClient()
    client.create_registered_model("imram-test")
    version = client.create_model_version("imram-test", source, run_id=run.info.run_id)
    client.set_registered_model_alias("imram-test", "champion", version.version)
    model, info = load_model(model_uri="models:/imram-test@champion")
    assert info["source"].startswith("models:/imram-test@champion")
    ref = dataset["model"].state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())


def test_cli_device(dataset, tmp_path, capsys, monkeypatch):
    """--device (eval.device) says where to score and is recorded; asking for CUDA where torch sees
    no GPU is an error that names the key and says why, before any model or data is loaded."""
    from imram_dist.evaluate.cli import main

    ref, root, js = str(dataset["ckpt"]), str(dataset["root"]), tmp_path / "o.json"
    rc = main(["--reference", ref, "--data", root, "--split", "dev", "--device", "cpu", "--json", str(js),
               "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert "pairs/s scoring in fp32 on cpu, 1 worker" in capsys.readouterr().out
    assert json.loads(js.read_text())["device"] == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without a GPU
    rc, err = _main(["--reference", str(dataset["base"] / "missing.pth.tar"), "--data", root, "--device", "cuda"],
                    capsys)
    assert rc == 2 and "eval.device=cuda: torch sees no CUDA GPU here" in err and "eval.device=cpu or auto" in err
    rc, err = _main(["--reference", ref, "--data", root, "--device", "tpu"], capsys)
    assert rc == 2 and "eval.device" in err and "tpu" in err
