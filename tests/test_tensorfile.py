"""Our positioned-I/O safetensors reader and planned writer against the safetensors library itself."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from regmean.errors import RegmeanError
from regmean.io.tensorfile import TensorFile
from regmean.io.writer import ShardedWriter

TENSORS = {
    "f32": torch.randn(3, 5),
    "f64": torch.randn(7, dtype=torch.float64),
    "bf16": torch.randn(4, 4).to(torch.bfloat16),
    "f16": torch.randn(2, 3).to(torch.float16),
    "i64": torch.arange(6).reshape(2, 3),
    "u8": torch.arange(5, dtype=torch.uint8),
    "bool": torch.tensor([True, False, True]),
    "scalar": torch.tensor(2.5),
    "empty": torch.empty(0, 4),
}


def test_reader_equals_safetensors(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file(TENSORS, path, metadata={"a": "b"})
    f = TensorFile(path)
    assert f.metadata == {"a": "b"}
    assert set(f.keys()) == set(TENSORS)
    for k, t in TENSORS.items():
        got = f.get(k)
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), k


def test_planned_writer_output_reads_back_with_safetensors(tmp_path):
    layout = {k: (t.dtype, tuple(t.shape)) for k, t in TENSORS.items()}
    w = ShardedWriter(tmp_path / "out", layout, max_shard_bytes=64)
    for k in reversed(list(TENSORS)):  # any order
        w.add(k, TENSORS[k])
    shards = w.finish()
    assert len(shards) > 1
    back = {}
    for s in shards:
        back.update(load_file(s))
    assert set(back) == set(TENSORS)
    for k, t in TENSORS.items():
        assert torch.equal(back[k], t), k


def test_writer_refuses_unplanned_or_missing_tensors(tmp_path):
    w = ShardedWriter(tmp_path / "out", {"a": (torch.float32, (2,))})
    with pytest.raises(RegmeanError, match="not in the planned output"):
        w.add("b", torch.zeros(2))
    with pytest.raises(RegmeanError, match="planned"):
        w.add("a", torch.zeros(3))
    with pytest.raises(RegmeanError, match="never written"):
        w.finish()


def test_truncated_file_is_refused(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.randn(100)}, path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(RegmeanError, match="truncated"):
        TensorFile(path)
