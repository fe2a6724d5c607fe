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


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_layer_by_layer_statistics_equal_the_whole_model_pass(tmp_path: Path, family: str) -> None:
    from moeq.calibrate.runner import collect_routing_streaming

    model = tiny_model(family)
    model.save_pretrained(tmp_path / "m")
    ids = torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(2))
    whole = collect_routing(model, ids, batch_size=3, input_moments=True)
    streamed = collect_routing_streaming(tmp_path / "m", ids, input_moments=True, batch_size=3)
    assert streamed.tokens == whole.tokens
    assert torch.equal(streamed.counts, whole.counts)
    torch.testing.assert_close(streamed.weight_sums, whole.weight_sums, atol=1e-5, rtol=1e-5)
    projection = "down_proj"
    a = whole.input_second_moment(0, 1, projection)
    b = streamed.input_second_moment(0, 1, projection)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_allocation_from_a_folder_calibrates_layer_by_layer(tmp_path: Path) -> None:
    from moeq.allocate import allocate

    model = tiny_model("olmoe")
    model.save_pretrained(tmp_path / "m")
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(3))
    from_folder = allocate(tmp_path / "m", "frequency", avg_bits=2.5, calibration=ids)
    in_memory = allocate(model, "frequency", avg_bits=2.5, calibration=ids)
    assert from_folder.method["calibration"]["pass"] == "layer by layer from the checkpoint"
    assert in_memory.method["calibration"]["pass"] == "whole model in memory"
    assert from_folder.to_json()["experts"] == in_memory.to_json()["experts"]
