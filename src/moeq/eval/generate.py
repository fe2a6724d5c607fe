"""Text generation with a model folder (quantized by moeq or not), timed: ``moeq generate``."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["Generation", "generate_text"]


@dataclass(frozen=True)
class Generation:
    text: str  # the continuation only, without the prompt
    new_tokens: int
    seconds: float  # wall time of model.generate
    backend: str  # experts backend of a moeq checkpoint, "-" for an unquantized model
    kernel_copy_bytes: int  # copies the experts' backend built (cpu-int4, Triton layouts)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")


def _tokenizer(model_path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"{model_path} has no usable tokenizer files ({type(err).__name__}); copy the source model's "
            "tokenizer files into it (moeq quantize does this when the source has them)"
        ) from None


def generate_text(
    model_path: str | Path,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    backend: str = "auto",
    temperature: float = 0.0,
    seed: int = 0,
    device: str = "cpu",
) -> Generation:
    """Continue ``prompt`` with the model in ``model_path``: greedy when ``temperature`` is 0, else
    sampled at that temperature (seeded). ``backend`` runs a moeq checkpoint's experts
    (:data:`moeq.kernels.BACKENDS`)."""
    from ..io.source import load_any
    from ..modules.experts import QuantizedExperts

    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"--temperature must be 0 (greedy) or positive, got {temperature}")
    folder = Path(model_path)
    tokenizer = _tokenizer(folder)
    model = load_any(folder, backend).to(device)
    experts = [m for m in model.modules() if isinstance(m, QuantizedExperts)]
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
    if ids.numel() == 0:
        raise ValueError("the prompt gives no tokens; pass a non-empty --prompt")
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0} if temperature > 0 else {"do_sample": False}
    torch.manual_seed(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    started = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, pad_token_id=pad, **sampling)
    seconds = time.perf_counter() - started
    new = out[0, 1:] if model.config.is_encoder_decoder else out[0, ids.shape[1] :]  # drop the decoder start or the prompt
    return Generation(
        text=tokenizer.decode(new, skip_special_tokens=True),
        new_tokens=int(new.numel()),
        seconds=seconds,
        backend=experts[0].backend if experts else "-",
        kernel_copy_bytes=sum(m.kernel_copy_nbytes() for m in experts),
    )
