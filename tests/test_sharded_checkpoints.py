"""Sharded checkpoints (torch.distributed.checkpoint) in one process: a run that writes them
resumes exactly like one that never stopped and trains like one writing full checkpoints;
they load whole into a plain model; a stranger's shard folder runs nothing and escapes
nothing. The multi-rank cases (FSDP writes, loads 2 -> 1, 2 -> 2, 1 -> 2) are in
tests/test_distributed.py."""

from __future__ import annotations

import json
import os
import pickle
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import traineval
from traineval import TrainingConfig, TrainingManager
from traineval.cli import main
from traineval.runs.checkpoint import (
    CheckpointError,
    load_checkpoint_file,
    remove_stale_temporaries,
    save_checkpoint_file,
)
from traineval.training.loop import TrainingInterrupted
from traineval.training.optim import OptimizerChoice, build_optimizer

from conftest import InterruptAt, make_classification
from test_resume import config as resume_config
from test_resume import dropout_mlp as mlp


def loaders():
    generator = torch.Generator().manual_seed(123)
    train = DataLoader(
        make_classification(n=96, seed=1), batch_size=8, shuffle=True, generator=generator
    )
    return train, DataLoader(make_classification(n=40, seed=2), batch_size=20)


def config(path: Path, sharding: str = "sharded", **overrides) -> TrainingConfig:
    """test_resume's run (cosine schedule with warmup, evaluations, seed), 3 epochs of 12
    updates, a checkpoint every 4."""
    settings = {"num_epochs": 3, "gradient_accumulation_steps": 1, "checkpoint_every_n_steps": 4}
    return resume_config(path, **{**settings, "checkpoint_sharding": sharding, **overrides})


def shard_folders(run: Path, name: str = "last") -> list[Path]:
    return sorted((run / "checkpoints").glob(f"{name}.shards-*"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three runs of one job: full checkpoints; sharded; sharded, stopped at update 17 and
    resumed (12 updates per epoch)."""
    root = tmp_path_factory.mktemp("sharded")
    models = {}
    for name, sharding in (("full", "full"), ("sharded", "sharded")):
        models[name] = mlp(0)
        TrainingManager(config(root / name, sharding)).train(models[name], *loaders())
    with pytest.raises(TrainingInterrupted):
        TrainingManager(config(root / "resumed")).train(
            mlp(0), *loaders(), callbacks=[InterruptAt(17)]
        )
    assert load_checkpoint_file(root / "resumed" / "checkpoints" / "last.pt")["global_step"] == 17
    models["resumed"] = mlp(99)  # other weights: the checkpoint must win
    TrainingManager(config(root / "resumed")).train(
        models["resumed"], *loaders(), resume_from="auto"
    )
    return root, models


def test_a_sharded_run_trains_like_a_full_one_and_resumes_exactly(runs):
    root, models = runs
    for name in ("sharded", "resumed"):
        for key, value in models["full"].state_dict().items():
            assert torch.equal(models[name].state_dict()[key], value), (name, key)
    losses = [
        [
            r["train_step_loss"]
            for r in traineval.loggers.read_jsonl(root / n / "metrics.jsonl")
            if r["event"] == "train"
        ]
        for n in ("full", "sharded", "resumed")
    ]
    assert losses[0] == losses[1] == losses[2]


def test_a_sharded_checkpoint_keeps_its_tensors_in_one_folder_beside_the_file(runs):
    root, _ = runs
    saved = torch.load(root / "sharded" / "checkpoints" / "last.pt", weights_only=True)
    assert "model" not in saved
    assert "optimizer" not in saved
    folders = shard_folders(root / "sharded")
    assert [f.name for f in folders] == [saved["shards"]]  # the earlier saves' are gone
    assert (folders[0] / ".metadata").is_file()
    assert len(shard_folders(root / "sharded", "best")) == 1
    assert torch.load(root / "full" / "checkpoints" / "last.pt")["shards"] is None


def test_a_sharded_checkpoint_loads_whole_into_a_plain_model_and_optimizer(runs):
    root, models = runs
    whole = load_checkpoint_file(root / "sharded" / "checkpoints" / "last.pt")
    for key, value in models["full"].state_dict().items():
        assert torch.equal(whole["model"][key], value), key
    model = mlp(5)
    optimizer = build_optimizer(
        model, OptimizerChoice("adamw", lr=1.0, weight_decay=0.01)
    )  # as the run's
    reference_model = mlp(5)
    reference = build_optimizer(
        reference_model, OptimizerChoice("adamw", lr=1.0, weight_decay=0.01)
    )
    payload = traineval.load_checkpoint(
        root / "sharded" / "checkpoints" / "last.pt", model, optimizer=optimizer
    )
    traineval.load_checkpoint(
        root / "full" / "checkpoints" / "last.pt", reference_model, optimizer=reference
    )
    assert payload["global_step"] == 36
    for key, value in models["full"].state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    mine, theirs = optimizer.state_dict(), reference.state_dict()
    assert mine["param_groups"] == theirs["param_groups"]
    for index, state in theirs["state"].items():
        for name, value in state.items():
            assert torch.equal(mine["state"][index][name], value), (index, name)


def test_another_models_sharded_checkpoint_is_refused_naming_what_differs(runs):
    root, _ = runs
    other = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    with pytest.raises(ValueError, match=r"0\.weight"):
        traineval.load_checkpoint(root / "sharded" / "checkpoints" / "last.pt", other)


def test_evaluate_reads_a_sharded_run_and_matches_fit(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["demo", "-q", "data.name=wine", "model.name=mlp", "model.options={}"]
    args += ["training.num_epochs=2", "training.checkpoint_sharding=sharded"]
    assert main([*args, f"training.output_dir={run}"]) == 0
    assert shard_folders(run, "best")
    fitted = json.loads((run / "evaluation" / "metrics.json").read_text())["test"]
    export = str(run / "checkpoints" / "best.safetensors")
    for checkpoint in ("best", export):  # best.pt's folder, and the file written from it
        assert main(["evaluate", str(run), "--checkpoint", checkpoint]) == 0
        saved = json.loads((run / "evaluation" / "metrics_test.json").read_text())
        assert saved["metrics"] == fitted, checkpoint
    model = traineval.load_model(run)
    assert isinstance(model, nn.Module)


def copy_run(runs, tmp_path) -> Path:
    import shutil

    root, _ = runs
    shutil.copytree(root / "sharded" / "checkpoints", tmp_path / "checkpoints")
    return tmp_path / "checkpoints"


def test_a_missing_or_outside_shard_folder_is_named(runs, tmp_path):
    folder = copy_run(runs, tmp_path)
    payload = torch.load(folder / "last.pt", weights_only=True)
    for name, said in (
        ("../sharded/checkpoints/" + payload["shards"], "not a shard folder beside it"),
        ("/etc", "not a shard folder beside it"),
        ("last.shards-00000000", "missing or incomplete"),
    ):
        save_checkpoint_file({**payload, "shards": name}, folder / "odd.pt")
        with pytest.raises(CheckpointError, match=said):
            load_checkpoint_file(folder / "odd.pt")
        with pytest.raises(CheckpointError, match=said):
            traineval.load_checkpoint(folder / "odd.pt", mlp(0))


class Runs:
    """Pickled, runs `touch` on the marker path: what a hostile file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hostile_metadata_is_refused_and_nothing_in_it_runs(runs, tmp_path):
    folder = copy_run(runs, tmp_path)
    shards = folder / torch.load(folder / "last.pt", weights_only=True)["shards"]
    marker = tmp_path / "ran"
    (shards / ".metadata").write_bytes(pickle.dumps(Runs(marker)))
    with pytest.raises(CheckpointError, match=r"unsafe metadata .*posix\.system|os\.system"):
        load_checkpoint_file(folder / "last.pt")
    with pytest.raises(CheckpointError, match="unsafe metadata"):
        traineval.load_checkpoint(folder / "last.pt", mlp(0))
    assert not marker.exists()


def test_metadata_naming_a_file_outside_its_folder_is_refused(runs, tmp_path):
    from traineval.runs.sharded import read_metadata

    folder = copy_run(runs, tmp_path)
    shards = folder / torch.load(folder / "last.pt", weights_only=True)["shards"]
    metadata = read_metadata(shards)
    for info in metadata.storage_data.values():
        info.relative_path = "../../elsewhere.distcp"
    (shards / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match="names a file outside the folder"):
        load_checkpoint_file(folder / "last.pt")


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_hostile_entry_in_a_shard_file_is_not_unpickled(tmp_path):
    import torch.distributed.checkpoint as dcp

    from traineval.runs.sharded import read_whole

    marker = tmp_path / "ran"
    state = {"model": {"w": torch.ones(2)}, "optimizer": {"extra": Runs(marker)}}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp_path / "x.shards-1"), no_dist=True)
    with pytest.raises(CheckpointError, match="truncated, corrupt or of another model"):
        read_whole(tmp_path / "x.shards-1")
    assert not marker.exists()


def test_a_truncated_shard_file_is_named(runs, tmp_path):
    folder = copy_run(runs, tmp_path)
    shards = folder / torch.load(folder / "last.pt", weights_only=True)["shards"]
    for data in shards.glob("*.distcp"):
        data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=str(shards.name)):
        load_checkpoint_file(folder / "last.pt")


def test_a_claim_removes_shard_folders_no_file_names_and_keeps_the_rest(runs, tmp_path):
    folder = copy_run(runs, tmp_path)
    named = folder / torch.load(folder / "last.pt", weights_only=True)["shards"]
    killed = folder / "last.shards-deadbeef"  # a save killed before it replaced last.pt
    orphan = folder / "gone.shards-0badf00d"  # its file was deleted
    kept = folder / "broken.shards-12345678"  # its file is unreadable: may be its shards
    for path in (killed, orphan, kept):
        path.mkdir()
    (folder / "broken.pt").write_bytes(b"not a zip")
    removed = remove_stale_temporaries(folder)
    assert sorted(removed) == sorted([killed, orphan])
    assert named.is_dir()
    assert kept.is_dir()
    assert load_checkpoint_file(folder / "last.pt")["global_step"] == 36


def test_checkpoint_sharding_is_checked_with_the_field_named():
    with pytest.raises(ValueError, match=r"checkpoint_sharding.*'halves'.*auto"):
        TrainingConfig(checkpoint_sharding="halves")


def _metadata_variants(metadata):
    """Hostile or malformed `.metadata` records, each as bytes."""
    import copy

    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    def changed(edit):
        record = copy.deepcopy(metadata)
        edit(record)
        return pickle.dumps(record)

    tensor = next(
        k for k, v in metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)
    )

    def negative(record):
        record.state_dict_metadata[tensor].size = torch.Size([-3, 8])

    def huge(record):
        record.state_dict_metadata[tensor].size = torch.Size([10**6, 10**6])

    def far_index(record):
        key = next(iter(record.planner_data))
        record.planner_data[key] = ("optimizer", "param_groups", 20_000_000, "lr")

    def listed(record):
        record.storage_data = [1]

    def no_dtype(record):
        record.state_dict_metadata[tensor].properties = None

    return {
        "protocol 9": b"\x80\x09" + pickle.dumps(metadata)[2:],
        "windows path": pickle.dumps(__import__("pathlib").PureWindowsPath("C:/x")),
        "negative size": changed(negative),
        "larger than the data": changed(huge),
        "a list padded to an index": changed(far_index),
        "storage as a list": changed(listed),
        "no dtype": changed(no_dtype),
    }


def test_malformed_metadata_is_a_checkpoint_error_before_anything_is_allocated(runs, tmp_path):
    from traineval.runs.shard_metadata import read_metadata

    folder = copy_run(runs, tmp_path)
    shards = folder / torch.load(folder / "last.pt", weights_only=True)["shards"]
    good = (shards / ".metadata").read_bytes()
    variants = _metadata_variants(read_metadata(shards))
    for said in variants:  # each must fail on its own: pytest names the one that did not
        (shards / ".metadata").write_bytes(variants[said])
        for load in (
            lambda: load_checkpoint_file(folder / "last.pt"),
            lambda: traineval.load_checkpoint(folder / "last.pt", mlp(0)),
            lambda: traineval.load_checkpoint(
                folder / "last.pt",
                (m := mlp(0)),
                optimizer=build_optimizer(m, OptimizerChoice("adamw", lr=1.0)),
            ),
        ):
            with pytest.raises(CheckpointError, match=r"shard folder .*last\.shards-"):
                load()
    (shards / ".metadata").write_bytes(good)
    assert load_checkpoint_file(folder / "last.pt")["global_step"] == 36


def test_links_and_pipes_in_a_shard_folder_are_refused(runs, tmp_path):
    folder = copy_run(runs, tmp_path)
    shards = folder / torch.load(folder / "last.pt", weights_only=True)["shards"]
    data = next(shards.glob("*.distcp"))
    outside = tmp_path / "outside.distcp"
    data.rename(outside)
    data.symlink_to(outside)
    with pytest.raises(CheckpointError, match="other than a regular file"):
        load_checkpoint_file(folder / "last.pt")
    data.unlink()
    os.mkfifo(data)  # reading it would wait forever
    with pytest.raises(CheckpointError, match="other than a regular file"):
        load_checkpoint_file(folder / "last.pt")
    data.unlink()
    outside.rename(data)
    moved = tmp_path / "elsewhere"
    shards.rename(moved)
    shards.symlink_to(moved)
    with pytest.raises(CheckpointError, match="is a link"):
        load_checkpoint_file(folder / "last.pt")
    assert remove_stale_temporaries(folder) == []  # named by last.pt: kept, and not followed
    assert moved.is_dir()


def test_a_reader_follows_a_save_that_replaced_the_file_meanwhile(runs, tmp_path, monkeypatch):
    import shutil

    from traineval.runs import sharded

    folder = copy_run(runs, tmp_path)
    payload = torch.load(folder / "last.pt", weights_only=True)
    old = folder / payload["shards"]
    new = folder / "last.shards-0000beef"
    shutil.copytree(old, new)
    read = sharded.read_whole

    def save_meanwhile(shards):  # what a run still training does between two reads
        if shards == old:
            save_checkpoint_file(
                {**payload, "shards": new.name, "global_step": 37}, folder / "last.pt"
            )
            shutil.rmtree(old)
        return read(shards)

    monkeypatch.setattr(sharded, "read_whole", save_meanwhile)
    assert load_checkpoint_file(folder / "last.pt")["global_step"] == 37


def test_names_are_matched_exactly_not_as_patterns(tmp_path):
    from traineval.runs.shard_folders import remove_older

    for name in ("keep1.shards-aa", "keep2.shards-bb", "keep[12].shards-cc", "keep[12].shards-dd"):
        (tmp_path / name).mkdir()
    remove_older(tmp_path, "keep[12]", keep="keep[12].shards-cc")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["keep1.shards-aa", "keep2.shards-bb", "keep[12].shards-cc"]


@pytest.mark.parametrize("background", [False, True], ids=["sync", "async"])
def test_a_failed_sharded_save_is_a_write_error_and_keeps_the_previous_checkpoint(
    tmp_path, monkeypatch, background
):
    import errno

    import torch.distributed.checkpoint as dcp

    from traineval import Callback
    from traineval.system.files import WriteError

    last = tmp_path / "run" / "checkpoints" / "last.pt"

    class FullDiskAt(Callback):
        def on_step_end(self, loop):
            if loop.state.global_step == 7:
                # the disk fills once update 4's save is on disk (a background write may
                # still be going on a loaded machine; the full disk is for the next save)
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and not written_at(last, 4):
                    time.sleep(0.01)

                def full(*args, **kwargs):
                    raise OSError(errno.ENOSPC, "No space left on device")

                monkeypatch.setattr(dcp.FileSystemWriter, "write_data", full)

    # (the next write is last.pt's, or a best.pt the write budget put off, written first)
    with pytest.raises(WriteError, match=r"could not write .*(last|best)\.pt': No space left"):
        TrainingManager(config(tmp_path / "run", async_checkpointing=background)).train(
            mlp(0), *loaders(), callbacks=[FullDiskAt()]
        )
    assert load_checkpoint_file(tmp_path / "run" / "checkpoints" / "last.pt")["global_step"] == 4
    assert len(shard_folders(tmp_path / "run")) == 1  # the failed save's folder is gone


def written_at(path, step):
    """Whether checkpoint `path` is on disk, written at update `step`."""
    try:
        return load_checkpoint_file(path, mmap=True)["global_step"] == step
    except Exception:  # not there yet, or replaced while read
        return False


def test_resuming_in_the_other_mode_leaves_no_stale_files(tmp_path):
    run = tmp_path / "run"
    for first, then in (("sharded", "full"), ("full", "sharded")):
        with pytest.raises(TrainingInterrupted):
            TrainingManager(config(run, first, overwrite_output_dir=True)).train(
                mlp(0), *loaders(), callbacks=[InterruptAt(17)]
            )
        TrainingManager(config(run, then)).train(mlp(0), *loaders(), resume_from="auto")
        folder = run / "checkpoints"
        for name in ("last", "best"):  # every shard folder left is the one its file names
            named = torch.load(folder / f"{name}.pt", weights_only=True)["shards"]
            assert [f.name for f in shard_folders(run, name)] == ([named] if named else [])
        from safetensors.torch import load_file

        exported = load_file(folder / "best.safetensors")  # best.pt's weights, either mode
        best = load_checkpoint_file(folder / "best.pt")["model"]
        assert exported.keys() == best.keys()
        assert all(torch.equal(exported[k], v) for k, v in best.items())
        assert torch.load(folder / "last.pt", weights_only=True)["shards"] is None or (
            then == "sharded"
        )


def test_an_explicit_resume_path_reads_the_shards_in_place_and_checks_them(runs, tmp_path):
    from traineval.runs.resume import find_checkpoint

    folder = copy_run(runs, tmp_path)
    _, payload = find_checkpoint(tmp_path, folder / "last.pt")
    assert "model" not in payload
    assert Path(payload["shards"]).is_dir()
    data = next(Path(payload["shards"]).glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="is truncated"):
        find_checkpoint(tmp_path, folder / "last.pt")


def test_an_optimizer_without_its_model_is_refused_and_map_location_may_be_a_mapping(runs):
    root, models = runs
    path = root / "sharded" / "checkpoints" / "last.pt"
    model = mlp(0)
    with pytest.raises(ValueError, match="keyed by parameter name: pass the model too"):
        traineval.load_checkpoint(
            path, optimizer=build_optimizer(model, OptimizerChoice("adamw", lr=1.0))
        )
    whole = load_checkpoint_file(path, map_location={"cuda:0": "cpu"})
    for key, value in models["full"].state_dict().items():
        assert torch.equal(whole["model"][key], value), key


class WithExtraState(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(8, 3)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.net(x)

    def get_extra_state(self):
        return {"calls": self.calls}

    def set_extra_state(self, state):
        self.calls = state["calls"]


def test_a_model_with_extra_state_loads_from_its_sharded_checkpoint(tmp_path):
    model = WithExtraState()
    TrainingManager(config(tmp_path / "run", num_epochs=1)).train(model, *loaders())
    loaded = WithExtraState()
    traineval.load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt", loaded)
    assert torch.equal(loaded.net.weight, model.net.weight)
    assert loaded.calls > 0


def test_a_sharded_best_is_exported_as_the_full_runs_best_safetensors(runs, tmp_path):
    """best.safetensors beside a sharded best.pt holds the full run's best weights, and
    the same bytes whether the folder is read a tensor at a time or all at once."""
    from safetensors.torch import load_file

    from traineval.runs.shard_export import export_safetensors

    root, _ = runs
    ours = root / "sharded" / "checkpoints" / "best.safetensors"
    reference = load_file(root / "full" / "checkpoints" / "best.safetensors")
    exported = load_file(ours)
    assert exported.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(exported[key], value), key
    best = torch.load(root / "sharded" / "checkpoints" / "best.pt", weights_only=True)
    shards = root / "sharded" / "checkpoints" / best["shards"]
    one_at_a_time = export_safetensors(shards, tmp_path / "small.safetensors", batch_bytes=1)
    assert one_at_a_time.read_bytes() == ours.read_bytes()
    model = mlp(7)
    traineval.load_checkpoint(ours, model)
    for key, value in reference.items():
        assert torch.equal(model.state_dict()[key], value), key


class Tied(nn.Module):
    """An embedding and an output layer sharing one weight, as language models do."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 8, bias=False)
        self.hidden = nn.Linear(8, 8)
        self.head = nn.Linear(8, 8, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x):
        return self.head(torch.relu(self.hidden(self.embed(x))))[:, :3]


def test_a_sharded_best_of_a_tied_model_stores_the_weight_once_and_loads_tied(tmp_path):
    from safetensors import safe_open

    from traineval.runs.shard_export import tied_names

    model = Tied()
    assert tied_names(model) == {"head.weight"}
    TrainingManager(config(tmp_path / "run", num_epochs=1)).train(model, *loaders())
    best = tmp_path / "run" / "checkpoints" / "best.safetensors"
    with safe_open(best, "pt") as handle:
        assert sorted(handle.keys()) == ["embed.weight", "hidden.bias", "hidden.weight"]
        assert handle.metadata() == {"format": "pt"}
    loaded = Tied()
    traineval.load_checkpoint(best, loaded)
    assert loaded.head.weight is loaded.embed.weight
    whole = load_checkpoint_file(tmp_path / "run" / "checkpoints" / "best.pt")
    assert torch.equal(loaded.embed.weight, whole["model"]["embed.weight"])


def test_sharded_saves_in_the_background_write_the_synchronous_files_and_resume_exactly(
    runs, tmp_path, monkeypatch
):
    """async_checkpointing with sharded checkpoints: each save is copied, then written by
    the writer thread (the folder, best.safetensors from it, then the file naming it); the
    files equal the synchronous run's, and a run stopped at update 17 resumes to its end."""
    import threading

    from safetensors.torch import load_file

    from traineval.runs.shard_writer import ShardWriter

    written = []
    perform = ShardWriter._perform

    def spy(self, write):
        written.append((write.kind, write.path.name, threading.current_thread().name))
        perform(self, write)

    monkeypatch.setattr(ShardWriter, "_perform", spy)
    root, models = runs
    run = tmp_path / "async"
    with pytest.raises(TrainingInterrupted):
        TrainingManager(config(run, async_checkpointing=True)).train(
            mlp(0), *loaders(), callbacks=[InterruptAt(17)]
        )
    model = mlp(99)
    TrainingManager(config(run, async_checkpointing=True)).train(
        model, *loaders(), resume_from="auto"
    )
    for key, value in models["full"].state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert {thread for *_, thread in written} == {"traineval-checkpoint"}
    kinds = [kind for kind, *_ in written]
    assert kinds.count("shards") == kinds.count("files") > 9  # every 4 updates, epochs
    # best.pt with best.safetensors: its files, or the whole save if the budget put it off
    assert {kind for kind, name, _ in written if name == "best.pt"} <= {"files", "call"}
    assert any(name == "best.pt" for _, name, _ in written)
    for name in ("last", "best"):
        ours = load_checkpoint_file(run / "checkpoints" / f"{name}.pt")
        theirs = load_checkpoint_file(root / "sharded" / "checkpoints" / f"{name}.pt")
        assert ours["global_step"] == theirs["global_step"]
        for key, value in theirs["model"].items():
            assert torch.equal(ours["model"][key], value), (name, key)
        for index, state in theirs["optimizer"]["state"].items():
            for item, value in state.items():
                assert torch.equal(ours["optimizer"]["state"][index][item], value)
        assert [f.name for f in shard_folders(run, name)] == [ours["shards"].rpartition("/")[2]]
    exported = load_file(run / "checkpoints" / "best.safetensors")
    reference = load_file(root / "sharded" / "checkpoints" / "best.safetensors")
    assert exported.keys() == reference.keys()
    assert all(torch.equal(exported[k], v) for k, v in reference.items())


def test_a_sharded_best_the_write_budget_puts_off_is_written_later_as_it_was(
    runs, tmp_path, monkeypatch
):
    """One process: a deferrable sharded save beyond the write budget was written at once
    (the budget held only for full checkpoints); it is now copied when asked and written
    later, and the files equal those of the run that wrote each save at once."""
    from safetensors.torch import load_file

    from traineval.runs.checkpoint_writer import WriteBudget
    from traineval.training import run_checkpoints

    monkeypatch.setattr(WriteBudget, "allows", lambda self: False)
    later = []
    write_later = run_checkpoints._write_later

    def spy(shards, path, copy, skip):
        later.append(path.name)
        write_later(shards, path, copy, skip)

    monkeypatch.setattr(run_checkpoints, "_write_later", spy)
    root, _ = runs
    run = tmp_path / "put_off"
    TrainingManager(config(run)).train(mlp(0), *loaders())
    assert "best.pt" in later
    ours = load_checkpoint_file(run / "checkpoints" / "best.pt")
    theirs = load_checkpoint_file(root / "sharded" / "checkpoints" / "best.pt")
    assert ours["global_step"] == theirs["global_step"]
    for key, value in theirs["model"].items():
        assert torch.equal(ours["model"][key], value), key
    assert [f.name for f in shard_folders(run, "best")] == [ours["shards"].rpartition("/")[2]]
    exported = load_file(run / "checkpoints" / "best.safetensors")
    reference = load_file(root / "sharded" / "checkpoints" / "best.safetensors")
    assert all(torch.equal(exported[k], reference[k]) for k in reference)
