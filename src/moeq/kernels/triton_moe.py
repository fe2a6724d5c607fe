"""Triton backend: one launch per projection covers every expert of a layer, whatever its width.

Tokens are sorted by expert (:mod:`moeq.kernels.routing`) and cut into blocks of ``BLOCK_M`` slots
that never span two experts; each program takes one block and one ``BLOCK_N`` slice of the output,
reads its expert's width, scheme and offsets from the layout metadata (:mod:`moeq.kernels.layout`),
and per ``BLOCK_K`` step loads the weight tile's bit planes (the same four loads at every width,
absent planes masked, so Triton software-pipelines the loop), assembles the codes in registers,
and feeds them to ``tl.dot``: as exact levels with zero point and scale applied to the product
when one scale covers each column of the tile (per-channel, or groups that are multiples of
``BLOCK_K``: decided per launch), else dequantized in the tile.

- gate/up: both projections in one program, SwiGLU applied in the epilogue, so only the
  ``[slots, intermediate]`` activation reaches memory (non-gated layers apply the activation alone);
- down: scales each slot by its routing weight; few-token (decode-shaped) calls split K across
  programs and accumulate in float32 with atomics, so a handful of tokens still fill the GPU.

The per-token sum over the top-k experts is one ``index_add_`` after the down launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .layout import META, WORD_ALIGN, KernelLayout
from .routing import group_by_expert

__all__ = ["LAUNCHES", "activation_code", "experts_forward_triton", "launch_config", "launch_constexprs"]

# Activations the kernels' epilogue applies, by function or module class name, lower case.
_FUSED_ACTIVATIONS = {"silu": 1, "siluactivation": 1, "relu": 2}
DECODE_SLOTS = 64  # at most this many routed slots: the decode-shaped configuration
ALIGN = tl.constexpr(WORD_ALIGN)  # kernels read module globals only as constexpr


def activation_code(act_fn) -> int | None:
    """The kernel's code for ``act_fn`` (SiLU, ReLU), or None when the kernels cannot fuse it."""
    return _FUSED_ACTIVATIONS.get(getattr(act_fn, "__name__", type(act_fn).__name__).lower())


@triton.jit
def _words_per_row(K, P: tl.constexpr):
    """Words in one row of a ``P``-bit plane: ``ceil(K * P / 128)`` 16-byte vectors (see the layout)."""
    return (K * P + 127) // 128 * ALIGN


@triton.jit
def _entry(meta, entry, N, K, NUM_META: tl.constexpr):
    """Entry ``entry``'s metadata (see :data:`moeq.kernels.layout.META`), read once per program, and
    the first word of its 8/4-, 2- and 1-bit planes (widest first, absent ones taking no room)."""
    row = meta + entry * NUM_META
    vec_offset, bits, group_size, scale_offset, scheme = tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3), tl.load(row + 4)
    base = vec_offset * ALIGN  # the layout counts 16-byte vectors: these products carry the alignment
    base2 = base + ((bits & 4) != 0).to(tl.int32) * N * _words_per_row(K, 4)
    base1 = base2 + ((bits & 2) != 0).to(tl.int32) * N * _words_per_row(K, 2)
    return base, base2, base1, bits, group_size, scale_offset, scheme


@triton.jit
def _plane_tile(words, base, k0, offs_n, N, K, present, P: tl.constexpr, BLOCK_K: tl.constexpr):
    """The ``[BLOCK_K / (32 // P), BLOCK_N]`` words of a ``P``-bit plane holding codes ``k0 ..
    k0 + BLOCK_K`` of rows ``offs_n``; all zero, with no memory traffic, when not ``present``.

    Rows are contiguous and 16-byte aligned (vector loads). Never inside a branch: Triton
    software-pipelines only loads at the loop's top level. Codes past ``K`` in a row's last words
    are padding; the activations there are masked to zero."""
    PER_WORD: tl.constexpr = 32 // P
    WORDS_K: tl.constexpr = BLOCK_K // PER_WORD
    words_per_row = _words_per_row(K, P)
    # k0 is a multiple of BLOCK_K, so the tile's words start on a multiple of WORDS_K: say so, for vector loads.
    offs_w = tl.max_contiguous(tl.multiple_of(k0 // PER_WORD + tl.arange(0, WORDS_K), WORDS_K), WORDS_K)
    words_present = words_per_row * present.to(tl.int32)  # 0: every word masked
    mask = (offs_w[:, None] < words_present) & (offs_n[None, :] < N)
    return tl.load(words + base + offs_n[None, :] * words_per_row + offs_w[:, None], mask=mask, other=0)


@triton.jit
def _plane_codes(word, P: tl.constexpr, BLOCK_K: tl.constexpr):
    """A plane tile's words split into its ``[BLOCK_K, BLOCK_N]`` ``P``-bit codes, in registers."""
    PER_WORD: tl.constexpr = 32 // P
    shifts = tl.arange(0, PER_WORD) * P
    codes = (word[:, None, :] >> shifts[None, :, None]) & ((1 << P) - 1)
    return tl.reshape(codes, (BLOCK_K, word.shape[1]))


@triton.jit
def _levels(w8, w4, w2, w1, bits, scheme, BLOCK_K: tl.constexpr):
    """The codes' values in units of their scale, float32 ``[BLOCK_K, BLOCK_N]``: the code itself
    (linear: the zero point is applied by the caller) or ``±2^(1-m)`` (log, zero point 0).

    Only the planes the width has are split (the branches hold no loads, so they do not stop the
    pipelining). A code becomes a float without an int-to-float conversion (a quarter-rate
    instruction): OR-ed into the mantissa of 2^23 it reads as ``2^23 + code``, exactly."""
    code = tl.zeros((BLOCK_K, w4.shape[1]), dtype=tl.int32)
    if bits == 8:
        code = _plane_codes(w8, 8, BLOCK_K)
    if (bits & 4) != 0:
        code = _plane_codes(w4, 4, BLOCK_K)
    if (bits & 2) != 0:
        code = code | (_plane_codes(w2, 2, BLOCK_K) << (bits & 4))
    if (bits & 1) != 0:
        code = code | (_plane_codes(w1, 1, BLOCK_K) << (bits & 6))
    if scheme == 1:
        magnitude = code & ((1 << (bits - 1)) - 1)
        sign = (code >> (bits - 1)) & 1
        # 2^(1 - m) has the biased exponent 128 - m; m = 0 is the level 0.
        levels = tl.where(magnitude > 0, ((128 - magnitude) << 23) | (sign << 31), 0).to(tl.float32, bitcast=True)
    else:
        levels = (code | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    return levels


@triton.jit
def _dot(a, b):
    """``a @ b`` with float32 sums; float32 operands multiplied in full float32, not TF32 (Triton's
    default): the zero point is applied after the product, so TF32's rounding of ``a`` would no
    longer cancel against the exactly summed ``rowsum(a) z``."""
    if a.dtype == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _accumulate(
    acc, a, a_sum, words, scales, zeros, base, base2, base1, bits, group_size, scale_offset, scheme,
    k0, offs_k, offs_n, K, N, FINE_GROUPS: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``acc + a @ W[k0:k0+BLOCK_K, offs_n]`` for one entry's transposed weight, dequantized in registers.

    Without ``FINE_GROUPS`` one scale and zero point cover each column of the K tile, so the
    product runs on the exact levels and ``(a @ levels - rowsum(a) z) s`` applies both to the
    ``[BLOCK_M, BLOCK_N]`` result (``a_sum``: the rows of ``a`` summed); else each weight is
    dequantized in the tile.
    """
    w8 = _plane_tile(words, base, k0, offs_n, N, K, bits == 8, 8, BLOCK_K)
    w4 = _plane_tile(words, base, k0, offs_n, N, K, (bits & 4) != 0, 4, BLOCK_K)
    w2 = _plane_tile(words, base2, k0, offs_n, N, K, (bits & 2) != 0, 2, BLOCK_K)
    w1 = _plane_tile(words, base1, k0, offs_n, N, K, (bits & 1) != 0, 1, BLOCK_K)
    groups_per_row = K // group_size
    if FINE_GROUPS:
        mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
        tile_group = scale_offset + offs_n[None, :] * groups_per_row + offs_k[:, None] // group_size
        tile_scale = tl.load(scales + tile_group, mask=mask, other=0.0).to(tl.float32)
        tile_zero = tl.load(zeros + tile_group, mask=mask, other=0.0).to(tl.float32)
        levels = _levels(w8, w4, w2, w1, bits, scheme, BLOCK_K)
        acc += _dot(a, ((levels - tile_zero) * tile_scale).to(a.dtype))
    else:
        mask_n = offs_n < N
        column_group = scale_offset + offs_n * groups_per_row + k0 // group_size
        column_scale = tl.load(scales + column_group, mask=mask_n, other=0.0).to(tl.float32)
        column_zero = tl.load(zeros + column_group, mask=mask_n, other=0.0).to(tl.float32)
        levels = _levels(w8, w4, w2, w1, bits, scheme, BLOCK_K)
        acc += (_dot(a, levels.to(a.dtype)) - a_sum[:, None] * column_zero[None, :]) * column_scale[None, :]
    return acc


@triton.jit
def _moe_gemm(
    x, x_rows, out, row_weight, block_expert, block_start, block_end,
    words, meta, scales, zeros, N, K, stride_x, stride_out, second_entry,
    GATED: tl.constexpr, ACT: tl.constexpr, GATHER: tl.constexpr, WEIGHTED: tl.constexpr,
    SPLIT_K: tl.constexpr, NUM_META: tl.constexpr, FINE_GROUPS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    expert = tl.load(block_expert + pid_m)
    offs_m = tl.load(block_start + pid_m) + tl.arange(0, BLOCK_M)
    mask_m = offs_m < tl.load(block_end + pid_m)
    rows = tl.load(x_rows + offs_m, mask=mask_m, other=0) if GATHER else offs_m
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    base, base2, base1, bits, group_size, s_offset, scheme = _entry(meta, expert, N, K, NUM_META)
    if GATED:
        up_base, up_base2, up_base1, up_bits, up_group, up_s_offset, up_scheme = _entry(meta, expert + second_entry, N, K, NUM_META)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = tl.max_contiguous(tl.multiple_of(k0 + tl.arange(0, BLOCK_K), BLOCK_K), BLOCK_K)  # k0 steps by BLOCK_K
        a = tl.load(x + rows[:, None] * stride_x + offs_k[None, :], mask=mask_m[:, None] & (offs_k[None, :] < K), other=0.0)
        a_sum = tl.sum(a.to(tl.float32), axis=1)
        acc = _accumulate(acc, a, a_sum, words, scales, zeros, base, base2, base1, bits, group_size, s_offset, scheme,
                          k0, offs_k, offs_n, K, N, FINE_GROUPS, BLOCK_K)
        if GATED:
            acc_up = _accumulate(acc_up, a, a_sum, words, scales, zeros, up_base, up_base2, up_base1, up_bits, up_group,
                                 up_s_offset, up_scheme, k0, offs_k, offs_n, K, N, FINE_GROUPS, BLOCK_K)
    if ACT == 1:
        acc = acc * tl.sigmoid(acc)
    elif ACT == 2:
        acc = tl.maximum(acc, 0.0)
    if GATED:
        acc = acc * acc_up
    if WEIGHTED:
        acc = acc * tl.load(row_weight + offs_m, mask=mask_m, other=0.0).to(tl.float32)[:, None]
    target = out + offs_m[:, None] * stride_out + offs_n[None, :]
    mask = mask_m[:, None] & (offs_n[None, :] < N)
    if SPLIT_K > 1:
        tl.atomic_add(target, acc, mask=mask)
    else:
        tl.store(target, acc.to(out.dtype.element_ty), mask=mask)


def _blocks(starts: torch.Tensor, counts: torch.Tensor, block_m: int) -> tuple[torch.Tensor, ...]:
    """Per block of ``block_m`` sorted slots: its expert, first slot and end slot (one host sync)."""
    per_expert = (counts + block_m - 1) // block_m
    expert = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), per_expert)
    first_block = torch.cumsum(per_expert, 0) - per_expert
    index_in_expert = torch.arange(expert.numel(), device=counts.device) - first_block[expert]
    start = starts[expert] + index_in_expert * block_m
    return expert.to(torch.int32), start.to(torch.int32), (starts + counts)[expert].to(torch.int32)


LAUNCHES = ("gate_up", "up", "down")


def launch_constexprs(launch: str, activation: int, fine_groups: bool) -> dict[str, int | bool]:
    """The compile-time arguments of ``_moe_gemm`` for one of :data:`LAUNCHES`: the first launch
    gathers token rows and applies ``activation`` (SwiGLU when gated), ``down`` weights the slots."""
    first = launch != "down"
    return {"GATED": launch == "gate_up", "ACT": activation if first else 0, "GATHER": first, "WEIGHTED": not first,
            "NUM_META": len(META), "FINE_GROUPS": fine_groups}


def launch_config(slots: int, n: int, launch: str) -> dict[str, int]:
    """Tiles and warps of one launch over ``slots`` routed slots and ``n`` outputs.

    ``launch``: ``gate_up`` (two accumulators, SwiGLU epilogue), ``up`` (one, activation epilogue)
    or ``down`` (routing weights; split-K when decode-shaped). ``BLOCK_M`` depends on ``slots``
    only, so both launches of a layer cut the same blocks; ``BLOCK_K`` must be a multiple of 32
    (a 1-bit plane's word). Every configuration compiles for sm_90 pipelined and without spilling
    registers (``tests/kernels/test_triton_compile.py``; figures: ``python -m moeq.kernels.static``).
    Speed is untuned until a GPU is lent (``moe_kernel.py --part sweep``).
    """
    if slots <= DECODE_SLOTS:
        return {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 4 if launch == "down" else 1, "num_warps": 4}
    return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 1, "num_warps": 8}


def experts_forward_triton(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    first: KernelLayout,
    down: KernelLayout,
    num_experts: int,
    gated: bool,
    activation: int,
) -> torch.Tensor:
    """Routed experts' combined output; ``first`` holds gate then up (gated) or up, ``down`` the down projections."""
    groups = group_by_expert(top_k_index, top_k_weights, num_experts)
    inter, hidden = first.out_features, down.out_features
    slots = groups.token.numel()
    first_cfg = launch_config(slots, inter, "gate_up" if gated else "up")
    down_cfg = launch_config(slots, hidden, "down")
    block_expert, block_start, block_end = _blocks(groups.starts, groups.counts, first_cfg["BLOCK_M"])
    num_blocks = block_expert.numel()
    output = torch.zeros_like(hidden_states)
    if num_blocks == 0:
        return output
    x = hidden_states.contiguous()
    h = torch.empty(slots, inter, dtype=x.dtype, device=x.device)
    grid = (num_blocks, triton.cdiv(inter, first_cfg["BLOCK_N"]), first_cfg["SPLIT_K"])
    _moe_gemm[grid](
        x, groups.token, h, groups.weight, block_expert, block_start, block_end,
        first.words, first.meta, first.scales, first.zeros, inter, first.in_features, x.stride(0), h.stride(0),
        num_experts, **launch_constexprs("gate_up" if gated else "up", activation, not first.one_scale_per_tile(first_cfg["BLOCK_K"])),
        **first_cfg,
    )
    if down_cfg["SPLIT_K"] > 1:  # split-K partial sums meet in float32 atomics
        y = torch.zeros(slots, hidden, dtype=torch.float32, device=x.device)
    else:
        y = torch.empty(slots, hidden, dtype=x.dtype, device=x.device)
    grid = (num_blocks, triton.cdiv(hidden, down_cfg["BLOCK_N"]), down_cfg["SPLIT_K"])
    _moe_gemm[grid](
        h, groups.token, y, groups.weight, block_expert, block_start, block_end,
        down.words, down.meta, down.scales, down.zeros, hidden, inter, h.stride(0), y.stride(0),
        0, **launch_constexprs("down", activation, not down.one_scale_per_tile(down_cfg["BLOCK_K"])), **down_cfg,
    )
    routed = int(groups.counts.sum())  # sentinel slots sort last and were never computed
    output.index_add_(0, groups.token[:routed], y[:routed].to(output.dtype))
    return output
