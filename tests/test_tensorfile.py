"""Our safetensors reader: same tensors as the safetensors library, and every corrupt or malicious header
refused with one UserError naming the file, before anything is allocated from it (issue 8 item 7)."""

from __future__ import annotations

import json
import struct
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tpi_mpi.errors import UserError
from tpi_mpi.weights import tensorfile


@pytest.fixture
def good(tmp_path: Path) -> Path:
    path = tmp_path / "good.safetensors"
    save_file({"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64),
               "c": torch.randn(4, 2).to(torch.bfloat16), "d": torch.randn(6).half()}, str(path),
              metadata={"format": "pt"})
    return path


def test_reads_what_safetensors_reads(good: Path) -> None:
    ref = load_file(str(good))
    tf = tensorfile.parse_header(good)
    got, n = tensorfile.load(tf)
    assert n == tf.data_bytes == good.stat().st_size - tf.data_offset
    assert set(got) == set(ref)
    for k in ref:
        assert got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k])
    buf = torch.zeros(tf.data_bytes + 100, dtype=torch.uint8)  # a reused, larger buffer
    again, _ = tensorfile.load(tf, buf)
    assert all(torch.equal(again[k], ref[k]) for k in ref)
    one, _ = tensorfile.read_tensor(tf, "c")
    assert torch.equal(one, ref["c"])
    rows, n = tensorfile.read_rows(tf, "a", [2, 0, 2])
    assert torch.equal(rows, ref["a"][[2, 0, 2]]) and n == 3 * 5 * 4
    span, _ = tensorfile.read_rows(tf, "a", range(1, 3))
    assert torch.equal(span, ref["a"][1:3])


def _file(tmp: Path, header: bytes | dict, data: bytes = b"", length: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path = tmp / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
# (case, header, data bytes, header length written (None: the true one), what the error says)
BAD = [
    ("shorter than 8 bytes", None, b"", None, "shorter than the 8-byte header length"),
    ("huge header length", {}, b"", 1 << 62, "exceeds the limit"),
    ("header past the end", {}, b"", 1000, "runs past the end"),
    ("not JSON", b"{not json", b"", None, "not JSON"),
    ("not an object", b"[1, 2]", b"", None, "not a JSON object"),
    ("unknown dtype", {"x": {**F32x2, "dtype": "F8_E9"}}, b"\0" * 8, None, "unknown dtype"),
    ("shape not a list", {"x": {**F32x2, "shape": "2"}}, b"\0" * 8, None, "not a list of non-negative"),
    ("negative dim", {"x": {**F32x2, "shape": [-2]}}, b"\0" * 8, None, "not a list of non-negative"),
    ("offsets not two ints", {"x": {**F32x2, "data_offsets": [0]}}, b"\0" * 8, None, "not two non-negative"),
    ("end past data", {"x": {**F32x2, "data_offsets": [0, 4096]}}, b"\0" * 8, None, "outside the 8 data"),
    ("begin after end", {"x": {**F32x2, "data_offsets": [8, 0]}}, b"\0" * 8, None, "outside the 8 data"),
    ("huge shape, small span", {"x": {**F32x2, "shape": [1 << 40, 1 << 20]}}, b"\0" * 8, None,
     "needs 4611686018427387904 bytes but spans 8"),
    ("overlap", {"x": F32x2, "y": {**F32x2, "data_offsets": [4, 12]}}, b"\0" * 12, None, "overlaps"),
    ("hole", {"x": F32x2, "y": {**F32x2, "data_offsets": [12, 20]}}, b"\0" * 20, None, "belong to no tensor"),
    ("trailing bytes", {"x": F32x2}, b"\0" * 16, None, "at the end belong to no tensor"),
    ("extra key", {"x": {**F32x2, "evil": 1}}, b"\0" * 8, None, "needs exactly dtype, shape and data_offsets"),
    ("bad metadata", {"__metadata__": {"k": 1}, "x": F32x2}, b"\0" * 8, None, "__metadata__"),
]


@pytest.mark.parametrize("case,header,data,length,message", BAD, ids=[b[0] for b in BAD])
def test_corrupt_header_is_one_clear_error_without_allocating(tmp_path: Path, case: str, header: dict | bytes | None,
                                                              data: bytes, length: int | None, message: str) -> None:
    if header is None:
        path = tmp_path / "bad.safetensors"
        path.write_bytes(b"\1\2\3")
    else:
        path = _file(tmp_path, header, data, length)
    tracemalloc.start()
    try:
        with pytest.raises(UserError) as err:
            tensorfile.parse_header(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    text = str(err.value)
    assert str(path) in text and message in text and "\n" not in text
    assert peak < 256 * 1024, f"parsing a bad header allocated {peak} bytes"
