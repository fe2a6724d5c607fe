"""The training loop learns on a tiny config, and its initial routers are what allocation reads."""

from pathlib import Path

import torch

from moeq.train.lm import TrainConfig, default_model_config, fit


def test_a_few_steps_lower_the_loss(tmp_path: Path) -> None:
    config = TrainConfig(out=tmp_path / "m", steps=30, seq_len=32, batch_size=8, lr=3e-3, warmup=5, eval_every=10,
                         eval_batches=2, vocab_size=64, hidden=32, intermediate=48, layers=2, experts=4)
    # A learnable stream: a short repeating pattern with a little noise.
    gen = torch.Generator().manual_seed(0)
    pattern = torch.arange(16).repeat(400)
    ids = torch.where(torch.rand(pattern.shape, generator=gen) < 0.1, torch.randint(0, 64, pattern.shape, generator=gen), pattern)
    model, initial_router, steps = fit(default_model_config(config), ids, ids[:2000], config)
    assert steps == 30 and len(config.log) == 3
    assert config.log[-1]["val_loss"] < config.log[0]["val_loss"] - 0.5
    assert sorted(initial_router) == ["model.layers.0.mlp.gate.weight", "model.layers.1.mlp.gate.weight"]
    trained = model.model.layers[0].mlp.gate.weight.detach().to(torch.bfloat16)
    assert not torch.equal(initial_router["model.layers.0.mlp.gate.weight"], trained)


def test_fine_tuning_a_given_model_keeps_its_routers_from_before(tmp_path: Path) -> None:
    config = TrainConfig(out=tmp_path / "m", steps=4, seq_len=32, batch_size=4, warmup=2, eval_every=4, eval_batches=1,
                         vocab_size=64, hidden=32, intermediate=48, layers=2, experts=4)
    import transformers

    torch.manual_seed(1)
    start = transformers.MixtralForCausalLM(default_model_config(config))
    before = start.model.layers[1].mlp.gate.weight.detach().to(torch.bfloat16).clone()
    ids = torch.randint(0, 64, (2000,), generator=torch.Generator().manual_seed(0))
    model, initial_router, _ = fit(start, ids, ids[:500], config)
    assert model is start  # fine-tuned in place, not re-initialised
    assert torch.equal(initial_router["model.layers.1.mlp.gate.weight"], before)
    assert not torch.equal(model.model.layers[1].mlp.gate.weight.detach().to(torch.bfloat16), before)
