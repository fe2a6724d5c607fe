"""The Switch default's training: span corruption, the shared loop on a tiny config, its initial
routers as allocation reads them, and the denoising evaluation by hand."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from moeq.allocate import allocate
from moeq.eval.api import evaluate
from moeq.models import moe_layers_or_error
from moeq.models.tiny import tiny_model
from moeq.train.denoise import (
    NUM_SENTINELS,
    DenoiseConfig,
    Denoising,
    corrupt,
    sentinel_ids,
)
from moeq.train.lm import INITIAL_ROUTER_FILE, fit


def _tiny(tmp_path: Path) -> DenoiseConfig:
    return DenoiseConfig(out=tmp_path / "m", steps=40, seq_len=32, batch_size=8, lr=1e-2, warmup=3, eval_every=10,
                         eval_batches=2, vocab_size=64, hidden=32, intermediate=32, heads=2, head_dim=16, layers=2, experts=4)


def _uncorrupt(inputs: torch.Tensor, targets: torch.Tensor, sentinels: torch.Tensor) -> list[int]:
    """Put each dropped span back in place of its sentinel."""
    spans, current = {}, None
    for token in targets[:-1].tolist():
        if token in sentinels.tolist():
            current = spans.setdefault(token, [])
        else:
            current.append(token)
    return [t for token in inputs[:-1].tolist() for t in spans.get(token, [token])]


@settings(max_examples=60, deadline=None)
@given(length=st.integers(2, 200), seed=st.integers(0, 10**6))
def test_corruption_is_invertible_and_its_lengths_depend_only_on_the_window(length: int, seed: int) -> None:
    tokens = torch.randint(0, 64, (length,), generator=torch.Generator().manual_seed(seed))
    sentinels = sentinel_ids(96)
    inputs, targets = corrupt(tokens, sentinels, 0, torch.Generator().manual_seed(seed))
    again, _ = corrupt(tokens, sentinels, 0, torch.Generator().manual_seed(seed + 1))
    assert inputs[-1] == 0 and targets[-1] == 0 and inputs.numel() == again.numel()
    assert _uncorrupt(inputs, targets, sentinels) == tokens.tolist()
    used = targets[torch.isin(targets, sentinels)]
    assert used.tolist() == sentinels[: used.numel()].tolist()  # <extra_id_0>, <extra_id_1>, ... in order
    if length >= 20:
        assert abs((targets.numel() - 1 - used.numel()) / length - 0.15) < 0.03


def test_a_few_steps_lower_the_denoising_loss_and_keep_the_initial_routers(tmp_path: Path) -> None:
    config = _tiny(tmp_path)
    gen = torch.Generator().manual_seed(0)
    pattern = torch.arange(16).repeat(400)  # a learnable stream: a repeating pattern with a little noise
    ids = torch.where(torch.rand(pattern.shape, generator=gen) < 0.1, torch.randint(0, 64, pattern.shape, generator=gen), pattern)
    objective = Denoising()
    model, initial_router, steps = fit(objective.model_config(config), ids, ids[:2000], config, objective)
    assert steps == 40 and len(config.log) == 4
    assert model.config.vocab_size == 64 + NUM_SENTINELS
    assert config.log[-1]["val_loss"] < config.log[0]["val_loss"] - 0.25
    adapter, layers = moe_layers_or_error(model)
    assert len(layers) == 4  # every encoder and decoder block is a mixture
    assert sorted(initial_router) == sorted(s.key for layer in layers for s in adapter.router_sources(layer))
    assert not torch.equal(initial_router[layers[0].path + ".router.classifier.weight"], layers[0].router_weight.detach().bfloat16())

    save_file(initial_router, tmp_path / INITIAL_ROUTER_FILE)
    loaded = load_file(tmp_path / INITIAL_ROUTER_FILE)
    assert all(torch.equal(loaded[k], v) for k, v in initial_router.items())
    plan = allocate(model, "router", avg_bits=2.5, levels=(3, 2), reference=tmp_path / INITIAL_ROUTER_FILE)
    assert plan.method["router_signal"].startswith("norm change against the reference")


def test_denoising_evaluation_by_hand() -> None:
    model = tiny_model("switch_transformers")
    ids = torch.randint(2, 200, (50,), generator=torch.Generator().manual_seed(3))
    report = evaluate(model, ids, reference=model, seq_len=25)
    generator = torch.Generator().manual_seed(0)  # the protocol's fixed corruption
    pairs = [corrupt(w, sentinel_ids(256), model.config.eos_token_id, generator) for w in (ids[:25], ids[25:])]
    with torch.no_grad():
        logits = torch.cat([model(input_ids=i[None], labels=t[None]).logits[0] for i, t in pairs])
    targets = torch.cat([t for _, t in pairs])
    assert report.tokens_scored == targets.numel()
    assert report.perplexity == pytest.approx(float(F.cross_entropy(logits, targets).exp()), rel=1e-5)
    assert report.kl_to_reference == pytest.approx(0.0, abs=1e-7) and report.routing_agreement == [1.0, 1.0]
    encoder_tokens = sum(i.numel() for i, _ in pairs)
    assert report.expert_load[0] and sum(report.expert_load[0]) <= encoder_tokens  # top-1; capacity may drop some
    with pytest.raises(ValueError, match="disjoint windows"):
        evaluate(model, ids, seq_len=25, stride=10)


def test_train_command_names_an_unknown_family() -> None:
    from typer.testing import CliRunner

    from moeq.cli import app

    result = CliRunner().invoke(app, ["train", "--family", "gpt", "--steps", "1"], env={"COLUMNS": "200"})
    assert result.exit_code != 0 and "unknown --family 'gpt'; choose one of mixtral, switch" in result.output
