"""GPTQ against round-to-nearest on the best model the project has, at 2, 3, 4 and 2.5 bits.

    python benchmarks/gptq_vs_rtn.py [--activations random|correlated]

Until the trained default model exists (issue 5), "the best model available" is moeq's demo
Mixtral (4 layers, 8 experts, hidden 256, expert width 512; random weights, float32). Its
activations are nearly isotropic, which makes GPTQ's Hessian close to a multiple of the identity
and GPTQ close to rounding. ``--activations correlated`` gives it low-rank token embeddings
(rank 8 plus 10 % noise), the trained-like case. Calibration: 64 x 128 random token ids;
evaluation: 16 x 128 other random ids. Reported: mean KL(full precision || quantized) of the
next-token distributions, top-1 agreement, perplexity on the evaluation ids (random tokens: only
comparable between rows, not a language-modelling figure), and the time to quantize.
Experts only (everything else full precision), asym, group size 128.
Writes benchmarks/results/gptq_vs_rtn_<activations>.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

from _common import print_table, write_json
import moeq
from moeq.calibrate.runner import quantize_calibrated
from moeq.demo import demo_config
from moeq.io.source import load_source


def evaluate(model, reference_logits: torch.Tensor, ids: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        logits = model(ids).logits.float()
    ref = F.log_softmax(reference_logits, dim=-1)
    mine = F.log_softmax(logits, dim=-1)
    kl = (ref.exp() * (ref - mine)).sum(-1).mean()
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return {"kl": float(kl), "top1": float((logits.argmax(-1) == reference_logits.argmax(-1)).float().mean()),
            "perplexity": float(nll.exp())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--activations", choices=["random", "correlated"], default="random")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(demo_config()).eval()
    if args.activations == "correlated":
        embed = model.get_input_embeddings().weight
        with torch.no_grad():
            embed.copy_(torch.randn(embed.shape[0], 8) @ torch.randn(8, embed.shape[1]) * 0.02 + 0.002 * torch.randn(embed.shape))
    gen = torch.Generator().manual_seed(1)
    calib = torch.randint(0, 1024, (64, 128), generator=gen)
    held_out = torch.randint(0, 1024, (16, 128), generator=gen)
    with torch.no_grad():
        reference = model(held_out).logits.float()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "source"
        model.save_pretrained(source)
        budgets = [("uniform", 4), ("uniform", 3), ("uniform", 2), ("router-maxvar", 2.5)]
        for strategy, bits in budgets:
            if strategy == "uniform":
                plan_config = moeq.QuantConfig(bits=int(bits), group_size=128)
                make_plan = lambda m: moeq.plan_for(m, plan_config)  # noqa: E731
            else:
                make_plan = lambda m: moeq.allocate(source, "router-maxvar", avg_bits=bits, group_size=128)  # noqa: E731
            for quantizer in ("rtn", "gptq"):
                started = time.perf_counter()
                if quantizer == "rtn":
                    quantized = moeq.quantize(load_source(source), make_plan(model))
                else:
                    out = Path(tmp) / f"{strategy}-{bits}-gptq"
                    quantize_calibrated(source, make_plan(model), calib, out)
                    quantized = moeq.load(out)
                seconds = time.perf_counter() - started
                rows.append({"plan": f"{strategy} {bits}", "quantizer": quantizer, "seconds": seconds,
                             **evaluate(quantized, reference, held_out)})
    fp = evaluate(model, reference, held_out)
    print(f"full precision: perplexity {fp['perplexity']:.1f} on the evaluation ids")
    print_table(
        ["plan", "quantizer", "KL to fp", "top-1 agree", "perplexity", "seconds"],
        [[r["plan"], r["quantizer"], f"{r['kl']:.4f}", f"{r['top1']:.3f}", f"{r['perplexity']:.1f}", f"{r['seconds']:.1f}"] for r in rows],
    )
    print(f"wrote {write_json(f'gptq_vs_rtn_{args.activations}', rows, full_precision=fp, activations=args.activations)}")


if __name__ == "__main__":
    main()
