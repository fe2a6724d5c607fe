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
from .kquants import SUPER_BLOCK, KParams, decode_values, encode_values, fit_kparams, pack_k, search_clip_k
from .rtn import CLIP_NORM, CLIP_RATIOS, resolve_group_size, round_scales, search_clip, split_groups
from .schemes import Scheme, check_scheme_bits, decode, encode, fit_scales, kquant_of
from .tensor import QuantizedTensor

__all__ = ["gptq_quantize", "gptq_quantize_batch", "HessianError"]


class HessianError(ValueError):
    """A Hessian that GPTQ cannot use (non-finite, wrong shape)."""


def _fit(groups: torch.Tensor, scheme: Scheme, bits: int, clip_search: bool, scale_dtype: torch.dtype):
    """Scales (as stored, back in float32) and zero points for ``groups [rows, G, group]``."""
    clip = search_clip(groups, scheme, bits, scale_dtype) if clip_search else 1.0
    scales, zeros = fit_scales(groups, scheme, bits, clip)
    return round_scales(scales, scale_dtype).to(torch.float32), zeros


class _KGrid:
    """A K-quant's grid inside the column loop: super-block scales fitted (on the weights as updated
    so far, or up front) and each column coded against its sub-block's stored scale."""

    def __init__(self, scheme: Scheme, clip_search: bool, batch: int, rows: int, supers: int, names: list[str]) -> None:
        self.kind, self.clip_search, self.names = kquant_of(scheme), clip_search, names
        self.batch, self.rows = batch, rows
        self.params: list[list[KParams | None]] = [[None] * supers for _ in range(batch)]
        self.scale = torch.zeros(batch, rows, supers * self.kind.sub_blocks)
        self.offset = torch.zeros_like(self.scale)

    def fit(self, weights: torch.Tensor, first_super: int) -> None:
        """Fit super-blocks ``first_super...`` from ``weights [B, rows, n * 256]``."""
        b, r, cols = weights.shape
        groups = weights.reshape(b * r, cols // SUPER_BLOCK, SUPER_BLOCK)
        clip = search_clip_k(groups, self.kind, CLIP_NORM, CLIP_RATIOS) if self.clip_search else 1.0
        params = fit_kparams(groups, self.kind, clip, ", ".join(self.names))
        scale, offset = params.affine()
        n = self.kind.sub_blocks
        span = slice(first_super * n, (first_super + cols // SUPER_BLOCK) * n)
        self.scale[:, :, span] = scale.reshape(b, r, -1)
        if offset is not None:
            self.offset[:, :, span] = offset.reshape(b, r, -1)
        for i in range(b):
            for j in range(cols // SUPER_BLOCK):
                self.params[i][first_super + j] = KParams(
                    *(None if t is None else t.reshape(b, r, *t.shape[1:])[i, :, j] for t in (params.d, params.dmin, params.sc, params.m))
                )

    def quantize(self, column: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes and decoded values of ``values [B, rows]`` in original columns ``column [B]``."""
        sub = (column // self.kind.sub_block)[:, None, None].expand(self.batch, self.rows, 1)
        scale = torch.gather(self.scale, 2, sub).squeeze(-1)
        offset = torch.gather(self.offset, 2, sub).squeeze(-1)
        codes = encode_values(values, scale, offset, self.kind)
        return codes, decode_values(codes, scale, offset, self.kind)

    def tensors(self, codes: torch.Tensor, like: list[torch.Tensor], scheme: Scheme) -> list[QuantizedTensor]:
        rows, cols = codes.shape[1:]
        out = []
        for b in range(self.batch):
            per = self.params[b]
            params = KParams(*(None if getattr(per[0], f) is None else torch.stack([getattr(p, f) for p in per], dim=1)
                               for f in ("d", "dmin", "sc", "m")))
            blocks = pack_k(codes[b].reshape(rows, cols // SUPER_BLOCK, SUPER_BLOCK), params, self.kind)
            out.append(QuantizedTensor(codes=blocks.reshape(-1), scales=None, zeros=None, bits=self.kind.bits, group_size=SUPER_BLOCK,
                                       scheme=scheme, shape=(rows, cols), dtype=like[b].dtype))
        return out


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
    """GPTQ-quantize ``weight [out, in]`` given ``hessian [in, in]`` (``Σ x xᵀ`` of its inputs)."""
    return gptq_quantize_batch(
        [weight], [hessian], bits, scheme, group_size, clip_search, damp, block_size, act_order, scale_dtype, [name]
    )[0]


def gptq_quantize_batch(
    weights: list[torch.Tensor],
    hessians: list[torch.Tensor],
    bits: int,
    scheme: Scheme | str = Scheme.ASYM,
    group_size: int | None = None,
    clip_search: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    scale_dtype: torch.dtype = torch.float16,
    names: list[str] | None = None,
) -> list[QuantizedTensor]:
    """GPTQ for several weights of one shape and spec at once (the experts of a layer): one
    column loop over a ``[batch, out, in]`` stack instead of one per weight. Each result equals
    :func:`gptq_quantize` of that weight alone."""
    scheme = check_scheme_bits(scheme, bits)
    if clip_search and scheme is Scheme.SIGN:
        raise ValueError("the clipping search does not apply to 'sign' (its mean|w| scale is already optimal)")
    names = names or [f"weight {i}" for i in range(len(weights))]
    batch = len(weights)
    rows, cols = weights[0].shape
    for weight, hessian, name in zip(weights, hessians, names):
        if weight.shape != (rows, cols):
            raise ValueError(f"{name} has shape {tuple(weight.shape)}; a batch needs one shape ({rows}, {cols})")
        if hessian.shape != (cols, cols):
            raise HessianError(f"Hessian of {name} has shape {tuple(hessian.shape)}, expected ({cols}, {cols})")
        if not torch.isfinite(weight).all():
            raise ValueError(f"{name} holds NaN or infinite values; quantizing it would hide the problem: check the source")
        if not torch.isfinite(hessian).all():
            raise HessianError(f"the calibration Hessian of {name} holds NaN or infinite values; check the calibration inputs")
    group = resolve_group_size(cols, group_size, scheme)
    for weight, name in zip(weights, names):  # a scale the storage dtype cannot hold, named before any work
        if scheme.is_kquant:
            fit_kparams(split_groups(weight, group), kquant_of(scheme), 1.0, name)
        else:
            round_scales(fit_scales(split_groups(weight, group), scheme, bits)[0], scale_dtype, name)
    groups_per_row = cols // group
    w = torch.stack([x.detach().to(torch.float32) for x in weights])
    h = torch.stack([x.detach().to(torch.float32) for x in hessians])
    diagonal = torch.diagonal(h, dim1=1, dim2=2)
    dead = diagonal == 0  # [B, C]
    h = h + torch.diag_embed(dead.to(h.dtype))
    w = w.masked_fill(dead[:, None, :], 0.0)

    static = group == cols or act_order
    grid = _KGrid(scheme, clip_search, batch, rows, groups_per_row, names) if scheme.is_kquant else None
    scales = zeros = None
    if grid is not None:
        if static:
            grid.fit(w, 0)
    elif static:  # every group's scale from the (dead-column-zeroed) original weight
        s, z = _fit(w.reshape(batch * rows, groups_per_row, group), scheme, bits, clip_search, scale_dtype)
        scales = s.reshape(batch, rows, groups_per_row)
        zeros = None if z is None else z.reshape(batch, rows, groups_per_row)
    else:
        scales = torch.zeros(batch, rows, groups_per_row)
        zeros = torch.zeros(batch, rows, groups_per_row) if scheme.zero_dtype is not None else None

    diagonal = torch.diagonal(h, dim1=1, dim2=2)
    if act_order:
        order = torch.argsort(diagonal, dim=1, descending=True, stable=True)  # [B, C]
    else:
        order = torch.arange(cols).expand(batch, cols)
    w = torch.gather(w, 2, order[:, None, :].expand(batch, rows, cols))
    h = torch.gather(torch.gather(h, 1, order[:, :, None].expand(batch, cols, cols)), 2, order[:, None, :].expand(batch, cols, cols))
    h = h + torch.eye(cols) * (damp * torch.diagonal(h, dim1=1, dim2=2).mean(dim=1))[:, None, None]
    try:
        upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError:
        raise HessianError(
            f"the calibration Hessian of {', '.join(names)} is not positive definite even with damping {damp}"
        ) from None

    codes = torch.zeros(batch, rows, cols, dtype=torch.int64)  # in processing order
    arange = torch.arange(batch)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        block = w[:, :, start:end].clone()
        errors = torch.zeros_like(block)
        u = upper[:, start:end, start:end]
        for i in range(end - start):
            column = order[:, start + i]  # [B] original column of each weight
            g = column // group
            if not static and (start + i) % group == 0:
                # Fit this group's scale on the weights as updated so far (columns in order).
                current = torch.cat([block[:, :, i:], w[:, :, end:]], dim=2)[:, :, :group]
                if grid is not None:
                    grid.fit(current, (start + i) // group)
                else:
                    s, z = _fit(current.reshape(batch * rows, 1, group), scheme, bits, clip_search, scale_dtype)
                    scales[:, :, (start + i) // group] = s.reshape(batch, rows)
                    if zeros is not None:
                        zeros[:, :, (start + i) // group] = z.reshape(batch, rows)
            if grid is not None:
                code, q = grid.quantize(column, block[:, :, i])
            else:
                scale = scales[arange, :, g].reshape(batch * rows, 1)
                zero = None if zeros is None else zeros[arange, :, g].reshape(batch * rows, 1)
                x = block[:, :, i].reshape(batch * rows, 1, 1)
                code = encode(x, scale, zero, scheme, bits)
                q = decode(code, scale, zero, scheme, bits).reshape(batch, rows)
            codes[:, :, start + i] = code.reshape(batch, rows)
            error = (block[:, :, i] - q) / u[:, i, i][:, None]
            block[:, :, i:] -= error[:, :, None] * u[:, i, i:][:, None, :]
            errors[:, :, i] = error
        w[:, :, end:] -= errors @ upper[:, start:end, end:]

    inverse = torch.argsort(order, dim=1)
    codes = torch.gather(codes, 2, inverse[:, None, :].expand(batch, rows, cols))
    if grid is not None:
        return grid.tensors(codes, weights, scheme)
    return [
        QuantizedTensor(
            codes=pack_codes(codes[b], bits),
            scales=scales[b].to(scale_dtype),
            zeros=None if zeros is None else zeros[b].to(scheme.zero_dtype),
            bits=bits,
            group_size=group,
            scheme=scheme,
            shape=(rows, cols),
            dtype=weights[b].dtype,
        )
        for b in range(batch)
    ]
