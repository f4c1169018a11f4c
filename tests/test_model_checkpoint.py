"""Authors' checkpoints (model_best.pth.tar) and our inference checkpoints."""

from __future__ import annotations

import argparse
import os

import imram_oracle as oracle
import pytest
import torch

from imram_dist.config import ModelConfig
from imram_dist.model import (
    IMRAM,
    CheckpointError,
    load_inference_checkpoint,
    load_reference_checkpoint,
    save_inference_checkpoint,
)

D_IMG, D, WORD, VOCAB = 10, 8, 6, 25
EXECUTED = []


def _side_effect(*args):
    EXECUTED.append(args)
    return args


class Sneaky:
    """Unpickling this would call _side_effect: a stand-in for arbitrary code in a pickle."""

    def __reduce__(self):
        return (_side_effect, ("pwned",))


def authors_opt(**over) -> argparse.Namespace:
    """The Namespace the authors' train_gpus.py pickles, with their f30k script's flags."""
    opt = dict(data_path="../../data", data_name="f30k_precomp", vocab_path="vocab", margin=0.2,
               num_epochs=30, batch_size=128, word_dim=WORD, embed_size=D, grad_clip=2.0, num_layers=1,
               learning_rate=0.0002, lr_update=15, workers=10, log_step=10, val_step=5000,
               logger_name="runs/x", model_name="runs/x", resume="", max_violation=True, img_dim=D_IMG,
               no_imgnorm=False, no_txtnorm=False, raw_feature_norm="clipped_l2norm", agg_func="Mean",
               cross_attn="t2i", precomp_enc_type="basic", bi_gru=True, lambda_lse=6.0,
               lambda_softmax=9.0, pos_emb=False, gpuid="0,1", model_mode="full_IMRAM", iteration_step=3,
               no_IMRAM_norm=True, vocab_size=VOCAB)
    opt.update(over)
    return argparse.Namespace(**opt)


def source_model(seed=0) -> IMRAM:
    torch.manual_seed(seed)
    return IMRAM(ModelConfig(image_dim=D_IMG, embed_size=D, word_dim=WORD, vocab_size=VOCAB))


def write_authors_ckpt(path, model, opt, legacy=False):
    state = {f"module.{k}": v.clone() for k, v in model.state_dict().items()}
    torch.save({"epoch": 12, "model": state, "best_rsum": 471.3, "opt": opt}, path,
               _use_new_zipfile_serialization=not legacy)


def batch():
    g = torch.Generator().manual_seed(5)
    return (torch.randn(3, 4, D_IMG, generator=g), torch.randint(0, VOCAB, (4, 6), generator=g),
            torch.tensor([6, 2, 4, 3]))


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("mode,steps,no_norm,lam", [("full_IMRAM", 3, True, 9.0), ("text_IMRAM", 2, False, 11.0),
                                                    ("image_IMRAM", 1, True, 4.0)])
def test_authors_checkpoint_round_trip(tmp_path, legacy, mode, steps, no_norm, lam):
    src = source_model()
    path = tmp_path / "model_best.pth.tar"
    write_authors_ckpt(path, src, authors_opt(model_mode=mode, iteration_step=steps, no_IMRAM_norm=no_norm,
                                              lambda_softmax=lam), legacy=legacy)
    model, cfg = load_reference_checkpoint(path)
    assert (cfg.mode, cfg.steps, cfg.lambda_softmax, cfg.renorm_query) == \
        ({"full_IMRAM": "full", "text_IMRAM": "text", "image_IMRAM": "image"}[mode], steps, lam, not no_norm)
    assert (cfg.embed_size, cfg.image_dim, cfg.word_dim, cfg.vocab_size) == (D, D_IMG, WORD, VOCAB)
    assert not model.training
    saved = src.state_dict()
    for name, p in model.state_dict().items():
        assert torch.equal(p, saved[name]), name
    regions, tokens, lengths = batch()
    with torch.no_grad():
        torch.testing.assert_close(model(regions, tokens, lengths), oracle.forward(model, regions, tokens, lengths),
                                   rtol=0, atol=1e-5)


def test_unprefixed_state_dict_is_accepted(tmp_path):
    src = source_model()
    torch.save({"model": src.state_dict(), "opt": authors_opt(), "epoch": 1, "best_rsum": 0.0},
               tmp_path / "m.pth")
    model, _ = load_reference_checkpoint(tmp_path / "m.pth")
    assert torch.equal(model.gate_i2t.weight, src.gate_i2t.weight)


@pytest.mark.parametrize("over,names", [
    (dict(raw_feature_norm="softmax"), ["raw_feature_norm"]),
    (dict(num_layers=2), ["num_layers"]),
    (dict(bi_gru=False), ["bi_gru"]),
    (dict(precomp_enc_type="weight_norm"), ["precomp_enc_type"]),
    (dict(no_imgnorm=True, no_txtnorm=True), ["no_imgnorm", "no_txtnorm"]),
    (dict(model_mode="vse"), ["model_mode"]),
    (dict(iteration_step=0), ["iteration_step"]),
])
def test_unsupported_options_are_refused_by_name(tmp_path, over, names):
    path = tmp_path / "m.pth.tar"
    write_authors_ckpt(path, source_model(), authors_opt(**over))
    with pytest.raises(CheckpointError) as err:
        load_reference_checkpoint(path)
    for name in names:
        assert name in str(err.value)


def test_options_that_disagree_with_the_weights_are_refused(tmp_path):
    path = tmp_path / "m.pth.tar"
    write_authors_ckpt(path, source_model(), authors_opt(embed_size=D * 2))
    with pytest.raises(CheckpointError, match="embed_size"):
        load_reference_checkpoint(path)


def test_missing_or_extra_weights_are_refused(tmp_path):
    src = source_model()
    state = {f"module.{k}": v for k, v in src.state_dict().items() if not k.startswith("gate_i2t")}
    state["module.txt_enc.rnn.weight_ih_l1"] = torch.zeros(3)
    torch.save({"model": state, "opt": authors_opt()}, tmp_path / "m.pth")
    with pytest.raises(CheckpointError, match=r"missing \['gate_i2t.weight', 'gate_i2t.bias'\].*weight_ih_l1"):
        load_reference_checkpoint(tmp_path / "m.pth")


def test_a_pickle_with_an_arbitrary_class_is_refused(tmp_path):
    path = tmp_path / "evil.pth.tar"
    src = source_model()
    torch.save({"model": {f"module.{k}": v for k, v in src.state_dict().items()}, "opt": Sneaky()}, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_reference_checkpoint(path)
    torch.save({"format": "imram-dist/inference/1", "x": Sneaky()}, tmp_path / "evil2.pt")
    with pytest.raises(CheckpointError, match="refused"):
        load_inference_checkpoint(tmp_path / "evil2.pt")
    assert EXECUTED == []


def test_inference_checkpoint_round_trip(tmp_path):
    torch.manual_seed(3)
    model = IMRAM(ModelConfig(image_dim=D_IMG, embed_size=D, word_dim=WORD, vocab_size=VOCAB, mode="text",
                              steps=2, renorm_query=True))
    vocab = {"word2idx": {"<pad>": 0, "<start>": 1}, "idx2word": {"0": "<pad>", "1": "<start>"}, "idx": 2}
    config = {"model": {"mode": "text"}, "train": {"lr": 2e-4}, "data": {"root": ""}}
    path = tmp_path / "sub" / "best.pt"
    save_inference_checkpoint(path, model, {"config": config, "vocab": vocab, "epoch": 4})
    assert sorted(os.listdir(path.parent)) == ["best.pt"]  # no temp file left behind
    loaded, extra = load_inference_checkpoint(path)
    assert extra["config"] == config and extra["vocab"] == vocab and extra["epoch"] == 4
    assert extra["model_config"]["mode"] == "text" and loaded.config == model.config
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b) and b.dtype == torch.float32, n
    regions, tokens, lengths = batch()
    with torch.no_grad():
        assert torch.equal(loaded(regions, tokens, lengths), model.eval()(regions, tokens, lengths))
    # the docs/interfaces.md call form (path, model, config_dict, vocab); bf16 weights come back fp32
    save_inference_checkpoint(path, model.to(torch.bfloat16), config, vocab)
    loaded, extra = load_inference_checkpoint(path)
    assert extra["config"] == config and extra["vocab"] == vocab
    assert loaded.gate_t2i.weight.dtype == torch.float32


def test_inference_checkpoint_refuses_non_plain_extras_and_foreign_files(tmp_path):
    with pytest.raises(TypeError, match=r"extra\['vocab'\].*plain data"):
        save_inference_checkpoint(tmp_path / "x.pt", source_model(), {"vocab": object()})
    write_authors_ckpt(tmp_path / "a.pth.tar", source_model(), authors_opt())
    with pytest.raises(CheckpointError, match="load_reference_checkpoint"):
        load_inference_checkpoint(tmp_path / "a.pth.tar")
