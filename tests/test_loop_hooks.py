"""The loop driven directly: the order of the callback hooks, and what a request does."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from traineval import TrainingConfig, TrainingManager
from traineval.callbacks import Callback
from traineval.callbacks.base import saved_states, state_keys
from traineval.modes import SupervisedStep
from traineval.training.loop import (
    Loop,
    LoopControl,
    Monitor,
    Observers,
    Placement,
    RunLength,
    TrainingInterrupted,
    UpdateRule,
)

from conftest import InterruptAt, make_classification, make_mlp

CPU = torch.device("cpu")


class Recorder(Callback):
    def __init__(self, stop_at=None, save_at=None):
        self.calls, self.stop_at, self.save_at = [], stop_at, save_at

    def _note(self, hook, loop):
        assert isinstance(loop, LoopControl)  # the narrow surface, not the loop itself
        self.calls.append((hook, loop.state.epoch, loop.state.global_step))

    def on_train_start(self, loop):
        self._note("train_start", loop)

    def on_epoch_start(self, loop):
        self._note("epoch_start", loop)

    def on_step_end(self, loop):
        self._note("step_end", loop)
        if loop.state.global_step == self.save_at:
            loop.request_save("mid")
        if loop.state.global_step == self.stop_at:
            loop.request_stop("asked")

    def on_log(self, loop, logs):
        self._note("log", loop)

    def on_evaluate(self, loop, logs):
        self._note("evaluate", loop)

    def on_epoch_end(self, loop, logs):
        self._note("epoch_end", loop)

    def on_train_end(self, loop, logs):
        self._note("train_end", loop)


def _loop(recorder, saves, *others):
    torch.manual_seed(0)
    model = nn.Linear(8, 3)
    return Loop(
        model=model,
        train_loader=DataLoader(make_classification(n=24), batch_size=4),  # 6 micro-batches
        update=UpdateRule(
            SupervisedStep(nn.CrossEntropyLoss()),
            torch.optim.SGD(model.parameters(), lr=0.1),
            accumulation_steps=2,  # 3 updates an epoch
        ),
        length=RunLength(
            num_epochs=2, updates_per_epoch=3, eval_every_n_steps=2, log_every_n_steps=2
        ),
        placement=Placement(CPU),
        monitor=Monitor("val_loss", minimize=True),
        evaluate_fn=lambda m: {"loss": 1.0},
        save_fn=lambda name, loop: saves.append((name, loop.state.global_step)),
        observers=Observers(callbacks=[recorder, *others]),
    )


def test_the_hooks_run_in_the_documented_order():
    recorder, saves = Recorder(), []
    state = _loop(recorder, saves).run()
    assert recorder.calls == [
        ("train_start", 0, 0),
        ("epoch_start", 1, 0),
        ("step_end", 1, 1),
        ("log", 1, 2),  # every 2 updates: log, then evaluate, then step_end
        ("evaluate", 1, 2),
        ("step_end", 1, 2),
        ("step_end", 1, 3),
        ("evaluate", 1, 3),  # the epoch's end evaluates unless it just did
        ("epoch_end", 1, 3),
        ("epoch_start", 2, 3),
        ("log", 2, 4),
        ("evaluate", 2, 4),
        ("step_end", 2, 4),
        ("step_end", 2, 5),
        ("log", 2, 6),
        ("evaluate", 2, 6),
        ("step_end", 2, 6),
        ("epoch_end", 2, 6),
        ("train_end", 2, 6),
    ]
    assert state.global_step == 6
    assert saves == []


def test_requests_are_carried_out_at_the_next_step_boundary():
    recorder, saves = Recorder(save_at=2, stop_at=4), []
    state = _loop(recorder, saves).run()
    assert saves == [("mid", 2)]  # after step 2's hooks, before step 3
    assert recorder.calls[-3:] == [("step_end", 2, 4), ("epoch_end", 2, 4), ("train_end", 2, 4)]
    assert state.stopped_early
    assert state.stop_reason == "asked"


def test_callback_state_is_keyed_by_name_not_position():
    class Counter(Callback):
        pass

    class Other(Callback):
        state_key = "mine"

    callbacks = [Counter(), Other(), Counter()]
    assert state_keys(callbacks) == ["Counter", "mine", "Counter#2"]
    assert state_keys(callbacks[::-1]) == ["Counter", "mine", "Counter#2"]
    # checkpoints of earlier versions keyed states by position
    old = {"0:ProgressBar": {}, "3:Counter": {"n": 2}, "1:Counter": {"n": 1}}
    assert saved_states(old) == {"ProgressBar": {}, "Counter": {"n": 1}, "Counter#2": {"n": 2}}


def test_a_resumed_run_gives_each_callback_its_own_state_whatever_the_order(quiet_config, tmp_path):
    class Tally(Callback):
        def __init__(self):
            self.steps = 0

        def on_step_end(self, loop):
            self.steps += 1

        def state_dict(self):
            return {"steps": self.steps}

        def load_state_dict(self, state):
            self.steps = state["steps"]

    class Quiet(Callback):
        def state_dict(self):
            return {"steps": -1}  # a state that must not land in Tally

    config = TrainingConfig(num_epochs=2, batch_size=8, **quiet_config)
    loader = DataLoader(make_classification(n=48), batch_size=8)  # 6 updates an epoch
    with pytest.raises(TrainingInterrupted):
        TrainingManager(config).train(make_mlp(), loader, callbacks=[Tally(), InterruptAt(4)])
    tally = Tally()
    TrainingManager(config).train(
        make_mlp(), loader, callbacks=[Quiet(), tally], resume_from="auto"
    )
    assert tally.steps == 12  # 4 before the interruption, 8 after


def test_a_callback_state_a_checkpoint_cannot_hold_is_refused_and_numpy_values_resume(
    quiet_config, tmp_path
):
    """A deque, an object or a numpy value in a callback's state was pickled into every
    checkpoint, none of which a weights_only load then read: the run could not resume."""
    import collections

    import numpy as np

    class Kept(Callback):
        def __init__(self, extra):
            self.steps, self.extra = 0, extra

        def on_step_end(self, loop):
            self.steps += 1

        def state_dict(self):
            return {"steps": np.int64(self.steps), "seen": np.arange(3), **self.extra}

        def load_state_dict(self, state):
            self.steps, self.seen = state["steps"], state["seen"]

    config = TrainingConfig(num_epochs=2, batch_size=8, **quiet_config)
    loader = DataLoader(make_classification(n=48), batch_size=8)
    queue = {"recent": collections.deque([1, 2], maxlen=5)}
    with pytest.raises(ValueError, match=r"callback 'Kept': state_dict\(\)\['recent'\] is a "):
        TrainingManager(config).train(make_mlp(), loader, callbacks=[Kept(queue)])
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any work
    with pytest.raises(TrainingInterrupted):
        TrainingManager(config).train(make_mlp(), loader, callbacks=[Kept({}), InterruptAt(4)])
    kept = Kept({})
    TrainingManager(config).train(make_mlp(), loader, callbacks=[kept], resume_from="auto")
    assert kept.steps == 12
    assert torch.equal(kept.seen, torch.arange(3))


@pytest.mark.parametrize("name", ["../../evil", "", "x.pt", "a/b", ".hidden", 3])
def test_a_save_name_that_is_not_a_file_name_is_refused(quiet_config, tmp_path, name):
    """ "../../evil" wrote evil.pt outside the run directory; "" wrote ".pt"."""

    class Saver(Callback):
        def on_step_end(self, loop):
            loop.request_save(name)

    config = TrainingConfig(num_epochs=1, batch_size=8, **quiet_config)
    loader = DataLoader(make_classification(n=16), batch_size=8)
    with pytest.raises(ValueError, match=r"request_save\(name=.*\) is invalid: expected a"):
        TrainingManager(config).train(make_mlp(), loader, callbacks=[Saver()])
    assert not list(tmp_path.rglob("*evil*"))


def test_a_best_save_where_the_monitor_did_not_improve_is_refused(quiet_config, tmp_path):
    """best.pt then held the current weights while the result named an earlier best epoch:
    evaluating "the best checkpoint" scored other weights."""

    class Saver(Callback):
        def on_epoch_end(self, loop, logs):
            loop.request_save("best")

    config = TrainingConfig(
        num_epochs=2, batch_size=8, early_stopping_min_delta=1e9, **quiet_config
    )  # only the first evaluation improves
    loader = DataLoader(make_classification(n=16), batch_size=8)
    with pytest.raises(ValueError, match=r"request_save\('best'\) is for the weights of the best"):
        TrainingManager(config).train(make_mlp(), loader, loader, callbacks=[Saver()])
    saved = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=True)
    assert saved["global_step"] == 2  # the first epoch's, its best


def test_callbacks_of_earlier_versions_still_reach_the_loop_with_a_warning():
    class Old(Callback):
        def on_train_start(self, loop):
            self.precision = loop.precision.name  # not on the surface: the Loop's attribute

        def on_step_end(self, loop):
            if loop.state.global_step == 2:
                loop.interrupted = "SIGTERM"  # the old way to ask for an interruption

    old, saves = Old(), []
    loop = _loop(Recorder(), saves, old)
    with (
        pytest.warns(FutureWarning, match=r"loop\.precision in a callback"),
        pytest.raises(TrainingInterrupted),
    ):
        loop.run()
    assert old.precision == "fp32"
    assert saves == [("last", 2)]


def test_on_exception_runs_before_an_interruption_or_an_error_propagates(quiet_config):
    """A callback gets on_exception with the error (a progress bar closes its line there);
    a failing on_exception does not replace the training's error."""

    class Seen(Callback):
        def __init__(self):
            self.errors = []

        def on_exception(self, loop, error):
            self.errors.append(type(error).__name__)

    class Broken(Callback):
        def on_exception(self, loop, error):
            raise OSError("cannot release")

    class Fails(Callback):
        def on_step_end(self, loop):
            if loop.state.global_step == 2:
                raise ZeroDivisionError("in the user's callback")

    config = TrainingConfig(
        num_epochs=1, batch_size=8, **{**quiet_config, "overwrite_output_dir": True}
    )
    loader = DataLoader(make_classification(n=48), batch_size=8)
    seen = Seen()
    with pytest.raises(TrainingInterrupted):
        TrainingManager(config).train(make_mlp(), loader, callbacks=[seen, InterruptAt(3)])
    with pytest.raises(ZeroDivisionError):
        TrainingManager(config).train(make_mlp(), loader, callbacks=[Broken(), Fails(), seen])
    assert seen.errors == ["TrainingInterrupted", "ZeroDivisionError"]
    finished = Seen()
    TrainingManager(config).train(make_mlp(), loader, callbacks=[finished])
    assert finished.errors == []


def test_an_interrupted_runs_progress_bar_closes_and_warnings_print_above_a_live_bar():
    import io
    import logging

    from tqdm import tqdm

    from traineval.callbacks.progress import BarAwareHandler, ProgressBar

    stream = io.StringIO()
    bar = tqdm(total=10, file=stream, mininterval=0)
    bar.update(3)
    handler = BarAwareHandler(stream)
    handler.emit(logging.makeLogRecord({"msg": "SIGINT received", "levelno": logging.WARNING}))
    bar.close()
    before, _, _ = stream.getvalue().partition("SIGINT received")
    assert before.endswith("\r")  # the bar's line was cleared first: the warning starts it
    assert "3/10" in before

    progress = ProgressBar(enabled=True)
    progress.bar = tqdm(total=10, file=io.StringIO())
    progress.on_exception(None, KeyboardInterrupt())
    assert progress.bar is None
    assert not getattr(tqdm, "_instances", None)  # no bar left to draw over the message


def test_what_is_not_a_callback_is_refused_before_any_work(tmp_path):
    """A function given as a callback failed at the first step (the run directory already
    claimed, no summary.json); `callbacks=` one object failed unpacking it."""
    config = TrainingConfig(num_epochs=1, batch_size=8, output_dir=str(tmp_path / "run"),
                            progress_bar=False, tensorboard_logging=False)  # fmt: skip
    train = DataLoader(make_classification(n=32), 8)

    def on_step(loop):
        pass

    with pytest.raises(TypeError, match=r"callbacks\[0\] \(function\) is not a traineval\.Call"):
        TrainingManager(config).train(make_mlp(), train, callbacks=[on_step])
    with pytest.raises(TypeError, match=r"callbacks=.* is invalid: expected a list of traineval"):
        TrainingManager(config).train(make_mlp(), train, callbacks=Callback())
    assert not (tmp_path / "run").exists()
    seen = []

    class Seen(Callback):
        def on_train_start(self, loop):
            seen.append(loop.state.global_step)

    TrainingManager(config).train(make_mlp(), train, callbacks=(c for c in [Seen()]))
    assert seen == [0]  # a generator of callbacks, as a list
