"""Every config in examples/configs runs (one short epoch each), from the repository root
as its comments say."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from traineval.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "examples" / "configs").glob("*.yaml"))
SHORT = {  # what makes each a few-second run
    "meta_learning": ["mode.train_episodes=40", "mode.eval_episodes=10"],
    "reinforcement": ["mode.rollouts_per_epoch=2", "mode.eval_episodes=2"],
}


def test_there_is_an_example_for_each_mode_and_task():
    names = {path.stem for path in CONFIGS}
    assert names >= {
        "classification", "regression", "multilabel", "csv", "autoencoder",
        "semi_supervised", "federated", "meta_learning", "reinforcement", "custom_model",
        "huggingface",
    }  # fmt: skip


@pytest.mark.parametrize("config", CONFIGS, ids=[path.stem for path in CONFIGS])
def test_the_example_runs(config, tmp_path, monkeypatch, capsys):
    if config.stem == "huggingface" and importlib.util.find_spec("transformers") is None:
        pytest.skip("needs the hf extra (transformers)")
    monkeypatch.chdir(ROOT)
    monkeypatch.delitem(sys.modules, "example_models", raising=False)
    run = tmp_path / "run"
    args = ["fit", str(config), "-q", "training.num_epochs=1", f"training.output_dir={run}"]
    assert main(args + SHORT.get(config.stem, [])) == 0, capsys.readouterr().err
    record = json.loads((run / "evaluation" / "metrics.json").read_text())
    assert record["test"]
