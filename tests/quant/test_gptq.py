"""GPTQ: lower output error than rounding, the same container, named errors, determinism."""

import pytest
import torch

from moeq.quant.gptq import HessianError, gptq_quantize
from moeq.quant.rtn import quantize_rtn
from moeq.quant.schemes import Scheme


def _layer(seed: int = 0, out: int = 64, inp: int = 128, n: int = 1024):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, inp, generator=gen) * 0.05
    mixing = torch.randn(inp, inp, generator=gen) * 0.3 + torch.eye(inp)
    inputs = torch.randn(n, inp, generator=gen) @ mixing  # correlated inputs, as real activations are
    return weight, inputs, inputs.T @ inputs


def _output_error(inputs, weight, quantized) -> float:
    return float((inputs @ (weight - quantized.dequantize(torch.float32)).T).norm())


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [None, 32])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("scheme", ["asym", "affine"])  # affine: llama.cpp's Q4_1/Q5_1 float minima
def test_gptq_beats_rounding_on_the_output(bits: int, group_size, act_order: bool, scheme: str) -> None:
    weight, inputs, hessian = _layer()
    gptq = gptq_quantize(weight, hessian, bits, scheme, group_size, act_order=act_order)
    rtn = quantize_rtn(weight, bits, scheme, group_size)
    assert (gptq.zeros is None) == (rtn.zeros is None) and (gptq.zeros is None or gptq.zeros.dtype == rtn.zeros.dtype)
    assert _output_error(inputs, weight, gptq) < 0.9 * _output_error(inputs, weight, rtn)


def test_sign_and_clip_search_and_sym() -> None:
    weight, inputs, hessian = _layer(1)
    for kwargs in ({"bits": 1, "scheme": "sign", "group_size": 32}, {"bits": 3, "scheme": "asym", "clip_search": True},
                   {"bits": 3, "scheme": "sym"}, {"bits": 3, "scheme": "log"}):
        gptq = gptq_quantize(weight, hessian, **kwargs)
        rtn = quantize_rtn(weight, **kwargs)
        assert _output_error(inputs, weight, gptq) < _output_error(inputs, weight, rtn), kwargs


def test_same_container_as_rounding() -> None:
    weight, _, hessian = _layer(2)
    gptq = gptq_quantize(weight, hessian, 3, "asym", 32)
    rtn = quantize_rtn(weight, 3, "asym", 32)
    for field in ("bits", "group_size", "scheme", "shape", "dtype"):
        assert getattr(gptq, field) == getattr(rtn, field)
    assert gptq.codes.shape == rtn.codes.shape and gptq.scales.shape == rtn.scales.shape
    assert gptq.zeros.dtype == rtn.zeros.dtype and gptq.nbytes == rtn.nbytes


def test_identity_hessian_per_channel_equals_rounding() -> None:
    # With uncorrelated unit inputs there is no error to push anywhere useful: GPTQ rounds.
    weight, _, _ = _layer(3)
    gptq = gptq_quantize(weight, torch.eye(weight.shape[1]), 4, "asym", damp=0.0)
    rtn = quantize_rtn(weight, 4, "asym")
    assert torch.equal(gptq.dequantize(), rtn.dequantize())


def test_dead_inputs_are_zeroed_and_deterministic() -> None:
    weight, inputs, _ = _layer(4)
    inputs[:, :5] = 0
    hessian = inputs.T @ inputs
    first = gptq_quantize(weight, hessian, 3, "asym", 32)
    second = gptq_quantize(weight, hessian, 3, "asym", 32)
    assert torch.equal(first.codes, second.codes) and torch.equal(first.scales, second.scales)
    assert torch.isfinite(first.dequantize()).all()


def test_bad_hessians_are_named() -> None:
    weight, _, hessian = _layer(5)
    bad = hessian.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(HessianError, match="Hessian of layers.3.experts.2.down_proj holds NaN"):
        gptq_quantize(weight, bad, 3, name="layers.3.experts.2.down_proj")
    with pytest.raises(HessianError, match="expected \\(128, 128\\)"):
        gptq_quantize(weight, hessian[:4, :4], 3)
    assert gptq_quantize(weight, hessian, 2, Scheme.ASYM).bits == 2


@pytest.mark.parametrize("kwargs", [{"bits": 3}, {"bits": 2, "group_size": 32}, {"bits": 3, "group_size": 32, "act_order": True},
                                    {"bits": 1, "scheme": "sign", "group_size": 32}])
def test_a_batch_equals_its_members_quantized_alone(kwargs) -> None:
    from moeq.quant.gptq import gptq_quantize_batch

    layers = [_layer(seed) for seed in (10, 11, 12)]
    batch = gptq_quantize_batch([w for w, _, _ in layers], [h for _, _, h in layers], **kwargs)
    for (weight, _, hessian), together in zip(layers, batch):
        alone = gptq_quantize(weight, hessian, **kwargs)
        assert torch.equal(alone.codes, together.codes) and torch.equal(alone.scales, together.scales)
        assert (alone.zeros is None) == (together.zeros is None)
        if alone.zeros is not None:
            assert torch.equal(alone.zeros, together.zeros)
