"""llama.cpp's K-quants (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) as moeq schemes: codes and scales chosen
by moeq's quantizers (round-to-nearest, the clipping search, GPTQ) and stored as the GGML blocks
a GGUF file holds, so export copies bytes and every decode is the file's.

A row is cut into super-blocks of 256 weights, each into sub-blocks of 16 or 32. A sub-block has
an integer scale ``sc`` (and for the affine types an integer minimum ``m``); the super-block has
float16 ``d`` (and ``dmin``). Decoding, for code ``q`` (values as ggml-common.h and the ``gguf``
package's numpy decoders define them, in the same float32 operations)::

    affine (Q2_K, Q4_K, Q5_K):  w = (d * sc) * q - (dmin * m)      q in [0, 2^b)
    signed (Q3_K, Q6_K):        w = (d * sc) * (q - 2^(b-1))       sc signed

=====  ====  =========  ====================  ========================  ==========
type   bits  sub-block  sc / m                bytes per 256 (bits/w)    layout
=====  ====  =========  ====================  ========================  ==========
Q2_K   2     16         4-bit / 4-bit         84 (2.625)                scales, qs, d, dmin
Q3_K   3     16         6-bit signed          110 (3.4375)              hmask, qs, scales, d
Q4_K   4     32         6-bit / 6-bit         144 (4.5)                 d, dmin, scales, qs
Q5_K   5     32         6-bit / 6-bit         176 (5.5)                 d, dmin, scales, qh, qs
Q6_K   6     16         8-bit signed          210 (6.5625)              ql, qh, scales, d
=====  ====  =========  ====================  ========================  ==========

Fitting (the round-to-nearest grid): each sub-block's float scale (and minimum) comes from its
range as in moeq's ``asym``/``sym`` schemes (the range including 0 for affine types; for signed
types the weight of largest magnitude maps to code 0, as llama.cpp's Q3/Q6 fits do), optionally
scaled by a clipping ratio; the super-block's ``d`` (``dmin``) is the largest sub-block scale
(minimum) over the integer range, stored in float16, and the integer scales are rounded against
it. Codes are then chosen against the scales as stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "KQuant", "KQUANTS", "KParams", "SUPER_BLOCK", "fit_kparams", "encode_k", "decode_k", "encode_values", "decode_values",
    "pack_k", "unpack_k", "search_clip_k", "super_block_scales",
]

SUPER_BLOCK = 256


@dataclass(frozen=True)
class KQuant:
    """One K-quant type's geometry and integer ranges."""

    name: str
    bits: int
    sub_block: int
    affine: bool  # True: scale and minimum per sub-block; False: one signed scale
    scale_max: int  # largest integer sub-block scale (and minimum) magnitude
    type_size: int  # bytes per super-block

    @property
    def sub_blocks(self) -> int:
        return SUPER_BLOCK // self.sub_block

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    @property
    def bits_per_weight(self) -> float:
        return self.type_size * 8 / SUPER_BLOCK


KQUANTS: dict[str, KQuant] = {
    k.name: k
    for k in (
        KQuant("Q2_K", 2, 16, True, 15, 84),
        KQuant("Q3_K", 3, 16, False, 31, 110),
        KQuant("Q4_K", 4, 32, True, 63, 144),
        KQuant("Q5_K", 5, 32, True, 63, 176),
        KQuant("Q6_K", 6, 16, False, 127, 210),
    )
}


@dataclass(frozen=True)
class KParams:
    """Scales of ``rows x supers`` super-blocks: float16 ``d``/``dmin`` (held as float32) and
    integer ``sc``/``m`` per sub-block, ``[rows, supers, sub_blocks]``."""

    d: torch.Tensor
    dmin: torch.Tensor | None
    sc: torch.Tensor
    m: torch.Tensor | None

    def affine(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per sub-block float32 ``scale = d*sc`` and ``offset = dmin*m`` (exact products)."""
        scale = self.d.unsqueeze(-1) * self.sc.to(torch.float32)
        offset = None if self.dmin is None else self.dmin.unsqueeze(-1) * self.m.to(torch.float32)
        return scale, offset


def _to_half(values: torch.Tensor, name: str) -> torch.Tensor:
    if values.numel() and values.max() > torch.finfo(torch.float16).max:
        raise ValueError(
            f"{name} needs a super-block scale of {values.max().item():.3g}, more than float16 holds (65504); "
            "weights that large are almost surely corrupt: check the source"
        )
    return values.to(torch.float16).to(torch.float32)


def _sub_ranges(groups: torch.Tensor, kind: KQuant, clip: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float scale (and minimum) per sub-block of ``groups [rows, supers, sub_blocks, sub_block]``."""
    clip = torch.as_tensor(clip, dtype=groups.dtype)
    if kind.affine:
        lo = groups.amin(dim=-1).clamp(max=0) * clip
        hi = groups.amax(dim=-1).clamp(min=0) * clip
        return (hi - lo) / kind.qmax, -lo
    half = 1 << (kind.bits - 1)
    index = groups.abs().argmax(dim=-1, keepdim=True)
    signed_max = torch.gather(groups, -1, index).squeeze(-1) * clip
    return signed_max / -half, None  # the largest-magnitude weight maps to code 0 (value -half)


def _integer_scales(values: torch.Tensor, limit: int, signed: bool, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """float16 super-block factor and integer sub-block scales for float ``values [R, S, n]``."""
    top = values.abs().amax(dim=-1) / limit
    top = _to_half(top, name)
    safe = torch.where(top > 0, top, torch.ones_like(top))
    ints = torch.round(values / safe.unsqueeze(-1))
    ints = ints.clamp(-limit, limit) if signed else ints.clamp(0, limit)
    return top, ints.to(torch.int64)


def fit_kparams(groups: torch.Tensor, kind: KQuant, clip: torch.Tensor | float = 1.0, name: str = "weight") -> KParams:
    """The K-quant scales of ``groups`` (float32 ``[rows, supers, 256]``); ``clip`` is a scalar
    or ``[rows, supers, sub_blocks]``.

    Why the range and not a least-squares fit of the scales: alternating least squares on the
    sub-block and super-block scales cut the squared weight error by 12-30% (Q4_K-Q2_K) and
    still made the model worse in llama.cpp's own harness (benchmarks/gguf_peers.py, BENCHMARKS.md):
    it clips the largest weights, which matter most, and leaves GPTQ's updated columns no room.
    """
    rows, supers, _ = groups.shape
    sub = groups.reshape(rows, supers, kind.sub_blocks, kind.sub_block)
    scale, minimum = _sub_ranges(sub, kind, clip)
    if kind.affine:
        d, sc = _integer_scales(scale, kind.scale_max, False, name)
        dmin, m = _integer_scales(minimum, kind.scale_max, False, name)
        return KParams(d, dmin, sc, m)
    d, sc = _integer_scales(scale, kind.scale_max, True, name)
    return KParams(d, None, sc, None)


def _per_weight(values: torch.Tensor, kind: KQuant) -> torch.Tensor:
    """``[R, S, sub_blocks]`` -> ``[R, S, 256]`` (each sub-block's value repeated)."""
    return values.repeat_interleave(kind.sub_block, dim=-1)


def encode_values(values: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, kind: KQuant) -> torch.Tensor:
    """Codes (int64 in ``[0, 2^bits)``) of ``values`` against per-value float32 ``scale = d*sc``
    and (affine types) ``offset = dmin*m``, all the same shape."""
    safe = torch.where(scale != 0, scale, torch.ones_like(scale))
    if kind.affine:
        codes = torch.round((values + offset) / safe)
        codes = torch.where(scale != 0, codes, torch.zeros_like(codes))
    else:
        half = 1 << (kind.bits - 1)
        codes = torch.round(values / safe) + half
        codes = torch.where(scale != 0, codes, torch.full_like(codes, half))
    return codes.clamp(0, kind.qmax).to(torch.int64)


def decode_values(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, kind: KQuant) -> torch.Tensor:
    """Float32 values of ``codes`` (the file's decode: ``scale*q - offset`` or ``scale*(q - half)``)."""
    q = codes.to(torch.float32)
    if kind.affine:
        return scale * q - offset
    return scale * (q - (1 << (kind.bits - 1)))


def encode_k(groups: torch.Tensor, params: KParams, kind: KQuant) -> torch.Tensor:
    """Codes of ``groups [R, S, 256]`` against the stored scales."""
    scale, offset = params.affine()
    return encode_values(groups, _per_weight(scale, kind), None if offset is None else _per_weight(offset, kind), kind)


def decode_k(codes: torch.Tensor, params: KParams, kind: KQuant) -> torch.Tensor:
    """Float32 weights ``[R, S, 256]`` of codes shaped the same way (the file's decode)."""
    scale, offset = params.affine()
    return decode_values(codes, _per_weight(scale, kind), None if offset is None else _per_weight(offset, kind), kind)


def search_clip_k(groups: torch.Tensor, kind: KQuant, norm: float, ratios: tuple[float, ...]) -> torch.Tensor:
    """Per sub-block clipping ratio ``[R, S, sub_blocks]`` minimising ``Σ|w' - w|^norm`` with the
    sub-block's float scale (before the scales are rounded to integers)."""
    rows, supers, _ = groups.shape
    sub = groups.reshape(rows, supers, kind.sub_blocks, kind.sub_block)
    best_err = torch.full(sub.shape[:3], float("inf"))
    best = torch.ones(sub.shape[:3])
    for ratio in ratios:
        scale, minimum = _sub_ranges(sub, kind, ratio)
        safe = torch.where(scale != 0, scale, torch.ones_like(scale)).unsqueeze(-1)
        if kind.affine:
            q = torch.round((sub + minimum.unsqueeze(-1)) / safe).clamp(0, kind.qmax)
            recon = q * safe - minimum.unsqueeze(-1)
        else:
            half = 1 << (kind.bits - 1)
            q = (torch.round(sub / safe) + half).clamp(0, kind.qmax)
            recon = (q - half) * safe
        err = (recon - sub).abs().pow(norm).sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, ratio), best)
    return best


# ---- the GGML block layouts ------------------------------------------------------------------

def _half_bytes(values: torch.Tensor) -> torch.Tensor:
    """float32 values (exactly float16) -> uint8 ``[..., 2]`` little-endian float16."""
    return values.to(torch.float16).contiguous().view(torch.uint8).reshape(*values.shape, 2)


def _half_values(data: torch.Tensor) -> torch.Tensor:
    return data.contiguous().view(torch.float16).squeeze(-1).to(torch.float32)


def _pack_bits(values: torch.Tensor, width: int, lanes: int) -> torch.Tensor:
    """Codes ``[..., n]`` (``width`` bits each) into bytes where byte ``l`` of a chunk holds, at
    bit ``width*j``, element ``j*lanes + l`` of that chunk (chunks of ``lanes * 8/width``)."""
    per_byte = 8 // width
    chunk = values.reshape(*values.shape[:-1], -1, per_byte, lanes)
    out = torch.zeros(*chunk.shape[:-2], lanes, dtype=torch.int64, device=values.device)
    for j in range(per_byte):
        out |= (chunk[..., j, :] & ((1 << width) - 1)) << (width * j)
    return out.reshape(*values.shape[:-1], -1).to(torch.uint8)


def _unpack_bits(data: torch.Tensor, width: int, lanes: int) -> torch.Tensor:
    per_byte = 8 // width
    chunk = data.to(torch.int64).reshape(*data.shape[:-1], -1, 1, lanes)
    shifts = (torch.arange(per_byte, device=data.device) * width).reshape(1, per_byte, 1)
    return ((chunk >> shifts) & ((1 << width) - 1)).reshape(*data.shape[:-1], -1)


def _pack_6bit_scales(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K: eight 6-bit scales and minimums in 12 bytes (ggml's get_scale_min_k4 layout)."""
    low = sc[..., :4] | ((sc[..., 4:] >> 4) << 6)
    mid = m[..., :4] | ((m[..., 4:] >> 4) << 6)
    high = (sc[..., 4:] & 0x0F) | ((m[..., 4:] & 0x0F) << 4)
    return torch.cat([low, mid, high], dim=-1).to(torch.uint8)


def _unpack_6bit_scales(data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    data = data.to(torch.int64)
    low, mid, high = data[..., :4], data[..., 4:8], data[..., 8:12]
    sc = torch.cat([low & 0x3F, (high & 0x0F) | ((low >> 2) & 0x30)], dim=-1)
    m = torch.cat([mid & 0x3F, (high >> 4) | ((mid >> 2) & 0x30)], dim=-1)
    return sc, m


def _pack_q3_scales(sc: torch.Tensor) -> torch.Tensor:
    """Q3_K: sixteen signed 6-bit scales (stored + 32) in 12 bytes."""
    u = sc + 32
    low = (u[..., :8] & 0x0F) | ((u[..., 8:] & 0x0F) << 4)
    top = (u >> 4) & 0x03  # [.., 16]: scale i's two high bits go to byte 8 + i % 4 at bit 2 * (i // 4)
    high = torch.zeros(*u.shape[:-1], 4, dtype=torch.int64, device=u.device)
    for i in range(16):
        high[..., i % 4] |= top[..., i] << (2 * (i // 4))
    return torch.cat([low, high], dim=-1).to(torch.uint8)


def _unpack_q3_scales(data: torch.Tensor) -> torch.Tensor:
    data = data.to(torch.int64)
    low = torch.cat([data[..., :8] & 0x0F, data[..., :8] >> 4], dim=-1)
    high = torch.stack([(data[..., 8 + i % 4] >> (2 * (i // 4))) & 0x03 for i in range(16)], dim=-1)
    return (low | (high << 4)) - 32


def pack_k(codes: torch.Tensor, params: KParams, kind: KQuant) -> torch.Tensor:
    """GGML blocks uint8 ``[R, S * type_size]`` from codes ``[R, S, 256]`` and their scales."""
    codes = codes.to(torch.int64)
    rows, supers, _ = codes.shape
    if kind.name == "Q2_K":
        parts = [(params.sc | (params.m << 4)).to(torch.uint8), _pack_bits(codes, 2, 32), _half_bytes(params.d),
                 _half_bytes(params.dmin)]
    elif kind.name == "Q3_K":
        parts = [_pack_bits(codes >> 2, 1, 32), _pack_bits(codes & 3, 2, 32), _pack_q3_scales(params.sc), _half_bytes(params.d)]
    elif kind.name == "Q4_K":
        parts = [_half_bytes(params.d), _half_bytes(params.dmin), _pack_6bit_scales(params.sc, params.m),
                 _pack_bits(codes, 4, 32)]
    elif kind.name == "Q5_K":
        parts = [_half_bytes(params.d), _half_bytes(params.dmin), _pack_6bit_scales(params.sc, params.m),
                 _pack_bits(codes >> 4, 1, 32), _pack_bits(codes & 0x0F, 4, 32)]
    else:  # Q6_K
        parts = [_pack_bits(codes & 0x0F, 4, 64), _pack_bits(codes >> 4, 2, 32), params.sc.to(torch.int8).view(torch.uint8),
                 _half_bytes(params.d)]
    blocks = torch.cat(parts, dim=-1)
    assert blocks.shape == (rows, supers, kind.type_size), blocks.shape
    return blocks.reshape(rows, supers * kind.type_size)


def unpack_k(blocks: torch.Tensor, kind: KQuant) -> tuple[torch.Tensor, KParams]:
    """Codes ``[R, S, 256]`` and scales of GGML blocks uint8 ``[R, S * type_size]``."""
    rows = blocks.shape[0]
    b = blocks.reshape(rows, -1, kind.type_size)

    def cut(*sizes):
        out, start = [], 0
        for size in sizes:
            out.append(b[..., start:start + size])
            start += size
        return out

    if kind.name == "Q2_K":
        scales, qs, d, dmin = cut(16, 64, 2, 2)
        s = scales.to(torch.int64)
        return _unpack_bits(qs, 2, 32), KParams(_half_values(d), _half_values(dmin), s & 0x0F, s >> 4)
    if kind.name == "Q3_K":
        hmask, qs, scales, d = cut(32, 64, 12, 2)
        codes = _unpack_bits(qs, 2, 32) | (_unpack_bits(hmask, 1, 32) << 2)
        return codes, KParams(_half_values(d), None, _unpack_q3_scales(scales), None)
    if kind.name in ("Q4_K", "Q5_K"):
        if kind.name == "Q4_K":
            d, dmin, scales, qs = cut(2, 2, 12, 128)
            codes = _unpack_bits(qs, 4, 32)
        else:
            d, dmin, scales, qh, qs = cut(2, 2, 12, 32, 128)
            codes = _unpack_bits(qs, 4, 32) | (_unpack_bits(qh, 1, 32) << 4)
        sc, m = _unpack_6bit_scales(scales)
        return codes, KParams(_half_values(d), _half_values(dmin), sc, m)
    ql, qh, scales, d = cut(128, 64, 16, 2)
    codes = _unpack_bits(ql, 4, 64) | (_unpack_bits(qh, 2, 32) << 4)
    return codes, KParams(_half_values(d), None, scales.contiguous().view(torch.int8).to(torch.int64), None)


# Byte offset of the float16 ``d`` (and ``dmin``) inside each type's block.
_SCALE_OFFSETS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def super_block_scales(blocks: torch.Tensor, kind: KQuant) -> torch.Tensor:
    """The float16 super-block scales (``d``, and ``dmin``) of GGML blocks, as float32 ``[n, 1 or 2]``."""
    b = blocks.reshape(-1, kind.type_size)
    return torch.stack([_half_values(b[:, o:o + 2]) for o in _SCALE_OFFSETS[kind.name]], dim=-1)
