"""How many intra-op threads torch uses for a job, chosen from the job's size.

On small models every matrix is tiny: two intra-op threads gain ~15 % on an idle 2-core machine,
and when another process holds a core they wait on each other and the same work takes 2.7x as
long (measured: `tests/allocate` + `tests/calibrate`, 18 s idle with 2 threads, 49 s beside one
busy process; with 1 thread 21 s either way). So below ``SMALL_MODEL_BYTES`` of weights moeq
runs on one thread; above it torch's default (all cores) stands. ``--threads N`` (or
``MOEQ_THREADS``) overrides the choice.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

__all__ = ["SMALL_MODEL_BYTES", "threads_for", "use_threads", "threads_pinned"]

SMALL_MODEL_BYTES = 2 * 10**9


def threads_for(weight_bytes: int | None, requested: int | None = None) -> int | None:
    """The thread count for a job on ``weight_bytes`` of weights (None: leave torch's default)."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads must be at least 1, got {requested}")
        return requested
    if weight_bytes is not None and weight_bytes < SMALL_MODEL_BYTES:
        return 1
    return None


def use_threads(folder: str | Path | None, requested: int | None = None) -> int:
    """Set torch's intra-op threads for a job on the model folder ``folder``; returns the count."""
    size = None
    if folder is not None and Path(folder).is_dir():
        size = sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
    count = threads_for(size, requested)
    if count is not None:
        torch.set_num_threads(count)
    return torch.get_num_threads()


@contextmanager
def threads_pinned(count: int | None) -> Iterator[None]:
    """Run the block with ``count`` intra-op threads (``None``: as it stands), then restore.

    Why: a matrix product's rounding depends on how many threads split its sums, so a job run by a
    worker process (an executor) pins the count the run's own process uses: the same bytes as a
    run in one process, whichever executor runs the job."""
    before = torch.get_num_threads()
    if count is not None and count != before:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
