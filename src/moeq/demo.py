"""The main job until the trained default model exists: quantize a small MoE end to end.

Builds a Mixtral-architecture model from a config (random weights, seed 0), saves it in bf16 as a
full-precision source folder, then for each width runs the same road a user's checkpoint takes
(load, plan, quantize, save, load back) and measures bytes, the logits' distance to the
full-precision model, and that the reloaded model reproduces the in-memory one exactly.
The model is untrained, so the logit error shows how faithful the numerics are, not quality.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from .api import quantize
from .config import QuantConfig
from .io.atomic import ensure_output_free
from .io.checkpoint import load, save
from .io.inspect import inspect_checkpoint
from .io.source import load_source

__all__ = ["DemoRow", "demo_config", "run_demo"]


@dataclass
class DemoRow:
    bits: int
    expert_bytes: int
    expert_fp16_bytes: int
    file_bytes: int
    source_file_bytes: int
    logits_rel_error: float
    reload_exact: bool
    seconds: float


def demo_config() -> transformers.MixtralConfig:
    """A small Mixtral: 4 layers, 8 experts (top-2), hidden 256, expert width 512."""
    return transformers.MixtralConfig(
        vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, bos_token_id=None, eos_token_id=None,
        pad_token_id=None,
    )


def run_demo(out: Path, widths: tuple[int, ...] = (4, 3, 2), overwrite: bool = False, seed: int = 0) -> list[DemoRow]:
    """Quantize the demo model at each width under ``out``; return one row per width."""
    out = Path(out)
    ensure_output_free(out, overwrite)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    torch.manual_seed(seed)
    source = out / "source"
    transformers.AutoModelForCausalLM.from_config(demo_config(), dtype=torch.bfloat16).save_pretrained(source)
    tokens = torch.randint(0, 1024, (4, 64), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        reference = load_source(source)(tokens).logits
    source_bytes = sum(f.stat().st_size for f in source.glob("*.safetensors"))
    rows = []
    for bits in widths:
        started = time.perf_counter()
        model = quantize(load_source(source), QuantConfig(bits=bits))
        folder = out / f"experts-{bits}bit"
        save(model, folder, source=source)
        with torch.no_grad():
            logits = model(tokens).logits
            reloaded = load(folder)(tokens).logits
        report = inspect_checkpoint(folder)
        rows.append(
            DemoRow(
                bits=bits,
                expert_bytes=report.expert_bytes,
                expert_fp16_bytes=report.expert_fp16_bytes,
                file_bytes=report.file_bytes,
                source_file_bytes=source_bytes,
                logits_rel_error=float((logits - reference).norm() / reference.norm()),
                reload_exact=bool(torch.equal(logits, reloaded)),
                seconds=time.perf_counter() - started,
            )
        )
    return rows
