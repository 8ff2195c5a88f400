"""The README's and the docs' Python examples run as written; the config reference is current."""

from __future__ import annotations

import ast
import re
import warnings
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
DOCS = README.parent / "docs"


def run_examples(page: Path) -> dict:
    """Run a page's Python blocks in order, in one namespace (they build on each other, like a
    session); return the namespace."""
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    assert blocks, f"{page.name} has no Python example"
    namespace = {"__name__": page.stem}
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the docs use no deprecated names
        for block in blocks:
            exec(compile(block, str(page), "exec", dont_inherit=True), namespace)
    return namespace


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace = run_examples(README)
    assert "accuracy" in capsys.readouterr().out
    assert (tmp_path / "runs" / "example" / "metrics.jsonl").exists()
    assert namespace["results"]["global_step"] > 0


def _check_models(namespace: dict, printed: str) -> None:
    assert namespace["bert_result"]["training_history"]["val_metrics"][-1]["accuracy"] >= 0.9
    assert "test accuracy" in printed


def _check_checkpoints(namespace: dict, printed: str) -> None:
    assert namespace["result"]["epochs_completed"] == 3


def _check_reinforcement(namespace: dict, printed: str) -> None:
    assert namespace["rl_result"]["monitor_metric"] == "val_return"
    assert len(namespace["rl_result"]["training_history"]["val_metrics"]) == 4


def _check_your_own(namespace: dict, printed: str) -> None:
    proto = namespace["proto_result"]
    assert proto["monitor_metric"] == "val_accuracy"
    assert proto["best_metric"] > 0.8  # 5-way 1-shot: chance is 0.2
    assert Path(proto["checkpoints"]["best"]).exists()
    assert "{'name': 'distill', 'temperature': 2.0}" in printed  # the teacher is not saved


def _check_unsupervised(namespace: dict, printed: str) -> None:
    last = namespace["vae_result"]["training_history"]["val_metrics"][-1]
    assert last["probe_accuracy"] > 0.6  # 10 digits: chance 0.1
    assert "linear probe" in printed


def _check_semi_supervised(namespace: dict, printed: str) -> None:
    assert "ImageAugment('weak'" in printed
    assert "ImageAugment('strong'" in printed


def _check_federated(namespace: dict, printed: str) -> None:
    accuracies = ast.literal_eval(printed.strip().splitlines()[-1])  # the printed list
    assert len(accuracies) >= 2
    assert accuracies[-1] > 0.5


def _check_tuning(namespace: dict, printed: str) -> None:
    result = namespace["result"]
    assert len(result.trials) == 3
    assert result.best_config.exists()


def _check_training(namespace: dict, printed: str) -> None:
    assert "hamming_loss" in printed


def _check_evaluation(namespace: dict, printed: str) -> None:
    """The user's metric is monitored: the best checkpoint holds its best value, printed."""
    history = namespace["result"].training_history["val_metrics"]
    assert namespace["result"].best_metric == max(m["macro_f1"] for m in history)
    assert "best val_macro_f1 0.9405 at epoch 5" in printed  # the docs' numbers
    assert namespace["balanced_error"].higher_is_better is False


CHECKS = {
    "evaluation.md": _check_evaluation,
    "models.md": _check_models,
    "checkpoints.md": _check_checkpoints,
    "modes-unsupervised.md": _check_unsupervised,
    "modes-semi-supervised.md": _check_semi_supervised,
    "modes-federated.md": _check_federated,
    "modes-reinforcement.md": _check_reinforcement,
    "modes-your-own.md": _check_your_own,
    "training.md": _check_training,
    "tuning.md": _check_tuning,
}


def test_every_docs_page_with_python_has_a_check():
    pages = {p.name for p in DOCS.glob("*.md") if "```python" in p.read_text()}
    assert pages == set(CHECKS)


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_docs_python_examples_run(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace = run_examples(DOCS / name)
    CHECKS[name](namespace, capsys.readouterr().out)


def test_the_config_reference_is_generated_from_the_code():
    from traineval.commands.config_docs import reference_markdown

    assert (DOCS / "config-reference.md").read_text() == reference_markdown(), (
        "docs/config-reference.md is stale: run "
        "`.venv/bin/python -m traineval.commands.config_docs > docs/config-reference.md`"
    )


def test_the_project_explains_itself_without_the_steering_files():
    """Users have the repository only: no pointer to the specification or design files
    that live outside it."""
    root = README.parent
    files = [README, *(root / "docs").glob("*.md"), *(root / "src").rglob("*.py")]
    for path in files:
        text = path.read_text()
        for outside in ("../shared", "SPEC.md", "DESIGN.md", "STYLE.md"):
            assert outside not in text, f"{path.relative_to(root)} points to {outside}"
