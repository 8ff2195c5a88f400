"""The flat layout's module paths keep working for one more minor release, with a warning."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from traineval.system.moved_modules import MOVED


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-W", "always::FutureWarning", "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_an_old_path_is_the_new_module_itself_and_says_where_it_went():
    done = _run(
        """
        import traineval.loop as old
        from traineval.checkpoint import load_model_weights
        import traineval.training.loop as new
        import traineval.runs.checkpoint as checkpoint
        assert old is new
        assert load_model_weights is checkpoint.load_model_weights
        assert new.__spec__.name == "traineval.training.loop"
        """
    )
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "FutureWarning" in line]
    assert lines == [
        "<string>:2: FutureWarning: traineval.loop moved to traineval.training.loop; import it "
        "from there (the old path goes in traineval 0.3)",
        "<string>:3: FutureWarning: traineval.checkpoint moved to traineval.runs.checkpoint; "
        "import it from there (the old path goes in traineval 0.3)",
    ]


@pytest.mark.parametrize("old", sorted(MOVED))
def test_every_old_path_names_a_module_that_exists(old):
    import importlib.util

    assert importlib.util.find_spec(MOVED[old]) is not None
    assert importlib.util.find_spec(old.rpartition(".")[0]) is not None


def test_a_new_path_is_not_an_old_one():
    assert not set(MOVED) & set(MOVED.values())


def test_names_that_moved_to_another_module_still_answer_at_the_old_place():
    done = _run(
        """
        import warnings
        from traineval.distributed import shard_eval_loader
        from traineval.data.sharding import shard_eval_loader as new
        from traineval.rundir import atomic_write_json, write_run_config
        from traineval.evaluation import Evaluator
        from traineval.loop import CHECKPOINT_SHARE
        from traineval.config import current_metric_name
        assert shard_eval_loader is new
        """
    )
    assert done.returncode == 0, done.stderr
    assert "shard_eval_loader moved to traineval.data.sharding.shard_eval_loader" in done.stderr
    assert done.stderr.count("traineval.evaluation.Evaluator moved to") == 1
