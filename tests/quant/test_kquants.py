"""K-quant schemes: moeq's blocks decode in the ``gguf`` package (which llama.cpp's own Python
tools use) to exactly moeq's weights; sizes are the format's; GPTQ keeps its error compensation."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moeq.plan import PlanError, TensorSpec
from moeq.quant.gptq import gptq_quantize, gptq_quantize_batch
from moeq.quant.kquants import KQUANTS, fit_kparams, encode_k, pack_k, super_block_scales, unpack_k
from moeq.quant.rtn import quantize_rtn
from moeq.quant.tensor import storage_nbytes

SCHEMES = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k")
BITS = {s: int(s[1]) for s in SCHEMES}


def _gguf_dequantize(blocks: torch.Tensor, rows: int, scheme: str) -> np.ndarray:
    return gguf.quants.dequantize(blocks.view(rows, -1).numpy(), gguf.GGMLQuantizationType[scheme.upper()])


@settings(max_examples=40, deadline=None)
@given(
    scheme=st.sampled_from(SCHEMES),
    rows=st.integers(1, 5),
    supers=st.integers(1, 3),
    magnitude=st.sampled_from([1e-3, 0.05, 4.0, 500.0]),
    shift=st.sampled_from([0.0, 0.5]),
    clip=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_blocks_decode_in_gguf_to_moeqs_weights(scheme, rows, supers, magnitude, shift, clip, seed) -> None:
    weight = (torch.randn(rows, 256 * supers, generator=torch.Generator().manual_seed(seed)) + shift) * magnitude
    tensor = quantize_rtn(weight, BITS[scheme], scheme, clip_search=clip)
    theirs = _gguf_dequantize(tensor.codes, rows, scheme)
    assert np.array_equal(theirs, tensor.dequantize(torch.float32).numpy())  # bit for bit
    assert tensor.nbytes == rows * supers * KQUANTS[scheme.upper()].type_size == storage_nbytes((rows, 256 * supers), BITS[scheme], 256, tensor.scheme)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_pack_and_unpack_are_inverse_over_the_whole_code_and_scale_range(scheme: str) -> None:
    kind = KQUANTS[scheme.upper()]
    gen = torch.Generator().manual_seed(1)
    rows, supers = 3, 2
    codes = torch.randint(0, 1 << kind.bits, (rows, supers, 256), generator=gen)
    low = -kind.scale_max if not kind.affine else 0
    sc = torch.randint(low, kind.scale_max + 1, (rows, supers, kind.sub_blocks), generator=gen)
    m = torch.randint(0, kind.scale_max + 1, sc.shape, generator=gen) if kind.affine else None
    d = torch.rand(rows, supers, generator=gen).half().float()
    dmin = torch.rand(rows, supers, generator=gen).half().float() if kind.affine else None
    params = type(fit_kparams(torch.zeros(1, 1, 256), kind))(d, dmin, sc, m)
    blocks = pack_k(codes, params, kind)
    back, unpacked = unpack_k(blocks, kind)
    assert torch.equal(back, codes) and torch.equal(unpacked.sc, sc) and torch.equal(unpacked.d, d)
    if kind.affine:
        assert torch.equal(unpacked.m, m) and torch.equal(unpacked.dmin, dmin)
    scales = super_block_scales(blocks, kind)
    assert torch.equal(scales[:, 0], d.reshape(-1))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_error_falls_with_width_and_the_clipping_search_helps(scheme: str) -> None:
    weight = torch.randn(64, 512, generator=torch.Generator().manual_seed(0))

    def error(**kwargs) -> float:
        q = quantize_rtn(weight, BITS[scheme], scheme, **kwargs).dequantize(torch.float32)
        return float((q - weight).pow(2).mean())

    assert error(clip_search=True) <= error()
    # Squared error on unit Gaussian weights, measured: 2-bit 0.108, 3-bit 0.0240, 4-bit 0.00615, 5: 0.00146, 6: 0.00035.
    assert error() < {2: 0.115, 3: 0.026, 4: 0.0066, 5: 0.0016, 6: 0.00038}[BITS[scheme]]


def _correlated_inputs(columns: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.eye(columns) + torch.randn(columns, columns, generator=gen) / columns**0.5
    return torch.randn(4096, columns, generator=gen) @ mix * torch.linspace(0.2, 3.0, columns)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_writes_valid_blocks_with_less_output_error_than_rounding(scheme: str, act_order: bool) -> None:
    weight = torch.randn(32, 512, generator=torch.Generator().manual_seed(2)) * 0.05
    inputs = _correlated_inputs(512)
    hessian = inputs.T @ inputs
    gptq = gptq_quantize(weight, hessian, BITS[scheme], scheme, act_order=act_order)
    rtn = quantize_rtn(weight, BITS[scheme], scheme)
    assert np.array_equal(_gguf_dequantize(gptq.codes, 32, scheme), gptq.dequantize(torch.float32).numpy())

    def output_error(q) -> float:
        return float((inputs @ (q.dequantize(torch.float32) - weight).T).pow(2).mean())

    assert output_error(gptq) < 0.9 * output_error(rtn)


@pytest.mark.parametrize("scheme", ["q3_k", "q4_k"])
def test_gptq_with_uncorrelated_inputs_is_rounding_and_a_batch_is_each_alone(scheme: str) -> None:
    gen = torch.Generator().manual_seed(3)
    weights = [torch.randn(16, 256, generator=gen) for _ in range(3)]
    assert torch.equal(gptq_quantize(weights[0], torch.eye(256), BITS[scheme], scheme).codes, quantize_rtn(weights[0], BITS[scheme], scheme).codes)
    inputs = _correlated_inputs(256, seed=4)
    hessian = inputs.T @ inputs
    batch = gptq_quantize_batch(weights, [hessian] * 3, BITS[scheme], scheme)
    for weight, tensor in zip(weights, batch):
        assert torch.equal(tensor.codes, gptq_quantize(weight, hessian, BITS[scheme], scheme).codes)


def test_bad_k_specs_name_the_rule() -> None:
    with pytest.raises(PlanError, match="scheme 'q4_k' takes exactly 4 bits, got 3"):
        TensorSpec(3, "q4_k")
    with pytest.raises(PlanError, match="q4_k has fixed super-blocks of 256 weights; leave the group size out"):
        TensorSpec(4, "q4_k", 64)
    with pytest.raises(ValueError, match="q4_k stores rows in super-blocks of 256; an input dimension of 384 does not divide"):
        quantize_rtn(torch.randn(4, 384), 4, "q4_k")
    with pytest.raises(ValueError, match="more than float16 holds"):
        quantize_rtn(torch.full((2, 256), 1e30), 4, "q4_k")


def test_an_all_zero_super_block_is_exact() -> None:
    weight = torch.zeros(2, 512)
    weight[1, 256:] = torch.randn(256)
    for scheme in SCHEMES:
        q = quantize_rtn(weight, BITS[scheme], scheme).dequantize(torch.float32)
        assert torch.equal(q[0], weight[0]) and torch.equal(q[1, :256], weight[1, :256])
