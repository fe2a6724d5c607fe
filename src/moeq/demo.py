"""The main job (``make run``): the built-in default model quantized by every allocation strategy
at several budgets, each measured against the full-precision model, with a report folder.

With the trained default model (``moeq/data/default-mixtral``, made by ``moeq train``) the rows
are real: perplexity on the corpus's test split, KL to the full-precision model, routing
agreement, true model bytes and time. Without it (a fresh checkout before the model was trained)
the job falls back to a Mixtral-architecture model with random weights built from a config, and
says so: its perplexities are then about the vocabulary size and only the relative numbers mean
anything.

Every row runs the same road a user's checkpoint takes: ``allocate`` from the folder (lazily),
``quantize`` (round to nearest, per output channel), ``evaluate``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers

from .allocate import allocate
from .api import quantize
from .eval import evaluate
from .eval.data import evaluation_tokens
from .atomic import atomic_directory
from .io.source import load_source
from .train.corpus import DATA_DIR, read_split

__all__ = ["DemoRow", "DemoResult", "DEFAULT_MODEL", "demo_config", "run_demo", "STRATEGIES", "BUDGETS", "UNIFORM_WIDTHS"]

DEFAULT_MODEL = DATA_DIR / "default-mixtral"
STRATEGIES = ("router-maxvar", "router", "variance", "frequency", "routing-weight", "random", "auto")
BUDGETS = (2.5, 2.25, 2.0)
UNIFORM_WIDTHS = (3, 2)  # the uniform baselines bracketing the mixed budgets


@dataclass
class DemoRow:
    strategy: str
    avg_bits: float
    perplexity: float
    kl: float
    routing_agreement: float  # mean over MoE layers
    model_bytes: int
    seconds: float


@dataclass
class DemoResult:
    model: str
    trained: bool
    full_precision_perplexity: float
    full_precision_bytes: int
    eval_tokens: int
    rows: list[DemoRow]


def demo_config() -> transformers.MixtralConfig:
    """The fallback model when no trained default exists: 4 layers, 8 experts, hidden 256."""
    return transformers.MixtralConfig(
        vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, bos_token_id=None, eos_token_id=None,
        pad_token_id=None,
    )


def _source(work: Path, seed: int) -> tuple[Path, bool]:
    if (DEFAULT_MODEL / "config.json").is_file():
        return DEFAULT_MODEL, True
    torch.manual_seed(seed)
    folder = work / "random-source"
    transformers.AutoModelForCausalLM.from_config(demo_config(), dtype=torch.bfloat16).save_pretrained(folder)
    return folder, False


def _calibration_ids(source: Path, trained: bool, tokens: int, seq_len: int) -> torch.Tensor:
    if trained:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source)
        ids = tokenizer(read_split("calibration")[: tokens * 16], add_special_tokens=False)["input_ids"][:tokens]
        ids = torch.tensor(ids[: len(ids) // seq_len * seq_len])
        return ids.view(-1, seq_len)
    return torch.randint(0, 1024, (tokens // seq_len, seq_len), generator=torch.Generator().manual_seed(1))


def run_demo(
    out: Path,
    overwrite: bool = False,
    strategies: tuple[str, ...] = STRATEGIES,
    budgets: tuple[float, ...] = BUDGETS,
    uniform_widths: tuple[int, ...] = UNIFORM_WIDTHS,
    eval_tokens: int = 8192,
    calib_tokens: int = 8192,
    seq_len: int = 256,
    seed: int = 0,
    progress=None,
) -> DemoResult:
    """Run the main job and write ``out`` (report.md, results.json, plots)."""
    with atomic_directory(Path(out), overwrite=overwrite) as work:
        source, trained = _source(work, seed)
        if trained:
            ids = evaluation_tokens(source, None, eval_tokens)
        else:
            ids = torch.randint(0, 1024, (eval_tokens,), generator=torch.Generator().manual_seed(2))
        calibration = _calibration_ids(source, trained, calib_tokens, seq_len)
        reference = load_source(source)
        fp = evaluate(reference, ids, seq_len=seq_len)
        rows = []
        runs = [("uniform", float(b)) for b in uniform_widths] + [(s, b) for s in strategies for b in budgets]
        for strategy, bits in runs:
            started = time.perf_counter()
            plan = allocate(source, strategy, avg_bits=bits, calibration=calibration, seed=seed)
            model = quantize(load_source(source), plan)
            report = evaluate(model, ids, reference=reference, seq_len=seq_len)
            rows.append(DemoRow(
                strategy=strategy, avg_bits=plan.budget["avg_expert_bits"], perplexity=report.perplexity,
                kl=report.kl_to_reference, routing_agreement=sum(report.routing_agreement) / len(report.routing_agreement),
                model_bytes=plan.budget["model_bytes"], seconds=time.perf_counter() - started,
            ))
            if progress:
                progress(f"{strategy} {bits:g}")
        result = DemoResult(
            model=str(source) if trained else "random-weight Mixtral (no trained default model found)",
            trained=trained, full_precision_perplexity=fp.perplexity, full_precision_bytes=fp.bytes_in_memory,
            eval_tokens=fp.tokens_scored, rows=rows,
        )
        (work / "results.json").write_text(json.dumps(asdict(result), indent=1) + "\n")
        _plots(result, work)
        (work / "report.md").write_text(_markdown(result))
    return result


def _plots(result: DemoResult, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for strategy in dict.fromkeys(r.strategy for r in result.rows):
        rows = sorted((r for r in result.rows if r.strategy == strategy), key=lambda r: r.avg_bits)
        axes[0].plot([r.avg_bits for r in rows], [r.perplexity for r in rows], marker="o", label=strategy)
        axes[1].plot([r.avg_bits for r in rows], [r.kl for r in rows], marker="o", label=strategy)
    axes[0].axhline(result.full_precision_perplexity, color="black", linestyle="--", label="full precision")
    axes[0].set(xlabel="mean expert bits", ylabel="perplexity (test split)", title="perplexity")
    axes[1].set(xlabel="mean expert bits", ylabel="KL to full precision (nats/token)", title="KL divergence", yscale="log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "quality_vs_bits.png", dpi=110)
    plt.close(fig)


def _markdown(result: DemoResult) -> str:
    lines = [
        "# moeq main job",
        "",
        f"Model: {result.model}. Evaluation: {result.eval_tokens:,} scored tokens "
        f"({'the corpus test split' if result.trained else 'random token ids'}), windows of 256.",
        f"Full precision: perplexity {result.full_precision_perplexity:.3f}, {result.full_precision_bytes:,} bytes.",
        "Experts quantized by round-to-nearest (asym per output channel; 1-bit experts sign), levels 3,2,1;",
        "everything else full precision. Bytes are the true size of the quantized model.",
        "",
        "| strategy | mean expert bits | perplexity | KL to fp | routing agreement | model bytes | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result.rows:
        lines.append(f"| {r.strategy} | {r.avg_bits:.3g} | {r.perplexity:.3f} | {r.kl:.4f} | {r.routing_agreement:.3f} | "
                     f"{r.model_bytes:,} | {r.seconds:.1f} |")
    lines += ["", "![quality vs bits](quality_vs_bits.png)", ""]
    return "\n".join(lines)
