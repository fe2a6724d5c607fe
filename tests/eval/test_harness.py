"""The lm-eval bridge: a custom multiple-choice task scored against log-likelihoods computed by hand."""

import json
import sys
from pathlib import Path

import pytest
import torch
from lm_eval.tasks import TaskManager
from typer.testing import CliRunner

import moeq
from moeq.cli import app
from moeq.config import QuantConfig
from moeq.eval import harness
from moeq.eval.harness import HarnessNotInstalled, run_harness
from moeq.io.source import load_source
from moeq.models.tiny import tiny_model
from moeq.modules.experts import QuantizedExperts
from moeq.train.corpus import DATA_DIR
from tests.conftest import one_line_error

runner = CliRunner()

TASK = "moeq_shakespeare_choice"
# (context, choices, gold): gold is not always the likelier choice, and the choices differ in
# length, so accuracy and length-normalised accuracy both depend on the log-likelihoods.
ITEMS = [
    ("To be, or not to", ["be", "sing"], 0),
    ("My good", ["lord", "friend"], 1),
    ("Good night, sweet", ["prince", "lady"], 0),
    ("O Romeo, Romeo, wherefore art", ["thou", "you"], 1),
    ("The lady doth protest too", ["much", "little"], 0),
    ("Something is rotten in the state of", ["Denmark", "Rome"], 0),
    ("Double, double, toil and", ["trouble", "sorrow"], 1),
    ("Out, damned", ["spot", "dog"], 0),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    """The shipped model quantized to 2 bits and saved, and a folder with the task's YAML and JSONL."""
    root = tmp_path_factory.mktemp("harness")
    with pytest.MonkeyPatch.context() as env:
        for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
            env.setenv(name, "1")
        env.setenv("HF_DATASETS_CACHE", str(root / "datasets-cache"))
        # The libraries read these once, at import, which may have happened before this fixture.
        env.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
        env.setattr("datasets.config.HF_HUB_OFFLINE", True)
        env.setattr("datasets.config.HF_DATASETS_CACHE", root / "datasets-cache")
        # Indexing lm-eval's ~15,000 bundled task configs takes 6 s here; these tests need only their own.
        env.setattr(harness, "_task_manager", lambda include_path: TaskManager(include_path=include_path, include_defaults=False))
        quantized = moeq.quantize(load_source(DATA_DIR / "default-mixtral"), QuantConfig(bits=2))
        moeq.save(quantized, root / "q", source=DATA_DIR / "default-mixtral")
        tasks = root / "tasks"
        tasks.mkdir()
        (tasks / "items.jsonl").write_text(
            "".join(json.dumps({"context": c, "choices": ch, "gold": g}) + "\n" for c, ch, g in ITEMS)
        )
        (tasks / f"{TASK}.yaml").write_text(
            f"task: {TASK}\n"
            "dataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: {tasks / 'items.jsonl'}\n"
            "test_split: test\n"
            "output_type: multiple_choice\n"
            'doc_to_text: "{{context}}"\n'
            'doc_to_choice: "{{choices}}"\n'
            "doc_to_target: gold\n"
            "metric_list:\n"
            "  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
            "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}\n"
        )
        # Data on the hub, which these tests never reach.
        (tasks / "remote.yaml").write_text(
            "task: moeq_remote_choice\ndataset_path: moeq-tests/absent\ntest_split: test\noutput_type: multiple_choice\n"
            'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: gold\n'
        )
        yield root / "q", tasks


def _expected_accuracies(folder: Path, items) -> tuple[float, float]:
    """Accuracy and per-character normalised accuracy from log P(" " + choice | context) by hand."""
    from transformers import AutoTokenizer

    model, tokenizer = moeq.load(folder), AutoTokenizer.from_pretrained(folder)
    correct = correct_norm = 0
    for context, choices, gold in items:
        scores = []
        for choice in choices:
            # lm-eval's default target delimiter is one space; the context is tokenized alone and
            # the continuation is what the whole string adds to it.
            prefix, whole = tokenizer.encode(context), tokenizer.encode(context + " " + choice)
            assert whole[: len(prefix)] == prefix
            with torch.no_grad():
                logprobs = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].float(), -1)
            scores.append(sum(float(logprobs[i - 1, whole[i]]) for i in range(len(prefix), len(whole))))
        normalised = [s / len(c) for s, c in zip(scores, choices)]
        # Far from ties, so the bfloat16 model's rounding cannot decide an item.
        assert abs(scores[0] - scores[1]) > 0.05 and abs(normalised[0] - normalised[1]) > 0.01
        correct += max(range(2), key=scores.__getitem__) == gold
        correct_norm += max(range(2), key=normalised.__getitem__) == gold
    return correct / len(items), correct_norm / len(items)


def test_accuracy_matches_hand_computation(setup, monkeypatch) -> None:
    folder, tasks = setup
    calls = []
    packed_forward = QuantizedExperts.forward
    monkeypatch.setattr(QuantizedExperts, "forward", lambda self, *a, **k: calls.append(1) or packed_forward(self, *a, **k))
    result = run_harness(folder, [TASK], include_path=tasks)
    assert calls, "the quantized experts must run packed"
    acc, acc_norm = _expected_accuracies(folder, ITEMS)
    assert 0 < acc < 1 and acc != acc_norm  # the items discriminate
    metrics = result["results"][TASK]
    assert metrics["acc"] == pytest.approx(acc) and metrics["acc_norm"] == pytest.approx(acc_norm)
    assert "acc_stderr" in metrics and result["lm_eval_version"] == "0.4.13"


def test_cli_prints_the_table(setup) -> None:
    folder, tasks = setup
    result = runner.invoke(app, ["eval", str(folder), "--tasks", TASK, "--include-path", str(tasks), "--limit", "4"],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    acc, acc_norm = _expected_accuracies(folder, ITEMS[:4])
    rows = {tuple(cell.strip() for cell in line.split("│")[1:4]) for line in result.output.splitlines() if TASK in line}
    assert (TASK, "acc", f"{acc:.4f}") in rows and (TASK, "acc_norm", f"{acc_norm:.4f}") in rows
    assert "at most 4 documents per task" in result.output and "lm-eval 0.4.13" in result.output


def test_unknown_task_is_named(setup) -> None:
    folder, tasks = setup
    with pytest.raises(ValueError, match="unknown lm-eval task 'no_such_task'"):
        run_harness(folder, [TASK, "no_such_task"], include_path=tasks)
    line = one_line_error(runner.invoke(app, ["eval", str(folder), "--tasks", "no_such_task", "--include-path", str(tasks)]))
    assert "'no_such_task'" in line


def test_unreachable_data_is_one_line(setup) -> None:
    folder, tasks = setup
    line = one_line_error(runner.invoke(app, ["eval", str(folder), "--tasks", "moeq_remote_choice", "--include-path", str(tasks)]))
    assert "could not load a task's data set" in line and "moeq-tests/absent" in line


def test_encoder_decoder_is_refused(tmp_path: Path) -> None:
    tiny_model("switch_transformers").save_pretrained(tmp_path / "switch")
    with pytest.raises(ValueError, match="supports only causal LMs"):
        run_harness(tmp_path / "switch", [TASK])


def test_missing_lm_eval_says_how_to_install(setup, monkeypatch) -> None:
    folder, tasks = setup
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` fail
    with pytest.raises(HarnessNotInstalled, match=r"pip install 'moeq\[harness\]'"):
        run_harness(folder, [TASK])
    line = one_line_error(runner.invoke(app, ["eval", str(folder), "--tasks", TASK, "--include-path", str(tasks)]))
    assert "pip install 'moeq[harness]'" in line
