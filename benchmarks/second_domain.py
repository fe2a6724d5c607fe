"""The paper's setting, honestly: a fine-tune with a true router-norm change, and who ranks experts best.

    python benchmarks/second_domain.py [--steps 400] [--budgets 2.25,2.5] [--random-seeds 3]
        [--eval-tokens 0] [--workdir runs/second-domain] [--train-router DIR]

1. Fine-tunes the default model (Shakespeare) on a second domain, the Jargon File (public domain,
   Debian's ``jargon-text``; ``moeq.train.jargon``), every weight trainable, with the
   load-balancing loss, for ``--steps`` steps (seed 0, lr 1e-3, batch 16 x 256). The routers of
   the model *before* the fine-tune are saved beside it as ``initial_router.safetensors``: the
   router-norm change Λ of the fine-tune is then exact, as in the paper's Switch experiments.
   Cached in ``--workdir``.
2. At each budget (levels 3,2,1, RTN), allocates with router-maxvar using the true Λ, the
   final-norm proxy (no reference), and, with ``--train-router DIR`` (a ``moeq train-router``
   output of the fine-tuned model), the Λ of a short router-only fine-tune on calibration text;
   (created with ``moeq.train.router.train_router`` on the Jargon calibration split when the folder
   does not exist); and with frequency, random (several seeds) and auto (calibration: the Jargon
   calibration split).
3. Measures KL to the fine-tuned full-precision model and perplexity on the Jargon test split.

Prints a table and writes benchmarks/results/second_domain.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from scipy.stats import spearmanr

from _common import print_table, write_json
from moeq import quantize
from moeq.allocate import allocate
from moeq.eval.api import evaluate
from moeq.io.source import load_source
from moeq.train.corpus import DATA_DIR
from moeq.train.jargon import fetch_jargon
from moeq.train.lm import INITIAL_ROUTER_FILE, TrainConfig, fit

DEFAULT = DATA_DIR / "default-mixtral"


def finetune(folder: Path, texts: dict[str, str], steps: int) -> Path:
    """The default model fine-tuned on ``texts["train"]``, saved with its routers from before."""
    from transformers import AutoTokenizer

    if (folder / "config.json").is_file():
        return folder
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT)

    def encode(text: str) -> torch.Tensor:
        return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)

    config = TrainConfig(out=folder, steps=steps, lr=1e-3, warmup=20, eval_every=50, seed=0)
    started = time.perf_counter()
    model, before, step = fit(load_source(DEFAULT), encode(texts["train"]), encode(texts["calibration"]), config)
    work = folder.with_name(folder.name + ".partial")
    model.to(torch.bfloat16).save_pretrained(work)
    tokenizer.save_pretrained(work)
    save_file(before, work / INITIAL_ROUTER_FILE, metadata={"format": "pt"})
    (work / "finetune_log.json").write_text(json.dumps({
        "from": str(DEFAULT), "corpus": "Jargon File 4.4.7 (moeq.train.jargon)", "steps": step, "lr": config.lr,
        "seconds": round(time.perf_counter() - started, 1), "log": config.log,
    }, indent=1))
    work.rename(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--budgets", default="2.25,2.5")
    parser.add_argument("--random-seeds", type=int, default=3)
    parser.add_argument("--eval-tokens", type=int, default=0, help="test tokens to score (0: the whole test split)")
    parser.add_argument("--calib-tokens", type=int, default=8192)
    parser.add_argument("--workdir", type=Path, default=Path("runs/second-domain"))
    parser.add_argument("--train-router", type=Path, default=None)
    args = parser.parse_args()

    texts = fetch_jargon(args.workdir / "cache")
    model_dir = finetune(args.workdir / "finetuned", texts, args.steps)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    test_ids = torch.tensor(tokenizer(texts["test"], add_special_tokens=False)["input_ids"][: args.eval_tokens or None])
    calibration = torch.tensor(tokenizer(texts["calibration"], add_special_tokens=False)["input_ids"][: args.calib_tokens])
    calibration = calibration[: calibration.numel() // 256 * 256].view(-1, 256)
    reference = load_source(model_dir)
    fp = evaluate(reference, test_ids)
    before = evaluate(load_source(DEFAULT), test_ids)
    print(f"fine-tuned model: test perplexity {fp.perplexity:.2f} (before the fine-tune {before.perplexity:.2f})", flush=True)

    variants = [("router-maxvar (true Λ)", "router-maxvar", {"reference": model_dir / INITIAL_ROUTER_FILE}),
                ("router-maxvar (final-norm proxy)", "router-maxvar", {"proxy": True})]
    if args.train_router is not None:
        if not (args.train_router / "config.json").is_file():  # a short router-only fine-tune on the calibration text
            from moeq.train.router import RouterTuneConfig, train_router

            train_router(model_dir, args.train_router, texts["calibration"], RouterTuneConfig())
        variants.append(("router-maxvar (train-router Λ)", "router-maxvar", {"reference": args.train_router / INITIAL_ROUTER_FILE,
                                                                             "router_model": args.train_router}))
    variants += [("frequency", "frequency", {}), *[(f"random-{s}", "random", {"seed": s}) for s in range(args.random_seeds)],
                 ("auto", "auto", {})]
    rows = []
    for budget in (float(b) for b in args.budgets.split(",")):
        for name, strategy, extra in variants:
            source = load_source(model_dir) if extra.get("proxy") else (extra.get("router_model") or model_dir)
            plan = allocate(source, strategy, avg_bits=budget, levels=(4, 3, 2, 1) if strategy == "auto" else (3, 2, 1),
                            calibration=calibration, seed=extra.get("seed", 0), reference=extra.get("reference"))
            report = evaluate(quantize(load_source(model_dir), plan), test_ids, reference=reference)
            rows.append({"budget": budget, "plan": name, "kl": report.kl_to_reference, "perplexity": report.perplexity,
                         "router_signal": plan.method.get("router_signal", "")})
            print(f"  {budget} {name}: KL {report.kl_to_reference:.4f} ppl {report.perplexity:.2f}", flush=True)
    change = allocate(model_dir, "router", avg_bits=2.5).scores["router_norm_change"]
    freq = allocate(model_dir, "frequency", avg_bits=2.5, calibration=calibration).scores["frequency"]
    rho = [float(spearmanr(c, f).statistic) for c, f in zip(change, freq)]
    table = []
    for row in rows:
        table.append([row["budget"], row["plan"], f"{row['kl']:.4f}", f"{row['perplexity']:.2f}"])
    print_table(["budget", "plan", "KL", "ppl"], table)
    randoms = {b: statistics.mean(r["kl"] for r in rows if r["budget"] == b and r["plan"].startswith("random")) for b in {r["budget"] for r in rows}}
    print(f"Spearman(Λ of the fine-tune, calibration frequency) per layer: {[round(r, 2) for r in rho]}")
    print(f"mean KL of random plans per budget: { {b: round(v, 4) for b, v in randoms.items()} }")
    path = write_json("second_domain", rows, fine_tuned_perplexity=fp.perplexity, perplexity_before_finetune=before.perplexity,
                      spearman_lambda_frequency=rho, args=vars(args) | {"workdir": str(args.workdir),
                                                                        "train_router": str(args.train_router)})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
