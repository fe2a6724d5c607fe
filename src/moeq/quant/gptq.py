"""GPTQ (Frantar et al., 2022): quantize a weight column by column, pushing each column's rounding
error onto the columns not yet quantized, weighted by the inverse Hessian of the layer's inputs.

For ``W [out, in]`` and calibration inputs ``X [n, in]``, ``H = X^T X`` (any positive scale: GPTQ
only uses ratios of its entries). With ``damp`` (default 0.01 of the mean diagonal) added to the
diagonal, ``U`` = the upper Cholesky factor of ``H^-1``, and columns processed in blocks of 128::

    for column i:  q_i = Q(w_i);  e_i = (w_i - q_i) / U_ii;  w_j -= e_i U_ij  for j > i

Inputs that never fire (``H_ii = 0``) get ``H_ii = 1`` and their column is zeroed first, as in the
reference code. Scales come from the scheme of :mod:`moeq.quant.schemes`: per output channel
(fitted on the whole weight before the loop) or per group (fitted on the partly updated weight
when the loop reaches the group's first column), optionally with the clipping search; 1-bit
``sign`` uses the group's mean ``|w|``. With ``act_order`` columns are visited by decreasing
``H_ii``; group scales are then fitted up front on the original weight ("static groups"), so groups
stay contiguous in the original column order and the result fits the same QuantizedTensor.
"""

from __future__ import annotations

import torch

from .pack import pack_codes
from .rtn import _round_scales, _search_clip, resolve_group_size, split_groups
from .schemes import Scheme, check_scheme_bits, decode, encode, fit_scales
from .tensor import QuantizedTensor

__all__ = ["gptq_quantize", "HessianError"]


class HessianError(ValueError):
    """A Hessian that GPTQ cannot use (non-finite, wrong shape)."""


def _fit(groups: torch.Tensor, scheme: Scheme, bits: int, clip_search: bool, scale_dtype: torch.dtype):
    clip = _search_clip(groups, scheme, bits, scale_dtype) if clip_search else 1.0
    scales, zeros = fit_scales(groups, scheme, bits, clip)
    return _round_scales(scales, scale_dtype).to(torch.float32), zeros


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    scheme: Scheme | str = Scheme.ASYM,
    group_size: int | None = None,
    clip_search: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    scale_dtype: torch.dtype = torch.float16,
    name: str = "weight",
) -> QuantizedTensor:
    """GPTQ-quantize ``weight [out, in]`` given ``hessian [in, in]`` (``Σ x x^T`` of its inputs)."""
    scheme = check_scheme_bits(scheme, bits)
    if clip_search and scheme is Scheme.SIGN:
        raise ValueError("the clipping search does not apply to 'sign' (its mean|w| scale is already optimal)")
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise HessianError(f"Hessian of {name} has shape {tuple(hessian.shape)}, expected ({cols}, {cols})")
    if not torch.isfinite(weight).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    if not torch.isfinite(hessian).all():
        raise HessianError(f"the calibration Hessian of {name} holds NaN or infinite values; check the calibration inputs")
    group = resolve_group_size(cols, group_size)
    w = weight.detach().to(torch.float32).clone()
    h = hessian.detach().to(torch.float32).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    per_channel = group == cols
    static = per_channel or act_order
    if static:  # every group's scale from the (dead-column-zeroed) original weight
        scales, zeros = _fit(split_groups(w, group), scheme, bits, clip_search, scale_dtype)
    else:
        scales = torch.zeros(rows, cols // group)
        zeros = torch.zeros(rows, cols // group) if scheme is Scheme.ASYM else None

    order = torch.argsort(torch.diag(h), descending=True, stable=True) if act_order else torch.arange(cols)
    w, h = w[:, order], h[order][:, order]
    h += torch.eye(cols) * (damp * torch.mean(torch.diag(h)))
    try:
        upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError:
        raise HessianError(f"the calibration Hessian of {name} is not positive definite even with damping {damp}") from None

    codes = torch.zeros(rows, cols, dtype=torch.int64)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        u = upper[start:end, start:end]
        for i in range(end - start):
            column = int(order[start + i])
            g = column // group
            if not static and column % group == 0:
                # Fit this group's scale on the weights as updated so far (columns in order).
                current = torch.cat([block[:, i:], w[:, end:]], dim=1)[:, :group]
                s, z = _fit(current.reshape(rows, 1, group), scheme, bits, clip_search, scale_dtype)
                scales[:, g] = s[:, 0]
                if zeros is not None:
                    zeros[:, g] = z[:, 0]
            zero = None if zeros is None else zeros[:, g : g + 1]
            x = block[:, i].reshape(rows, 1, 1)
            code = encode(x, scales[:, g : g + 1], zero, scheme, bits)
            q = decode(code, scales[:, g : g + 1], zero, scheme, bits).reshape(rows)
            codes[:, column] = code.reshape(rows)
            error = (block[:, i] - q) / u[i, i]
            block[:, i:] -= error[:, None] * u[i, i:][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ upper[start:end, end:]

    return QuantizedTensor(
        codes=pack_codes(codes, bits),
        scales=scales.to(scale_dtype),
        zeros=None if zeros is None else zeros.to(torch.uint8),
        bits=bits,
        group_size=group,
        scheme=scheme,
        shape=(rows, cols),
        dtype=weight.dtype,
    )
