"""What the compiled Triton kernels look like on an H100, found without a GPU.

Triton ships its compiler, ptxas and cuobjdump, so every launch configuration can be compiled for
sm_90, specialised as a launch at Mixtral-8x7B shapes would be, and inspected: registers and
spills, shared memory, whether the K loop is software-pipelined (asynchronous global-to-shared
copies) and the SASS instruction mix. ``tests/kernels/test_triton_compile.py`` asserts on it; run

    python -m moeq.kernels.static            # one JSON object a configuration

in a process without ``TRITON_INTERPRET`` (the interpreter replaces ``triton.jit``).
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import triton_moe

__all__ = ["CONFIGURATIONS", "compile_launch", "cuobjdump", "static_rows"]

# Mixtral-8x7B: intermediate 14336 (gate/up outputs), hidden 4096 (down outputs); 2 slots (one
# decoded token, top-2) and 8192 (a 4096-token prefill); fine groups (32) for gate/up only.
CONFIGURATIONS = [(slots, launch, False) for slots in (2, 8192) for launch in triton_moe.LAUNCHES] + [
    (slots, "gate_up", True) for slots in (2, 8192)
]
_SIGNATURE = {
    "x": "*bf16", "x_rows": "*i64", "out": "*bf16", "row_weight": "*bf16", "block_expert": "*i32", "block_start": "*i32",
    "block_end": "*i32", "words": "*i32", "meta": "*i32", "scales": "*fp16", "zeros": "*fp16", "N": "i32", "K": "i32",
    "stride_x": "i32", "stride_out": "i32", "second_entry": "i32",
}
# SASS opcodes worth counting: tensor-core products, int-to-float conversions (quarter rate),
# special functions, global loads, asynchronous global-to-shared copies.
_OPCODES = {"mma": ("HMMA", "HGMMA"), "i2f": ("I2F", "I2FP"), "mufu": ("MUFU",), "ldg": ("LDG",), "ldgsts": ("LDGSTS",)}


def cuobjdump() -> Path:
    """The cuobjdump that triton ships (absent from builds without the CUDA toolchain)."""
    return Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"


def compile_launch(slots: int, launch: str, fine_groups: bool):
    """``_moe_gemm`` compiled for sm_90 as :func:`experts_forward_triton` would launch it."""
    n = 4096 if launch == "down" else 14336
    config = triton_moe.launch_config(slots, n, launch)
    silu = triton_moe.activation_code(torch.nn.functional.silu)
    constexprs = {**triton_moe.launch_constexprs(launch, silu, fine_groups), **{k: v for k, v in config.items() if k != "num_warps"}}
    signature = dict(_SIGNATURE, out="*fp32" if config["SPLIT_K"] > 1 else "*bf16", **dict.fromkeys(constexprs, "constexpr"))
    # What a launch specialises at these shapes: 16-byte aligned tensors, sizes and strides multiple of 16.
    names = list(signature)
    aligned = [a for a, t in _SIGNATURE.items() if t.startswith("*") or a in ("N", "K", "stride_x", "stride_out")]
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    source = ASTSource(fn=triton_moe._moe_gemm, signature=signature, constexprs=constexprs, attrs=attrs)
    return config, triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": config["num_warps"]})


def _sass(cubin: bytes) -> tuple[dict[str, int], Counter]:
    """(``cuobjdump -res-usage`` fields, SASS opcode counts) of a cubin."""
    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "kernel.cubin"
        path.write_bytes(cubin)
        usage = subprocess.run([cuobjdump(), "-res-usage", path], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([cuobjdump(), "-sass", path], capture_output=True, text=True, check=True).stdout
    fields = dict(item.split(":", 1) for item in next(line for line in usage.splitlines() if "REG:" in line).split())
    opcodes = Counter(m.group(1).split(".")[0] for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9.]*)", sass))
    return {k: int(v) for k, v in fields.items() if v.isdigit()}, opcodes


def static_rows() -> list[dict]:
    """One row per configuration in :data:`CONFIGURATIONS`."""
    rows = []
    for slots, launch, fine in CONFIGURATIONS:
        config, kernel = compile_launch(slots, launch, fine)
        usage, opcodes = _sass(kernel.asm["cubin"])
        rows.append({
            "slots": slots, "launch": launch, "fine_groups": fine, **config,
            "registers": usage["REG"], "stack": usage["STACK"], "shared_bytes": kernel.metadata.shared,
            "async_copies": kernel.asm["ttgir"].count("async_copy_global_to_local"),
            "sass_instructions": sum(opcodes.values()),
            **{f"sass_{name}": sum(n for op, n in opcodes.items() if op in ops) for name, ops in _OPCODES.items()},
        })
    return rows


if __name__ == "__main__":
    print(json.dumps(static_rows()))
