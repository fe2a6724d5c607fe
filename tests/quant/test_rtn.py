"""Quantizer invariants: error bounds per scheme, exact representable values, the container's bytes."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moeq.quant import Scheme, quantize_rtn
from moeq.quant.rtn import CLIP_RATIOS

SCHEME_BITS = [("sym", b) for b in range(2, 9)] + [("asym", b) for b in range(1, 9)]
SCHEME_BITS += [("log", b) for b in range(2, 9)] + [("sign", 1)] + [("affine", b) for b in range(2, 9)]


def _weight(rows: int, cols: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05


@settings(max_examples=60, deadline=None)
@given(
    pair=st.sampled_from(SCHEME_BITS),
    rows=st.integers(1, 12),
    groups=st.integers(1, 4),
    group=st.sampled_from([1, 2, 8, 16]),
    seed=st.integers(0, 10_000),
)
def test_container_shapes_and_true_bytes(pair, rows: int, groups: int, group: int, seed: int) -> None:
    scheme, bits = pair
    cols = groups * group
    q = quantize_rtn(_weight(rows, cols, seed), bits, scheme, group_size=group)
    assert q.codes.numel() == math.ceil(rows * cols * bits / 8)
    assert q.scales.shape == (rows, groups) and q.scales.dtype == torch.float16
    assert (q.zeros is not None) == (scheme in ("asym", "affine"))
    zero_bytes = {"asym": 1, "affine": 2}.get(scheme, 0)  # uint8 zero points, float16 minima
    expected = q.codes.numel() + 2 * rows * groups + zero_bytes * rows * groups
    assert q.nbytes == expected
    assert q.dequantize().shape == (rows, cols)


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 8), seed=st.integers(0, 10_000), scheme=st.sampled_from(["sym", "asym"]))
def test_linear_schemes_err_by_at_most_half_a_step(bits: int, seed: int, scheme: str) -> None:
    w = _weight(8, 32, seed)
    q = quantize_rtn(w, bits, scheme, scale_dtype=torch.float32)
    step = q.scales.to(torch.float32)  # [rows, 1]
    err = (q.dequantize() - w).abs()
    # Round-to-nearest inside the range: half a step, plus float32 rounding slack.
    assert torch.all(err <= step * 0.5 + 1e-6)


def test_error_shrinks_with_bits() -> None:
    w = _weight(64, 128, 0)
    for scheme, widths in [("sym", range(2, 9)), ("asym", range(1, 9)), ("log", range(2, 6)), ("affine", range(2, 9))]:
        errors = [(quantize_rtn(w, b, scheme).dequantize() - w).pow(2).sum().item() for b in widths]
        assert all(a >= b for a, b in zip(errors, errors[1:])), (scheme, errors)


def test_representable_weights_are_exact() -> None:
    # 3 bits, step 1/8: sym spans [-3, 3] steps from max|w|, asym [-4, 3] steps from min and max.
    for scheme, steps in [("sym", [-3.0, -1.0, 0.0, 2.0, 3.0]), ("asym", [-4.0, -1.0, 0.0, 2.0, 3.0])]:
        w = torch.tensor([steps]) * 0.125
        q = quantize_rtn(w, 3, scheme, scale_dtype=torch.float32)
        assert torch.equal(q.dequantize(), w), scheme
    # affine, 3 bits: min -0.5 and max 1.25 give step 0.25 from -0.5 (zero need not be in the range)
    w = torch.tensor([[-0.5, -0.25, 0.25, 1.25]])
    assert torch.equal(quantize_rtn(w, 3, "affine", scale_dtype=torch.float32).dequantize(), w)
    powers = torch.tensor([[1.0, -0.5, 0.25, -0.125, 0.0]])
    assert torch.equal(quantize_rtn(powers, 4, "log").dequantize(), powers)


def test_log_rounds_in_the_log_domain_and_flushes_tiny_values() -> None:
    # 3 bits: levels s, s/2, s/4 and zero; s = 1. 0.36 is nearer 1/4 in log2 (|log2 .36 + 2| < |log2 .36 + 1|).
    w = torch.tensor([[1.0, 0.36, 0.3, -0.2, 0.1]])
    assert quantize_rtn(w, 3, "log", scale_dtype=torch.float32).dequantize().tolist() == [
        [1.0, 0.5, 0.25, -0.25, 0.0]
    ]


def test_sign_uses_mean_absolute_value_per_group() -> None:
    w = torch.tensor([[1.0, -3.0, 2.0, -2.0, 0.5, 0.5, -0.5, 0.5]])
    q = quantize_rtn(w, 1, "sign", group_size=4, scale_dtype=torch.float32)
    assert q.dequantize().tolist() == [[2.0, -2.0, 2.0, -2.0, 0.5, 0.5, -0.5, 0.5]]


def test_all_zero_and_constant_groups_are_exact() -> None:
    w = torch.zeros(3, 8)
    w[1] = 0.7
    for scheme, bits in [("sym", 4), ("asym", 2), ("log", 3), ("asym", 1), ("affine", 4)]:
        assert torch.allclose(quantize_rtn(w, bits, scheme).dequantize(), w, atol=1e-3), scheme


def test_clip_search_never_increases_the_searched_error() -> None:
    w = _weight(32, 128, 3)
    w[0, 0] = 1.0  # an outlier the search should learn to clip
    assert len(CLIP_RATIOS) == 101
    for scheme, bits in [("asym", 2), ("asym", 3), ("sym", 3), ("log", 3), ("affine", 3)]:
        plain = quantize_rtn(w, bits, scheme, group_size=32)
        searched = quantize_rtn(w, bits, scheme, group_size=32, clip_search=True)
        e_plain = (plain.dequantize() - w).abs().pow(2.4).sum()
        e_search = (searched.dequantize() - w).abs().pow(2.4).sum()
        assert e_search <= e_plain + 1e-7, scheme


def test_dtype_is_remembered() -> None:
    w = _weight(4, 16, 1).to(torch.bfloat16)
    assert quantize_rtn(w, 4, "asym").dequantize().dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 1, "scheme": "sym"}, "'sym' takes 2 to 8 bits"),
        ({"bits": 3, "scheme": "sign"}, "'sign' takes exactly 1 bit"),
        ({"bits": 1, "scheme": "log"}, "use scheme 'sign'"),
        ({"bits": 9, "scheme": "asym"}, "takes 1 to 8 bits"),
        ({"bits": 3, "scheme": "nf4"}, "unknown quantization scheme"),
        ({"bits": 3, "scheme": "asym", "group_size": 5}, "does not divide"),
        ({"bits": 1, "scheme": "sign", "clip_search": True}, "does not apply to 'sign'"),
    ],
)
def test_unsupported_combinations_name_the_problem(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        quantize_rtn(_weight(4, 16, 0), **kwargs)


def test_non_finite_weights_are_refused() -> None:
    w = _weight(4, 16, 0)
    w[2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        quantize_rtn(w, 4)


def test_scheme_enum_accepts_strings() -> None:
    assert quantize_rtn(_weight(2, 8, 0), 2, Scheme.SYM).scheme is Scheme.SYM
