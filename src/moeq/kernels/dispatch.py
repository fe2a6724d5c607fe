"""One entry point for a quantized MoE layer's routed experts, whatever backend runs them.

Backends: ``reference`` (the torch ground truth), ``cpu`` (just-in-time unpacking, one expert at
a time), ``cpu-int4`` (torch's CPU int4 kernel on a 4-bit copy of the 1-4 bit experts, built at
first use: faster, more memory; see :mod:`moeq.kernels.cpu`) and ``triton`` (fused mixed-width
kernels). ``auto`` takes Triton for CUDA tensors when
Triton is importable and the layer is one it fuses (SiLU/ReLU activation), else the CPU path.
"""

from __future__ import annotations

import importlib.util

import torch

from ..quant.schemes import Scheme
from .cpu import experts_forward_cpu
from .layout import KernelLayout, build_layout
from .reference import experts_forward_reference

__all__ = ["BACKENDS", "check_backend", "moe_experts_forward", "triton_available", "triton_supports"]

BACKENDS = ("auto", "reference", "cpu", "cpu-int4", "triton")


def check_backend(backend: str) -> None:
    """Refuse a backend name that is not one of :data:`BACKENDS`, in one line."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown experts backend {backend!r}; choose one of: {', '.join(BACKENDS)}")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def has_cpu_only_codes(experts) -> bool:
    """Whether any projection of the layer is stored as llama.cpp K-quant blocks or with ``affine``'s
    float minima, which the Triton kernels (integer zero points) do not decode."""
    schemes = {experts.expert(e)[p].spec.scheme for e in range(experts.num_experts) for p in experts.projections}
    return any(scheme.is_kquant or scheme is Scheme.AFFINE for scheme in schemes)


def triton_supports(experts) -> bool:
    """Whether the Triton kernels can run this layer (they fuse SiLU and ReLU only, add no expert
    biases, and decode moeq's own packing, not K-quant blocks or affine minima: those run on the
    CPU path)."""
    if not triton_available() or has_cpu_only_codes(experts) or experts.biased:
        return False
    from .triton_moe import activation_code

    return activation_code(experts.act_fn) is not None


def _layouts(experts, device: torch.device) -> tuple[KernelLayout, KernelLayout]:
    """The layer's kernel layouts on ``device``, built on first use and kept on the module."""
    key = (device, tuple(experts.expert(e)[p].codes.data_ptr() for e in range(experts.num_experts) for p in experts.projections))
    cached = getattr(experts, "_kernel_layouts", None)
    if cached is None or cached[0] != key:
        *first, down = experts.projections
        layouts = (
            build_layout([experts.expert(e)[p] for p in first for e in range(experts.num_experts)], device),
            build_layout([experts.expert(e)[down] for e in range(experts.num_experts)], device),
        )
        experts._kernel_layouts = cached = (key, layouts)
    return cached[1]


def moe_experts_forward(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    experts,
    backend: str = "auto",
) -> torch.Tensor:
    """Weighted sum over each token's selected experts of a ``QuantizedExperts`` layer.

    Args:
        hidden_states: ``[tokens, hidden]``.
        top_k_index: ``[tokens, k]`` expert ids; an id ``>= num_experts`` is a sentinel and skipped.
        top_k_weights: ``[tokens, k]`` routing weights.
        experts: the layer's ``QuantizedExperts``.
        backend: one of :data:`BACKENDS`.
    """
    check_backend(backend)
    if backend == "auto":
        backend = "triton" if hidden_states.is_cuda and triton_supports(experts) else "cpu"
    if backend == "reference":
        return experts_forward_reference(
            hidden_states, top_k_index, top_k_weights, experts.num_experts, experts.dequantized_weights, experts.act_fn, experts.gated,
            experts.biases if experts.biased else None,
        )
    if backend in ("cpu", "cpu-int4"):
        if backend == "cpu-int4" and hidden_states.device.type != "cpu":
            raise ValueError("the cpu-int4 backend runs CPU tensors only; use backend='triton' or 'auto' on a GPU")
        return experts_forward_cpu(hidden_states, top_k_index, top_k_weights, experts, int4=backend == "cpu-int4")
    if has_cpu_only_codes(experts):
        raise ValueError("the triton kernels decode moeq's own packing, not K-quant blocks (q2_k ... q6_k) or affine minima: run this model "
                         "with backend='cpu', or in llama.cpp after `moeq export --format gguf`")
    if experts.biased:
        raise ValueError("the triton kernels add no expert biases (gpt-oss's experts have them): run this model with backend='cpu'")
    if not triton_supports(experts):
        raise ValueError(
            "the triton backend needs the triton package and a SiLU or ReLU expert activation (a model's own gate "
            "function runs on the CPU paths); install moeq[triton] or use backend='cpu'"
        )
    from .triton_moe import activation_code, experts_forward_triton

    first, down = _layouts(experts, hidden_states.device)
    return experts_forward_triton(
        hidden_states, top_k_index, top_k_weights, first, down, experts.num_experts, experts.gated, activation_code(experts.act_fn)
    )
