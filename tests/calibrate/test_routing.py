"""Routing statistics: counts match the router's own choices; calibration text is tokenized."""

from pathlib import Path

import pytest
import torch

from moeq.calibrate import collect_routing, tokenize_calibration
from moeq.models.tiny import tiny_model
from tests.conftest import SAMPLE_TEXT, add_tokenizer


def test_counts_match_the_router(family: str) -> None:
    model = tiny_model(family)
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    stats = collect_routing(model, ids, batch_size=2, input_moments=True)
    top_k = 1 if model.config.is_encoder_decoder else 2
    assert stats.tokens == 4 * 16
    # Every token fills top-k slots (Switch may drop tokens over capacity: at most one slot).
    assert (stats.counts.sum(dim=1) <= stats.tokens * top_k).all()
    if not model.config.is_encoder_decoder:
        assert (stats.counts.sum(dim=1) == stats.tokens * top_k).all()
    assert torch.all(stats.mean_weight[stats.counts > 0] > 0)
    layer, expert = (stats.counts > 0).nonzero()[0].tolist()
    moment = stats.input_second_moment(layer, expert, "down_proj" if top_k == 2 else "wo")
    assert moment is not None and torch.all(moment >= 0)


def test_mixtral_counts_equal_a_direct_router_call() -> None:
    model = tiny_model("mixtral")
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(1))
    seen = []
    gate = model.model.layers[0].mlp.gate
    handle = gate.register_forward_hook(lambda m, a, out: seen.append(out[2].reshape(-1)))
    stats = collect_routing(model, ids)
    handle.remove()
    assert torch.equal(stats.counts[0], torch.bincount(torch.cat(seen), minlength=8))


def test_calibration_text_is_tokenized_with_the_model_tokenizer(tmp_path: Path) -> None:
    add_tokenizer(tmp_path)
    (tmp_path / "calib.txt").write_text(SAMPLE_TEXT)
    ids = tokenize_calibration(tmp_path, tmp_path / "calib.txt", num_tokens=256, seq_len=32)
    assert ids.shape[1] == 32 and 1 <= ids.shape[0] <= 8
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tokenize_calibration(tmp_path, tmp_path / "none.txt", 256, 32)
    with pytest.raises(ValueError, match="fewer than one sequence"):
        tokenize_calibration(tmp_path, tmp_path / "calib.txt", 256, 100_000)
