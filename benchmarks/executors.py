"""Executors side by side: serial, a local process pool and Ray, on a Mixtral-shaped checkpoint.

    python benchmarks/executors.py [--layers 2] [--hidden 1024] [--intermediate 3584] [--experts 8]
                                   [--workers 1 2] [--calib-tokens 2048] [--workdir /tmp/moeq-executors]
                                   [--threads N] [--executors serial local ray] [--name executors]

Writes (unless present) the streaming benchmark's synthetic Mixtral checkpoint (per-expert
``block_sparse_moe.experts.E.w1/w3/w2``, random bf16 weights) at the given shape, then for every
executor and worker count quantizes it twice: rounding while streaming (3 bits, one job per decoder
block) and GPTQ (3 bits on random calibration ids; each layer's weights split into one job per
worker, the layers in order). Reported: wall time, the peak resident memory of the largest worker
process (sampled every 50 ms over the process tree; serial: the run's own process), whether the
bytes equal the serial run's, and the scheduler's overhead per job (a trivial job mapped 200 times).

From the measured GPTQ time per expert weight it projects the GPTQ time of real models on N
workers. The projection scales the measured time by rows x columns^2 (GPTQ's column loop updates
the columns after each one; its Hessian inverse is columns^3) from this checkpoint's shapes to
theirs: an assumption stated, not a measurement. The calibration forward passes and the layers'
order are the sequential part; the projection leaves the forward out (it is stated per model as
the number of sequential layer steps).

Each job computes with the driver's thread count (``--threads``; default torch's, all cores), so
the bytes match; with N workers, ``--threads`` cores/N keeps them from oversubscribing the machine.
Writes benchmarks/results/<--name>.json.
"""

from __future__ import annotations

import argparse
import hashlib
import threading
import time
from pathlib import Path

import psutil
import torch

from _common import machine, print_table, write_json
from streaming import write_checkpoint

# (name, layers, routed experts per layer, hidden, expert intermediate)
MODELS = [("Mixtral-8x7B", 32, 8, 4096, 14336), ("Qwen3-235B-A22B", 94, 128, 4096, 1536), ("DeepSeek-V3", 58, 256, 7168, 2048)]


class PeakWorker:
    """The largest resident set of any process in this process's tree (or this process), sampled."""

    def __init__(self) -> None:
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            for process in [me, *me.children(recursive=True)]:
                try:
                    self.peak = max(self.peak, process.memory_info().rss)
                except psutil.Error:
                    pass
            time.sleep(0.05)

    def __enter__(self) -> PeakWorker:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _noop(job: int) -> int:
    return job


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=3584)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--calib-tokens", type=int, default=2048)
    parser.add_argument("--executors", nargs="+", default=["serial", "local", "ray"])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/moeq-executors"))
    parser.add_argument("--threads", type=int, default=None, help="the driver's intra-op threads (jobs compute with the same)")
    parser.add_argument("--name", default="executors")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from moeq.calibrate.runner import CalibrationConfig, quantize_calibrated
    from moeq.config import QuantConfig, uniform_plan
    from moeq.executors import make_executor
    from moeq.io.source import meta_skeleton
    from moeq.io.streaming import quantize_checkpoint

    folder = args.workdir / f"mixtral-l{args.layers}-h{args.hidden}-i{args.intermediate}-e{args.experts}"
    if not (folder / "config.json").is_file():
        write_checkpoint(folder, args.layers, args.hidden, args.intermediate, args.experts, 32000, 2 * 2**30)
    plan = uniform_plan(meta_skeleton(folder), QuantConfig(bits=3))
    ids = torch.randint(0, 32000, (args.calib_tokens // 256, 256), generator=torch.Generator().manual_seed(0))
    config = CalibrationConfig(min_tokens=1)
    runs = [("serial", 1)] + [(name, n) for name in args.executors if name != "serial" for n in args.workers]
    rows, table, reference = [], [], {}
    for name, workers in runs:
        row = {"executor": name, "workers": workers}
        started = time.perf_counter()
        with make_executor(name, None if name == "serial" else workers) as executor:
            row["start_s"] = time.perf_counter() - started
            overhead = time.perf_counter()
            list(executor.map(_noop, range(200)))
            row["overhead_per_job_ms"] = (time.perf_counter() - overhead) / 200 * 1e3
            for road in ("rtn", "gptq"):
                out = args.workdir / f"out-{road}-{name}-{workers}"
                with PeakWorker() as peak:
                    began = time.perf_counter()
                    if road == "rtn":
                        quantize_checkpoint(folder, plan, out, overwrite=True, executor=executor)
                    else:
                        quantize_calibrated(folder, plan, ids, out, config, overwrite=True, executor=executor)
                    row[f"{road}_s"] = time.perf_counter() - began
                row[f"{road}_peak_worker_mib"] = peak.peak / 2**20
                digest = _digest(out)
                reference.setdefault(road, digest)
                row[f"{road}_same_bytes"] = digest == reference[road]
        rows.append(row)
        write_json(args.name, rows, machine=machine(), args={k: str(v) for k, v in vars(args).items()})
        table.append([name, workers, f"{row['rtn_s']:.1f}", f"{row['gptq_s']:.1f}", f"{row['rtn_peak_worker_mib']:.0f}",
                      f"{row['gptq_peak_worker_mib']:.0f}", f"{row['overhead_per_job_ms']:.2f}",
                      "yes" if row["rtn_same_bytes"] and row["gptq_same_bytes"] else "NO"])
    print_table(["executor", "workers", "RTN s", "GPTQ s", "RTN peak MiB", "GPTQ peak MiB", "overhead ms/job", "same bytes"], table)

    # Seconds per expert (gate, up, down) of the serial GPTQ run; it includes the calibration forward,
    # so it bounds the jobs' own time from above.
    per_expert = rows[0]["gptq_s"] / (args.layers * args.experts)

    def cost(hidden: int, intermediate: int) -> int:  # rows x columns^2 of gate, up ([I, H]) and down ([H, I])
        return 2 * intermediate * hidden**2 + hidden * intermediate**2

    projections = []
    for model, layers, experts, hidden, intermediate in MODELS:
        serial_hours = layers * experts * per_expert * cost(hidden, intermediate) / cost(args.hidden, args.intermediate) / 3600
        projections.append({"model": model, "jobs": layers * experts * 3, "sequential_layer_steps": layers,
                            "serial_h": serial_hours, **{f"workers_{n}_h": serial_hours / n for n in (2, 8, 16, 64)}})
    write_json(args.name, rows, machine=machine(), args={k: str(v) for k, v in vars(args).items()}, projections=projections,
               seconds_per_expert=per_expert)
    print_table(["model", "expert weight jobs", "sequential layers", "1 worker h", "8 workers h", "16 workers h", "64 workers h"],
                [[p["model"], p["jobs"], p["sequential_layer_steps"], f"{p['serial_h']:.1f}", f"{p['workers_8_h']:.2f}",
                  f"{p['workers_16_h']:.2f}", f"{p['workers_64_h']:.2f}"] for p in projections])


if __name__ == "__main__":
    main()
