"""Quantized folder size of a Mixtral-shaped model at 2, 3 and 4 bits against the theory.

    python benchmarks/checkpoint_size.py

The model is moeq's demo Mixtral (4 layers, 8 experts, hidden 256, expert width 512, bf16),
built from its config. For each width and group size the routed experts are quantized (asym),
saved, and the bytes on disk are compared with the theory: packed codes ceil(n*b/8) plus an fp16
scale and a uint8 zero point per group, for the experts; the stored tensors for everything else;
and the safetensors header. Writes benchmarks/results/checkpoint_size.json.
"""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path

import torch
import transformers

from _common import print_table, write_json
import moeq
from moeq.demo import demo_config
from moeq.io.inspect import inspect_checkpoint
from moeq.models import moe_layers_or_error
from moeq.quant.tensor import storage_nbytes


def header_bytes(file: Path) -> int:
    with file.open("rb") as handle:
        return 8 + struct.unpack("<Q", handle.read(8))[0]


def main() -> None:
    torch.manual_seed(0)
    source = transformers.AutoModelForCausalLM.from_config(demo_config(), dtype=torch.bfloat16).eval()
    _, layers = moe_layers_or_error(source)
    expert_prefixes = tuple(layer.experts_path + "." for layer in layers)
    other_bytes = sum(t.numel() * t.element_size() for k, t in source.state_dict().items() if not k.startswith(expert_prefixes))
    fp16_expert_bytes = sum(w.numel() * 2 for layer in layers for w in layer.expert_weights().values())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for group_size in (None, 128):
            for bits in (4, 3, 2):
                model = moeq.quantize(transformers.AutoModelForCausalLM.from_config(demo_config(), dtype=torch.bfloat16), moeq.QuantConfig(bits=bits, group_size=group_size))
                model.load_state_dict(source.state_dict(), strict=False)  # same non-expert weights as the source
                folder = Path(tmp) / f"b{bits}-g{group_size}"
                moeq.save(model, folder)
                report = inspect_checkpoint(folder)
                theory_experts = sum(
                    storage_nbytes(tuple(w.shape), bits, group_size or w.shape[1], moeq.quant.Scheme.ASYM)
                    for layer in layers for w in layer.expert_weights().values()
                )
                file = folder / "model.safetensors"
                theory_file = theory_experts + other_bytes + header_bytes(file)
                rows.append({
                    "bits": bits, "group_size": group_size or "channel", "expert_bytes": report.expert_bytes,
                    "expert_theory_bytes": theory_experts, "file_bytes": file.stat().st_size, "file_theory_bytes": theory_file,
                    "experts_vs_fp16": fp16_expert_bytes / report.expert_bytes,
                    "effective_expert_bits": 8 * report.expert_bytes / (fp16_expert_bytes / 2),
                })
    print_table(
        ["bits", "group", "expert bytes", "theory", "file bytes", "theory", "experts vs fp16", "bits/weight"],
        [[r["bits"], r["group_size"], r["expert_bytes"], r["expert_theory_bytes"], r["file_bytes"], r["file_theory_bytes"],
          f"{r['experts_vs_fp16']:.2f}x", f"{r['effective_expert_bits']:.3f}"] for r in rows],
    )
    assert all(r["expert_bytes"] == r["expert_theory_bytes"] and r["file_bytes"] == r["file_theory_bytes"] for r in rows)
    print(f"wrote {write_json('checkpoint_size', rows, model='moeq demo Mixtral, bf16')}")


if __name__ == "__main__":
    main()
