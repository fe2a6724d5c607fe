"""QAT: the loss falls under fake quant, gradients pass straight through, export equals the fake quant."""

import copy
from pathlib import Path

import pytest
import torch
import transformers

from moeq import QuantConfig
from moeq.api import plan_for, quantize
from moeq.plan import PlanError
from moeq.train.lm import FinetuneConfig, TrainConfig, default_model_config, short_finetune
from moeq.train.qat import QATConfig, attach_fake_quant, detach_fake_quant, distillation_loss, qat_fit, training_text


def _tiny(seed: int = 0) -> transformers.MixtralForCausalLM:
    config = TrainConfig(out=Path("unused"), seq_len=32, vocab_size=64, hidden=32, intermediate=48, layers=2, experts=4)
    torch.manual_seed(seed)
    model = transformers.MixtralForCausalLM(default_model_config(config))
    model.set_experts_implementation("eager")
    return model


def _stream() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    pattern = torch.arange(16).repeat(300)
    return torch.where(torch.rand(pattern.shape, generator=gen) < 0.1, torch.randint(0, 64, pattern.shape, generator=gen), pattern)


def test_loss_falls_and_export_equals_the_fake_quant_forward() -> None:
    model = _tiny()
    plan = plan_for(model, QuantConfig(bits=2, scheme="asym", attn_bits=4))
    config = QATConfig(steps=25, lr=3e-3, seq_len=32, batch_size=8)
    qat_fit(model, plan, _stream(), config)
    first, last = config.log[0]["loss"], sum(e["loss"] for e in config.log[-5:]) / 5
    assert last < first - 0.5
    ids = _stream()[:64].view(2, 32)
    with torch.no_grad():
        fake = model(input_ids=ids).logits
        quantize(detach_fake_quant(model), plan)
        packed = model(input_ids=ids).logits
    # Same codes and scales; only the order of float32 operations in the packed matmul differs.
    torch.testing.assert_close(packed, fake, rtol=0, atol=1e-4)


@pytest.mark.parametrize("model_type", ["gpt_oss", "aria_text"])
def test_fake_quant_of_transposed_and_interleaved_experts_is_the_packed_model(model_type: str) -> None:
    from moeq.models import auto_model_class
    from tests.models.families import tiny_config

    config = tiny_config(model_type)
    torch.manual_seed(0)
    model = auto_model_class(config).from_config(config).eval()
    plan = plan_for(model, QuantConfig(bits=3, group_size=16))  # groups along each expert's input, not its output
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        packed = quantize(copy.deepcopy(model), plan)(input_ids=ids).logits
        fake = attach_fake_quant(model, plan, torch.float32)(input_ids=ids).logits
    torch.testing.assert_close(fake, packed, rtol=0, atol=1e-4)


def test_gradient_passes_straight_through() -> None:
    model = _tiny()
    plan = plan_for(model, QuantConfig(bits=2))
    attach_fake_quant(model, plan, torch.float32)
    experts = model.model.layers[0].mlp.experts
    quantized = experts.gate_up_proj  # the parametrized (fake-quantized) view
    assert len(torch.unique(quantized[0, 0])) <= 4  # 2 bits: at most four levels per channel
    weights = torch.randn_like(quantized)
    (quantized * weights).sum().backward()
    latent = experts.parametrizations.gate_up_proj.original
    torch.testing.assert_close(latent.grad, weights, rtol=0, atol=0)


def test_a_plan_for_another_model_is_refused() -> None:
    plan = plan_for(_tiny(), QuantConfig(bits=2))
    plan.model_type = "qwen2_moe"
    with pytest.raises(PlanError, match="the plan is for a qwen2_moe model"):
        attach_fake_quant(_tiny(), plan, torch.float32)


def test_missing_training_text_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="--data"):
        training_text(tmp_path / "nope.txt", tmp_path)
    text, origin = training_text(None, tmp_path)  # no corpus package cached: the calibration slice
    assert origin == "shipped calibration slice" and text


def test_distillation_lowers_the_kl_to_the_full_precision_model() -> None:
    teacher = _tiny()  # trained a little first, so that its predictions are sharp and 2 bits hurt them
    short_finetune(teacher, _stream(), list(teacher.parameters()), FinetuneConfig(steps=40, lr=3e-3, seq_len=32, batch_size=8))
    weights = [p.detach().clone() for p in teacher.parameters()]
    student = copy.deepcopy(teacher)
    plan = plan_for(student, QuantConfig(bits=2))
    ids = _stream()[-256:].view(8, 32)
    kl = distillation_loss(teacher)
    with torch.no_grad():
        before = float(kl(quantize(copy.deepcopy(teacher), plan), ids))  # 2-bit RTN of the same weights
    config = QATConfig(steps=30, lr=3e-4, seq_len=32, batch_size=8, objective="distill")
    qat_fit(student, plan, _stream(), config)
    with torch.no_grad():
        after = float(kl(quantize(detach_fake_quant(student), plan), ids))
    assert before > 1e-3 and after < 0.6 * before, (before, after)  # measured: 0.0024 -> 0.0010
    assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), weights))  # the teacher is untouched


def test_an_unknown_objective_is_named() -> None:
    with pytest.raises(ValueError, match="unknown QAT objective 'mse'; choose one of lm, distill"):
        QATConfig(objective="mse")
