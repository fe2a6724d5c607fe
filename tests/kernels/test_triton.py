"""The Triton kernels, run by Triton's interpreter on CPU tensors, match the torch reference.

Every width and scheme, uniform and mixed inside one layer, gated (Mixtral, SwiGLU fused) and not
(Switch, ReLU), in both the decode configuration (split-K down) and the prefill one; float32 and
float16 and bfloat16 activations (bfloat16 products through a correction of the interpreter, see
``bfloat16_products``).
"""

import pytest
import torch

pytest.importorskip("triton", reason="the Triton backend needs the triton package (pip install moeq[triton])")

from moeq.kernels import moe_experts_forward, triton_moe
from moeq.plan import TensorSpec
from tests.kernels.helpers import WIDTHS, quantized_experts, routing

# float32 end to end; the kernel sums tiles in another order than torch's matmul.
ATOL = 1e-4


def check(experts, tokens: int, seed: int = 0) -> None:
    hidden = experts.expert(0)[experts.projections[0]].in_features
    x, index, weights = routing(tokens, hidden, experts.num_experts, 2 if experts.gated else 1, seed)
    expected = moe_experts_forward(x, index, weights, experts, backend="reference")
    got = moe_experts_forward(x, index, weights, experts, backend="triton")
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("spec", WIDTHS, ids=lambda s: f"{s.bits}{s.scheme.value}{s.group_size or ''}")
def test_every_width_decode_shape(spec: TensorSpec) -> None:
    check(quantized_experts("mixtral", spec), tokens=3)


@pytest.mark.parametrize("family", ["mixtral", "switch_transformers"])
def test_mixed_widths_in_one_layer_decode_and_prefill(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    experts = quantized_experts(family, seed=2)
    widths = {experts.expert(e)[p].spec.bits for e in range(experts.num_experts) for p in experts.projections}
    assert len(widths) >= 4, "the layer must mix widths"
    check(experts, tokens=4)
    monkeypatch.setattr(triton_moe, "DECODE_SLOTS", 4)  # the prefill configuration, on few tokens
    check(experts, tokens=5, seed=1)


def test_an_activation_the_kernels_cannot_fuse_is_refused_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    experts = quantized_experts("mixtral", WIDTHS[0])
    monkeypatch.setattr(experts, "act_fn", torch.nn.GELU())
    x, index, weights = routing(2, 64, experts.num_experts, 2)
    with pytest.raises(ValueError, match=r"SiLU or ReLU expert activation \(a model's own gate function runs on the CPU paths\); install moeq\[triton\] or use backend='cpu'"):
        moe_experts_forward(x, index, weights, experts, backend="triton")


@pytest.mark.parametrize("decode", [True, False])
@pytest.mark.parametrize("block_k", [64, 128])
def test_several_groups_per_row(decode: bool, block_k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Groups of 64 along K = 128/256: one scale per K tile at BLOCK_K 64 (zero point and scale
    applied after the dot), two per tile at BLOCK_K 128 (the launch dequantizes in the tile)."""
    import torch.nn.functional as F

    from moeq.modules.convert import rtn_quantizer
    from moeq.modules.experts import QuantizedExperts

    hidden, inter, experts_n = 128, 256, 4
    shapes = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    widths = [TensorSpec(4, "asym", 64), TensorSpec(2, "sym", 64), TensorSpec(3, "log", 64), TensorSpec(1, "sign", 64)]
    specs = {(e, p): widths[e] for e in range(experts_n) for p in shapes}
    experts = QuantizedExperts(experts_n, shapes, specs, F.silu, gated=True)
    g = torch.Generator().manual_seed(0)
    for (e, p), spec in specs.items():
        weight = torch.randn(shapes[p], generator=g) * 0.05  # outputs of order one, as the tolerance assumes
        experts.expert(e)[p].load_quantized(rtn_quantizer(weight, spec, torch.float16))
    if not decode:
        monkeypatch.setattr(triton_moe, "DECODE_SLOTS", 0)
    shipped = triton_moe.launch_config
    monkeypatch.setattr(triton_moe, "launch_config", lambda *args: {**shipped(*args), "BLOCK_K": block_k})
    check(experts, tokens=6)


@pytest.fixture
def bfloat16_products(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let Triton's interpreter multiply bfloat16 tiles: it stores them as their uint16 bits (numpy has
    no bfloat16) and its ``tl.dot`` multiplies those bits as integers (Triton 3.9). Widening the
    operands to float32 first is exact, and is what the GPU's bf16 products do (exact products,
    float32 sums)."""
    import numpy as np
    from triton.runtime import interpreter

    builder = getattr(interpreter, "InterpreterBuilder", None)
    if builder is None or not hasattr(builder, "create_dot"):
        pytest.skip("this triton's interpreter has no InterpreterBuilder.create_dot to correct")
    plain = builder.create_dot

    def create_dot(self, a, b, d, *args):
        def widened(t):
            if t.dtype.scalar != interpreter.tl.bfloat16:
                return t
            return interpreter.TensorHandle((t.data.astype(np.uint32) << 16).view(np.float32), interpreter.tl.float32)

        return plain(self, widened(a), widened(b), d, *args)

    monkeypatch.setattr(builder, "create_dot", create_dot)


# Stated bounds, relative to the output's largest magnitude, against float32 math on the same
# (rounded) inputs: the activations between the launches, the finely grouped tiles' operands and
# the output are rounded to the dtype, a few roundings of 2^-11 (float16) or 2^-8 (bfloat16) each.
# Measured: 4e-4 and 1.1-1.2e-2 (torch's own bfloat16 reference: 6e-3; the interpreter truncates
# where the GPU rounds to nearest).
HALF_BOUNDS = {torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("dtype", list(HALF_BOUNDS), ids=str)
@pytest.mark.parametrize("decode", [True, False])
def test_half_precision_activations(dtype: torch.dtype, decode: bool, monkeypatch: pytest.MonkeyPatch, request) -> None:
    if dtype == torch.bfloat16:
        request.getfixturevalue("bfloat16_products")
    experts = quantized_experts("mixtral", seed=2)
    x, index, weights = routing(5, 64, experts.num_experts, 2, seed=3)
    x, weights = x.to(dtype), weights.to(dtype)
    exact = moe_experts_forward(x.float(), index, weights.float(), experts, backend="reference")
    if not decode:
        monkeypatch.setattr(triton_moe, "DECODE_SLOTS", 0)
    got = moe_experts_forward(x, index, weights, experts, backend="triton")
    assert got.dtype == dtype
    error = float((got.float() - exact).abs().max() / exact.abs().max())
    assert error < HALF_BOUNDS[dtype]


@pytest.mark.parametrize("decode", [True, False])
def test_dimensions_that_are_not_multiples_of_the_tiles(decode: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """hidden 100 and intermediate 72: rows end mid-word and mid-tile in every plane (padding
    codes meet zeroed activations), outputs end mid-block."""
    import torch.nn.functional as F

    from moeq.modules.convert import rtn_quantizer
    from moeq.modules.experts import QuantizedExperts

    hidden, inter, experts_n = 100, 72, 4
    shapes = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    widths = [TensorSpec(7, "asym"), TensorSpec(3, "sym"), TensorSpec(5, "log"), TensorSpec(1, "sign")]
    specs = {(e, p): widths[e] for e in range(experts_n) for p in shapes}
    experts = QuantizedExperts(experts_n, shapes, specs, F.silu, gated=True)
    g = torch.Generator().manual_seed(0)
    for (e, p), spec in specs.items():
        weight = torch.randn(shapes[p], generator=g) * 0.05
        experts.expert(e)[p].load_quantized(rtn_quantizer(weight, spec, torch.float16))
    if not decode:
        monkeypatch.setattr(triton_moe, "DECODE_SLOTS", 0)
    check(experts, tokens=5)
