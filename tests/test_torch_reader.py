"""The torch-free checkpoint reader: real official files, round trips, malicious and broken files.

Files are written by tests/torch_files.py (checked against torch.load during development).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import struct
import subprocess
import sys
import threading
import time
import zipfile
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


REFUSE_SECONDS = 10.0  # a hostile file must be refused well within this (2 shared CPU cores)


def refused(path: Path, exc: type = CheckpointError, load=load_torch_checkpoint) -> str:
    """``load(path)`` must raise ``exc`` naming the file within REFUSE_SECONDS; its message.

    The load runs in a daemon thread, so a reader that hangs fails the test instead of hanging
    the suite.
    """
    outcome: dict[str, BaseException] = {}

    def run() -> None:
        try:
            load(path)
        except BaseException as e:  # noqa: BLE001 - the test inspects whatever comes out
            outcome["error"] = e

    worker = threading.Thread(target=run, daemon=True)
    start = time.monotonic()
    worker.start()
    worker.join(REFUSE_SECONDS)
    elapsed = time.monotonic() - start
    assert not worker.is_alive(), f"{path.name}: still loading after {REFUSE_SECONDS} s"
    assert elapsed < REFUSE_SECONDS, f"{path.name}: took {elapsed:.1f} s to refuse"
    error = outcome.get("error")
    assert error is not None, f"{path.name} was loaded instead of refused"
    assert isinstance(error, exc), f"{type(error).__name__} instead of {exc.__name__}: {error}"
    assert str(path) in str(error), f"message does not name the file: {error}"
    return str(error)


# Peak memory from VmHWM, this address space's own high-water mark: getrusage's ru_maxrss keeps
# the parent's peak across fork and exec on Linux (the test process's, gigabytes in a full run).
LOAD_IN_CHILD = """
import json, re, sys, time
from retinaface_jax.weights.torch_reader import CheckpointError, load_torch_checkpoint
start = time.perf_counter()
try:
    load_torch_checkpoint(sys.argv[1])
    error = None
except Exception as e:
    error = [type(e).__name__, isinstance(e, CheckpointError), str(e)]
with open("/proc/self/status") as f:
    peak_kb = int(re.search(r"VmHWM:\\s+(\\d+) kB", f.read()).group(1))
print(json.dumps({"error": error, "seconds": time.perf_counter() - start,
                  "peak_mb": peak_kb / 1024}))
"""


def load_in_child(path: Path, seconds: float = 60) -> dict:
    """Load ``path`` in a fresh interpreter (killed after ``seconds``): outcome, time, peak RSS."""
    done = subprocess.run(
        [sys.executable, "-c", LOAD_IN_CHILD, str(path)],
        capture_output=True,
        text=True,
        timeout=seconds,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


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
        refused(path)


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
    assert re.search(message, refused(path))


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
    "expansion bomb": (tf.Tensor(SHORT, 0, (2**20, 2**20), (0, 0)), "over the budget"),
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


# ------------------------------------------------------------------------------- hostile files
# One crafted file per attack found by the outside check (issue 28): each must be refused with a
# CheckpointError naming the file, within REFUSE_SECONDS (see ``refused``).

HUGE = 10**5999  # 6000 digits: str() of it raises ValueError (Python's int digit limit)
FOUR = tf.Storage(np.ones(4, np.float32))


def one_tensor() -> tf.Tensor:
    return tf.tensor(np.ones(2, np.float32))


def self_referential(key: str) -> dict:
    """``{key: <itself>}``: unwrapping it used to loop forever."""
    d: dict = {"epoch": 1}
    d[key] = d
    return d


def mutual_cycle() -> dict:
    a: dict = {"w": one_tensor()}
    b = {"model": a}
    a["state_dict"] = b
    return b


def list_cycle() -> dict:
    items: list = [one_tensor()]
    items.append(items)
    return {"state_dict": {"w": one_tensor()}, "history": items}


def tuple_cycle() -> dict:
    inner: list = []
    outer = (one_tensor(), inner)
    inner.append(outer)
    return {"model": {"w": one_tensor(), "pair": outer}}


def module_prefix_cycle() -> dict:
    sd: dict = OrderedDict([("module.w", one_tensor())])
    sd["module.self"] = sd
    return {"state_dict": sd}


def nested_lists(depth: int) -> list:
    root: list = []
    node = root
    for _ in range(depth):
        node.append([])
        node = node[0]
    return root


HOSTILE_TREES = {
    "self-referential state_dict": (lambda: self_referential("state_dict"), "contains itself"),
    "self-referential model": (lambda: self_referential("model"), "contains itself"),
    "mutual cycle": (mutual_cycle, "contains itself"),
    "cycle via list": (list_cycle, "contains itself"),
    "cycle via tuple": (tuple_cycle, "contains itself"),
    "cycle under module. prefix": (module_prefix_cycle, "contains itself"),
    "65 dims": (lambda: {"w": tf.Tensor(FOUR, 0, (1,) * 65, (1,) * 65)}, "65 dimensions"),
    "33 dims": (lambda: {"w": tf.Tensor(FOUR, 0, (1,) * 33, (1,) * 33)}, "33 dimensions"),
    "zero dim beside absurd dim": (
        lambda: {"w": tf.Tensor(FOUR, 0, (0, 2**70), (1, 1))},
        "absurdly large",
    ),
    "zero dim beside huge dims": (
        lambda: {"w": tf.Tensor(FOUR, 0, (0, 2**30, 2**30), (1, 1, 1))},
        "is absurd",
    ),
    "6000-digit int key": (lambda: {HUGE: one_tensor()}, "does not fit in 64 bits"),
    "6000-digit int value": (lambda: {"epoch": HUGE, "w": one_tensor()}, "64 bits"),
    "6000-digit size": (lambda: {"w": tf.Tensor(FOUR, 0, (HUGE,), (1,))}, "absurdly large"),
    "6000-digit stride": (lambda: {"w": tf.Tensor(FOUR, 0, (1,), (HUGE,))}, "absurdly large"),
    "huge storage offset": (lambda: {"w": tf.Tensor(FOUR, 2**70, (1,), (1,))}, "absurdly"),
    "6000-digit storage offset": (lambda: {"w": tf.Tensor(FOUR, HUGE, (1,), (1,))}, "absurdly"),
    "negative 6000-digit size": (lambda: {"w": tf.Tensor(FOUR, 0, (-HUGE,), (1,))}, "negative"),
    "negative stride": (lambda: {"w": tf.Tensor(FOUR, 0, (2,), (-1,))}, "negative"),
    "negative offset": (lambda: {"w": tf.Tensor(FOUR, -1, (1,), (1,))}, "negative"),
    "float dict key": (lambda: {1.5: one_tensor()}, "float is not allowed"),
    "complex set item": (lambda: {"s": {1j, 2j}}, "complex is not allowed"),
    "nested 200 deep": (lambda: {"x": nested_lists(200)}, "nested too deeply"),
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", list(HOSTILE_TREES))
def test_hostile_tree_refused(tmp_path, fmt, case):
    build, message = HOSTILE_TREES[case]
    path = write(fmt, tmp_path / "hostile.pth", build())
    assert path.stat().st_size < 20_000  # the attacks are tiny files
    assert re.search(re.escape(message), refused(path))
    assert re.search(re.escape(message), refused(path, load=read_state_dict))


@pytest.mark.parametrize("fmt", FORMATS)
def test_huge_storage_element_count(tmp_path, fmt):
    pid = ("storage", tf.Global("torch", "FloatStorage"), "0", "cpu", HUGE)
    pid += (None,) if fmt == "legacy" else ()
    obj = {"w": tf.Tensor(tf.PersistentId(pid), 0, (1,), (1,))}
    path = write(
        fmt, tmp_path / "count.pth", obj, **({"storage_keys": ["0"]} if fmt == "legacy" else {})
    )
    assert "storage size" in refused(path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_int_key_hash_flood_refused_quickly(tmp_path, fmt):
    """Ints equal modulo 2**61 - 1 share one hash: a dict of 20000 of them is quadratic."""
    obj = {"state_dict": tf.DictItems([(k * (2**61 - 1), 0) for k in range(1, 20_001)])}
    path = write(fmt, tmp_path / "flood.pth", obj)
    assert "does not fit in 64 bits" in refused(path)


def stride_zero_bomb(path: Path, fmt: str) -> Path:
    """Eight 256 MiB float32 tensors expanded (stride 0) from one 4-byte storage."""
    one = tf.Storage(np.ones(1, np.float32))
    obj = {f"w{i}": tf.Tensor(one, 0, (2**13, 2**13), (0, 0)) for i in range(8)}
    return write(fmt, path, obj)


@pytest.mark.parametrize("fmt", FORMATS)
def test_stride_zero_bomb_over_total_budget(tmp_path, fmt):
    path = stride_zero_bomb(tmp_path / "bomb.pth", fmt)
    assert path.stat().st_size < 2000
    result = load_in_child(path)
    assert result["error"] is not None, "the bomb was loaded"
    name, is_checkpoint_error, message = result["error"]
    assert is_checkpoint_error and str(path) in message and "over the budget" in message, name
    assert result["seconds"] < REFUSE_SECONDS
    assert result["peak_mb"] < 400, result  # the old reader reached ~2 GB here


@pytest.mark.parametrize("fmt", FORMATS)
def test_many_views_each_small_over_total_budget(tmp_path, fmt):
    """200 whole-storage views of one 256 KiB storage: each is small, together 50 MiB."""
    storage = tf.Storage(np.arange(2**16, dtype=np.float32))
    obj = {f"w{i}": tf.Tensor(storage, 0, (2**16,), (1,)) for i in range(200)}
    path = write(fmt, tmp_path / "views.pth", obj)
    assert "over the budget" in refused(path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_budget_allows_honest_sharing(tmp_path, fmt):
    storage = tf.Storage(np.arange(2**16, dtype=np.float32))
    obj = {f"w{i}": tf.Tensor(storage, 0, (2**16,), (1,)) for i in range(3)}
    got = load_torch_checkpoint(write(fmt, tmp_path / "tied.pth", obj))
    for i in range(3):
        assert_same(got[f"w{i}"], np.arange(2**16, dtype=np.float32))


@pytest.mark.parametrize("fmt", FORMATS)
def test_memo_index_bomb(tmp_path, fmt):
    """7 bytes of LONG_BINPUT 0x07ffffff made the C unpickler allocate a 2 GB memo."""
    put = tf.Raw(pickle.NONE + pickle.LONG_BINPUT + struct.pack("<I", 0x07FFFFFF))
    path = write(fmt, tmp_path / "memo.pth", {"w": one_tensor(), "x": put})
    result = load_in_child(path)
    assert result["seconds"] < REFUSE_SECONDS and result["peak_mb"] < 400, result
    assert result["error"] is None, result  # an honest if odd pickle: loads, cheaply
    assert load_torch_checkpoint(path)["x"] is None


def test_overlapping_zip_records(tmp_path):
    path = tf.write_overlapping_zip(tmp_path / "overlap.pth", 4096)
    assert "overlapping" in refused(path)


def test_zip_encrypted_record(tmp_path):
    path = tf.write_zip(tmp_path / "enc.pth", small_checkpoint())
    tf.set_zip_flags(path, "archive/data/0", 1)
    assert "encrypted" in refused(path)


@pytest.mark.parametrize(
    "record, at, damage",
    [("data/0", 0, b"XX"), ("data.pkl", 30, b"X")],
    ids=["bad local header magic", "local name differs from the directory"],
)
def test_zip_bad_member_header(tmp_path, record, at, damage):
    path = tf.write_zip(tmp_path / "member.pth", small_checkpoint())
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        at += zf.getinfo(f"archive/{record}").header_offset
    data[at : at + len(damage)] = damage
    path.write_bytes(bytes(data))
    assert "corrupted" in refused(path)


def test_zip_deflated_record(tmp_path):
    path = tmp_path / "deflated.pth"
    honest = tf.write_zip(tmp_path / "honest.pth", small_checkpoint())
    with zipfile.ZipFile(honest) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    assert "compressed" in refused(path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_byte_flips_give_checkpoint_errors_only(tmp_path, fmt):
    """Any damage to a small honest file loads or raises CheckpointError naming the file."""
    honest = write(fmt, tmp_path / "honest.pth", {"state_dict": small_checkpoint(), "n": 3})
    data = honest.read_bytes()
    rng = np.random.default_rng(28)
    path = tmp_path / "flipped.pth"
    start = time.monotonic()
    for _ in range(300):
        damaged = bytearray(data)
        for at in rng.integers(0, len(data), rng.integers(1, 4)):
            damaged[at] = int(rng.integers(0, 256))
        path.write_bytes(bytes(damaged))
        try:
            load_torch_checkpoint(path)
        except CheckpointError as e:
            assert str(path) in str(e)
    assert time.monotonic() - start < 60
