"""Loggers: TensorBoard event files read back, failing loggers, gradient and speed monitoring."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from traineval import TaskType, TrainingConfig, TrainingManager
from traineval.loggers import LoggerHub, read_jsonl

from conftest import InterruptAt, hide_package, make_classification, make_mlp


def _config(tmp_path, **overrides):
    settings = {
        "num_epochs": 2,
        "batch_size": 8,
        "learning_rate": 1e-2,
        "warmup_steps": 0,
        "scheduler_type": "constant",
        "early_stopping_patience": 0,
        "log_frequency": 2,
        "output_dir": str(tmp_path / "run"),
        "progress_bar": False,
        "device": "cpu",
        "tensorboard_logging": False,
    }
    settings.update(overrides)
    return TrainingConfig(**settings)


def _events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    accumulator.Reload()
    return accumulator


def _scalars(folder):
    accumulator = _events(folder)
    return {
        tag: [e.step for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]
    }


def test_tensorboard_event_files_hold_the_expected_tags_and_steps(tmp_path):
    data = make_classification(n=64)
    config = _config(tmp_path, tensorboard_logging=True)
    TrainingManager(config).train(make_mlp(), DataLoader(data, 8), DataLoader(data, 32))
    scalars = _scalars(tmp_path / "run" / "tensorboard")
    assert scalars["train_step_loss"] == [2, 4, 6, 8, 10, 12, 14, 16]
    assert scalars["val_loss"] == [8, 16]
    assert scalars["val_accuracy"] == [8, 16]
    for tag in ("learning_rate", "grad_norm", "samples_per_sec", "step_time_ms", "peak_rss_mb"):
        assert sorted(set(scalars[tag])) == [2, 4, 6, 8, 10, 12, 14, 16], tag
    assert scalars["train_loss"] == [8, 16]


def test_resumed_tensorboard_run_drops_the_interrupted_runs_later_events(tmp_path):
    from traineval.training.loop import TrainingInterrupted

    data = make_classification(n=64)
    config = _config(tmp_path, tensorboard_logging=True, checkpoint_every_n_steps=4)
    with pytest.raises(TrainingInterrupted):
        TrainingManager(config).train(make_mlp(), DataLoader(data, 8), callbacks=[InterruptAt(10)])
    result = TrainingManager(config).train(make_mlp(), DataLoader(data, 8), resume_from="auto")
    # one hparams entry, the run's best (the interrupted run's NaN one had stayed beside it)
    hparams = _events(tmp_path / "run" / "tensorboard" / "hparams")
    assert [e.value for e in hparams.Scalars("best_metric")] == [pytest.approx(result.best_metric)]
    assert _scalars(tmp_path / "run" / "tensorboard")["train_step_loss"] == [
        2,
        4,
        6,
        8,
        10,
        12,
        14,
        16,
    ]


class Broken:
    calls = 0

    def log(self, metrics, step):
        Broken.calls += 1
        raise OSError(28, "No space left on device")

    def log_config(self, config):
        raise RuntimeError("service unavailable")

    def close(self):
        raise RuntimeError("service unavailable")


def test_a_logger_raising_on_every_call_does_not_stop_training(tmp_path, caplog):
    hub = LoggerHub([Broken()])
    with caplog.at_level(logging.WARNING):
        hub.log_config({"a": 1})
        for step in range(5):
            hub.log({"loss": 1.0}, step)
        hub.close()
    assert caplog.text.count("Broken.") == 1  # warned once
    assert hub.failures["Broken"] == 7
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        LoggerHub([Broken()]).close()  # at the end, nothing goes on: it says what may be lost
    assert "Broken.close failed (RuntimeError: service unavailable); its last records may be " in (
        caplog.text
    )

    Broken.calls = 0
    result = TrainingManager(_config(tmp_path)).train(
        make_mlp(), DataLoader(make_classification(n=64), 8), loggers=[Broken()]
    )
    assert result["global_step"] == 16
    assert Broken.calls > 8  # it was called, and failed, all along
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert len([r for r in records if r["event"] == "train"]) == 8  # the others still log


class OnlyLog:
    def __init__(self) -> None:
        self.records: list[dict] = []

    def log(self, metrics, step):
        self.records.append(dict(metrics))


def test_a_logger_without_log_is_refused_before_training_and_the_rest_is_optional(tmp_path, caplog):
    """An object without log() was taken and reported failing at the first record: the run
    went on with nothing logged to it. log_config and close were required, and a logger
    with log() alone was reported failing at the start and the end."""
    train = DataLoader(make_classification(n=64), 8)
    with pytest.raises(TypeError, match=r"loggers\[1\] \(dict\) has no log\(metrics, step\)"):
        TrainingManager(_config(tmp_path)).train(make_mlp(), train, loggers=[OnlyLog(), {}])
    assert not (tmp_path / "run").exists()  # before any work
    with pytest.raises(TypeError, match="expected a list of loggers"):
        TrainingManager(_config(tmp_path)).train(make_mlp(), train, loggers=OnlyLog())
    mine = OnlyLog()
    with caplog.at_level(logging.WARNING):
        TrainingManager(_config(tmp_path)).train(make_mlp(), train, loggers=[mine])
    assert "failed" not in caplog.text
    assert [r["event"] for r in mine.records].count("train") == 8


def test_missing_tensorboard_warns_with_the_extra_and_training_goes_on(
    tmp_path, monkeypatch, caplog
):
    hide_package(monkeypatch, "torch.utils.tensorboard", "tensorboard")
    with caplog.at_level(logging.WARNING):
        result = TrainingManager(_config(tmp_path, tensorboard_logging=True)).train(
            make_mlp(), DataLoader(make_classification(n=32), 8)
        )
    assert "pip install 'traineval[tensorboard]'" in caplog.text
    assert result["global_step"] == 8


def test_gradient_monitoring_without_clipping_and_per_layer(tmp_path):
    config = _config(tmp_path, gradient_clipping=False, log_layer_grad_norms=True)
    TrainingManager(config).train(make_mlp(), DataLoader(make_classification(n=64), 8))
    records = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["event"] == "train"]
    first = records[0]
    layers = {k: v for k, v in first.items() if k.startswith("layer_grad_norm_")}
    assert set(layers) == {
        "layer_grad_norm_0.weight",
        "layer_grad_norm_0.bias",
        "layer_grad_norm_2.weight",
        "layer_grad_norm_2.bias",
    }
    total = sum(v**2 for v in layers.values()) ** 0.5
    assert first["grad_norm"] == pytest.approx(total, rel=1e-5)
    assert "clip_fraction" not in first


def test_clip_fraction_counts_the_clipped_steps(tmp_path):
    config = _config(tmp_path, max_grad_norm=1e-6, log_frequency=4)
    TrainingManager(config).train(make_mlp(), DataLoader(make_classification(n=64), 8))
    records = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["event"] == "train"]
    assert all(r["clip_fraction"] == 1.0 for r in records)
    assert all(r["grad_norm_max"] >= r["grad_norm_mean"] for r in records)


def test_tokens_per_second_for_token_level_losses(tmp_path):
    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(7, 4)
            self.out = torch.nn.Linear(4, 7)

        def forward(self, tokens):
            return self.out(self.embed(tokens))

    tokens = torch.randint(0, 7, (32, 6))
    targets = tokens.clone()
    targets[:, 4:] = -100
    config = _config(tmp_path)
    TrainingManager(config).train(
        LM(), DataLoader(TensorDataset(tokens, targets), 8), task_type=TaskType.GENERATION
    )
    record = next(
        r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["event"] == "train"
    )
    assert (
        record["tokens_per_sec"]
        == pytest.approx(record["samples_per_sec"] * 4 / 6 * 6 / 6 * (16 * 4) / (16 * 4), rel=1e-6)
        or record["tokens_per_sec"] > 0
    )
    # every sample carries 4 tokens that count (2 are padding)
    assert record["tokens_per_sec"] == pytest.approx(record["samples_per_sec"] * 4, rel=1e-6)


def _key(item):
    return item.key or "/".join(item.nested_key)


def _wandb_run(folder):
    from wandb_files import wandb_records

    history, summary, ids, config = [], {}, set(), {}
    for path in sorted(folder.glob("wandb/offline-run-*/run-*.wandb")):
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
                config.update({i.key: i.value_json for i in record.run.config.update})
            elif kind == "config":
                config.update({i.key: i.value_json for i in record.config.update})
            elif kind == "history":
                history.append({_key(i): i.value_json for i in record.history.item})
            elif kind == "summary":
                summary.update({_key(i): i.value_json for i in record.summary.update if _key(i)})
    return history, summary, ids, config


@pytest.fixture
def wandb_offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_wandb_offline_run_holds_config_metrics_and_best_summary(tmp_path, wandb_offline):
    data = make_classification(n=64)
    config = _config(tmp_path, wandb_logging=True)
    TrainingManager(config).train(make_mlp(), DataLoader(data, 8), DataLoader(data, 32))
    history, summary, ids, logged_config = _wandb_run(tmp_path / "run")
    assert ids == {(tmp_path / "run" / "wandb_run_id.txt").read_text()}
    steps = sorted({int(row["_step"]) for row in history if "train_step_loss" in row})
    assert steps == [2, 4, 6, 8, 10, 12, 14, 16]
    assert any("val_accuracy" in row for row in history)
    assert "grad_norm" in {key for row in history for key in row}
    assert float(logged_config["learning_rate"]) == 0.01
    assert "best_metric" in summary


def test_resumed_run_continues_the_same_wandb_run(tmp_path, wandb_offline):
    from traineval.training.loop import TrainingInterrupted

    data = make_classification(n=64)
    config = _config(tmp_path, wandb_logging=True)
    with pytest.raises(TrainingInterrupted):
        TrainingManager(config).train(make_mlp(), DataLoader(data, 8), callbacks=[InterruptAt(6)])
    TrainingManager(config).train(make_mlp(), DataLoader(data, 8), resume_from="auto")
    history, _, ids, _ = _wandb_run(tmp_path / "run")
    assert len(list((tmp_path / "run").glob("wandb/offline-run-*"))) == 2
    assert len(ids) == 1  # one W&B run across the resume
    steps = [int(row["_step"]) for row in history if "train_step_loss" in row]
    assert steps == [2, 4, 6, 8, 10, 12, 14, 16]


@pytest.mark.parametrize("lost", [False, True], ids=["kept", "never-sent"])
def test_a_resumed_mlflow_run_holds_every_point_of_the_uninterrupted_one(tmp_path, lost):
    """A run killed in its first seconds had sent MLflow nothing (its points were still
    on the logger's thread): the resumed run's MLflow run lacked every point before the
    resume. `never-sent` stops a run that logs to MLflow nothing, as that kill leaves it;
    `kept` is a plain resume (no point twice)."""
    from mlflow.tracking import MlflowClient

    from traineval.training.stopping import TrainingInterrupted

    data = make_classification(n=64)
    config = _config(tmp_path, mlflow_logging=True, checkpoint_every_n_steps=4)
    first = config.replace(mlflow_logging=not lost)
    with pytest.raises(TrainingInterrupted):
        TrainingManager(first).train(make_mlp(), DataLoader(data, 8), callbacks=[InterruptAt(10)])
    TrainingManager(config).train(make_mlp(), DataLoader(data, 8), resume_from="auto")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = (tmp_path / "run" / "mlflow_run_id.txt").read_text()
    steps = [m.step for m in client.get_metric_history(run_id, "train_step_loss")]
    assert sorted(steps) == [2, 4, 6, 8, 10, 12, 14, 16]


def test_mlflow_run_read_back_through_its_client(tmp_path):
    from mlflow.tracking import MlflowClient

    data = make_classification(n=64)
    config = _config(tmp_path, mlflow_logging=True)
    TrainingManager(config).train(make_mlp(), DataLoader(data, 8), DataLoader(data, 32))
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = (tmp_path / "run" / "mlflow_run_id.txt").read_text()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["learning_rate"] == "0.01"
    assert run.data.params["batch_size"] == "8"
    steps = [m.step for m in client.get_metric_history(run_id, "train_step_loss")]
    assert steps == [2, 4, 6, 8, 10, 12, 14, 16]
    assert [m.step for m in client.get_metric_history(run_id, "val_accuracy")] == [8, 16]
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "metrics.jsonl", "summary.json"} <= artifacts
    assert "checkpoints" not in artifacts


def test_confusion_matrix_figure_goes_to_tensorboard_when_plots_are_on(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from traineval.cli import main

    run = tmp_path / "run"
    args = [
        "demo",
        "-q",
        "data.name=iris",
        "model.name=mlp",
        "model.options={}",
        "training.num_epochs=2",
        "training.warmup_steps=0",
        "training.tensorboard_logging=true",
        "evaluation.plot_metrics=true",
        f"training.output_dir={run}",
    ]
    assert main(args) == 0
    accumulator = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    accumulator.Reload()
    assert accumulator.Tags()["images"] == ["test_confusion_matrix"]
    assert "train_loss" in accumulator.Tags()["scalars"]


def test_wandb_runs_outside_the_training_process(tmp_path, wandb_offline):
    import threading

    from traineval import Callback

    seen = []

    class Threads(Callback):
        def on_step_end(self, loop):
            seen.extend(t.name for t in threading.enumerate())

    data = make_classification(n=64)
    config = _config(tmp_path, wandb_logging=True)
    TrainingManager(config).train(make_mlp(), DataLoader(data, 8), callbacks=[Threads()])
    assert seen
    assert not [name for name in seen if "wandb" in name.lower()]
    history, _, _, _ = _wandb_run(tmp_path / "run")
    assert any("train_step_loss" in row for row in history)


def test_a_failing_wandb_process_is_reported_and_training_goes_on(tmp_path, monkeypatch, caplog):
    from traineval.loggers import wandb as wandb_logger

    broken = tmp_path / "broken_child.py"
    broken.write_text(
        'import sys\nprint("ValueError: no W&B today", file=sys.stderr)\nsys.exit(1)\n'
    )
    monkeypatch.setattr(wandb_logger, "CHILD", broken)
    data = make_classification(n=64)
    config = _config(tmp_path, wandb_logging=True)
    with caplog.at_level("WARNING"):
        result = TrainingManager(config).train(make_mlp(), DataLoader(data, 8))
    assert result.global_step == 16
    assert "no W&B today" in caplog.text


def test_tensorboard_that_cannot_start_does_not_stop_training(tmp_path, monkeypatch, caplog):
    from traineval.loggers import tensorboard

    def unwritable(self, run_dir, purge_step=None, replay=()):
        raise PermissionError(13, "Permission denied", str(run_dir))

    monkeypatch.setattr(tensorboard.TensorBoardLogger, "__init__", unwritable)
    with caplog.at_level(logging.WARNING):
        result = TrainingManager(_config(tmp_path, tensorboard_logging=True)).train(
            make_mlp(), DataLoader(make_classification(n=32), 8)
        )
    assert "TensorBoard could not start" in caplog.text
    assert "Permission denied" in caplog.text
    assert result["global_step"] == 8


def test_a_nan_value_sent_to_tensorboard_is_named_once(tmp_path, caplog):
    from traineval.loggers.tensorboard import TensorBoardLogger

    board = TensorBoardLogger(tmp_path)
    with caplog.at_level(logging.WARNING):
        board.log({"val_r2": float("nan"), "val_loss": 0.5}, 3)
        board.log({"val_r2": float("nan"), "val_loss": 0.4}, 6)
    board.close()
    assert caplog.text.count("TensorBoard: val_r2 is nan at step 3") == 1
    assert "step 6" not in caplog.text
    assert _scalars(tmp_path / "tensorboard")["val_loss"] == [3, 6]


def test_a_background_logger_never_makes_training_wait(caplog):
    """The training thread only queues; a blocked service delays nothing, and close() gives
    up after its bound, saying how much was not sent."""
    import threading

    from traineval.loggers.background import BackgroundLogger

    release = threading.Event()
    received = []

    class Stuck:
        def log(self, metrics, step):
            release.wait()
            received.append(step)

        def log_config(self, config):
            pass

        def close(self):
            received.append("closed")

    background = BackgroundLogger(Stuck, "Stuck")
    background.close_timeout = 0.2
    for step in range(5):
        background.log({"loss": 1.0}, step)  # returns at once though the service is stuck
    with caplog.at_level(logging.WARNING):
        background.close()
    assert "Stuck did not finish within 0 s" in caplog.text
    assert "record(s) were not sent" in caplog.text
    release.set()
    background._thread.join(5)
    assert received == [0, 1, 2, 3, 4, "closed"]  # in order, once released


def test_a_logger_that_cannot_start_in_the_background_is_reported(caplog):
    from traineval.loggers.background import BackgroundLogger

    def down():
        raise ConnectionError("tracking server unreachable")

    with caplog.at_level(logging.WARNING):
        background = BackgroundLogger(down, "MLflow")
        background._thread.join(5)
        background.log({"loss": 1.0}, 1)  # dropped: nothing queues for a dead logger
        background.close()
    assert "MLflow could not start (ConnectionError: tracking server unreachable)" in caplog.text
    assert background._queue.qsize() == 0


def test_an_unreachable_mlflow_server_does_not_delay_training(tmp_path, caplog):
    """A server that accepts connections and never answers: training finishes while the
    MLflow client is still waiting; the run ends after close()'s bound, with a warning."""
    import socket
    import time

    from traineval.loggers.background import BackgroundLogger

    pytest.importorskip("mlflow")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    uri = f"http://127.0.0.1:{server.getsockname()[1]}"
    original = BackgroundLogger.close_timeout
    BackgroundLogger.close_timeout = 1.0
    try:
        config = _config(tmp_path, mlflow_logging=True, mlflow_tracking_uri=uri, num_epochs=1)
        started = time.perf_counter()
        with caplog.at_level(logging.WARNING):
            result = TrainingManager(config).train(
                make_mlp(), DataLoader(make_classification(n=32), 8)
            )
        took = time.perf_counter() - started
    finally:
        BackgroundLogger.close_timeout = original
        server.close()
    assert result["global_step"] == 4
    assert "MLflow did not finish within 1 s" in caplog.text
    assert took < 30  # MLflow's own retries against this server take minutes


def test_a_resume_inside_a_step_leaves_tensorboard_as_the_uninterrupted_run(tmp_path):
    """TensorBoard drops a resumed run's events by step: it kept, after the stop step, the
    points the stopped run logged there after its checkpoint (a max_steps stop's closing
    validation and part of an epoch, at step 10), beside the resumed run's own."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def points(folder):
        accumulator = EventAccumulator(str(folder / "tensorboard"), size_guidance={"scalars": 0})
        accumulator.Reload()
        return {
            tag: [(e.step, e.value) for e in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]
            if not re.search(r"sec|wait|rss|memory|time", tag)  # timings differ
        }

    data = make_classification(n=64)  # 8 updates an epoch: step 10 is inside epoch 2

    def train(name, **settings):
        config = _config(tmp_path / name, tensorboard_logging=True, eval_frequency=5, **settings)
        torch.manual_seed(0)
        model, loaders = make_mlp(), (DataLoader(data, 8), DataLoader(data, 32))
        TrainingManager(config).train(model, *loaders, resume_from="auto")  # (fresh at first)

    train("straight")
    train("stopped", max_steps=10)
    train("stopped", max_steps=None)
    assert points(tmp_path / "stopped" / "run") == points(tmp_path / "straight" / "run")


def test_a_damaged_metrics_file_reads_as_the_records_a_resume_keeps(tmp_path):
    """read_jsonl (the report, users) and a resume's trimming (json_records) read the same
    records: a line cut short, one that is not an object, one with bytes that are not UTF-8
    and one nested too deep to read are passed over by both (read_jsonl read the bad bytes
    as replacement characters, so the report showed a record the resumed run had dropped)."""
    from traineval.loggers import read_jsonl
    from traineval.system.files import json_records

    path = tmp_path / "metrics.jsonl"
    lines = [
        b'{"step": 1, "loss": 0.5}\n',
        b'{"step": 2, "lo\n',  # cut short by a crash
        b"[1, 2]\n",  # not a record
        b'{"step": 3, "note": "caf\xe9"}\n',  # latin-1, not UTF-8
        b"[" * 100_000 + b"\n",  # nested too deep
        b"\n",
        b'{"step": 4, "note": "caf\xc3\xa9"}',  # UTF-8, no final newline
    ]
    path.write_bytes(b"".join(lines))
    expected = [{"step": 1, "loss": 0.5}, {"step": 4, "note": "café"}]
    assert read_jsonl(path) == expected
    assert [record for _, record in json_records(path)] == expected
