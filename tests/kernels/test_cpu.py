"""The CPU backends match the torch reference."""

import pytest
import torch

from moeq.kernels import moe_experts_forward
from moeq.kernels.cpu import int4_group
from moeq.plan import TensorSpec
from tests.kernels.helpers import WIDTHS, quantized_experts, routing

ATOL = 1e-5  # float32; same products, summed in a different order


@pytest.mark.parametrize("backend", ["cpu", "cpu-int4"])
@pytest.mark.parametrize("family", ["mixtral", "switch_transformers"])
@pytest.mark.parametrize("seed", [0, 1])
def test_cpu_backends_match_reference_on_mixed_widths(backend: str, family: str, seed: int) -> None:
    experts = quantized_experts(family, seed=seed)
    hidden = experts.expert(0)[experts.projections[0]].in_features
    x, index, weights = routing(9, hidden, experts.num_experts, 2 if experts.gated else 1, seed)
    expected = moe_experts_forward(x, index, weights, experts, backend="reference")
    got = moe_experts_forward(x, index, weights, experts, backend=backend)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("spec", WIDTHS, ids=str)
def test_int4_backend_takes_linear_widths_up_to_4_and_leaves_the_rest_to_the_jit_path(spec: TensorSpec) -> None:
    experts = quantized_experts("mixtral", spec)
    x, index, weights = routing(16, 64, experts.num_experts, 2)
    expected = moe_experts_forward(x, index, weights, experts, backend="reference")
    experts.__dict__.pop("_int4_weights", None)
    torch.testing.assert_close(moe_experts_forward(x, index, weights, experts, "cpu-int4"), expected, atol=ATOL, rtol=0)
    takes = spec.bits <= 4 and spec.scheme.value != "log" and spec.group_size != 16
    assert bool(getattr(experts, "_int4_weights", {})) == takes


def test_int4_backend_dequantizes_experts_with_many_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    from moeq.kernels import cpu

    experts = quantized_experts("mixtral", TensorSpec(4, "asym", 32), seed=4)
    x, index, weights = routing(16, 64, experts.num_experts, 2)
    experts.__dict__.pop("_int4_weights", None)
    monkeypatch.setattr(cpu, "INT4_MAX_ROWS", 1)  # every expert gets more rows than this
    expected = moe_experts_forward(x, index, weights, experts, backend="reference")
    torch.testing.assert_close(moe_experts_forward(x, index, weights, experts, "cpu-int4"), expected, atol=ATOL, rtol=0)
    assert not experts._int4_weights


def test_int4_in_bf16_is_as_accurate_as_dequantizing_to_bf16() -> None:
    """bf16 rounds the int4 kernel's scales and zeros; stated bound: within 1.5x the lean path's error."""
    experts = quantized_experts("mixtral", TensorSpec(2, "asym", 32))
    x, index, weights = routing(16, 64, experts.num_experts, 2)
    exact = moe_experts_forward(x, index, weights, experts, backend="reference")
    errors = {b: (moe_experts_forward(x.bfloat16(), index, weights, experts, b).float() - exact).norm() / exact.norm() for b in ("cpu", "cpu-int4")}
    assert errors["cpu-int4"] <= 1.5 * errors["cpu"] + 1e-3, errors


def test_int4_copy_is_rebuilt_when_the_codes_change() -> None:
    experts = quantized_experts("mixtral", TensorSpec(4, "asym", 32), seed=3)
    x, index, weights = routing(8, 64, experts.num_experts, 2)
    moe_experts_forward(x, index, weights, experts, "cpu-int4")
    linear = experts.expert(0)["down_proj"]
    old = linear.codes
    try:
        linear.codes = torch.randint(0, 256, old.shape, dtype=torch.uint8)
        expected = moe_experts_forward(x, index, weights, experts, backend="reference")
        torch.testing.assert_close(moe_experts_forward(x, index, weights, experts, "cpu-int4"), expected, atol=ATOL, rtol=0)
    finally:
        linear.codes = old


@pytest.mark.parametrize(
    ("spec", "shape", "group"),
    [
        (TensorSpec(4, "asym"), (384, 256), 256),  # a whole row: the kernel's largest group, repeated
        (TensorSpec(2, "sym", 96), (64, 96), 32),
        (TensorSpec(3, "asym", 16), (64, 64), None),  # finer than the kernel's smallest group
        (TensorSpec(5, "asym", 64), (64, 64), None),
        (TensorSpec(3, "log", 64), (64, 64), None),
        (TensorSpec(4, "asym", 64), (40, 64), None),  # the kernel needs outputs in multiples of 16
    ],
)
def test_int4_group(spec: TensorSpec, shape: tuple[int, int], group: int | None) -> None:
    from moeq.modules.linear import QuantizedLinear

    assert int4_group(QuantizedLinear(shape[1], shape[0], spec, torch.float16)) == group


def test_auto_runs_cpu_on_cpu_tensors_and_unknown_backend_is_refused() -> None:
    experts = quantized_experts("mixtral")
    x, index, weights = routing(3, 64, experts.num_experts, 2)
    torch.testing.assert_close(experts(x, index, weights), moe_experts_forward(x, index, weights, experts, "cpu"), atol=0, rtol=0)
    with pytest.raises(ValueError, match="unknown experts backend 'cuda'"):
        moe_experts_forward(x, index, weights, experts, "cuda")


def test_int4_copy_is_counted_at_four_bits_per_weight_plus_scales() -> None:
    experts = quantized_experts("mixtral", TensorSpec(2, "asym", 32), seed=5)
    experts.__dict__.pop("_int4_weights", None)
    assert experts.kernel_copy_nbytes() == 0
    index = torch.arange(experts.num_experts).view(-1, 1)
    moe_experts_forward(torch.randn(experts.num_experts, 64), index, torch.ones(experts.num_experts, 1), experts, "cpu-int4")
    expected = 0
    for e in range(experts.num_experts):
        for p in experts.projections:
            linear = experts.expert(e)[p]
            out, inp = linear.out_features, linear.in_features
            expected += out * inp // 2 + (inp // 32) * out * 2 * 4  # codes at 4 bits; float32 scale and zero per group
    assert experts.kernel_copy_nbytes() == expected


@pytest.mark.parametrize("bits", [4, 5])
def test_affine_experts_run_on_the_cpu_paths_and_triton_refuses_them(bits: int) -> None:
    experts = quantized_experts("mixtral", TensorSpec(bits, "affine", 32), seed=6)  # llama.cpp's Q4_1/Q5_1
    x, index, weights = routing(16, 64, experts.num_experts, 2)
    expected = moe_experts_forward(x, index, weights, experts, backend="reference")
    for backend in ("cpu", "cpu-int4"):  # int4 leaves float minima to the just-in-time path
        torch.testing.assert_close(moe_experts_forward(x, index, weights, experts, backend), expected, atol=ATOL, rtol=0)
    assert not getattr(experts, "_int4_weights", {})
    with pytest.raises(ValueError, match="not K-quant blocks .* or affine minima: run this model with backend='cpu'"):
        moe_experts_forward(x, index, weights, experts, "triton")
