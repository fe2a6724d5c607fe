"""Round-to-nearest weight quantization, per output channel or per group, with an optional
clipping search.

The clipping search is the one the expert-wise mixed-precision paper used with GPTQ
(PAPERS.md §1): for every group try ``p`` in ``{1} ∪ linspace(1, 1.1, 50) ∪ linspace(1, 0.9, 50)``,
scale the range by ``p``, and keep the ``p`` with the smallest ``Σ |w' - w|^2.4``. It applies to
``sym``, ``asym`` and ``log``; ``sign`` has a closed-form optimal scale and refuses it.
"""

from __future__ import annotations

import torch

from .pack import pack_codes
from .kquants import SUPER_BLOCK, encode_k, fit_kparams, pack_k, search_clip_k
from .schemes import Scheme, check_scheme_bits, decode, encode, fit_scales, kquant_of
from .tensor import QuantizedTensor

__all__ = ["quantize_rtn", "CLIP_RATIOS", "CLIP_NORM", "split_groups", "resolve_group_size", "round_scales", "search_clip"]

CLIP_RATIOS: tuple[float, ...] = tuple(
    [1.0] + torch.linspace(1.0, 1.1, 50).tolist() + torch.linspace(1.0, 0.9, 50).tolist()
)
CLIP_NORM = 2.4


def resolve_group_size(in_features: int, group_size: int | None, scheme: Scheme | str | None = None) -> int:
    """The group size to use along the input dimension (``None`` or -1: one group per row; a
    K-quant scheme: its super-block of 256, whatever ``group_size`` says)."""
    if scheme is not None and Scheme(scheme).is_kquant:
        if in_features % SUPER_BLOCK:
            raise ValueError(
                f"{Scheme(scheme).value} stores rows in super-blocks of {SUPER_BLOCK}; an input dimension of {in_features} "
                "does not divide (llama.cpp falls back to Q4_0/Q5_0/Q8_0 for such tensors: use scheme sym with group 32)"
            )
        return SUPER_BLOCK
    if group_size is None or group_size == -1 or group_size == in_features:
        return in_features
    if group_size <= 0 or in_features % group_size:
        raise ValueError(
            f"group size {group_size} does not divide the input dimension {in_features}; "
            "choose a divisor or omit --group-size for one scale per output channel"
        )
    return group_size


def split_groups(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """float32 ``[out, in / group_size, group_size]`` view of a 2-D weight."""
    rows, cols = weight.shape
    return weight.detach().to(torch.float32).reshape(rows, cols // group_size, group_size)


def round_scales(scales: torch.Tensor, scale_dtype: torch.dtype, name: str = "weight") -> torch.Tensor:
    """``scales`` in their storage dtype; a scale the dtype cannot hold is refused, naming ``name``
    (float16 tops out at 65504: stored, it would become inf and the row would decode to NaN)."""
    largest = torch.finfo(scale_dtype).max
    if scales.numel() and scales.abs().max() > largest:
        dtype = str(scale_dtype).removeprefix("torch.")
        raise ValueError(
            f"{name} needs a scale of {scales.abs().max().item():.3g}, more than {dtype} holds ({largest:.6g}); weights that large "
            'are almost surely corrupt: check the source (if they are genuine, use a plan whose "scale_dtype" is "float32")'
        )
    # Codes are chosen against the scale as stored, so encode and decode agree exactly. Only symx has
    # negative scales; their magnitude is kept off zero the same way.
    tiny = torch.finfo(scale_dtype).tiny
    return torch.where(scales < 0, scales.clamp(max=-tiny), scales.clamp(min=tiny)).to(scale_dtype)


def search_clip(groups: torch.Tensor, scheme: Scheme, bits: int, scale_dtype: torch.dtype, name: str = "weight") -> torch.Tensor:
    best_err = torch.full(groups.shape[:2], float("inf"))
    best_clip = torch.ones(groups.shape[:2])
    for ratio in CLIP_RATIOS:
        scales, zeros = fit_scales(groups, scheme, bits, ratio)
        scales = round_scales(scales, scale_dtype, name).to(torch.float32)
        recon = decode(encode(groups, scales, zeros, scheme, bits), scales, zeros, scheme, bits)
        err = (recon - groups).abs().pow(CLIP_NORM).sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_clip = torch.where(better, torch.full_like(best_clip, ratio), best_clip)
    return best_clip


def quantize_rtn(
    weight: torch.Tensor,
    bits: int,
    scheme: Scheme | str = Scheme.ASYM,
    group_size: int | None = None,
    clip_search: bool = False,
    scale_dtype: torch.dtype = torch.float16,
    name: str = "weight",
) -> QuantizedTensor:
    """Quantize a 2-D weight ``[out, in]`` by rounding to the nearest code.

    Args:
        weight: the weight; any float dtype, returned dtype is remembered for dequantization.
        bits: code width, 1 to 8 (the scheme narrows it: ``sign`` is 1 bit, ``sym``/``log`` >= 2).
        scheme: ``sym``, ``asym``, ``log`` or ``sign`` (see :mod:`moeq.quant.schemes`).
        group_size: inputs per scale along the input dimension; ``None`` = one per output channel.
        clip_search: search a clipping ratio per group (not for ``sign``).
        scale_dtype: storage dtype of the scales.
        name: what the weight is, for errors (a non-finite weight, a scale the dtype cannot hold).
    """
    scheme = check_scheme_bits(scheme, bits)
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    if not torch.isfinite(weight).all():
        raise ValueError(f"{name} holds NaN or infinite values; quantizing it would hide the problem: check the source")
    if clip_search and scheme is Scheme.SIGN:
        raise ValueError("the clipping search does not apply to 'sign' (its mean|w| scale is already optimal)")
    group = resolve_group_size(weight.shape[1], group_size, scheme)
    groups = split_groups(weight, group)
    if scheme.is_kquant:
        kind = kquant_of(scheme)
        clip = search_clip_k(groups, kind, CLIP_NORM, CLIP_RATIOS) if clip_search else 1.0
        params = fit_kparams(groups, kind, clip, name)
        return QuantizedTensor(
            codes=pack_k(encode_k(groups, params, kind), params, kind).reshape(-1),
            scales=None, zeros=None, bits=bits, group_size=group, scheme=scheme,
            shape=(int(weight.shape[0]), int(weight.shape[1])), dtype=weight.dtype,
        )
    clip = search_clip(groups, scheme, bits, scale_dtype, name) if clip_search else 1.0
    scales, zeros = fit_scales(groups, scheme, bits, clip)
    scales = round_scales(scales, scale_dtype, name)
    codes = encode(groups, scales.to(torch.float32), zeros, scheme, bits)
    return QuantizedTensor(
        codes=pack_codes(codes, bits),
        scales=scales,
        zeros=None if zeros is None else zeros.to(scheme.zero_dtype),
        bits=bits,
        group_size=group,
        scheme=scheme,
        shape=(int(weight.shape[0]), int(weight.shape[1])),
        dtype=weight.dtype,
    )
