"""The router-only fine-tune moves only the routers and writes the routers from before it."""

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file

from moeq.allocate.scores import router_norms
from moeq.files import INITIAL_ROUTER_FILE
from moeq.models import moe_layers_or_error
from moeq.train.lm import TrainConfig, default_model_config
from moeq.train.router import RouterTuneConfig, train_router, tune_routers


def _tiny() -> transformers.MixtralForCausalLM:
    config = TrainConfig(out=Path("unused"), seq_len=32, vocab_size=64, hidden=32, intermediate=48, layers=2, experts=4)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(default_model_config(config))
    model.set_experts_implementation("eager")
    return model


def test_only_the_routers_change() -> None:
    model = _tiny()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ids = torch.randint(0, 64, (1000,), generator=torch.Generator().manual_seed(0))
    initial = tune_routers(model, ids, RouterTuneConfig(steps=3, seq_len=32, batch_size=4, lr=1e-2))
    assert sorted(initial) == ["model.layers.0.mlp.gate.weight", "model.layers.1.mlp.gate.weight"]
    for name, p in model.named_parameters():
        changed = not torch.equal(p.detach(), before[name])
        assert changed == name.endswith("mlp.gate.weight"), name
        if name in initial:  # the saved "before" is the untouched weight, rounded to bfloat16
            assert torch.equal(initial[name], before[name].to(torch.bfloat16))


@pytest.mark.parametrize("model_type", ["gpt_oss", "hunyuan_v1_moe"])
def test_the_routers_of_any_family_are_the_ones_tuned(model_type: str) -> None:
    from moeq.models import auto_model_class
    from tests.models.families import tiny_config

    config = tiny_config(model_type)
    torch.manual_seed(0)
    model = auto_model_class(config).from_config(config).train()
    layers = moe_layers_or_error(model)[1]
    names = sorted(f"{layer.path}.{layer.router_name}" for layer in layers)
    assert names[0].endswith({"gpt_oss": "mlp.router.weight", "hunyuan_v1_moe": "mlp.gate.wg.weight"}[model_type])
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ids = torch.randint(0, 128, (1000,), generator=torch.Generator().manual_seed(0))
    assert sorted(tune_routers(model, ids, RouterTuneConfig(steps=2, seq_len=32, batch_size=4, lr=1e-2))) == names
    assert {name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])} == set(names)


def test_a_router_network_is_refused_in_one_line() -> None:
    from moeq.models import auto_model_class
    from tests.models.families import tiny_config

    config = tiny_config("zaya")
    model = auto_model_class(config).from_config(config)
    with pytest.raises(ValueError, match="model.layers.0.mlp.gate is a router network, not an \\[experts, hidden\\] matrix"):
        tune_routers(model, torch.zeros(1000, dtype=torch.long), RouterTuneConfig(steps=1, seq_len=32))


def test_too_little_text_is_a_one_line_error() -> None:
    with pytest.raises(ValueError, match="text has 10 tokens"):
        tune_routers(_tiny(), torch.zeros(10, dtype=torch.long), RouterTuneConfig(steps=1, seq_len=32))


def test_the_default_model_round_trips_its_initial_routers(tmp_path: Path) -> None:
    import moeq

    source = Path(moeq.__file__).parent / "data" / "default-mixtral"
    text = (Path(moeq.__file__).parent / "data" / "calibration.txt").read_text()[:20000]
    out = train_router(source, tmp_path / "tuned", text, RouterTuneConfig(steps=2, seq_len=64, batch_size=2, lr=1e-2))
    initial = load_file(str(out / INITIAL_ROUTER_FILE))
    original = dict(transformers.AutoModelForCausalLM.from_pretrained(source).named_parameters())
    tuned = dict(transformers.AutoModelForCausalLM.from_pretrained(out).named_parameters())
    assert len(initial) == 4
    for name, value in original.items():
        if name in initial:  # the routers before the fine-tune, and they moved
            assert torch.equal(initial[name], value.detach().to(torch.bfloat16))
            assert not torch.equal(tuned[name], value)
        else:
            assert torch.equal(tuned[name], value), name


def test_a_router_tune_as_reference_gives_the_same_change_as_the_tuned_folder(tmp_path: Path) -> None:
    from moeq.allocate import allocate

    source = tmp_path / "src"
    model = transformers.MixtralForCausalLM(default_model_config(TrainConfig(out=tmp_path, layers=2, hidden=64, intermediate=96)))
    model.save_pretrained(source)
    import moeq

    transformers.AutoTokenizer.from_pretrained(Path(moeq.__file__).parent / "data" / "tokenizer").save_pretrained(source)
    text = (Path(moeq.__file__).parent / "data" / "calibration.txt").read_text()[:20000]
    tuned = train_router(source, tmp_path / "tuned", text, RouterTuneConfig(steps=3, seq_len=64, batch_size=2, lr=1e-2))
    from_folder = allocate(tuned, "router", avg_bits=2.5, levels=(3, 2))
    as_reference = allocate(source, "router", avg_bits=2.5, levels=(3, 2), reference=tuned)
    change = np.array(as_reference.scores["router_norm_change"])
    # The folder's "before" is stored in bfloat16 (8 significant bits): its norms are off by up to ~2^-8 relative.
    norms = np.array([[float(v) for v in router_norms(layer.router_weight)] for layer in moe_layers_or_error(model)[1]])
    np.testing.assert_allclose(change, from_folder.scores["router_norm_change"], rtol=0, atol=float(norms.max()) * 2**-8)
    assert np.abs(change).max() > 10 * float(norms.max()) * 2**-8  # the fine-tune moved them well beyond that rounding
    assert "router-only fine-tune" in as_reference.method["router_signal"]
