"""Tasks of EleutherAI's lm-evaluation-harness on a model folder, quantized by moeq or not.

The folder is loaded as moeq loads any model (a moeq checkpoint keeps its packed experts, which
run through moeq's kernels), wrapped with its own tokenizer in lm-eval's Hugging Face model class
and scored by ``lm_eval.simple_evaluate``. lm-eval is optional: ``pip install 'moeq[harness]'``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from types import ModuleType

from ..io.source import load_any, read_config

__all__ = ["HarnessNotInstalled", "run_harness"]

INSTALL_HINT = "pip install 'moeq[harness]'"


class HarnessNotInstalled(ImportError):
    """lm-evaluation-harness (moeq's ``harness`` extra) cannot be imported."""


def _lm_eval() -> tuple[ModuleType, type]:
    """The ``lm_eval`` package and its HF model class, or a one-line error saying how to install them."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:
        missing = err.name or "lm-eval"
        raise HarnessNotInstalled(f"the lm-eval bridge needs {missing}, which is not installed; install it with {INSTALL_HINT}") from None
    return lm_eval, HFLM


@functools.lru_cache(maxsize=4)
def _task_manager(include_path: str | None):
    # Indexing lm-eval's bundled task configs takes seconds; one index serves every run in a process.
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def _checked_tasks(tasks: list[str], include_path: Path | None):
    """The task manager that knows every name in ``tasks``; an unknown name is a one-line error."""
    if not tasks:
        raise ValueError("no lm-eval task given; pass task names like --tasks arc_easy,hellaswag")
    if include_path is not None and not Path(include_path).is_dir():
        raise FileNotFoundError(f"task folder {include_path} does not exist; --include-path takes a folder of task YAML files")
    manager = _task_manager(None if include_path is None else str(Path(include_path).resolve()))
    for name in tasks:
        if name not in manager.task_index and not Path(name).is_file():
            where = f" or in {include_path}" if include_path is not None else "; custom task YAML folders go in --include-path"
            raise ValueError(f"unknown lm-eval task {name!r}: not among lm-eval's tasks{where} (list them with `lm-eval ls tasks`)")
    return manager


def _tokenizer(model_path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as err:
        # The project's fallback tokenizer would not match an arbitrary model's vocabulary.
        raise ValueError(f"{model_path} has no usable tokenizer files; lm-eval needs the model's own tokenizer ({type(err).__name__})") from None


def _compact(results: dict) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from lm-eval's results; metrics of a non-default filter keep its name."""
    compact = {}
    for task, row in results["results"].items():
        metrics = {}
        for key, value in row.items():
            metric, comma, filter_name = key.partition(",")
            # Skips the alias, and stderrs lm-eval reports as "N/A".
            if comma and isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[metric if filter_name == "none" else f"{metric} ({filter_name})"] = float(value)
        compact[task] = metrics
    return compact


def run_harness(
    model_path: Path,
    tasks: list[str],
    *,
    limit: int | None = None,
    batch_size: int = 1,
    num_fewshot: int = 0,
    include_path: Path | None = None,
    device: str = "cpu",
    backend: str = "auto",
) -> dict:
    """Run lm-evaluation-harness tasks on the model folder ``model_path``.

    Args:
        model_path: a causal MoE model folder, quantized by moeq or full precision, with its tokenizer.
        tasks: lm-eval task, group or tag names (or paths of task YAML files).
        limit: score at most this many documents per task (for quick checks; the result is then
            not comparable with published numbers).
        batch_size: requests per forward pass.
        num_fewshot: few-shot examples per prompt (tasks whose config fixes 0 keep 0).
        include_path: a folder of custom task YAML files, searched besides lm-eval's own.
        device: where the model runs.
        backend: experts backend of a moeq checkpoint (:data:`moeq.kernels.BACKENDS`).

    Returns:
        ``{"results": {task: {metric: value}}, "lm_eval_version": str}``; stderrs appear as
        ``<metric>_stderr`` where lm-eval computes them.

    Raises:
        HarnessNotInstalled: lm-eval (or its HF dependencies) is missing.
        ValueError: an unknown task, an encoder-decoder model, a folder without a tokenizer, a
            task whose data set is neither cached nor reachable.
        FileNotFoundError: ``include_path`` is not a folder.
    """
    lm_eval, hf_model_class = _lm_eval()
    model_path = Path(model_path)
    if read_config(model_path).get("is_encoder_decoder"):
        raise ValueError(f"{model_path} is an encoder-decoder model; the lm-eval bridge supports only causal LMs")
    manager = _checked_tasks(list(tasks), include_path)
    tokenizer = _tokenizer(model_path)
    model = load_any(model_path, backend).to(device)
    lm = hf_model_class(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size)
    try:
        results = lm_eval.simple_evaluate(
            model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, batch_size=batch_size, device=device,
            task_manager=manager, log_samples=False,
        )
    except ConnectionError as err:  # datasets' error for a data set neither cached nor reachable
        raise ValueError(f"lm-eval could not load a task's data set: {err}; run once with network access to cache it") from None
    return {"results": _compact(results), "lm_eval_version": lm_eval.__version__}
