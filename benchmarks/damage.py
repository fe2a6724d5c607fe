"""Does predicted damage rank plans like measured KL, and does ``auto`` beat every fixed rule?

    python benchmarks/damage.py [--budgets 2.0,2.25,2.5,2.75] [--quantizers rtn,gptq]
        [--strategies router-maxvar,router,frequency,routing-weight,random,pmq,error-ilp,auto]
        [--random-seeds 3] [--eval-tokens 8192] [--calib-tokens 16384] [--model DIR]

On the default model (src/moeq/data/default-mixtral, initial routers shipped, so Λ is exact):
for each quantizer, the predicted-damage table is computed once from the calibration split
(16,384 tokens) for widths 4,3,2,1 and calibrated by the per-layer probes; every strategy allocates at every budget (levels 3,2,1 for
the fixed rules, 4,3,2,1 for ``auto``; ``auto-321`` is ``auto`` restricted to 3,2,1), the plan's
predicted damage is read from the table, the model is quantized (RTN in memory; GPTQ layer by
layer from the checkpoint with the same calibration tokens) and measured on the test split: KL to
the full-precision model and perplexity. Per quantizer and budget: Spearman's ρ between predicted
damage and KL over the plans, and ``auto``'s KL over the best fixed rule's. Prints tables and
writes benchmarks/results/damage.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

from _common import print_table, write_json
from moeq import quantize
from moeq.allocate import allocate
from moeq.allocate.api import _one_bit_aware_spec
from moeq.allocate.damage import damage_table
from moeq.calibrate.runner import CalibrationConfig, quantize_calibrated
from moeq.eval.api import evaluate
from moeq.eval.data import evaluation_tokens
from moeq.io.lazy import open_lazy
from moeq.io.source import load_source
from moeq.train.corpus import DATA_DIR

FIXED_RULES = ("router-maxvar", "router", "frequency", "routing-weight", "random", "pmq", "error-ilp")


def calibration_ids(model: Path, tokens: int, seq_len: int = 256) -> torch.Tensor:
    from moeq.calibrate.routing import tokenize_calibration

    return tokenize_calibration(model, DATA_DIR / "calibration.txt", tokens, seq_len)


def widths_of(plan, layers) -> list[list[int]]:
    return [[plan.expert_specs(layer.index)[(e, layer.projections[0])].bits for e in range(layer.num_experts)] for layer in layers]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DATA_DIR / "default-mixtral")
    parser.add_argument("--budgets", default="2.0,2.25,2.5,2.75")
    parser.add_argument("--quantizers", default="rtn,gptq")
    parser.add_argument("--strategies", default=",".join((*FIXED_RULES, "auto", "auto-321")))
    parser.add_argument("--random-seeds", type=int, default=3)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--calib-tokens", type=int, default=16384)
    args = parser.parse_args()

    budgets = [float(b) for b in args.budgets.split(",")]
    strategies = args.strategies.split(",")
    calibration = calibration_ids(args.model, args.calib_tokens)
    test_ids = evaluation_tokens(args.model, None, args.eval_tokens)
    reference = load_source(args.model)
    layers = open_lazy(args.model).layers
    rows, summary = [], []
    for quantizer in args.quantizers.split(","):
        started = time.perf_counter()
        lazy = open_lazy(args.model)
        prior = [list(range(layer.num_experts)) for layer in layers]  # every expert is reached on this model
        table = damage_table(lazy, calibration, (4, 3, 2, 1), lambda b: _one_bit_aware_spec(b, "asym", None), prior, quantizer)
        table_seconds = time.perf_counter() - started
        print(f"[{quantizer}] damage table in {table_seconds:.1f} s; experts on the prior: {sum(map(sum, table.prior))}", flush=True)
        for budget in budgets:
            group = []
            for strategy in strategies:
                seeds = range(args.random_seeds) if strategy == "random" else [0]
                for seed in seeds:
                    name = strategy if strategy != "random" else f"random-{seed}"
                    real = "auto" if strategy.startswith("auto") else strategy
                    levels = (3, 2, 1) if strategy == "auto-321" else None
                    damage = table if real == "auto" and levels is None else None
                    try:
                        plan = allocate(args.model, real, avg_bits=budget, levels=levels, calibration=calibration, seed=seed,
                                        damage_quantizer=quantizer, damage=damage)
                    except ValueError as err:
                        print(f"  {name} at {budget}: not possible ({err})")
                        continue
                    predicted = table.total(widths_of(plan, layers))
                    if quantizer == "rtn":
                        model = quantize(load_source(args.model), plan)
                    else:
                        out = Path(tempfile.mkdtemp()) / "q"
                        quantize_calibrated(args.model, plan, calibration, out, CalibrationConfig())
                        model = out
                    report = evaluate(model, test_ids, reference=reference)
                    row = {"quantizer": quantizer, "budget": budget, "strategy": name, "avg_bits": plan.budget["avg_expert_bits"],
                           "predicted_damage": predicted, "kl": report.kl_to_reference, "perplexity": report.perplexity}
                    rows.append(row)
                    group.append(row)
                    print(f"  {quantizer} {budget} {name}: predicted {predicted:.4f} KL {row['kl']:.4f} ppl {row['perplexity']:.2f}", flush=True)
            rho = spearmanr([r["predicted_damage"] for r in group], [r["kl"] for r in group]).statistic
            fixed = [r for r in group if not r["strategy"].startswith("auto")]
            best = min(fixed, key=lambda r: r["kl"])
            auto = next((r for r in group if r["strategy"] == "auto"), None)
            summary.append([quantizer, budget, len(group), f"{rho:.2f}", best["strategy"], f"{best['kl']:.4f}",
                            f"{auto['kl']:.4f}" if auto else "-", f"{auto['kl'] / best['kl']:.2f}" if auto else "-"])
        print_table(["quantizer", "budget", "plans", "spearman", "best fixed rule", "its KL", "auto KL", "auto/best"], summary)
    print_table(["quantizer", "budget", "strategy", "avg bits", "predicted", "KL", "ppl"],
                [[r["quantizer"], r["budget"], r["strategy"], f"{r['avg_bits']:.3f}", f"{r['predicted_damage']:.4f}",
                  f"{r['kl']:.4f}", f"{r['perplexity']:.2f}"] for r in rows])
    print(f"wrote {write_json('damage', rows, summary=summary, args=vars(args) | {'model': str(args.model)})}")


if __name__ == "__main__":
    main()
