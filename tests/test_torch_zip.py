"""The writer process's files, made without torch, against torch's and safetensors' own:
every record of a checkpoint equal to `torch.save`'s, data aligned for `torch.load(mmap=
True)`, zip64 where offsets or counts need it, a stop at any record leaving the previous
file or the whole new one, and safetensors files equal to the library's bytes."""

from __future__ import annotations

import mmap
import struct
import zipfile

import pytest
import torch

from test_checkpoint_process import _state as process_state
from traineval.runs import checkpoint_process, file_plans, torch_zip, write_worker
from traineval.runs.checkpoint import load_checkpoint_file, save_checkpoint_file

pytestmark = pytest.mark.skipif(
    not checkpoint_process.available(), reason="the writer process needs Linux (memfd)"
)


def _state():
    """The writer process's test state, with a sparse tensor and integers beside it."""
    state = process_state()
    state.update(sparse=torch.eye(3).to_sparse(), ints=torch.arange(9).view(3, 3))
    return state


def _planned_file(tmp_path, state, name="async.pt", options=None):
    """`state` copied into an arena and written by the writer process's code, in-process."""
    arena = checkpoint_process.Arena()
    value = checkpoint_process._in_arena(checkpoint_process._into(state, arena), arena)
    plan = file_plans.checkpoint_plan(value, arena.place)
    plan["options"].update(options or {})
    mapping = mmap.mmap(arena.fd, arena.size, prot=mmap.PROT_READ)
    path = tmp_path / name
    write_worker._write_file("torch", path, plan, mapping, lambda nbytes: False)
    return path, plan


def _records(path):
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None  # every CRC-32 right
        return [(i.filename.split("/", 1)[1], archive.read(i)) for i in archive.infolist()]


def _data_offsets(path):
    """Where each record's data starts, from its local header."""
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        offsets = {}
        for info in archive.infolist():
            names, extra = struct.unpack_from("<HH", raw, info.header_offset + 26)
            offsets[info.filename] = info.header_offset + 30 + names + extra
        return offsets


def test_every_record_equals_torch_saves_and_the_data_is_aligned(tmp_path):
    state = _state()
    torch.save(state, tmp_path / "sync.pt")
    path, _ = _planned_file(tmp_path, state)
    ours, torchs = _records(path), _records(tmp_path / "sync.pt")
    assert [name for name, _ in ours] == [name for name, _ in torchs]
    different = [name for (name, a), (_, b) in zip(ours, torchs, strict=True) if a != b]
    assert different == [".data/serialization_id"]  # random per file, in torch too
    assert all(offset % 64 == 0 for offset in _data_offsets(path).values())
    for mapped in (False, True):
        loaded = torch.load(path, weights_only=True, mmap=mapped)
        assert torch.equal(loaded["model"]["embed"], state["model"]["embed"])
        assert loaded["model"]["embed"].data_ptr() == loaded["model"]["head"].data_ptr()
        assert torch.equal(loaded["sparse"].to_dense(), torch.eye(3))
        assert loaded["empty"].shape == (0,)
        assert loaded["step"] == 7


@pytest.mark.parametrize("limit", [0, 600])  # every field zip64, or those past byte 600
def test_zip64_fields_are_read_by_torch_and_by_zipfile(tmp_path, limit):
    state = _state()
    path, _ = _planned_file(tmp_path, state, options={"zip64_limit": limit})
    assert _records(path)[0][0] == "data.pkl"
    loaded = load_checkpoint_file(path)
    assert torch.equal(loaded["ints"], state["ints"])
    assert torch.equal(loaded["model"]["bias"], state["model"]["bias"])


def test_more_records_than_a_plain_zip_counts_are_read_by_torchs_reader(tmp_path):
    records = [(f"data/{i}", i.to_bytes(4, "little")) for i in range(70_000)]  # > 65,535
    records.append(("version", b"3\n"))
    path = tmp_path / "many.pt"
    with path.open("wb") as handle:
        torch_zip.write_archive(handle, "many", records, None)
    reader = torch._C.PyTorchFileReader(str(path))
    assert len(reader.get_all_records()) == 70_001
    assert reader.get_record("data/69999") == (69_999).to_bytes(4, "little")
    with zipfile.ZipFile(path) as archive:
        assert len(archive.infolist()) == 70_001


def test_without_checksums_the_crcs_are_zero_and_torch_loads_it(tmp_path):
    state = {"w": torch.randn(100)}
    path, _ = _planned_file(tmp_path, state, options={"checksums": False})
    with zipfile.ZipFile(path) as archive:
        assert {info.CRC for info in archive.infolist()} == {0}
    assert torch.equal(torch.load(path, weights_only=True)["w"], state["w"])


def test_a_record_outside_the_buffer_is_refused(tmp_path):
    with (tmp_path / "x.pt").open("wb") as handle, pytest.raises(ValueError, match="outside"):
        torch_zip.write_archive(handle, "x", [("data/0", (8, 100))], b"0123456789")


def _stop_after(k: int):
    """A `stop` that lets `k` asks through, then stops."""
    calls = iter(range(10**6))
    return lambda nbytes: next(calls) >= k


def test_a_stop_at_any_record_leaves_the_old_file_or_the_whole_new_one(tmp_path):
    state = {"step": 2, **{f"t{i}": torch.full((1000,), float(i)) for i in range(5)}}
    arena = checkpoint_process.Arena()
    plan = file_plans.checkpoint_plan(checkpoint_process._into(state, arena), arena.place)
    mapping = mmap.mmap(arena.fd, arena.size, prot=mmap.PROT_READ)
    path = tmp_path / "last.pt"
    asked = len(plan["records"]) + 1  # before each record, and before the fsync
    for k in range(asked + 1):
        save_checkpoint_file({"step": 1}, path)
        try:
            write_worker._write_file("torch", path, plan, mapping, _stop_after(k))
        except torch_zip.Stopped:
            assert k < asked
            assert load_checkpoint_file(path)["step"] == 1  # the previous file
        else:
            assert k == asked
            assert torch.equal(load_checkpoint_file(path)["t4"], state["t4"])
        assert list(tmp_path.glob(".*.tmp")) == []


def test_a_safetensors_plan_writes_the_librarys_bytes(tmp_path):
    from safetensors.torch import load_file, save

    tensors = {
        "z": torch.randn(2, 3),
        "a": torch.randn(3, dtype=torch.float16),
        "m": torch.arange(4, dtype=torch.int64),
        "q": torch.empty(0),
        "b": torch.tensor([True, False]),
    }
    arena = checkpoint_process.Arena()
    plan = file_plans.safetensors_plan(checkpoint_process._into(tensors, arena), arena.place)
    mapping = mmap.mmap(arena.fd, arena.size, prot=mmap.PROT_READ)
    path = tmp_path / "best.safetensors"
    write_worker._write_file("bytes", path, plan, mapping, lambda nbytes: False)
    assert path.read_bytes() == save(tensors, metadata={"format": "pt"})
    loaded = load_file(path)
    assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors.items())


def test_a_dtype_safetensors_cannot_store_is_named():
    with pytest.raises(ValueError, match=r"'z' of dtype torch.complex128"):
        file_plans.safetensors_plan(
            {"z": torch.zeros(2, dtype=torch.complex128)}, lambda p, n: None
        )


def test_the_writer_process_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, traineval.runs.write_worker; print('torch' in sys.modules)"
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert found.stdout.strip() == "False", found.stderr


def test_a_safetensors_plan_of_equal_widths_and_unicode_names_loads_the_same_tensors(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors = {
        "b": torch.randn(3),
        "a": torch.arange(3, dtype=torch.int32),
        "h\u00e9": torch.randn(2, dtype=torch.bfloat16),
        "g": torch.randn(2, dtype=torch.float16),
    }
    arena = checkpoint_process.Arena()
    plan = file_plans.safetensors_plan(checkpoint_process._into(tensors, arena), arena.place)
    mapping = mmap.mmap(arena.fd, arena.size, prot=mmap.PROT_READ)
    path = tmp_path / "best.safetensors"
    write_worker._write_file("bytes", path, plan, mapping, lambda nbytes: False)
    loaded = load_file(path)
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors.items())
    assert "h\u00e9".encode() in path.read_bytes()  # UTF-8, as the library writes names
    with safe_open(path, "pt") as opened:
        assert opened.metadata() == {"format": "pt"}
