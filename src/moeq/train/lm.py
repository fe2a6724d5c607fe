"""Training the built-in default model: a small Mixtral-architecture causal LM on the corpus.

transformers' own ``MixtralForCausalLM`` (8 routed experts, top-2, load-balancing loss through
``output_router_logits``), eager experts (fastest on CPU), AdamW with warm-up and cosine decay,
trained for a wall-clock budget. Before the first step the router weights are saved
(``initial_router.safetensors``), so the router-norm change Λ of the mixed-precision paper is
available exactly, not through the final-norm proxy. The final model is saved in bfloat16 with
its tokenizer and a ``train_log.json`` that records the command's settings, the seed, the steps,
the tokens seen and the loss curve; the run is reproducible from it (up to the time budget, which
fixes the step count: pass ``--steps`` to pin it).

The loop is shared: ``fit`` and ``train`` take an objective (:class:`CausalLM` here, the
Switch denoising objective in :mod:`moeq.train.denoise`) that builds the model and its batches.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import transformers
from safetensors.torch import save_file

from ..files import INITIAL_ROUTER_FILE
from ..atomic import atomic_directory
from .corpus import DATA_DIR, digest, fetch_corpus
from .tokenizer import train_tokenizer

__all__ = ["TrainConfig", "Objective", "CausalLM", "random_windows", "FinetuneConfig", "load_causal_lm", "short_finetune", "default_model_config", "fit", "train", "INITIAL_ROUTER_FILE"]


@dataclass
class TrainConfig:
    out: Path
    cache: Path = Path("data/cache")
    minutes: float = 60.0
    steps: int | None = None  # overrides the time budget when given
    seq_len: int = 256
    batch_size: int = 16
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.1
    seed: int = 0
    vocab_size: int = 4096
    hidden: int = 256
    intermediate: int = 384
    layers: int = 4
    experts: int = 8
    top_k: int = 2
    aux_loss_coef: float = 0.02
    eval_every: int = 100
    eval_batches: int = 8
    overwrite: bool = False
    log: list = field(default_factory=list)


def default_model_config(config: TrainConfig) -> transformers.MixtralConfig:
    return transformers.MixtralConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden, intermediate_size=config.intermediate,
        num_hidden_layers=config.layers, num_attention_heads=8, num_key_value_heads=4,
        num_local_experts=config.experts, num_experts_per_tok=config.top_k, max_position_embeddings=4 * config.seq_len,
        tie_word_embeddings=True, output_router_logits=True, router_aux_loss_coef=config.aux_loss_coef,
        bos_token_id=0, eos_token_id=0, pad_token_id=None,
    )


def random_windows(ids: torch.Tensor, seq_len: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """``batch_size`` windows of ``seq_len`` tokens from 1-D ``ids`` at random starts, stacked."""
    starts = torch.randint(0, ids.numel() - seq_len - 1, (batch_size,), generator=generator)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


@dataclass
class FinetuneConfig:
    """A short fine-tune of a causal MoE LM (:func:`short_finetune`): QAT and the router-only one."""

    steps: int = 200
    lr: float = 1e-4
    seq_len: int = 128
    batch_size: int = 8
    seed: int = 0


def load_causal_lm(model_path: Path, text: str) -> tuple[transformers.PreTrainedModel, object, torch.dtype, torch.Tensor]:
    """A causal LM folder ready to fine-tune: ``(model in float32, tokenizer, the dtype it was saved
    in, the token ids of text)``."""
    from ..io.source import load_source

    model = load_source(model_path)  # a stranger's folder is checked before anything is read
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
    dtype = next(model.parameters()).dtype
    model = model.float()
    CausalLM().ready(model)
    return model, tokenizer, dtype, torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)


def short_finetune(model: transformers.PreTrainedModel, ids: torch.Tensor, parameters: list[torch.nn.Parameter],
                   config: FinetuneConfig, log: list | None = None,
                   loss_fn: Callable[[transformers.PreTrainedModel, torch.Tensor], torch.Tensor] | None = None) -> None:
    """Fine-tune ``parameters`` of a causal MoE LM in place on random windows of 1-D token ids
    (AdamW without decay, gradient norm clipped at 1). The loss is ``loss_fn(model, windows)``,
    by default the next-token loss with load balancing. ``log``, when given, gets the loss of
    every step."""
    if ids.numel() <= config.seq_len + 1:
        raise ValueError(f"the text has {ids.numel()} tokens; fine-tuning on windows of {config.seq_len} needs more than "
                         f"{config.seq_len + 1}: pass a longer text")
    torch.manual_seed(config.seed)
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(config.seed)
    objective = CausalLM()
    model.train()
    for step in range(config.steps):
        window = random_windows(ids, config.seq_len, config.batch_size, generator)
        loss = loss_fn(model, window) if loss_fn else objective.loss(model, {"input_ids": window, "labels": window})[0]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if log is not None:
            log.append({"step": step + 1, "loss": float(loss.detach())})
    model.eval()


class Objective(Protocol):
    """What :func:`fit` and :func:`train` train: an objective names the router weights, builds and
    readies the model, prepares the corpus and tokenizer, draws training batches, lists fixed
    validation batches and computes ``(loss to minimise, its auxiliary part)``."""

    router_suffix: str

    def model_config(self, config: TrainConfig) -> transformers.PretrainedConfig: ...
    def build(self, model_config: transformers.PretrainedConfig) -> transformers.PreTrainedModel: ...
    def ready(self, model: transformers.PreTrainedModel) -> None: ...
    def prepare(self, config: TrainConfig) -> tuple[dict[str, str], object]: ...
    def batch(self, ids: torch.Tensor, config: TrainConfig, generator: torch.Generator) -> dict[str, torch.Tensor]: ...
    def eval_batches(self, ids: torch.Tensor, config: TrainConfig) -> list[dict[str, torch.Tensor]]: ...
    def loss(self, model: transformers.PreTrainedModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]: ...


class CausalLM:
    """The Mixtral default's objective: next-token prediction with Mixtral's own loss (load
    balancing included)."""

    router_suffix = "mlp.gate.weight"

    def model_config(self, config: TrainConfig) -> transformers.PretrainedConfig:
        return default_model_config(config)

    def build(self, model_config: transformers.PretrainedConfig) -> transformers.PreTrainedModel:
        return transformers.MixtralForCausalLM(model_config)

    def ready(self, model: transformers.PreTrainedModel) -> None:
        model.set_experts_implementation("eager")

    def prepare(self, config: TrainConfig) -> tuple[dict[str, str], object]:
        return prepare(config)

    def batch(self, ids: torch.Tensor, config: TrainConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
        window = random_windows(ids, config.seq_len, config.batch_size, generator)
        return {"input_ids": window, "labels": window}

    def eval_batches(self, ids: torch.Tensor, config: TrainConfig) -> list[dict[str, torch.Tensor]]:
        chunks = ids[: (ids.numel() // config.seq_len) * config.seq_len].view(-1, config.seq_len)[: config.eval_batches * 8]
        return [{"input_ids": c, "labels": c} for c in chunks.split(8)]

    def loss(self, model: transformers.PreTrainedModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss to minimise, its auxiliary part)."""
        output = model(**batch)
        return output.loss, (output.aux_loss if output.aux_loss is not None else torch.tensor(0.0))


@torch.no_grad()
def _evaluate(model, objective: Objective, ids: torch.Tensor, config: TrainConfig) -> float:
    model.eval()
    losses = [float(objective.loss(model, batch)[0]) for batch in objective.eval_batches(ids, config)]
    model.train()
    return sum(losses) / len(losses)


def prepare(config: TrainConfig) -> tuple[dict[str, str], object]:
    """The corpus splits, the shipped slices in ``moeq/data``, and the tokenizer (saved in ``moeq/data``)."""
    corpus = fetch_corpus(config.cache)
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    for split in ("validation", "calibration", "test"):
        (DATA_DIR / f"{split}.txt").write_text(corpus[split])
    tokenizer = train_tokenizer(corpus["train"], config.vocab_size, DATA_DIR / "tokenizer")
    return corpus, tokenizer


def fit(model: transformers.PretrainedConfig | transformers.PreTrainedModel, train_ids: torch.Tensor, val_ids: torch.Tensor,
        config: TrainConfig, objective: Objective | None = None, checkpoint=None):
    """Train on 1-D token ids a fresh model (from a config) or a given one (a fine-tune); returns
    the model, its routers before training and the step count. ``checkpoint(model, initial_router,
    step)``, when given, is called after every evaluation, so a long run leaves a result behind."""
    objective = objective or CausalLM()
    torch.manual_seed(config.seed)
    if isinstance(model, transformers.PretrainedConfig):
        model = objective.build(model)
    model = model.float()
    objective.ready(model)
    initial_router = {
        name: p.detach().clone().to(torch.bfloat16).contiguous()
        for name, p in model.named_parameters() if name.endswith(objective.router_suffix)
    }
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=(0.9, 0.95),
    )
    generator = torch.Generator().manual_seed(config.seed)
    model.train()
    started = time.perf_counter()
    total_steps = config.steps
    step = 0
    while True:
        if total_steps is None and step == 5:  # fix the schedule's length from the measured speed
            per_step = (time.perf_counter() - started) / 5
            total_steps = max(10, int(config.minutes * 60 / per_step))
        horizon = total_steps or 10**9
        scale = min(1.0, (step + 1) / config.warmup) * 0.5 * (1 + math.cos(math.pi * min(step / horizon, 1.0)))
        for group in optimizer.param_groups:
            group["lr"] = config.lr * max(scale, 0.02)
        loss, aux_loss = objective.loss(model, objective.batch(train_ids, config, generator))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step % config.eval_every == 0 or step == total_steps:
            entry = {"step": step, "train_loss": float(loss.detach()), "aux_loss": float(aux_loss.detach()),
                     "val_loss": _evaluate(model, objective, val_ids, config),
                     "seconds": round(time.perf_counter() - started, 1)}
            config.log.append(entry)
            print(json.dumps(entry), flush=True)
            if checkpoint is not None:
                checkpoint(model, initial_router, step)
        if total_steps is not None and step >= total_steps:
            break
    return model.eval(), initial_router, step


def train(config: TrainConfig, objective: Objective | None = None) -> Path:
    """Prepare the corpus and tokenizer, train the default model and write it to ``config.out``.

    The folder is rewritten at every evaluation (the last one is at the final step), so an
    interrupted run leaves its latest evaluated model behind.
    """
    objective = objective or CausalLM()
    started = time.perf_counter()
    corpus, tokenizer = objective.prepare(config)
    encode = lambda text: torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)  # noqa: E731
    train_ids, val_ids = encode(corpus["train"]), encode(corpus["validation"])
    replace = config.overwrite

    def save(model: transformers.PreTrainedModel, initial_router: dict, step: int) -> None:
        nonlocal replace
        snapshot = copy.deepcopy(model).to(torch.bfloat16)
        with atomic_directory(config.out, overwrite=replace) as work:
            snapshot.save_pretrained(work)
            tokenizer.save_pretrained(work)
            save_file(initial_router, work / INITIAL_ROUTER_FILE, metadata={"format": "pt"})
            settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items() if k != "log"}
            (work / "train_log.json").write_text(json.dumps({
                "settings": settings, "steps": step, "tokens_seen": step * config.batch_size * config.seq_len,
                "train_tokens": int(train_ids.numel()), "corpus_digest": {k: digest(v) for k, v in corpus.items()},
                "parameters": sum(p.numel() for p in snapshot.parameters()), "log": config.log,
                "seconds": round(time.perf_counter() - started, 1),
            }, indent=1))
        replace = True  # later checkpoints replace this run's own earlier one

    fit(objective.model_config(config), train_ids, val_ids, config, objective, checkpoint=save)
    return config.out
