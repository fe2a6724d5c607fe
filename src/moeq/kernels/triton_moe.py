"""Triton backend: one launch per projection covers every expert of a layer, whatever its width.

Tokens are sorted by expert (:mod:`moeq.kernels.routing`) and cut into blocks of ``BLOCK_M`` slots
that never span two experts; each program takes one block and one ``BLOCK_N`` slice of the output,
reads its expert's width, scheme and offsets from the layout metadata (:mod:`moeq.kernels.layout`),
unpacks ``[BLOCK_K, BLOCK_N]`` weight tiles in registers with an unpacker specialised to that
width, and feeds them to ``tl.dot``: as exact levels with the scales applied to the product when
one scale covers the tile (per-channel, or groups that are multiples of ``BLOCK_K``), else
dequantized in the tile.

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

__all__ = ["LAUNCHES", "activation_code", "experts_forward_triton", "launch_config"]

# Activations the kernels' epilogue applies, by function or module class name, lower case.
_FUSED_ACTIVATIONS = {"silu": 1, "siluactivation": 1, "relu": 2}
DECODE_SLOTS = 64  # at most this many routed slots: the decode-shaped configuration
ALIGN = tl.constexpr(WORD_ALIGN)  # kernels read module globals only as constexpr


def activation_code(act_fn) -> int | None:
    """The kernel's code for ``act_fn`` (SiLU, ReLU), or None when the kernels cannot fuse it."""
    return _FUSED_ACTIVATIONS.get(getattr(act_fn, "__name__", type(act_fn).__name__).lower())


@triton.jit
def _unpack(words, word_offset, words_per_row, offs_k, offs_n, mask, BITS: tl.constexpr):
    """``[BLOCK_K, BLOCK_N]`` codes of width ``BITS``, each element reading its own word (3, 5, 6 bits:
    ``32 // BITS`` is not a power of two, so a tile of words cannot be reshaped into codes)."""
    PER_WORD = 32 // BITS
    word = tl.load(words + word_offset + offs_n[None, :] * words_per_row + offs_k[:, None] // PER_WORD, mask=mask, other=0)
    return (word >> ((offs_k[:, None] % PER_WORD) * BITS)) & ((1 << BITS) - 1)


@triton.jit
def _unpack_words(words, word_offset, words_per_row, k0, offs_n, N, BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """``[BLOCK_K, BLOCK_N]`` codes of width ``BITS`` (1, 2, 4, 7, 8: ``32 // BITS`` a power of two).

    Each word of the tile is loaded once, as ``[BLOCK_K / per_word, BLOCK_N]`` with rows of the
    layout contiguous and 16-byte aligned (vector loads), then split into its codes in registers.
    Codes past ``K`` in a row's last words are padding; the activations there are masked to zero.
    """
    PER_WORD: tl.constexpr = 32 // BITS
    WORDS_K: tl.constexpr = BLOCK_K // PER_WORD
    # k0 is a multiple of BLOCK_K, so the tile's words start on a multiple of WORDS_K: say so, for vector loads.
    offs_w = tl.max_contiguous(tl.multiple_of(k0 // PER_WORD + tl.arange(0, WORDS_K), WORDS_K), WORDS_K)
    mask = (offs_w[:, None] < words_per_row) & (offs_n[None, :] < N)
    word = tl.load(words + word_offset + offs_n[None, :] * words_per_row + offs_w[:, None], mask=mask, other=0)
    shifts = tl.arange(0, PER_WORD) * BITS
    codes = (word[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)
    return tl.reshape(codes, (BLOCK_K, offs_n.shape[0]))


@triton.jit
def _levels(code, zero, bits, scheme):
    """The weight of each code in units of its scale: ``code - zero`` (linear) or ``±2^(1-m)`` (log).

    Both are exact in bf16 (integers up to 255, halves, powers of two), so multiplying by the
    scale after the product loses nothing."""
    if scheme == 1:
        half = 1 << (bits - 1)
        magnitude = code & (half - 1)
        sign = 1.0 - 2.0 * (code >> (bits - 1)).to(tl.float32)
        levels = tl.where(magnitude > 0, tl.exp2((1 - magnitude).to(tl.float32)), 0.0) * sign
    else:
        levels = code.to(tl.float32) - zero
    return levels


@triton.jit
def _entry(meta, entry, NUM_META: tl.constexpr):
    """Entry ``entry``'s metadata row (see :data:`moeq.kernels.layout.META`), read once per program."""
    base = meta + entry * NUM_META
    return tl.load(base), tl.load(base + 1), tl.load(base + 2), tl.load(base + 3), tl.load(base + 4), tl.load(base + 5)


@triton.jit
def _accumulate(
    acc, a, words, scales, zeros, vec_offset, bits, vecs_per_row, group_size, scale_offset, scheme,
    k0, offs_k, offs_n, K, N, BLOCK_K: tl.constexpr,
):
    """``acc + a @ W[k0:k0+BLOCK_K, offs_n]`` for one entry's transposed weight, dequantized in registers.

    The width is dispatched to a specialised unpacker (every program of a block reads one expert,
    so the branch never diverges). When one scale covers the whole K tile (groups that are
    multiples of BLOCK_K, or a row per group) the product runs on the exact levels and the scales
    multiply the ``[BLOCK_M, BLOCK_N]`` result; finer groups are scaled in the tile.
    """
    mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
    word_offset = vec_offset * ALIGN  # the layout counts 16-byte vectors: these products carry the alignment
    words_per_row = vecs_per_row * ALIGN
    if bits == 1:
        code = _unpack_words(words, word_offset, words_per_row, k0, offs_n, N, 1, BLOCK_K)
    elif bits == 2:
        code = _unpack_words(words, word_offset, words_per_row, k0, offs_n, N, 2, BLOCK_K)
    elif bits == 3:
        code = _unpack(words, word_offset, words_per_row, offs_k, offs_n, mask, 3)
    elif bits == 4:
        code = _unpack_words(words, word_offset, words_per_row, k0, offs_n, N, 4, BLOCK_K)
    elif bits == 5:
        code = _unpack(words, word_offset, words_per_row, offs_k, offs_n, mask, 5)
    elif bits == 6:
        code = _unpack(words, word_offset, words_per_row, offs_k, offs_n, mask, 6)
    elif bits == 7:
        code = _unpack_words(words, word_offset, words_per_row, k0, offs_n, N, 7, BLOCK_K)
    else:
        code = _unpack_words(words, word_offset, words_per_row, k0, offs_n, N, 8, BLOCK_K)
    groups_per_row = K // group_size
    # Triton merges a name assigned in both branches, so each branch keeps names of its own shape.
    if (group_size % BLOCK_K == 0) | (group_size == K):
        mask_n = offs_n < N
        column_group = scale_offset + offs_n * groups_per_row + k0 // group_size
        column_scale = tl.load(scales + column_group, mask=mask_n, other=0.0).to(tl.float32)
        column_zero = tl.load(zeros + column_group, mask=mask_n, other=0.0).to(tl.float32)
        levels = _levels(code, column_zero[None, :], bits, scheme)
        acc += tl.dot(a, levels.to(a.dtype)) * column_scale[None, :]
    else:
        tile_group = scale_offset + offs_n[None, :] * groups_per_row + offs_k[:, None] // group_size
        tile_scale = tl.load(scales + tile_group, mask=mask, other=0.0).to(tl.float32)
        tile_zero = tl.load(zeros + tile_group, mask=mask, other=0.0).to(tl.float32)
        acc += tl.dot(a, (_levels(code, tile_zero, bits, scheme) * tile_scale).to(a.dtype))
    return acc


@triton.jit
def _moe_gemm(
    x, x_rows, out, row_weight, block_expert, block_start, block_end,
    words, meta, scales, zeros, N, K, stride_x, stride_out, second_entry,
    GATED: tl.constexpr, ACT: tl.constexpr, GATHER: tl.constexpr, WEIGHTED: tl.constexpr,
    SPLIT_K: tl.constexpr, NUM_META: tl.constexpr,
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
    vec_offset, bits, vecs_per_row, group_size, s_offset, scheme = _entry(meta, expert, NUM_META)
    if GATED:
        up_vec_offset, up_bits, up_vecs_per_row, up_group, up_s_offset, up_scheme = _entry(meta, expert + second_entry, NUM_META)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = tl.max_contiguous(tl.multiple_of(k0 + tl.arange(0, BLOCK_K), BLOCK_K), BLOCK_K)  # k0 steps by BLOCK_K
        a = tl.load(x + rows[:, None] * stride_x + offs_k[None, :], mask=mask_m[:, None] & (offs_k[None, :] < K), other=0.0)
        acc = _accumulate(acc, a, words, scales, zeros, vec_offset, bits, vecs_per_row, group_size, s_offset, scheme,
                          k0, offs_k, offs_n, K, N, BLOCK_K)
        if GATED:
            acc_up = _accumulate(acc_up, a, words, scales, zeros, up_vec_offset, up_bits, up_vecs_per_row, up_group, up_s_offset,
                                 up_scheme, k0, offs_k, offs_n, K, N, BLOCK_K)
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


def launch_config(slots: int, n: int, launch: str) -> dict[str, int]:
    """Tiles and warps of one launch over ``slots`` routed slots and ``n`` outputs.

    ``launch``: ``gate_up`` (two accumulators, SwiGLU epilogue), ``up`` (one, activation epilogue)
    or ``down`` (routing weights; split-K when decode-shaped). ``BLOCK_M`` depends on ``slots``
    only, so both launches of a layer cut the same blocks. Every configuration compiles for sm_90
    without spilling registers (``tests/kernels/test_triton_compile.py``): 125-128 registers a
    thread except the prefill gate/up (234), where 64 x 128 tiles with 4 warps spilled 0.4-1.7 KB
    and BLOCK_K 128 at decode needed 255. Speed is untuned until a GPU is lent
    (``moe_kernel.py --part sweep``).
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
        num_experts, GATED=gated, ACT=activation, GATHER=True, WEIGHTED=False, NUM_META=len(META), **first_cfg,
    )
    if down_cfg["SPLIT_K"] > 1:  # split-K partial sums meet in float32 atomics
        y = torch.zeros(slots, hidden, dtype=torch.float32, device=x.device)
    else:
        y = torch.empty(slots, hidden, dtype=x.dtype, device=x.device)
    grid = (num_blocks, triton.cdiv(hidden, down_cfg["BLOCK_N"]), down_cfg["SPLIT_K"])
    _moe_gemm[grid](
        h, groups.token, y, groups.weight, block_expert, block_start, block_end,
        down.words, down.meta, down.scales, down.zeros, hidden, inter, h.stride(0), y.stride(0),
        0, GATED=False, ACT=0, GATHER=False, WEIGHTED=True, NUM_META=len(META), **down_cfg,
    )
    routed = int(groups.counts.sum())  # sentinel slots sort last and were never computed
    output.index_add_(0, groups.token[:routed], y[:routed].to(output.dtype))
    return output
