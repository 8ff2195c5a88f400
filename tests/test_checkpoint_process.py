"""The checkpoint writer process: files equal to a synchronous save's, ties kept, failures
named, a writer that dies said so, and saves that outrun the writes said once."""

from __future__ import annotations

import collections
import logging
import time

import pytest
import torch

from traineval.runs import checkpoint_process
from traineval.runs.checkpoint import load_checkpoint_file, save_checkpoint_file
from traineval.runs.checkpoint_writer import CheckpointWriteError, CheckpointWriter, Write
from traineval.system.files import WriteError

pytestmark = pytest.mark.skipif(
    not checkpoint_process.available(), reason="the writer process needs Linux (memfd)"
)


def _state():
    torch.manual_seed(0)
    shared = torch.randn(4, 3)
    return {
        "model": {"embed": shared, "head": shared, "bias": torch.zeros(3, dtype=torch.bfloat16)},
        "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "groups": [{"lr": 0.1}]},
        "empty": torch.empty(0),
        "rng": (1, (2, 3), None),
        "flags": torch.tensor([True, False]),
        "step": 7,
    }


def test_the_process_writes_what_a_synchronous_save_writes_and_keeps_ties(tmp_path):
    state = _state()
    save_checkpoint_file(state, tmp_path / "sync.pt")
    writer = checkpoint_process.ProcessWriter()
    try:
        copied = writer.snapshot("checkpoint", state)
        state["model"]["embed"].add_(1)  # training goes on: the copy does not change
        writer.submit([Write("checkpoint", tmp_path / "async.pt", copied)], "async.pt")
        writer.wait()
    finally:
        writer.close()
    a = load_checkpoint_file(tmp_path / "sync.pt")
    b = load_checkpoint_file(tmp_path / "async.pt")
    assert torch.equal(a["model"]["embed"], b["model"]["embed"])
    assert b["model"]["bias"].dtype == torch.bfloat16
    assert b["model"]["embed"].data_ptr() == b["model"]["head"].data_ptr()  # one tensor
    assert b["empty"].shape == (0,)
    assert torch.equal(b["flags"], torch.tensor([True, False]))
    assert (b["rng"], b["step"], b["optimizer"]["groups"]) == ((1, (2, 3), None), 7, [{"lr": 0.1}])
    assert torch.equal(b["optimizer"]["state"][0]["step"], torch.tensor(3.0))


def test_a_failed_write_is_named_and_the_writer_goes_on(tmp_path):
    (tmp_path / "a-file").write_text("")
    writer = checkpoint_process.ProcessWriter()
    try:
        copied = writer.snapshot("checkpoint", {"w": torch.ones(3)})
        writer.submit([Write("checkpoint", tmp_path / "a-file" / "last.pt", copied)], "last.pt")
        with pytest.raises(
            WriteError, match=r"could not write '.*a-file/last\.pt': '.*a-file' is a file"
        ):
            writer.wait()  # one sentence naming the file, as a synchronous save says it
        copied = writer.snapshot("checkpoint", {"w": torch.full((3,), 2.0)})
        writer.submit([Write("checkpoint", tmp_path / "ok.pt", copied)], "ok.pt")
        writer.wait()  # the next save is written
    finally:
        writer.close()
    assert torch.equal(load_checkpoint_file(tmp_path / "ok.pt")["w"], torch.full((3,), 2.0))


def test_a_writer_that_dies_mid_write_is_an_error_and_the_previous_file_stays(tmp_path):
    writer = checkpoint_process.ProcessWriter()
    try:
        copied = writer.snapshot("checkpoint", {"w": torch.ones(3)})
        writer.submit([Write("checkpoint", tmp_path / "last.pt", copied)], "last.pt")
        writer.wait()
        big = writer.snapshot("checkpoint", {"w": torch.ones(50_000_000)})  # 200 MB
        writer.submit([Write("checkpoint", tmp_path / "last.pt", big)], "last.pt")
        writer._process.kill()  # mid-write (a kill -9 of the writer alone)
        with pytest.raises(CheckpointWriteError, match=r"writing last\.pt failed: .*ended"):
            writer.wait()
        assert torch.equal(load_checkpoint_file(tmp_path / "last.pt")["w"], torch.ones(3))
        copied = writer.snapshot("checkpoint", {"w": torch.zeros(2)})  # a new writer starts
        writer.submit([Write("checkpoint", tmp_path / "next.pt", copied)], "next.pt")
        writer.wait()
    finally:
        writer.close()
    assert torch.equal(load_checkpoint_file(tmp_path / "next.pt")["w"], torch.zeros(2))


def test_saves_that_outrun_their_writes_are_said_once(tmp_path, caplog):
    from traineval.training.run_checkpoints import _wait_for_the_previous_write

    writer = CheckpointWriter(perform=lambda write: time.sleep(0.2))
    for _ in range(3):
        with caplog.at_level(logging.WARNING):
            _wait_for_the_previous_write(writer, tmp_path / "last.pt", said=False)
        writer.submit([Write("checkpoint", tmp_path / "last.pt", {})], "last.pt")
    writer.close()
    said = [r for r in caplog.records if "cannot keep up" in r.getMessage()]
    assert len(said) == 1
    assert "checkpoint_every_n_steps" in said[0].getMessage()


def test_auto_uses_the_process_for_cpu_runs_and_the_thread_for_gpu_runs():
    from traineval.training.run_checkpoints import background_writer

    chosen = {}
    for device in ("cpu", "cuda"):
        writer = background_writer("auto", torch.device(device))
        chosen[device] = type(writer).__name__
        writer.close()
    # the process: with or without a free core (the thread costs more on busy cores)
    assert chosen == {"cpu": "ProcessWriter", "cuda": "CheckpointWriter"}
    assert type(background_writer("thread", torch.device("cpu"))) is CheckpointWriter
    process = background_writer("process", torch.device("cuda"))
    assert type(process) is checkpoint_process.ProcessWriter
    process.close()


def test_close_returns_while_a_forked_process_holds_the_pipe(tmp_path):
    """A process forked after the writer started (a DataLoader worker) holds a copy of the
    jobs pipe: the writer stops on an explicit message, not on EOF alone."""
    import os

    writer = checkpoint_process.ProcessWriter()
    child = os.fork()
    if child == 0:  # the forked process: hold the pipe a while, then leave
        time.sleep(5)
        os._exit(0)
    try:
        copied = writer.snapshot("checkpoint", {"w": torch.ones(2)})
        writer.submit([Write("checkpoint", tmp_path / "last.pt", copied)], "last.pt")
        started = time.perf_counter()
        writer.close()
        assert time.perf_counter() - started < 3
    finally:
        os.waitpid(child, 0)
    assert torch.equal(load_checkpoint_file(tmp_path / "last.pt")["w"], torch.ones(2))


def test_a_tensor_and_its_conjugate_view_are_two_copies(tmp_path):
    value = torch.tensor([1 + 2j, 3 - 1j])
    writer = checkpoint_process.ProcessWriter()
    try:
        copied = writer.snapshot("checkpoint", {"z": value, "conj": value.conj()})
        writer.submit([Write("checkpoint", tmp_path / "c.pt", copied)], "c.pt")
        writer.wait()
    finally:
        writer.close()
    saved = load_checkpoint_file(tmp_path / "c.pt")
    assert torch.equal(saved["z"], value)
    assert torch.equal(saved["conj"].resolve_conj(), value.conj().resolve_conj())


def test_a_save_of_the_same_update_stops_the_write_in_flight_and_another_does_not(tmp_path):
    save_checkpoint_file({"step": 1}, tmp_path / "last.pt")  # the previous file
    state = {f"t{i}": torch.full((1 << 16,), float(i)) for i in range(400)}  # 100 MB
    writer = checkpoint_process.ProcessWriter()
    try:
        for step, supersede_step, stopped in ((5, 5, 1), (6, 7, 1)):
            copied = writer.snapshot("checkpoint", {**state, "step": step})
            path = tmp_path / "last.pt"
            writer.submit([Write("checkpoint", path, copied)], str(path), step)
            writer.supersede(str(path), supersede_step)  # the epoch's end, at once
            writer.wait()
            assert writer.superseded == stopped
            kept = load_checkpoint_file(path, mmap=True)["step"]
            assert kept == (1 if step == supersede_step else step)  # stopped: the previous
        assert list(tmp_path.glob(".*.tmp")) == []  # the stopped write's temp file is gone
    finally:
        writer.close()


def _stop_after(k: int):
    """A `stop` for `save_checkpoint_file` that lets `k` records through, then stops."""
    calls = iter(range(10**6))
    return lambda nbytes: next(calls) >= k


def test_a_write_stopped_at_any_record_leaves_the_old_file_or_the_whole_new_one(tmp_path):
    path = tmp_path / "last.pt"
    new = {"step": 2, **{f"t{i}": torch.full((1000,), float(i)) for i in range(6)}}
    records = 0

    def count(nbytes: int) -> bool:
        nonlocal records
        records += 1
        return False

    save_checkpoint_file(new, tmp_path / "probe.pt", stop=count)
    assert records > 6  # one write per record at least
    for k in range(records + 1):
        save_checkpoint_file({"step": 1}, path)
        try:
            save_checkpoint_file(new, path, stop=_stop_after(k))
        except WriteError:
            assert k < records  # stopped: the previous file
            assert load_checkpoint_file(path)["step"] == 1
        else:
            assert k == records  # never asked to stop: the new one, whole
            assert torch.equal(load_checkpoint_file(path)["t5"], new["t5"])
        assert list(tmp_path.glob(".*.tmp")) == []


Pair = collections.namedtuple("Pair", "a b")


@pytest.mark.parametrize("writer_type", ["process", "thread"])
def test_layouts_quantized_tensors_and_tuple_types_come_back_as_torch_save_keeps_them(
    tmp_path, writer_type
):
    """The writer process's copy keeps what `torch.save` keeps: a transposed or channels_last
    tensor's strides (a resumed optimizer state matches its parameter's layout), a
    quantized tensor (its bytes go through torch's pickler: copying them into shared memory
    crashed), `torch.Size` and named tuples."""
    state = {
        "t": torch.randn(4, 6).t(),
        "nhwc": torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last),
        "q": torch.quantize_per_tensor(torch.randn(5), 0.1, 3, torch.qint8),
        "size": torch.Size([2, 3]),
        "pair": Pair(torch.ones(2), 3),
    }
    torch.save(state, tmp_path / "sync.pt")
    thread = writer_type == "thread"
    writer = CheckpointWriter() if thread else checkpoint_process.ProcessWriter()
    try:
        copied = writer.snapshot("checkpoint", state)
        writer.submit([Write("checkpoint", tmp_path / "async.pt", copied)], "async.pt")
        writer.wait()
    finally:
        writer.close()
    ours = torch.load(tmp_path / "async.pt", weights_only=False)
    theirs = torch.load(tmp_path / "sync.pt", weights_only=False)
    for name in ("t", "nhwc"):
        assert ours[name].stride() == theirs[name].stride() == state[name].stride()
        assert torch.equal(ours[name], state[name])
    assert torch.equal(ours["q"].int_repr(), state["q"].int_repr())
    assert (ours["q"].q_scale(), ours["q"].q_zero_point()) == (0.1, 3)
    assert type(ours["size"]) is torch.Size
    assert type(ours["pair"]) is Pair
    assert ours["pair"].b == 3


def test_async_checkpointing_null_writes_in_the_background_where_it_was_measured_to_win():
    from torch import nn

    from traineval import TrainingConfig
    from traineval.training.run_checkpoints import BACKGROUND_FROM, writes_in_background

    cpu = torch.device("cpu")
    large = nn.Linear(2048, 6144)  # 48 MiB of weights and 24 KiB of bias
    small = nn.Linear(2048, 6140)  # 8 KiB below the line
    assert sum(p.numel() * 4 for p in small.parameters()) < BACKGROUND_FROM
    auto = TrainingConfig()
    assert auto.async_checkpointing is None
    assert writes_in_background(auto, cpu, large)
    assert not writes_in_background(auto, cpu, small)
    assert not writes_in_background(auto, torch.device("cuda"), large)  # until measured
    assert not writes_in_background(auto, cpu, large, sharded=True)  # measured: no gain
    assert not writes_in_background(TrainingConfig(checkpoint_writer="thread"), cpu, large)
    assert not writes_in_background(TrainingConfig(async_checkpointing=False), cpu, large)
    assert writes_in_background(TrainingConfig(async_checkpointing=True), cpu, small)


def test_async_checkpointing_null_stays_in_place_when_its_copy_would_crowd_memory(monkeypatch):
    from torch import nn

    from traineval import TrainingConfig
    from traineval.training import run_checkpoints

    large = nn.Linear(2048, 6144)  # 48 MiB: its copy with AdamW's moments, 144 MiB
    monkeypatch.setattr(run_checkpoints, "available_memory", lambda: 4 * 144 * 2**20 + 4 * 2**20)
    assert run_checkpoints.writes_in_background(TrainingConfig(), torch.device("cpu"), large)
    monkeypatch.setattr(run_checkpoints, "available_memory", lambda: 4 * 144 * 2**20 - 1)
    assert not run_checkpoints.writes_in_background(TrainingConfig(), torch.device("cpu"), large)
    assert run_checkpoints.available_memory() > 0  # this machine's, read for real


def test_a_named_tuple_batch_moves_to_a_device_as_a_named_tuple():
    from traineval.system.devices import move_to_device

    moved = move_to_device(Pair(torch.ones(2), [torch.zeros(1)]), torch.device("cpu"))
    assert type(moved) is Pair
    assert torch.equal(moved.a, torch.ones(2))
    assert type(moved.b) is list
