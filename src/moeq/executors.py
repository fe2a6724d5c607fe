"""Executors: where the pure jobs of a run execute (here, a local process pool, or a Ray cluster).

A run hands an executor a pure function of plain data (``run_unit`` for a rounding shard,
``quantize_layer`` for a GPTQ layer's weights) and a list of picklable jobs; the executor yields
the results in the jobs' order, whatever order they finish in, so the bytes a run writes and its
resume manifest never depend on the executor or the number of workers. Which jobs may run at once
is the scheduler's decision (the streaming and GPTQ roads), not the executor's.

==========  =======================================================================================
``serial``  in this process, one job after another (the default)
``local``   a pool of ``workers`` processes on this machine (spawned, so no state is shared)
``ray``     Ray tasks on the cluster at ``address`` (``None``: a local Ray started for the run);
            needs ``pip install 'moeq[ray]'``; every node must see the source folder at its path
==========  =======================================================================================
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

__all__ = ["EXECUTORS", "Executor", "ExecutorError", "LocalExecutor", "RayExecutor", "SerialExecutor", "make_executor"]

EXECUTORS = ("serial", "local", "ray")
JOB_MEMORY_FACTOR = 4  # a job's tensors, GPTQ's float32 copies of them and its working set
JOB_MEMORY_BASE = 64 * 2**20


class ExecutorError(RuntimeError):
    """A job failed where it ran (a worker crashed or raised); the run stops, finished work is kept."""


class Executor:
    """Maps a pure function over jobs, yielding results in the jobs' order. ``workers``: how many
    jobs it runs at once, so a scheduler can split work into at least that many pieces."""

    name = "serial"
    workers = 1

    def map(self, fn: Callable[[Any], Any], jobs: Iterable[Any]) -> Iterator[Any]:
        raise NotImplementedError

    def close(self) -> None:
        """Release the workers (a no-op where there are none)."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SerialExecutor(Executor):
    """In this process, one job after another."""

    def map(self, fn, jobs):
        return map(fn, jobs)


class LocalExecutor(Executor):
    """A pool of ``workers`` spawned processes on this machine."""

    name = "local"

    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers if workers is not None else max(1, os.cpu_count() or 1)
        if self.workers < 1:
            raise ValueError(f"--workers must be at least 1, got {self.workers}")
        self._pool: ProcessPoolExecutor | None = None

    def map(self, fn, jobs):
        if self._pool is None:
            # The machine's cores shared among the workers: a worker with every core each would oversubscribe them.
            threads = max(1, (os.cpu_count() or 1) // self.workers)
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_set_threads, initargs=(threads,))
        try:
            yield from self._pool.map(fn, jobs)
        except (KeyboardInterrupt, GeneratorExit):
            self.close(cancel=True)
            raise
        except Exception as err:
            if type(err).__name__ == "BrokenProcessPool":
                self.close(cancel=True)
                raise ExecutorError(f"a worker process died ({err}); finished work is kept: rerun with --resume") from None
            raise

    def close(self, cancel: bool = False) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=not cancel, cancel_futures=cancel)
            self._pool = None


class RayExecutor(Executor):
    """Ray tasks, at most ``2 * workers`` in flight; ``address`` as ``ray.init`` takes it (``None``:
    a local Ray for this run, with ``workers`` CPUs, shut down with the executor). A task that
    fails is not retried: the run stops with one line and ``--resume`` continues it."""

    name = "ray"

    def __init__(self, workers: int | None = None, address: str | None = None, memory: Callable[[Any], int] | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise ExecutorError("--executor ray needs Ray: pip install 'moeq[ray]'") from None
        if workers is not None and workers < 1:
            raise ValueError(f"--workers must be at least 1, got {workers}")
        self._ray, self._address, self._requested = ray, address, workers
        self._memory = memory  # bytes a job needs, declared so Ray can pack jobs onto nodes
        self._started = False  # this executor started the local Ray (and shuts it down)
        self._remote = None

    def _start(self) -> None:
        """Join (or start) Ray on first use, so checks made before the work cost no start-up."""
        ray = self._ray
        if self._remote is not None:
            return
        if not ray.is_initialized():
            options = {"num_cpus": self._requested} if self._address is None and self._requested else {}
            ray.init(address=self._address, include_dashboard=False, log_to_driver=False, configure_logging=False, **options)
            self._started = True
        # Never more than the cluster has: a task no node can hold would wait forever.
        self._memory_cap = int(ray.cluster_resources().get("memory", 0))
        self._remote = ray.remote(max_retries=0)(_call)

    @property
    def workers(self) -> int:
        if not self._requested:  # the cluster's CPUs, asked once
            self._start()
            self._requested = max(1, int(self._ray.cluster_resources().get("CPU", 1)))
        return self._requested

    def map(self, fn, jobs):
        self._start()
        ray = self._ray
        pending: deque = deque()
        function = ray.put(fn)
        try:
            for job in jobs:
                need = self._memory(job) if self._memory else 0
                if not need and getattr(job, "nbytes", 0):  # the job's tensors, float32 copies of them and its working set
                    need = JOB_MEMORY_FACTOR * job.nbytes + JOB_MEMORY_BASE
                options = {"memory": min(need, self._memory_cap)} if need and self._memory_cap else {}
                pending.append(self._remote.options(**options).remote(function, job))
                if len(pending) >= 2 * self.workers:
                    yield self._get(pending.popleft())
            while pending:
                yield self._get(pending.popleft())
        except (KeyboardInterrupt, GeneratorExit):
            for ref in pending:
                ray.cancel(ref, force=True)
            raise

    def _get(self, ref):
        ray = self._ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as err:  # the job raised: the job's own error, as if it ran here
            cause = err.as_instanceof_cause()
            raise (cause if isinstance(cause, Exception) else ExecutorError(str(err).splitlines()[0])) from None
        except ray.exceptions.RayError as err:  # a worker or node died
            raise ExecutorError(f"a Ray worker failed ({type(err).__name__}: {str(err).strip().splitlines()[0]}); "
                                "finished work is kept: rerun with --resume") from None

    def close(self) -> None:
        if self._started and self._ray.is_initialized():
            self._ray.shutdown()
            self._started = False


def _call(fn, job):
    return fn(job)


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def make_executor(name: str = "serial", workers: int | None = None, address: str | None = None) -> Executor:
    """The executor called ``name`` (one of :data:`EXECUTORS`); one line naming them otherwise."""
    if name == "serial":
        if workers not in (None, 1) or address is not None:
            raise ValueError("--workers and --address need --executor local or ray")
        return SerialExecutor()
    if name == "local":
        if address is not None:
            raise ValueError("--address is for --executor ray")
        return LocalExecutor(workers)
    if name == "ray":
        return RayExecutor(workers, address)
    raise ValueError(f"unknown executor {name!r}; choose one of: {', '.join(EXECUTORS)}")
