"""Bad inputs are refused with a message that says what was expected."""

from __future__ import annotations

import pytest
import torch

from imram_dist.config import ModelConfig
from imram_dist.model import IMRAM, ModelInputError


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return IMRAM(ModelConfig(image_dim=10, embed_size=8, word_dim=6, vocab_size=20, max_caption_len=12))


def good():
    return torch.randn(2, 3, 10), torch.randint(0, 20, (3, 8)), torch.tensor([8, 2, 5])


def test_good_inputs_work_including_minimal_captions(model):
    regions, tokens, _ = good()
    with torch.no_grad():
        assert model(regions, tokens, torch.tensor([1, 2, 8])).shape == (2, 3)
        assert model(regions, tokens, [8, 2, 5]).shape == (2, 3)  # a plain list is fine too


@pytest.mark.parametrize("regions,match", [
    (torch.randn(2, 3, 11), r"\[N, R, 10\].*image_dim=10"),
    (torch.randn(3, 10), r"\[N, R, 10\]"),
    (torch.randint(0, 5, (2, 3, 10)), "floating-point"),
    (torch.randn(2, 0, 10), "at least one region"),
])
def test_bad_regions(model, regions, match):
    _, tokens, lengths = good()
    with pytest.raises(ModelInputError, match=match):
        model(regions, tokens, lengths)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_regions(model, value):
    regions, tokens, lengths = good()
    regions[1, 2, 3] = value
    with pytest.raises(ModelInputError, match="expected finite features"):
        model(regions, tokens, lengths)


@pytest.mark.parametrize("lengths,match", [
    (torch.tensor([8, 0, 5]), "at least 1 token.*empty"),
    (torch.tensor([9, 2, 5]), "at most 8 tokens.*padded width L=8"),
    (torch.tensor([8, 2]), r"one length per caption \(tokens has M=3\)"),
    (torch.tensor([[8, 2, 5]]), "1-D integer tensor"),
    (torch.tensor([8.0, 2.0, 5.0]), "1-D integer tensor"),
])
def test_bad_lengths(model, lengths, match):
    regions, tokens, _ = good()
    with pytest.raises(ModelInputError, match=match):
        model(regions, tokens, lengths)


def test_over_long_caption_for_the_config(model):
    regions = torch.randn(2, 3, 10)
    tokens = torch.randint(0, 20, (1, 20))
    with pytest.raises(ModelInputError, match="at most 12 tokens.*max_caption_len=12"):
        model(regions, tokens, torch.tensor([13]))


@pytest.mark.parametrize("bad_id", [20, -1, 10_000])
def test_token_ids_outside_the_vocabulary(model, bad_id):
    regions, tokens, lengths = good()
    tokens[2, 4] = bad_id
    with pytest.raises(ModelInputError, match=rf"ids in \[0, 20\).*got {bad_id} at caption 2, position 4"):
        model(regions, tokens, lengths)


def test_bad_tokens_dtype(model):
    regions, tokens, lengths = good()
    with pytest.raises(ModelInputError, match=r"integer tensor \[M, L\]"):
        model(regions, tokens.float(), lengths)


def test_bad_embeddings_for_similarity(model):
    img, cap, lengths = torch.randn(2, 3, 8), torch.randn(3, 5, 8), torch.tensor([5, 1, 2])
    with pytest.raises(ModelInputError, match=r"image_emb: expected a float tensor \[\*, \*, 8\]"):
        model.similarity(torch.randn(2, 3, 7), cap, lengths)
    with pytest.raises(ModelInputError, match=r"caption_emb: expected a float tensor \[\*, \*, 8\]"):
        model.similarity(img, torch.randn(3, 5), lengths)
    with pytest.raises(ModelInputError, match="one length per caption"):
        model.similarity(img, cap, torch.tensor([5, 1]))
    with pytest.raises(ModelInputError, match="at most 5 tokens"):
        model.similarity(img, cap, torch.tensor([6, 1, 1]))


def test_bad_config_is_refused():
    """The model runs the config's own checks (one set for every way a config is built): types,
    including the mode Literal, and values."""
    with pytest.raises(ValueError, match=r"model.vocab_size: expected at least 1 once the model is built"):
        IMRAM(ModelConfig(vocab_size=0))
    with pytest.raises(ValueError, match=r"model.steps: expected at least 1, got 0"):
        IMRAM(ModelConfig(vocab_size=5, steps=0))
    with pytest.raises(ValueError, match=r"model.mode: expected one of .*'full'.*got 'fast'"):
        IMRAM(ModelConfig(vocab_size=5, mode="fast"))
    with pytest.raises(ValueError, match=r"model.embed_size: expected an integer, got .32."):
        IMRAM(ModelConfig(vocab_size=5, embed_size="32"))


def test_checkpoint_model_config_is_checked_like_any_config(tmp_path):
    """A checkpoint whose model_config holds a bad type or value is refused with the file and key."""
    from imram_dist.model import CheckpointError, load_inference_checkpoint, save_inference_checkpoint

    path = tmp_path / "m.pt"
    save_inference_checkpoint(path, IMRAM(ModelConfig(vocab_size=5, embed_size=8, image_dim=4, word_dim=4)))
    payload = torch.load(path, weights_only=True)
    payload["model_config"]["steps"] = "3"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=rf"{path}: model_config: model.steps: expected an integer, got .3."):
        load_inference_checkpoint(path)
    payload["model_config"]["steps"] = 0
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"model_config: model.steps: expected at least 1, got 0"):
        load_inference_checkpoint(path)
