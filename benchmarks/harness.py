"""Zero-shot accuracy through the lm-eval bridge: full precision against quantized plans of the default model.

    OMP_NUM_THREADS=1 python benchmarks/harness.py [--items 400] [--choices 4] [--budget 2.5]

No lm-eval task data can be downloaded here, so the task is built from the project's own test
split (Hamlet and Macbeth, unseen in training): each item shows three lines of a play and asks
which of ``--choices`` candidate lines comes next; the wrong candidates are other lines of the
test split of similar length, drawn with a fixed seed. The task is written as an lm-eval YAML +
JSONL folder and run with ``moeq.eval.harness.run_harness`` (``--include-path``), exactly as a
user's custom task would be. Models: full precision, uniform 3 and 2 bits (RTN), and router-maxvar,
frequency and auto at ``--budget`` mean expert bits (calibration split, levels 3,2,1; auto 4,3,2,1).
Chance is 1 / choices. Prints a table and writes benchmarks/results/harness.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

for _name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):  # before datasets/huggingface_hub are imported
    os.environ.setdefault(_name, "1")

from _common import print_table, write_json  # noqa: E402
import moeq  # noqa: E402
from moeq.allocate import allocate  # noqa: E402
from moeq.eval.harness import run_harness  # noqa: E402
from moeq.io.source import load_source  # noqa: E402
from moeq.train.corpus import DATA_DIR, read_split  # noqa: E402

MODEL = DATA_DIR / "default-mixtral"
TASK = "moeq_next_line"


def build_task(folder: Path, items: int, choices: int, seed: int = 0) -> Path:
    """Write the next-line task (YAML + JSONL) into ``folder``; returns it."""
    lines = [line.strip() for line in read_split("test").splitlines() if len(line.split()) >= 4]
    rng = random.Random(seed)
    rows = []
    for start in rng.sample(range(3, len(lines)), items):
        gold = lines[start]
        similar = [line for line in lines if line != gold and abs(len(line) - len(gold)) <= 10]
        candidates = [gold, *rng.sample(similar, choices - 1)]
        rng.shuffle(candidates)
        rows.append({"context": "\n".join(lines[start - 3 : start]), "choices": candidates, "gold": candidates.index(gold)})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'items.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: gold\ntarget_delimiter: "\\n"\n'
        "metric_list:\n  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
        "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}\n"
    )
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=400)
    parser.add_argument("--choices", type=int, default=4)
    parser.add_argument("--budget", type=float, default=2.5)
    args = parser.parse_args()
    calibration = DATA_DIR / "calibration.txt"
    plans = {
        "uniform 3": moeq.QuantConfig(bits=3),
        "uniform 2": moeq.QuantConfig(bits=2),
        f"router-maxvar {args.budget:g}": allocate(MODEL, "router-maxvar", avg_bits=args.budget, levels=(3, 2, 1)),
        f"frequency {args.budget:g}": allocate(MODEL, "frequency", avg_bits=args.budget, levels=(3, 2, 1), calibration=calibration),
        f"auto {args.budget:g}": allocate(MODEL, "auto", avg_bits=args.budget, calibration=calibration),
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tasks = build_task(Path(tmp) / "tasks", args.items, args.choices)
        folders = {"full precision": MODEL}
        for name, plan in plans.items():
            folders[name] = moeq.save(moeq.quantize(load_source(MODEL), plan), Path(tmp) / name.replace(" ", "-"), source=MODEL)
        for name, folder in folders.items():
            started = time.perf_counter()
            result = run_harness(folder, [TASK], include_path=tasks)["results"][TASK]
            rows.append({"model": name, **result, "bytes_on_disk": sum(f.stat().st_size for f in Path(folder).glob("*.safetensors")),
                         "seconds": round(time.perf_counter() - started, 1)})
            print(f"{name}: acc {result['acc']:.3f} acc_norm {result['acc_norm']:.3f}", flush=True)
    print_table(["model", "acc", "± stderr", "acc_norm", "bytes on disk", "s"],
                [[r["model"], f"{r['acc']:.3f}", f"{r['acc_stderr']:.3f}", f"{r['acc_norm']:.3f}", f"{r['bytes_on_disk']:,}", r["seconds"]]
                 for r in rows])
    print(f"chance: {1 / args.choices:.3f}")
    print(f"wrote {write_json('harness', rows, items=args.items, choices=args.choices, budget=args.budget)}")


if __name__ == "__main__":
    main()
