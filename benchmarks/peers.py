"""Peers side by side: moeq's quantizers against HQQ and optimum-quanto on the same expert weights.

    DISABLE_CUDA=1 .venv/bin/pip install -c constraints.txt -e '.[peers]'
    python benchmarks/peers.py [--bits 4,3,2] [--group-sizes 0,64] [--eval-tokens 8192]
        [--part quality|speed|both] [--scale 4] [--tokens 1,16,256] [--repeats 7]

Quality part, on the shipped default Mixtral: only the routed experts are quantized (MoQE's
recipe; attention, router, embeddings stay in bf16), every expert at the same width, per output
channel (group size 0) or in groups along the input. Methods:

- ``moeq-rtn``: round-to-nearest, asym min-max with an integer zero point (``moeq.quantize``);
- ``moeq-rtn-clip``: the same with the per-row clipping search (``clip_search``);
- ``moeq-gptq``: GPTQ on the shipped calibration split (``quantize_calibrated``);
- ``hqq``: HQQ's half-quadratic optimizer of scale and float zero point (``Quantizer.quantize``,
  ``optimize=True``, its default settings), calibration-free;
- ``quanto``: optimum-quanto's weight quantizer as ``quanto.quantize(weights=qintN)`` applies it
  (``MaxOptimizer``: min-max with a float shift); quanto has int2/int4/int8 only, so 3 bits has
  no quanto row, and it needs a group size;
- ``moeq-auto-gptq`` at the ``--mixed-bits`` budgets (mean expert bits): what moeq is for, a width
  per expert from {4,3,2,1} chosen by ``--strategy auto`` on GPTQ's predicted damage, then GPTQ.

The peers' weights are quantized with their own code, dequantized and written back into a
bf16 copy of the model, which is then evaluated exactly like moeq's (``moeq.evaluate`` on the
test split: perplexity, KL to the bf16 model, routing agreement). "bits/weight" counts every byte
each method stores for the experts (codes, scales, zero points) as it stores them: moeq's packed
buffers, hqq's ``W_q`` and float16 ``scale``/``zero``, quanto's packed data and bf16 scale/shift.

Speed part: one MoE layer of Mixtral-8x7B shape divided by ``--scale`` (8 experts, top-2, random
bf16 weights), every expert quantized by each library at uniform 4 and 2 bits, group 64 (quanto:
128, its only CPU-fast int4 layout), and run on the same routing: bf16 dense experts (the torch
reference loop), moeq's CPU path (``moe_experts_forward(backend="cpu")``), and the same grouped
loop calling hqq's ``HQQLinear`` (backend PYTORCH) and quanto's frozen ``QLinear`` modules per
expert. Fastest of ``--repeats`` after warm-up, one thread.

Writes benchmarks/results/peers_quality.json and peers_speed.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from _common import print_table, timed, write_json
import moeq
from moeq import QuantConfig
from moeq.calibrate.routing import tokenize_calibration
from moeq.calibrate.runner import CalibrationConfig, quantize_calibrated
from moeq.demo import DEFAULT_MODEL
from moeq.eval import evaluate
from moeq.eval.data import evaluation_tokens
from moeq.io.source import load_source
from moeq.kernels import moe_experts_forward
from moeq.kernels.reference import experts_forward_reference
from moeq.kernels.routing import group_by_expert
from moeq.models import moe_layers_or_error
from moeq.modules.convert import rtn_quantizer
from moeq.modules.experts import QuantizedExperts
from moeq.plan import TensorSpec
from moeq.train.corpus import DATA_DIR

QUANTO_TYPES = {2: "qint2", 4: "qint4", 8: "qint8"}
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
EXPERTS, TOP_K = 8, 2


def stored_bytes(tensor: torch.Tensor) -> int:
    """Bytes a (possibly subclassed, e.g. quanto's packed) tensor holds, summed over its inner tensors."""
    if type(tensor) in (torch.Tensor, nn.Parameter):
        return tensor.numel() * tensor.element_size()
    names, _ = tensor.__tensor_flatten__()
    return sum(stored_bytes(getattr(tensor, name)) for name in names)


def hqq_fake_quant(weight: torch.Tensor, bits: int, group_size: int | None) -> tuple[torch.Tensor, int]:
    """HQQ's dequantized weight and its stored bytes (codes + float16 scale and zero)."""
    from hqq.core.quantize import Quantizer

    group_size = group_size or weight.shape[1]  # a whole row: per output channel (hqq needs a size)
    codes, meta = Quantizer.quantize(weight.float(), nbits=bits, group_size=group_size, optimize=True, axis=1,
                                     device="cpu", compute_dtype=torch.float32)
    restored = Quantizer.dequantize(codes, meta)
    meta_bytes = 2 * (meta["scale"].numel() + meta["zero"].numel())  # HQQLinear keeps them in its float16/bf16 compute dtype
    return restored, stored_bytes(codes) + meta_bytes


def quanto_fake_quant(weight: torch.Tensor, bits: int, group_size: int | None) -> tuple[torch.Tensor, int]:
    """optimum-quanto's dequantized weight (its default weight optimizer) and its stored bytes."""
    import optimum.quanto as oq
    from optimum.quanto.tensor.optimizers import MaxOptimizer

    qtype = getattr(oq, QUANTO_TYPES[bits])
    scale, shift = MaxOptimizer()(weight, qtype=qtype, axis=0, group_size=group_size)
    quantized = oq.quantize_weight(weight, qtype=qtype, axis=0, scale=scale, shift=shift, group_size=group_size)
    return quantized.dequantize(), stored_bytes(quantized)


PEERS = {"hqq": hqq_fake_quant, "quanto": quanto_fake_quant}


def peer_model(model_dir: Path, peer: str, bits: int, group_size: int | None) -> tuple[nn.Module, int]:
    """A bf16 copy of the model whose expert weights are the peer's dequantized ones; the peer's stored bytes."""
    model = load_source(model_dir)
    _, layers = moe_layers_or_error(model)
    total = 0
    with torch.no_grad():
        for layer in layers:
            for (expert, projection), weight in layer.expert_weights().items():
                restored, nbytes = PEERS[peer](weight, bits, group_size)
                weight.copy_(restored.to(weight.dtype).view_as(weight))
                total += nbytes
    return model, total


def expert_numel(model: nn.Module) -> int:
    _, layers = moe_layers_or_error(model)
    return sum(layer.num_experts * layer.expert_numel for layer in layers)


def _quality_row(method: str, bits: float, group: int, report, nbytes: int, numel: int, started: float) -> dict:
    row = {"method": method, "bits": bits, "group_size": group, "perplexity": report.perplexity, "kl": report.kl_to_reference,
           "routing_agreement": sum(report.routing_agreement) / len(report.routing_agreement),
           "expert_bytes": nbytes, "bits_per_weight": 8 * nbytes / numel, "seconds": round(time.perf_counter() - started, 1)}
    print(f"[{method} {bits} bits group {group}] ppl {row['perplexity']:.3f} kl {row['kl']:.4f} "
          f"{row['bits_per_weight']:.3f} bits/weight {row['seconds']}s", flush=True)
    return row


def quality_rows(args) -> list[dict]:
    model_dir = args.model
    ids = evaluation_tokens(model_dir, None, args.eval_tokens)
    reference = load_source(model_dir)
    numel = expert_numel(reference)
    fp = evaluate(reference, ids)
    rows = [{"method": "bf16", "bits": 16, "group_size": 0, "perplexity": fp.perplexity, "kl": 0.0, "routing_agreement": 1.0,
             "expert_bytes": 2 * numel, "bits_per_weight": 16.0, "seconds": 0.0}]
    calibration = tokenize_calibration(model_dir, DATA_DIR / "calibration.txt", args.calib_tokens, 256)
    with tempfile.TemporaryDirectory() as tmp:
        for group in args.group_sizes:
            group_size = group or None
            for bits in args.bits:
                for method in args.methods:
                    if method == "quanto" and (bits not in QUANTO_TYPES or group_size is None):
                        continue
                    started = time.perf_counter()
                    if method in PEERS:
                        model, nbytes = peer_model(model_dir, method, bits, group_size)
                    else:
                        config = QuantConfig(bits=bits, group_size=group_size, clip_search=method == "moeq-rtn-clip")
                        plan = moeq.plan_for(reference, config)
                        nbytes = plan.budget["expert_bytes"]
                        if method == "moeq-gptq":
                            model = Path(tmp) / "gptq"
                            quantize_calibrated(model_dir, plan, calibration, model, CalibrationConfig(quantizer="gptq"), overwrite=True)
                        else:
                            model = moeq.quantize(load_source(model_dir), plan)
                    rows.append(_quality_row(method, bits, group, evaluate(model, ids, reference=reference), nbytes, numel, started))
            for bits in args.mixed_bits:
                started = time.perf_counter()
                plan = moeq.allocate(model_dir, "auto", avg_bits=bits, calibration=DATA_DIR / "calibration.txt",
                                     group_size=group_size, damage_quantizer="gptq", calib_tokens=args.calib_tokens)
                out = Path(tmp) / "auto"
                quantize_calibrated(model_dir, plan, calibration, out, CalibrationConfig(quantizer="gptq"), overwrite=True)
                rows.append(_quality_row("moeq-auto-gptq", bits, group, evaluate(out, ids, reference=reference),
                                         plan.budget["expert_bytes"], numel, started))
    print_table(["method", "bits", "group", "ppl", "KL", "route agr", "bits/weight"],
                [[r["method"], r["bits"], r["group_size"] or "channel", f"{r['perplexity']:.2f}", f"{r['kl']:.4f}",
                  f"{r['routing_agreement']:.3f}", f"{r['bits_per_weight']:.3f}"] for r in rows])
    return rows


def grouped_forward(x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, experts: list[list[nn.Module]]) -> torch.Tensor:
    """SwiGLU experts as modules (gate, up, down), on the same per-expert grouping as moeq's CPU path."""
    groups = group_by_expert(index, weights, len(experts))
    output = torch.zeros_like(x)
    for expert, (start, count) in enumerate(zip(groups.starts.tolist(), groups.counts.tolist(), strict=True)):
        if count == 0:
            continue
        token = groups.token[start : start + count]
        gate, up, down = experts[expert]
        h = x[token]
        y = down(F.silu(gate(h)) * up(h))
        output.index_add_(0, token, y * groups.weight[start : start + count, None].to(y.dtype))
    return output


def _linear(weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    linear.weight.data.copy_(weight)
    return linear


def int4_resident_bytes(experts: QuantizedExperts) -> int:
    """Packed buffers plus the ``cpu-int4`` copy of every expert (built by one call routed to all of them)."""
    hidden = experts.expert(0)[PROJECTIONS[0]].in_features
    index = torch.arange(EXPERTS).view(-1, 1)
    moe_experts_forward(torch.zeros(EXPERTS, hidden, dtype=torch.bfloat16), index, torch.ones(EXPERTS, 1), experts, backend="cpu-int4")
    packed = sum(experts.expert(e)[p].quantized.nbytes for e in range(EXPERTS) for p in PROJECTIONS)
    return packed + sum(stored_bytes(w.packed) + stored_bytes(w.scale_zero) for w in experts._int4_weights.values())


def speed_rows(args) -> list[dict]:
    """One MoE layer, the same routing, each library's quantized experts vs bf16."""
    import optimum.quanto as oq
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    hidden, inter = 4096 // args.scale, 14336 // args.scale
    shapes = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    g = torch.Generator().manual_seed(0)
    dense = [[(torch.randn(shapes[p], generator=g) * 0.02).to(torch.bfloat16) for p in PROJECTIONS] for _ in range(EXPERTS)]
    rows = []
    for bits in (4, 2):
        spec = TensorSpec(bits, "asym", 64)
        ours = QuantizedExperts(EXPERTS, shapes, {(e, p): spec for e in range(EXPERTS) for p in PROJECTIONS}, F.silu, gated=True,
                                dtype=torch.bfloat16)
        for e in range(EXPERTS):
            for p, w in zip(PROJECTIONS, dense[e], strict=True):
                ours.expert(e)[p].load_quantized(rtn_quantizer(w, spec, torch.float16))
        hqq = [[HQQLinear(_linear(w), BaseQuantizeConfig(nbits=bits, group_size=64), compute_dtype=torch.bfloat16, device="cpu")
                for w in ws] for ws in dense]
        quanto = []
        for ws in dense:
            modules = nn.ModuleList(_linear(w) for w in ws)
            oq.quantize(modules, weights=getattr(oq, QUANTO_TYPES[bits]))
            oq.freeze(modules)
            quanto.append(list(modules))
        runs = {
            "bf16": lambda x, i, w: experts_forward_reference(x, i, w, EXPERTS, lambda e, dtype: dense[e], F.silu, True),
            "moeq-cpu": lambda x, i, w: moe_experts_forward(x, i, w, ours, backend="cpu"),
            "moeq-cpu-int4": lambda x, i, w: moe_experts_forward(x, i, w, ours, backend="cpu-int4"),
            "hqq": lambda x, i, w: grouped_forward(x, i, w, hqq),
            "quanto": lambda x, i, w: grouped_forward(x, i, w, quanto),
        }
        nbytes = {"bf16": sum(stored_bytes(t) for ws in dense for t in ws),
                  "moeq-cpu": sum(ours.expert(e)[p].quantized.nbytes for e in range(EXPERTS) for p in PROJECTIONS),
                  "moeq-cpu-int4": int4_resident_bytes(ours),
                  "hqq": sum(stored_bytes(m.W_q) + 2 * (m.meta["scale"].numel() + m.meta["zero"].numel()) for ms in hqq for m in ms),
                  "quanto": sum(stored_bytes(m.weight) for ms in quanto for m in ms)}
        quanto_layout = type(quanto[0][0].weight).__name__
        for tokens in args.tokens:
            x = torch.randn(tokens, hidden, generator=g).to(torch.bfloat16)
            index = torch.stack([torch.randperm(EXPERTS, generator=g)[:TOP_K] for _ in range(tokens)])
            weights = torch.softmax(torch.randn(tokens, TOP_K, generator=g), -1).to(torch.bfloat16)
            expected = runs["bf16"](x, index, weights).float()
            with torch.no_grad():  # quanto's qint2 path fails under inference_mode
                times = {name: timed(lambda run=run: run(x, index, weights), args.repeats) for name, run in runs.items()}
                errors = {name: float((run(x, index, weights).float() - expected).norm() / expected.norm()) for name, run in runs.items()}
            for name in runs:
                rows.append({"bits": bits, "tokens": tokens, "method": name, "ms": times[name] * 1e3,
                             "vs_bf16": times["bf16"] / times[name], "rel_error": errors[name],
                             "expert_bytes": nbytes[name], "layout": quanto_layout if name == "quanto" else ""})
            print(f"[{bits} bits, {tokens} tokens] " + ", ".join(f"{n} {times[n] * 1e3:.2f} ms" for n in runs), flush=True)
    print_table(["bits", "tokens", "method", "ms", "x bf16 speed", "rel err vs bf16", "expert MB"],
                [[r["bits"], r["tokens"], r["method"], f"{r['ms']:.2f}", f"{r['vs_bf16']:.2f}", f"{r['rel_error']:.4f}",
                  f"{r['expert_bytes'] / 1e6:.1f}"] for r in rows])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--part", choices=("quality", "speed", "both"), default="both")
    parser.add_argument("--methods", nargs="+", default=["moeq-rtn", "moeq-rtn-clip", "moeq-gptq", "hqq", "quanto"])
    parser.add_argument("--bits", type=lambda s: [int(b) for b in s.split(",")], default=[4, 3, 2])
    parser.add_argument("--group-sizes", type=lambda s: [int(b) for b in s.split(",")], default=[0, 64],
                        help="0 = per output channel")
    parser.add_argument("--mixed-bits", type=lambda s: [float(b) for b in s.split(",") if b], default=[2.5, 3.5],
                        help="budgets (mean expert bits) of the moeq-auto-gptq rows; empty for none")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--calib-tokens", type=int, default=8192)
    parser.add_argument("--scale", type=int, default=4, help="speed part: Mixtral-8x7B layer shapes divided by this")
    parser.add_argument("--tokens", type=lambda s: [int(t) for t in s.split(",")], default=[1, 16, 256])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import hqq
    import optimum.quanto

    versions = {"hqq": hqq.__version__, "optimum-quanto": optimum.quanto.__version__}
    if args.part in ("quality", "both"):
        print(f"wrote {write_json('peers_quality', quality_rows(args), model=str(args.model), versions=versions)}")
    if args.part in ("speed", "both"):
        print(f"wrote {write_json('peers_speed', speed_rows(args), scale=args.scale, versions=versions)}")


if __name__ == "__main__":
    main()
