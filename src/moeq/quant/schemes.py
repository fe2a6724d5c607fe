"""The four weight quantization schemes: how a group of weights maps to integer codes and back.

Every function works on weights already split into groups, shaped ``[rows, groups, group_size]``,
with one scale (and for ``asym`` one zero point) per ``[row, group]``. Choosing the scale lives in
:func:`fit_scales`; turning weights into codes with given scales in :func:`encode`; and back in
:func:`decode`. Round-to-nearest, the clipping search and GPTQ all use these three, so a code
means the same thing whichever algorithm produced it.

Schemes (``b`` bits, code ``c``, scale ``s``):

- ``sym``: linear symmetric absolute-max, MoQE's channel-wise quantizer. ``s = max|w| / (2^(b-1)-1)``,
  ``c = clamp(round(w/s), -2^(b-1), 2^(b-1)-1) + 2^(b-1)``, ``w' = (c - 2^(b-1)) s``. Needs b >= 2.
- ``symx``: ``sym``'s codes and decode with the scale llama.cpp's Q4_0/Q5_0 quantizer picks: the
  weight of largest magnitude ``m`` (with its sign) maps to the extra negative code,
  ``s = m / -2^(b-1)``, so all ``2^b`` codes are used and the step is ``2^(b-1)/(2^(b-1)-1)``
  times finer; ``s`` is negative when ``m > 0`` (GGUF stores it as is). Needs b >= 2.
- ``asym``: linear asymmetric min-max with an integer zero point ``z``: ``lo = min(min w, 0)``,
  ``hi = max(max w, 0)``, ``s = (hi - lo) / (2^b - 1)``, ``z = round(-lo/s)``,
  ``c = clamp(round(w/s) + z, 0, 2^b-1)``, ``w' = (c - z) s``. Including 0 in the range (as GPTQ
  does) keeps zero exactly representable and makes a constant group exact.
- ``affine``: llama.cpp's Q4_1/Q5_1 rule, a float offset instead of an integer zero point:
  ``m = min w`` and ``s = (max w - m) / (2^b - 1)`` (both float16, as the file stores them: ``m``
  is rounded here, ``s`` with the other schemes' scales), ``c = clamp(round((w - m)/s), 0, 2^b-1)``,
  ``w' = c s + m``. The group's extremes are exact up to the rounding; zero need not be.
- ``log``: MoQE's log-scale quantizer, a sign bit and ``b-1`` bits of power-of-two magnitude.
  With ``L = 2^(b-1) - 1`` magnitude levels ``s·2^0, s·2^-1, ..., s·2^-(L-1)`` and ``s = max|w|``,
  a weight's exponent is rounded in the log domain, ``k = clamp(round(-log2(|w|/s)), 0, L-1)``;
  weights below ``s·2^-L`` (half the smallest level) become 0. Code: sign in the top bit, then
  ``m = 0`` for zero or ``k + 1``. Needs b >= 2.
- ``sign``: 1 bit, ``c = [w >= 0]``, ``w' = (2c - 1) s`` with ``s = mean|w|`` over the group (the
  scale that minimises the squared error of a sign code).
- ``q2_k`` ... ``q6_k``: llama.cpp's K-quants (2 to 6 bits), whose scales are themselves quantized
  per super-block of 256 weights; their codes and scales live in GGML blocks, see
  :mod:`moeq.quant.kquants` (the three functions below do not take them).

A clipping ratio ``p`` (``clip`` below, one per group) scales the range before the scale is set:
``max|w|`` becomes ``p·max|w|`` and ``lo, hi`` become ``p·lo, p·hi``.
"""

from __future__ import annotations

from enum import Enum

import torch

from .kquants import KQUANTS, KQuant

__all__ = ["Scheme", "check_scheme_bits", "fit_scales", "encode", "decode", "kquant_of"]


class Scheme(str, Enum):
    """Weight quantization scheme; see the module docstring for the exact maps."""

    SYM = "sym"
    SYMX = "symx"
    ASYM = "asym"
    AFFINE = "affine"
    LOG = "log"
    SIGN = "sign"
    Q2_K = "q2_k"
    Q3_K = "q3_k"
    Q4_K = "q4_k"
    Q5_K = "q5_k"
    Q6_K = "q6_k"

    @property
    def zero_dtype(self) -> torch.dtype | None:
        """Storage of the per-group offsets: ``asym``'s integer zero points, ``affine``'s float16 minima."""
        return {"asym": torch.uint8, "affine": torch.float16}.get(self.value)

    @property
    def is_kquant(self) -> bool:
        """A llama.cpp K-quant, stored as GGML blocks (:mod:`moeq.quant.kquants`)."""
        return self.value.endswith("_k")


_BIT_RANGE = {
    Scheme.SYM: (2, 8),
    Scheme.SYMX: (2, 8),
    Scheme.ASYM: (1, 8),
    Scheme.AFFINE: (2, 8),
    Scheme.LOG: (2, 8),
    Scheme.SIGN: (1, 1),
    Scheme.Q2_K: (2, 2),
    Scheme.Q3_K: (3, 3),
    Scheme.Q4_K: (4, 4),
    Scheme.Q5_K: (5, 5),
    Scheme.Q6_K: (6, 6),
}


def kquant_of(scheme: Scheme) -> KQuant:
    """The :class:`moeq.quant.kquants.KQuant` of a K-quant scheme."""
    return KQUANTS[scheme.value.upper()]


def check_scheme_bits(scheme: Scheme | str, bits: int) -> Scheme:
    """Validate a (scheme, bits) pair and return the scheme as a :class:`Scheme`."""
    try:
        scheme = Scheme(scheme)
    except ValueError:
        names = ", ".join(s.value for s in Scheme)
        raise ValueError(f"unknown quantization scheme {scheme!r}; choose one of: {names}") from None
    low, high = _BIT_RANGE[scheme]
    if not isinstance(bits, int) or not low <= bits <= high:
        hint = " (use scheme 'sign' or 'asym' for 1 bit)" if bits == 1 else ""
        takes = f"exactly {low} bit{'s' if low > 1 else ''}" if low == high else f"{low} to {high} bits"
        raise ValueError(f"scheme '{scheme.value}' takes {takes}, got {bits!r}{hint}")
    return scheme


def fit_scales(
    groups: torch.Tensor, scheme: Scheme, bits: int, clip: torch.Tensor | float = 1.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales ``[rows, groups]`` (float32) and, for ``asym``, integer zero points (``affine``: float16
    minima, as float32), for ``groups``.

    ``groups`` is float32 ``[rows, groups, group_size]``; ``clip`` is a scalar or ``[rows, groups]``.
    """
    clip = torch.as_tensor(clip, dtype=groups.dtype, device=groups.device)
    if scheme is Scheme.SIGN:
        return groups.abs().mean(dim=-1), None
    if scheme is Scheme.ASYM:
        maxq = (1 << bits) - 1
        lo = groups.amin(dim=-1).clamp(max=0) * clip
        hi = groups.amax(dim=-1).clamp(min=0) * clip
        scales = _positive((hi - lo) / maxq)
        zeros = torch.round(-lo / scales).clamp(0, maxq)
        return scales, zeros
    if scheme is Scheme.AFFINE:
        lo = (groups.amin(dim=-1) * clip).to(torch.float16).to(torch.float32)
        hi = groups.amax(dim=-1) * clip
        return _positive((hi - lo) / ((1 << bits) - 1)), lo
    if scheme is Scheme.SYMX:
        index = groups.abs().argmax(dim=-1, keepdim=True)
        extreme = torch.gather(groups, -1, index).squeeze(-1) * clip
        scales = extreme / -(1 << (bits - 1))
        return torch.where(scales != 0, scales, torch.ones_like(scales)), None
    absmax = groups.abs().amax(dim=-1) * clip
    if scheme is Scheme.SYM:
        return _positive(absmax / ((1 << (bits - 1)) - 1)), None
    return _positive(absmax), None  # LOG: the scale is the largest magnitude level


def _positive(scales: torch.Tensor) -> torch.Tensor:
    # An all-zero group would give a zero scale and 0/0 codes; any positive scale codes it exactly.
    return torch.where(scales > 0, scales, torch.ones_like(scales))


def encode(
    groups: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, scheme: Scheme, bits: int
) -> torch.Tensor:
    """Integer codes (int64, in ``[0, 2**bits)``) of ``groups`` under the given scales."""
    s = scales.unsqueeze(-1)
    if scheme is Scheme.SIGN:
        return (groups >= 0).to(torch.int64)
    if scheme is Scheme.ASYM:
        maxq = (1 << bits) - 1
        return (torch.round(groups / s) + zeros.unsqueeze(-1)).clamp(0, maxq).to(torch.int64)
    if scheme is Scheme.AFFINE:
        return torch.round((groups - zeros.unsqueeze(-1)) / s).clamp(0, (1 << bits) - 1).to(torch.int64)
    half = 1 << (bits - 1)
    if scheme in (Scheme.SYM, Scheme.SYMX):
        return (torch.round(groups / s).clamp(-half, half - 1) + half).to(torch.int64)
    levels = half - 1
    ratio = groups.abs() / s
    exponent = torch.round(-torch.log2(ratio.clamp(min=2.0**-126))).clamp(0, levels - 1)
    magnitude = torch.where(ratio < 2.0 ** (-levels), torch.zeros_like(exponent), exponent + 1)
    sign = (groups < 0).to(torch.int64)
    return (sign << (bits - 1)) | magnitude.to(torch.int64)


def decode(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, scheme: Scheme, bits: int
) -> torch.Tensor:
    """Float32 weights ``[rows, groups, group_size]`` from codes shaped the same way."""
    s = scales.to(torch.float32).unsqueeze(-1)
    q = codes.to(torch.float32)
    if scheme is Scheme.SIGN:
        return (2 * q - 1) * s
    if scheme is Scheme.ASYM:
        return (q - zeros.to(torch.float32).unsqueeze(-1)) * s
    if scheme is Scheme.AFFINE:
        return q * s + zeros.to(torch.float32).unsqueeze(-1)
    half = 1 << (bits - 1)
    if scheme in (Scheme.SYM, Scheme.SYMX):
        return (q - half) * s
    codes = codes.to(torch.int64)
    magnitude = (codes & (half - 1)).to(torch.float32)
    sign = 1 - 2 * (codes >> (bits - 1)).to(torch.float32)
    value = torch.where(magnitude > 0, torch.exp2(1 - magnitude), torch.zeros_like(magnitude))
    return sign * value * s
