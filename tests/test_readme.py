"""The README's Python example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no Python example"
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "readme"}  # the blocks build on each other, like a session
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    printed = capsys.readouterr().out
    assert "accuracy" in printed
    assert (tmp_path / "runs" / "example" / "metrics.jsonl").exists()
    assert namespace["result"]["epochs_completed"] == 3
    assert namespace["rl_result"]["monitor_metric"] == "val_return"
    assert len(namespace["rl_result"]["training_history"]["val_metrics"]) == 4


def test_the_project_explains_itself_without_the_steering_files():
    """Users have the repository only: no pointer to the specification or design files
    that live outside it."""
    root = README.parent
    files = [README, *(root / "docs").glob("*.md"), *(root / "src").rglob("*.py")]
    for path in files:
        text = path.read_text()
        for outside in ("../shared", "SPEC.md", "DESIGN.md", "STYLE.md"):
            assert outside not in text, f"{path.relative_to(root)} points to {outside}"
