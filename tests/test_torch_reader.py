"""The torch-free checkpoint reader: real official files, round trips, malicious and broken files.

Files are written by tests/torch_files.py (checked against torch.load during development).
"""

from __future__ import annotations

import hashlib
import pickle
import re
import struct
import sys
import time
from collections import OrderedDict
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch_files as tf

from retinaface_jax.weights.torch_reader import (
    CheckpointError,
    UnsafeCheckpointError,
    load_torch_checkpoint,
    read_state_dict,
)

FINAL_SHA256 = "2979b33ffafda5d74b6948cd7a5b9a7a62f62b949cef24e95fd15d2883a65220"
PRETRAIN_SHA256 = "75c37f8d438b7c6aed2e6b310fd0540c40dabf0dd820770bd7082668dfd7c1c1"
FORMATS = ("legacy", "zip")


def write(fmt: str, path: Path, obj, **kwargs) -> Path:
    return (tf.write_legacy if fmt == "legacy" else tf.write_zip)(path, obj, **kwargs)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def names_file(path: Path):
    """pytest.raises(match=...) pattern requiring the file's path in the message."""
    return re.escape(str(path))


# ------------------------------------------------------------------------------- real files


def test_official_weights(shared):
    path = shared / "data/weights/mobilenet0.25_Final.pth"
    assert sha256(path) == FINAL_SHA256
    sd = load_torch_checkpoint(path)
    assert isinstance(sd, OrderedDict) and len(sd) == 300
    assert all(isinstance(v, np.ndarray) and v.flags.c_contiguous for v in sd.values())
    for key in [
        "body.stage1.0.0.weight",
        "fpn.output1.0.weight",
        "ssh1.conv3X3.0.weight",
        "ClassHead.0.conv1x1.weight",
    ]:
        assert key in sd, key
    assert sd["body.stage1.0.0.weight"].shape == (8, 3, 3, 3)  # 8 = 32 * 0.25, RGB in, 3x3
    assert sd["ClassHead.0.conv1x1.weight"].shape == (4, 64, 1, 1)  # 2 anchors x 2 classes
    assert sd["BboxHead.0.conv1x1.weight"].shape == (8, 64, 1, 1)
    assert sd["LandmarkHead.0.conv1x1.weight"].shape == (20, 64, 1, 1)
    counters = [k for k in sd if k.endswith("num_batches_tracked")]
    assert counters and all(sd[k].dtype == np.int64 and sd[k].shape == () for k in counters)
    floats = [v for k, v in sd.items() if k not in counters]
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in floats)
    assert all(sd[k].min() > 0 for k in sd if k.endswith("running_var"))
    clean = read_state_dict(path)
    assert len(clean) == 300 - len(counters)
    np.testing.assert_array_equal(clean["fpn.output1.0.weight"], sd["fpn.output1.0.weight"])


def test_pretrained_backbone_tar(shared):
    path = shared / "data/weights/mobilenetV1X0.25_pretrain.tar"
    assert sha256(path) == PRETRAIN_SHA256
    ckpt = load_torch_checkpoint(path)
    assert {"epoch", "arch", "state_dict"} <= set(ckpt)
    raw = ckpt["state_dict"]
    assert all(k.startswith("module.") for k in raw)
    sd = read_state_dict(path)
    assert sd and not any(k.startswith("module.") or "num_batches_tracked" in k for k in sd)
    assert sd["stage1.0.0.weight"].shape == (8, 3, 3, 3)
    assert sd["fc.weight"].shape == (1000, 256) and sd["fc.bias"].shape == (1000,)
    np.testing.assert_array_equal(sd["fc.weight"], raw["module.fc.weight"])


def test_reader_does_not_import_torch():
    assert "torch" not in sys.modules


# ---------------------------------------------------------------------------------- round trip

RNG = np.random.default_rng(0)
ARRAYS = {
    "float32": RNG.standard_normal((3, 4)).astype(np.float32),
    "float64": RNG.standard_normal((2, 3)),
    "float16": RNG.standard_normal(5).astype(np.float16),
    "bfloat16": RNG.standard_normal((2, 2)).astype(ml_dtypes.bfloat16),
    "int64": np.array([[-(2**40), 0, 2**40]], np.int64),
    "int32": np.arange(-3, 3, dtype=np.int32),
    "int16": np.arange(4, dtype=np.int16),
    "int8": np.arange(-2, 2, dtype=np.int8),
    "uint8": np.arange(250, 256, dtype=np.uint8),
    "bool": np.array([True, False, True]),
    "complex64": (RNG.standard_normal(3) + 1j).astype(np.complex64),
    "scalar": np.array(3.5, np.float32),
    "empty": np.zeros((0, 3), np.float32),
}


def assert_same(got, want):
    assert isinstance(got, np.ndarray) and got.flags.c_contiguous
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_dtypes_and_containers(tmp_path, fmt):
    obj = {
        "epoch": 7,
        "arch": "mobilenet0.25",
        "lr": 1e-3,
        "flags": (True, None, b"\x00\xff"),
        "history": [1, 2.5, "x"],
        "tensors": OrderedDict((k, tf.tensor(v)) for k, v in ARRAYS.items()),
    }
    got = load_torch_checkpoint(write(fmt, tmp_path / "ckpt.pt", obj))
    assert {k: v for k, v in got.items() if k != "tensors"} == {
        k: v for k, v in obj.items() if k != "tensors"
    }
    assert isinstance(got["tensors"], OrderedDict) and list(got["tensors"]) == list(ARRAYS)
    for name, want in ARRAYS.items():
        assert_same(got["tensors"][name], want)


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_views_shared_storage_and_parameters(tmp_path, fmt):
    flat = np.arange(24, dtype=np.float32)
    storage = tf.Storage(flat)
    obj = {
        # non-contiguous (transposed-like) view with a storage offset
        "strided": tf.Tensor(storage, 2, (3, 4), (1, 5)),
        # a second tensor on the same storage
        "shared": tf.Tensor(storage, 0, (2, 2), (12, 1)),
        "whole": tf.Tensor(storage, 0, (24,), (1,)),
        # an expanded (stride 0) view, as torch.save writes it
        "expanded": tf.Tensor(tf.Storage(np.array([7], np.int64)), 0, (3, 2), (0, 0)),
        "param": tf.Parameter(tf.tensor(np.ones((2, 2), np.float32))),
        "param_with_state": tf.Parameter(tf.tensor(np.full(3, 2.0)), state={"tag": 1}),
        "conj": tf.Tensor(
            tf.Storage(np.array([1 + 2j], np.complex64)), 0, (1,), (1,), metadata={"conj": True}
        ),
        "bare_storage": storage,  # torch.save of a storage itself: its elements, flat
    }
    got = load_torch_checkpoint(write(fmt, tmp_path / "views.pt", obj))
    assert_same(got["strided"], flat[2 + np.add.outer(np.arange(3), 5 * np.arange(4))])
    assert_same(got["shared"], np.array([[0, 1], [12, 13]], np.float32))
    assert_same(got["whole"], flat)
    assert not np.shares_memory(got["shared"], got["whole"])  # copies, not views of the file
    got["whole"][0] = 100.0  # writable and independent
    assert got["shared"][0, 0] == 0.0
    assert_same(got["expanded"], np.full((3, 2), 7, np.int64))
    assert_same(got["param"], np.ones((2, 2), np.float32))
    assert_same(got["param_with_state"], np.full(3, 2.0))
    assert_same(got["conj"], np.array([1 - 2j], np.complex64))
    assert_same(got["bare_storage"], np.arange(24, dtype=np.float32))


def test_legacy_storage_view(tmp_path):
    root = tf.Storage(np.arange(10, dtype=np.float32))
    obj = {"v": tf.Tensor(tf.StorageView(root, 3, 5), 1, (2,), (2,))}
    got = load_torch_checkpoint(tf.write_legacy(tmp_path / "view.pt", obj))
    assert_same(got["v"], np.array([4.0, 6.0], np.float32))


def test_big_endian_zip(tmp_path):
    obj = {k: tf.tensor(ARRAYS[k]) for k in ("float32", "int64", "bfloat16", "complex64")}
    got = load_torch_checkpoint(tf.write_zip(tmp_path / "be.pt", obj, byteorder="big"))
    for k in obj:
        assert got[k].dtype.isnative or got[k].dtype == ml_dtypes.bfloat16
        assert_same(got[k], ARRAYS[k])


@pytest.mark.parametrize("byteorder", ["little", "big"])
def test_zip_dtypes_without_storage_class(tmp_path, byteorder):
    """torch >= 2.3 writes uint16/32/64 and float8 via _rebuild_tensor_v3 on untyped storage."""
    arrays = {
        "uint16": np.array([[1, 65535], [3, 4]], np.uint16),
        "uint32": np.array([7, 2**32 - 1], np.uint32),
        "uint64": np.array([2**63 + 5], np.uint64),
        "float8_e4m3fn": np.array([0.5, -2, 448], ml_dtypes.float8_e4m3fn),
        "float8_e5m2": np.array([0.25, -3], ml_dtypes.float8_e5m2),
        "float32": ARRAYS["float32"],
    }
    obj = {k: tf.untyped_tensor(v, k) for k, v in arrays.items()}
    flat = tf.untyped_tensor(np.arange(6, dtype=np.uint32), "uint32")
    obj["strided"] = tf.Tensor(flat.storage, 1, (2,), (2,), dtype_name="uint32")
    got = load_torch_checkpoint(tf.write_zip(tmp_path / "v3.pt", obj, byteorder=byteorder))
    for k, want in arrays.items():
        assert_same(got[k], want)
    assert_same(got["strided"], np.array([1, 3], np.uint32))


def test_custom_archive_name(tmp_path):
    got = load_torch_checkpoint(
        tf.write_zip(tmp_path / "m.pt", {"w": tf.tensor(ARRAYS["int32"])}, archive="my_model")
    )
    assert_same(got["w"], ARRAYS["int32"])


# ------------------------------------------------------------------------------ read_state_dict


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("wrapper", [None, "state_dict", "model"])
def test_read_state_dict_unwraps_and_strips(tmp_path, fmt, wrapper):
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    sd = OrderedDict(
        [
            ("module.conv.weight", tf.tensor(w)),
            ("module.bn.num_batches_tracked", tf.tensor(np.array(5, np.int64))),
            ("module.bn.running_var", tf.tensor(np.ones(2, np.float32))),
        ]
    )
    obj = sd if wrapper is None else {"epoch": 3, wrapper: sd}
    got = read_state_dict(write(fmt, tmp_path / "sd.pt", obj))
    assert list(got) == ["conv.weight", "bn.running_var"]
    assert_same(got["conv.weight"], w)


def test_read_state_dict_accepts_loaded_mapping():
    w = np.ones(3, np.float32)
    assert read_state_dict({"state_dict": {"module.a": w}})["a"] is w
    assert list(read_state_dict({"a": w, "b.num_batches_tracked": np.array(1)})) == ["a"]


def test_read_state_dict_rejects_non_tensors(tmp_path):
    path = tf.write_zip(tmp_path / "bad.pt", {"a": tf.tensor(np.ones(2)), "b": 3})
    with pytest.raises(CheckpointError, match=names_file(path) + ".*'b' is int, not a tensor"):
        read_state_dict(path)
    with pytest.raises(CheckpointError, match="expected a mapping"):
        read_state_dict([np.ones(2)])
    with pytest.raises(CheckpointError, match="with and without 'module.'"):
        read_state_dict({"a": np.ones(1), "module.a": np.ones(1)})


# ------------------------------------------------------------------------------- malicious files

# The global each payload makes the unpickler resolve first (the one that must be refused).
REFUSED = {
    "os.system": "os.system",
    "posix.system": "posix.system",
    "builtins.eval": "builtins.eval",
    "builtins.exec": "builtins.exec",
    "subprocess.Popen": "subprocess.Popen",
    "getattr chain": "builtins.getattr",
    "arbitrary class": f"{tf.__name__}.MarkerWriter",
    "torch.load": "torch.load",
    "hidden in a tensor's hooks": "builtins.eval",
    "storage type is eval": "builtins.eval",
}


def wait_for(path: Path, seconds: float = 2.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists():
            return True
        time.sleep(0.02)
    return path.exists()


@pytest.mark.parametrize("name", tf.RUNNABLE)
def test_payloads_are_live_under_an_unsafe_loader(tmp_path, name):
    """Control: the same pickles DO create the marker when unpickled unsafely."""
    marker = tmp_path / "pwned"
    tf.unsafe_load(tf.dumps(tf.payloads(marker)[name]))
    assert wait_for(marker), f"payload {name!r} did not run under an unsafe loader"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("where", ["top level", "inside a state dict"])
@pytest.mark.parametrize("name", list(REFUSED))
def test_malicious_payload_refused_and_not_run(tmp_path, fmt, where, name):
    marker = tmp_path / "pwned"
    payload = tf.payloads(marker)[name]
    if where != "top level":
        payload = {"state_dict": OrderedDict(w=tf.tensor(np.ones(2, np.float32)), evil=payload)}
    path = write(fmt, tmp_path / "evil.pth", payload)
    pattern = names_file(path) + f".*refusing to load global '{re.escape(REFUSED[name])}'"
    with pytest.raises(UnsafeCheckpointError, match=pattern):
        load_torch_checkpoint(path)
    with pytest.raises(UnsafeCheckpointError):
        read_state_dict(path)
    if name == "subprocess.Popen":
        time.sleep(0.2)  # a spawned process would need a moment to create the marker
    assert not marker.exists()


class ExecOnLoad:
    """Pickles (with the real stdlib pickler) as a call to builtins.exec."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return exec, (self.code,)


def opcode_variants(marker: Path) -> dict[str, bytes]:
    """The same exec payload through every opcode that resolves a global."""
    code = f"open({str(marker)!r}, 'w').close()".encode()
    variants = {
        f"protocol {p}": pickle.dumps(ExecOnLoad(code.decode()), protocol=p) for p in range(6)
    }
    arg = b"X" + struct.pack("<I", len(code)) + code
    variants["INST"] = b"(" + arg + b"ibuiltins\nexec\n."
    variants["OBJ"] = b"\x80\x02(cbuiltins\nexec\n" + arg + b"o."
    return variants


@pytest.mark.parametrize(
    "variant", ["protocol 0", "protocol 2", "protocol 4", "protocol 5", "INST", "OBJ"]
)
def test_every_opcode_that_loads_a_global_is_guarded(tmp_path, variant):
    marker = tmp_path / "pwned"
    data = opcode_variants(marker)[variant]
    tf.unsafe_load(data)  # control: the payload is live
    assert marker.exists()
    marker.unlink()
    path = tf.write_zip(tmp_path / "evil.pt", None, extra={"data.pkl": data})
    # protocols < 3 spell the module the Python 2 way, '__builtin__'
    pattern = names_file(path) + ".*'(__builtin__|builtins).exec'"
    with pytest.raises(UnsafeCheckpointError, match=pattern):
        load_torch_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("slot", ["magic", "protocol_version", "sys_info", "storage_keys"])
def test_legacy_payload_in_header_pickles_refused(tmp_path, slot):
    marker = tmp_path / "pwned"
    kwargs = {slot: tf.payloads(marker)["builtins.exec"]}
    if slot == "storage_keys":
        kwargs[slot] = [kwargs[slot]]
    path = tf.write_legacy(tmp_path / "evil.pth", {"w": tf.tensor(np.ones(2))}, **kwargs)
    with pytest.raises(UnsafeCheckpointError, match=names_file(path) + ".*'builtins.exec'"):
        load_torch_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "pid",
    [
        ("module", "os", "evil.py", "import os; os.system('touch pwned')"),
        "storage",
        ("storage", "FloatStorage", "0", "cpu", 1, None),
        ("storage",),
    ],
)
def test_malicious_persistent_id_refused(tmp_path, fmt, pid):
    path = write(fmt, tmp_path / "evil.pth", {"w": tf.PersistentId(pid)})
    with pytest.raises(UnsafeCheckpointError, match=names_file(path) + ".*persistent id"):
        load_torch_checkpoint(path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_build_on_allowlisted_global_refused(tmp_path, fmt):
    """BUILD could rewrite a real function's __defaults__; our stand-ins carry no state."""
    attack = [
        tf.Raw(pickle.GLOBAL + b"torch._utils\n_rebuild_tensor_v2\n"),
        (None, {"__defaults__": (1, 2)}),
        tf.Raw(pickle.BUILD),
    ]
    path = write(fmt, tmp_path / "evil.pth", attack)
    with pytest.raises(CheckpointError, match=names_file(path)):
        load_torch_checkpoint(path)
    honest = write(fmt, tmp_path / "ok.pth", {"w": tf.tensor(ARRAYS["float32"])})
    assert_same(load_torch_checkpoint(honest)["w"], ARRAYS["float32"])


# ----------------------------------------------------------------------- truncated or corrupted


def small_checkpoint() -> dict:
    return {"a": tf.tensor(ARRAYS["float32"]), "b": tf.tensor(np.arange(300, dtype=np.int64))}


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_files(tmp_path, fmt):
    full = write(fmt, tmp_path / "full.pt", small_checkpoint()).read_bytes()
    cuts = sorted({1, 2, 5, 30, len(full) // 3, len(full) // 2, len(full) - 100, len(full) - 1})
    for cut in cuts:
        path = tmp_path / f"cut{cut}.pt"
        path.write_bytes(full[:cut])
        with pytest.raises(CheckpointError, match=names_file(path)):
            load_torch_checkpoint(path)


def test_legacy_truncation_messages(tmp_path):
    full = tf.write_legacy(tmp_path / "full.pt", small_checkpoint()).read_bytes()
    data_bytes = ARRAYS["float32"].nbytes + 300 * 8 + 16
    cases = {
        "inside the object pickle": (len(full) - data_bytes - 40, "truncated|corrupted"),
        "inside the storage data": (len(full) - 100, "truncated: storage '1' needs 2400 bytes"),
        "before a storage": (len(full) - 300 * 8 - 8, "file ends before storage '1'"),
    }
    for what, (cut, message) in cases.items():
        path = tmp_path / f"{what}.pt"
        path.write_bytes(full[:cut])
        with pytest.raises(CheckpointError, match=names_file(path) + f".*({message})"):
            load_torch_checkpoint(path)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "not a PyTorch checkpoint"),
        (b"hello world, definitely not a checkpoint\n", "not a PyTorch checkpoint"),
        (bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8)), "checkpoint"),
        (b"\x80\x02" + bytes(range(256)) * 4, "corrupted|truncated"),
        (b"PK\x03\x04" + b"\x00" * 200, "corrupted or truncated zip"),
    ],
    ids=["empty", "text", "random bytes", "pickle-like garbage", "zip header only"],
)
def test_garbage_files(tmp_path, content, message):
    path = tmp_path / "garbage.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=names_file(path) + f".*({message})"):
        load_torch_checkpoint(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="cannot read"):
        load_torch_checkpoint(tmp_path / "nope.pth")


def test_legacy_bad_headers(tmp_path):
    ckpt = small_checkpoint()
    path = tf.write_legacy(tmp_path / "magic.pt", ckpt, magic=12345)
    with pytest.raises(CheckpointError, match=names_file(path) + ".*bad magic number"):
        load_torch_checkpoint(path)
    path = tf.write_legacy(tmp_path / "proto.pt", ckpt, protocol_version=7)
    with pytest.raises(CheckpointError, match=names_file(path) + ".*protocol version 7"):
        load_torch_checkpoint(path)
    path = tf.write_legacy(tmp_path / "keys.pt", ckpt, storage_keys=["0", "nope"])
    with pytest.raises(CheckpointError, match=names_file(path) + ".*storage key list"):
        load_torch_checkpoint(path)


def test_legacy_storage_count_mismatch(tmp_path):
    full = tf.write_legacy(tmp_path / "full.pt", {"b": tf.tensor(np.arange(4, dtype=np.int64))})
    data = bytearray(full.read_bytes())
    struct.pack_into("<q", data, len(data) - 4 * 8 - 8, 3)
    path = tmp_path / "count.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=names_file(path) + ".*holds 3 elements.*declares 4"):
        load_torch_checkpoint(path)


def test_huge_declared_storage_legacy(tmp_path):
    numel = 2**40  # 4 TiB of float32 declared, a few bytes present
    pid = ("storage", tf.Global("torch", "FloatStorage"), "0", "cpu", numel, None)
    obj = {"w": tf.Tensor(tf.PersistentId(pid), 0, (numel,), (1,))}
    path = tf.write_legacy(tmp_path / "huge.pt", obj, storage_keys=["0"])
    with path.open("ab") as f:
        f.write(struct.pack("<q", numel) + b"\x00" * 64)
    with pytest.raises(CheckpointError, match=names_file(path) + ".*needs 4398046511104 bytes"):
        load_torch_checkpoint(path)


def test_huge_declared_storage_zip(tmp_path):
    numel = 2**40
    pid = ("storage", tf.Global("torch", "FloatStorage"), "0", "cpu", numel)
    obj = {"w": tf.Tensor(tf.PersistentId(pid), 0, (numel,), (1,))}
    path = tf.write_zip(tmp_path / "huge.pt", obj, extra={"data/0": b"\x00" * 64})
    with pytest.raises(CheckpointError, match=names_file(path) + ".*has 64 bytes"):
        load_torch_checkpoint(path)


SHORT = tf.Storage(np.ones(4, np.float32))
BAD_GEOMETRY = {
    "too long": (tf.Tensor(SHORT, 0, (10,), (1,)), "reaches element 9 of a storage of 4"),
    "offset past end": (tf.Tensor(SHORT, 4, (1,), (1,)), "reaches element 4"),
    "stride past end": (tf.Tensor(SHORT, 0, (2, 2), (3, 1)), "reaches element 4"),
    "negative size": (tf.Tensor(SHORT, 0, (-1,), (1,)), "negative"),
    "negative stride": (tf.Tensor(SHORT, 0, (1,), (-1,)), "negative"),
    "rank mismatch": (tf.Tensor(SHORT, 0, (1,), (1, 1)), "differ in rank"),
    "size not ints": (tf.Tensor(SHORT, 0, ("1",), (1,)), "must be an int"),
    "expansion bomb": (tf.Tensor(SHORT, 0, (2**20, 2**20), (0, 0)), "overlapping view"),
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", list(BAD_GEOMETRY))
def test_bad_tensor_geometry(tmp_path, fmt, case):
    tensor, message = BAD_GEOMETRY[case]
    path = write(fmt, tmp_path / "bad.pt", {"w": tensor})
    with pytest.raises(CheckpointError, match=names_file(path) + f".*{re.escape(message)}"):
        load_torch_checkpoint(path)


@pytest.mark.parametrize("record", ["data.pkl", "data/0"])
def test_zip_missing_records(tmp_path, record):
    path = tf.write_zip(tmp_path / "missing.pt", small_checkpoint(), skip=(record,))
    message = "exactly one '<archive>/data.pkl'" if record == "data.pkl" else "no record"
    with pytest.raises(CheckpointError, match=names_file(path) + f".*{re.escape(message)}"):
        load_torch_checkpoint(path)


def test_zip_corrupted_storage_bytes(tmp_path):
    path = tf.write_zip(tmp_path / "crc.pt", {"b": tf.tensor(np.arange(64, dtype=np.int64))})
    data = bytearray(path.read_bytes())
    start = data.index(np.arange(64, dtype=np.int64).tobytes())
    data[start + 8] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=names_file(path) + ".*corrupted"):
        load_torch_checkpoint(path)


def test_deeply_nested_pickle(tmp_path):
    depth = 100_000
    path = tf.write_zip(tmp_path / "deep.pt", tf.Raw(b"]" * depth + b"a" * (depth - 1)))
    with pytest.raises(CheckpointError, match=names_file(path) + ".*nested too deeply"):
        load_torch_checkpoint(path)
