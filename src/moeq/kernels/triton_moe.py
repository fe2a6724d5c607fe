"""Triton backend: one launch per projection covers every expert of a layer, whatever its width.

Tokens are sorted by expert (:mod:`moeq.kernels.routing`) and cut into blocks of ``BLOCK_M`` slots
that never span two experts; each program takes one block and one ``BLOCK_N`` slice of the output,
reads its expert's width, scheme and offsets from the layout metadata (:mod:`moeq.kernels.layout`),
dequantizes ``[BLOCK_K, BLOCK_N]`` weight tiles in registers and feeds them to ``tl.dot``.

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

from .layout import META, KernelLayout
from .routing import group_by_expert

__all__ = ["activation_code", "experts_forward_triton"]

# Activations the kernels' epilogue applies, by function or module class name, lower case.
_FUSED_ACTIVATIONS = {"silu": 1, "siluactivation": 1, "relu": 2}
DECODE_SLOTS = 64  # at most this many routed slots: the decode-shaped configuration


def activation_code(act_fn) -> int | None:
    """The kernel's code for ``act_fn`` (SiLU, ReLU), or None when the kernels cannot fuse it."""
    return _FUSED_ACTIVATIONS.get(getattr(act_fn, "__name__", type(act_fn).__name__).lower())


@triton.jit
def _weight_tile(words, meta, scales, zeros, entry, offs_k, offs_n, K, N, NUM_META: tl.constexpr):
    """Dequantized ``[BLOCK_K, BLOCK_N]`` tile of entry ``entry``'s transposed weight, float32."""
    base = meta + entry * NUM_META
    word_offset = tl.load(base)
    bits = tl.load(base + 1)
    words_per_row = tl.load(base + 2)
    group_size = tl.load(base + 3)
    scale_offset = tl.load(base + 4)
    scheme = tl.load(base + 5)
    per_word = 32 // bits
    mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
    word = tl.load(words + word_offset + offs_n[None, :] * words_per_row + offs_k[:, None] // per_word, mask=mask, other=0)
    code = (word >> ((offs_k[:, None] % per_word) * bits)) & ((1 << bits) - 1)
    group = scale_offset + offs_n[None, :] * (K // group_size) + offs_k[:, None] // group_size
    scale = tl.load(scales + group, mask=mask, other=0.0).to(tl.float32)
    zero = tl.load(zeros + group, mask=mask, other=0.0).to(tl.float32)
    linear = (code.to(tl.float32) - zero) * scale
    half = 1 << (bits - 1)
    magnitude = code & (half - 1)
    sign = 1.0 - 2.0 * (code >> (bits - 1)).to(tl.float32)
    log = tl.where(magnitude > 0, tl.exp2((1 - magnitude).to(tl.float32)), 0.0) * sign * scale
    return tl.where(scheme == 1, log, linear)


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
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x + rows[:, None] * stride_x + offs_k[None, :], mask=mask_m[:, None] & (offs_k[None, :] < K), other=0.0)
        w = _weight_tile(words, meta, scales, zeros, expert, offs_k, offs_n, K, N, NUM_META)
        acc += tl.dot(a, w.to(a.dtype))
        if GATED:
            w_up = _weight_tile(words, meta, scales, zeros, expert + second_entry, offs_k, offs_n, K, N, NUM_META)
            acc_up += tl.dot(a, w_up.to(a.dtype))
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


def _config(slots: int, n: int) -> dict[str, int]:
    """Tile sizes: decode-shaped (few slots: narrow N tiles, split-K on down) or prefill-shaped."""
    if slots <= DECODE_SLOTS:
        return {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128, "split_k": 4}
    return {"BLOCK_M": 64, "BLOCK_N": 64 if n <= 64 else 128, "BLOCK_K": 64, "split_k": 1}


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
    cfg = _config(slots, inter)
    block_expert, block_start, block_end = _blocks(groups.starts, groups.counts, cfg["BLOCK_M"])
    num_blocks = block_expert.numel()
    output = torch.zeros_like(hidden_states)
    if num_blocks == 0:
        return output
    x = hidden_states.contiguous()
    h = torch.empty(slots, inter, dtype=x.dtype, device=x.device)
    common = {"NUM_META": len(META), "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"], "BLOCK_K": cfg["BLOCK_K"]}
    grid = (num_blocks, triton.cdiv(inter, cfg["BLOCK_N"]), 1)
    _moe_gemm[grid](
        x, groups.token, h, groups.weight, block_expert, block_start, block_end,
        first.words, first.meta, first.scales, first.zeros, inter, first.in_features, x.stride(0), h.stride(0),
        num_experts, GATED=gated, ACT=activation, GATHER=True, WEIGHTED=False, SPLIT_K=1, **common,
    )
    split_k = cfg["split_k"]
    if split_k > 1:  # split-K partial sums meet in float32 atomics
        y = torch.zeros(slots, hidden, dtype=torch.float32, device=x.device)
    else:
        y = torch.empty(slots, hidden, dtype=x.dtype, device=x.device)
    grid = (num_blocks, triton.cdiv(hidden, cfg["BLOCK_N"]), split_k)
    _moe_gemm[grid](
        h, groups.token, y, groups.weight, block_expert, block_start, block_end,
        down.words, down.meta, down.scales, down.zeros, hidden, inter, h.stride(0), y.stride(0),
        0, GATED=False, ACT=0, GATHER=False, WEIGHTED=True, SPLIT_K=split_k, **common,
    )
    routed = int(groups.counts.sum())  # sentinel slots sort last and were never computed
    output.index_add_(0, groups.token[:routed], y[:routed].to(output.dtype))
    return output
