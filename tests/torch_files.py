"""Write PyTorch checkpoint files without torch, for tests: both formats, honest or malicious.

Object trees are built from plain Python containers plus these stand-ins:

* ``Storage(array)``: a flat storage holding a 1-D numpy array; ``StorageView(root, offset,
  numel)``: a legacy storage view into ``root``;
* ``Tensor(storage, offset, size, stride, metadata=None)`` (or ``tensor(array)`` for the usual
  contiguous case) and ``Parameter(tensor)``: pickled as torch's rebuild functions;
* ``Global(module, name)``: any global, written as a GLOBAL opcode without importing it;
  ``Reduce(func, args, state=None)``: a call to ``func(*args)`` on unpickling (then BUILD
  ``state``); ``PersistentId(pid)``: an arbitrary persistent id; ``Raw(opcodes)``: verbatim bytes;
  ``DictItems(pairs)``: a dict written from its pairs (e.g. keys with colliding hashes).

``write_legacy`` lays the pickles and storages out as torch did before 1.6 (and as the official
RetinaFace files are); ``write_zip`` writes the zip layout of torch >= 1.6. Both were checked to
load with ``torch.load`` (torch 2.13) during development. ``payloads(marker)`` returns
malicious objects that each create ``marker`` when unpickled by an unsafe loader.

This module is independent of the reader under test: it has its own dtype table and layout code.
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

MAGIC = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
SYS_INFO = {
    "protocol_version": PROTOCOL_VERSION,
    "little_endian": True,
    "type_sizes": {"short": 2, "int": 4, "long": 8},
}

STORAGE_NAMES = {
    np.dtype(np.float64): "DoubleStorage",
    np.dtype(np.float32): "FloatStorage",
    np.dtype(np.float16): "HalfStorage",
    np.dtype(ml_dtypes.bfloat16): "BFloat16Storage",
    np.dtype(np.int64): "LongStorage",
    np.dtype(np.int32): "IntStorage",
    np.dtype(np.int16): "ShortStorage",
    np.dtype(np.int8): "CharStorage",
    np.dtype(np.uint8): "ByteStorage",
    np.dtype(np.bool_): "BoolStorage",
    np.dtype(np.complex64): "ComplexFloatStorage",
    np.dtype(np.complex128): "ComplexDoubleStorage",
}


@dataclass(frozen=True)
class Global:
    """A global written as ``GLOBAL module\\nname`` (never imported here)."""

    module: str
    name: str

    def __call__(self, *args: Any) -> Any:  # pickle insists that reduce functions are callable
        raise RuntimeError("a Global stand-in is only for writing pickles")


@dataclass(eq=False)
class Reduce:
    """``func(*args)`` when unpickled, then BUILD with ``state`` if given."""

    func: Any
    args: tuple
    state: Any = None

    def __call__(self, *args: Any) -> Any:  # may itself be the function of another Reduce
        raise RuntimeError("a Reduce stand-in is only for writing pickles")


@dataclass(eq=False)
class PersistentId:
    """An arbitrary persistent id (BINPERSID of ``pid``)."""

    pid: Any


@dataclass(eq=False)
class Raw:
    """Opcodes written verbatim into the pickle."""

    opcodes: bytes


@dataclass(eq=False)
class DictItems:
    """A dict written from ``pairs`` without building it here (keys may collide by design)."""

    pairs: list[tuple[Any, Any]]


@dataclass(eq=False)
class Storage:
    """A flat storage: ``data`` is a 1-D numpy array of one of STORAGE_NAMES' dtypes."""

    data: np.ndarray
    type_name: str | None = None  # override the storage class written (e.g. a wrong one)
    untyped: bool = False  # write as torch.storage.UntypedStorage (for _rebuild_tensor_v3)

    @property
    def numel(self) -> int:
        """The element count in the persistent id (bytes, for an untyped storage)."""
        return self.data.nbytes if self.untyped else self.data.size

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype


@dataclass(eq=False)
class StorageView:
    """A legacy storage view: ``numel`` elements of ``root`` starting at element ``offset``."""

    root: Storage
    offset: int
    numel: int


@dataclass(eq=False)
class Tensor:
    """A tensor over ``storage`` with explicit element offset, size and stride."""

    storage: Storage | StorageView
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    metadata: dict | None = None
    hooks: Any = field(default_factory=OrderedDict)
    dtype_name: str | None = None  # set: written with _rebuild_tensor_v3 and torch.<dtype_name>


@dataclass(eq=False)
class Parameter:
    tensor: Tensor
    state: dict | None = None


def tensor(array: np.ndarray) -> Tensor:
    """A contiguous tensor with its own storage holding ``array``."""
    array = np.array(array, order="C")  # (ascontiguousarray would turn 0-d into 1-d)
    strides = tuple(s // array.itemsize for s in array.strides)
    return Tensor(Storage(array.reshape(-1)), 0, tuple(array.shape), strides)


def untyped_tensor(array: np.ndarray, dtype_name: str) -> Tensor:
    """A contiguous tensor as torch writes dtypes without a storage class (e.g. uint16)."""
    array = np.array(array, order="C")
    strides = tuple(s // array.itemsize for s in array.strides)
    storage = Storage(array.reshape(-1), untyped=True)
    return Tensor(storage, 0, array.shape, strides, dtype_name=dtype_name)


def _storage_global(storage: Storage) -> Global:
    if storage.untyped:
        return Global("torch.storage", "UntypedStorage")
    return Global("torch", storage.type_name or STORAGE_NAMES[storage.dtype])


class _Writer(pickle._Pickler):
    """Protocol-2 pickler that understands the stand-ins above (like torch's own pickler)."""

    dispatch = pickle._Pickler.dispatch.copy()

    def __init__(self, file: io.BytesIO, legacy: bool, keys: dict[int, tuple[str, Storage]]):
        super().__init__(file, protocol=2)
        self.legacy = legacy
        self.keys = keys  # id(storage) -> (key, storage), shared across one file

    def _key(self, storage: Storage) -> str:
        if id(storage) not in self.keys:
            self.keys[id(storage)] = (str(len(self.keys)), storage)
        return self.keys[id(storage)][0]

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, PersistentId):
            return obj.pid
        if isinstance(obj, StorageView):
            if not self.legacy:
                raise ValueError("storage views exist only in the legacy format")
            root = obj.root
            view = (f"{self._key(root)}_view{obj.offset}", obj.offset, obj.numel)
            return ("storage", _storage_global(root), self._key(root), "cpu", root.numel, view)
        if isinstance(obj, Storage):
            pid = ("storage", _storage_global(obj), self._key(obj), "cpu", obj.numel)
            return pid + (None,) if self.legacy else pid
        return None

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, Tensor):
            args = (obj.storage, obj.offset, tuple(obj.size), tuple(obj.stride), False, obj.hooks)
            func = Global("torch._utils", "_rebuild_tensor_v2")
            if obj.dtype_name is not None:
                func = Global("torch._utils", "_rebuild_tensor_v3")
                args += (Global("torch", obj.dtype_name),)
            if obj.metadata is not None:
                args += (obj.metadata,)
            return func, args
        if isinstance(obj, Parameter):
            if obj.state is None:
                return Global("torch._utils", "_rebuild_parameter"), (
                    obj.tensor,
                    True,
                    OrderedDict(),
                )
            return Global("torch._utils", "_rebuild_parameter_with_state"), (
                obj.tensor,
                True,
                OrderedDict(),
                obj.state,
            )
        if isinstance(obj, Reduce):
            return (obj.func, tuple(obj.args)) + (() if obj.state is None else (obj.state,))
        return NotImplemented

    def save_fake_global(self, obj: Global) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    def save_raw(self, obj: Raw) -> None:
        self.write(obj.opcodes)

    def save_dict_items(self, obj: DictItems) -> None:
        self.write(pickle.EMPTY_DICT + pickle.MARK)
        for key, value in obj.pairs:
            self.save(key)
            self.save(value)
        self.write(pickle.SETITEMS)

    dispatch[Global] = save_fake_global
    dispatch[Raw] = save_raw
    dispatch[DictItems] = save_dict_items


def dumps(obj: Any, *, legacy: bool = False, keys: dict | None = None) -> bytes:
    """The pickle torch would write for ``obj`` (storages become persistent ids)."""
    buf = io.BytesIO()
    _Writer(buf, legacy, {} if keys is None else keys).dump(obj)
    return buf.getvalue()


def _storage_bytes(storage: Storage, byteorder: str) -> bytes:
    data = storage.data
    if data.dtype.isbuiltin == 1:  # numpy's own types (ml_dtypes report 2)
        want = data.dtype.newbyteorder("<" if byteorder == "little" else ">")
        return np.array(data, dtype=want, order="C").tobytes()
    raw = data.view(f"u{data.dtype.itemsize}")  # bfloat16: write its uint16 bits
    return _storage_bytes(Storage(raw), byteorder)


def write_legacy(
    path: Path,
    obj: Any,
    *,
    magic: Any = MAGIC,
    protocol_version: Any = PROTOCOL_VERSION,
    sys_info: Any = None,
    storage_keys: list | None = None,
) -> Path:
    """Write ``obj`` in torch's legacy (pre-zip) format; returns ``path``."""
    keys: dict[int, tuple[str, Storage]] = {}
    main = dumps(obj, legacy=True, keys=keys)
    stored = sorted(keys.values(), key=lambda kv: kv[0])
    out = io.BytesIO()
    for header in (magic, protocol_version, SYS_INFO if sys_info is None else sys_info):
        out.write(dumps(header))
    out.write(main)
    out.write(dumps([k for k, _ in stored] if storage_keys is None else storage_keys))
    for _, storage in stored:
        out.write(struct.pack("<q", storage.numel))
        out.write(_storage_bytes(storage, "little"))
    path.write_bytes(out.getvalue())
    return path


def write_zip(
    path: Path,
    obj: Any,
    *,
    archive: str = "archive",
    byteorder: str = "little",
    skip: tuple[str, ...] = (),
    extra: dict[str, bytes] | None = None,
) -> Path:
    """Write ``obj`` in torch's zip format (records under ``archive/``); returns ``path``.

    ``skip`` names records (relative to ``archive/``) to leave out and ``extra`` adds or replaces
    records, to make broken files.
    """
    keys: dict[int, tuple[str, Storage]] = {}
    records = {"data.pkl": dumps(obj, legacy=False, keys=keys)}
    records["byteorder"] = byteorder.encode()
    for key, storage in keys.values():
        records[f"data/{key}"] = _storage_bytes(storage, byteorder)
    records["version"] = b"3\n"
    records[".data/serialization_id"] = b"0" * 40
    records.update(extra or {})
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in records.items():
            if name not in skip:
                zf.writestr(f"{archive}/{name}", data)
    return path


class MarkerWriter:
    """An arbitrary class: constructing it creates a file (an unsafe loader would do so)."""

    def __init__(self, marker: str) -> None:
        Path(marker).touch()


def payloads(marker: Path) -> dict[str, Any]:
    """Malicious objects, each creating ``marker`` if an unsafe unpickler runs it."""
    m = str(marker)
    touch = f"open({m!r}, 'w').close()"
    importer = Reduce(Global("builtins", "__import__"), ("os",))
    return {
        "os.system": Reduce(Global("os", "system"), (f"touch '{m}'",)),
        "posix.system": Reduce(Global("posix", "system"), (f"touch '{m}'",)),
        "builtins.eval": Reduce(Global("builtins", "eval"), (touch,)),
        "builtins.exec": Reduce(Global("builtins", "exec"), (touch,)),
        "subprocess.Popen": Reduce(Global("subprocess", "Popen"), (["touch", m],)),
        "getattr chain": Reduce(
            Reduce(Global("builtins", "getattr"), (importer, "system")), (f"touch '{m}'",)
        ),
        "arbitrary class": Reduce(Global(__name__, "MarkerWriter"), (m,)),
        "torch.load": Reduce(Global("torch", "load"), (m,)),
        "hidden in a tensor's hooks": OrderedDict(
            ok=tensor(np.ones(2, np.float32)),
            bad=Tensor(
                Storage(np.ones(2, np.float32)),
                0,
                (2,),
                (1,),
                hooks=Reduce(Global("builtins", "eval"), (touch,)),
            ),
        ),
        "storage type is eval": PersistentId(
            ("storage", Reduce(Global("builtins", "eval"), (touch,)), "0", "cpu", 1)
        ),
    }


# Payloads an ordinary unpickler can run here (torch.load needs torch, which tests lack).
RUNNABLE = (
    "os.system",
    "posix.system",
    "builtins.eval",
    "builtins.exec",
    "subprocess.Popen",
    "getattr chain",
    "arbitrary class",
    "hidden in a tensor's hooks",
    "storage type is eval",
)


class _UnsafeLoader(pickle.Unpickler):
    """What an unsafe loader does: resolve any global. torch.* names become inert stand-ins."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" or module.startswith("torch."):
            return lambda *args, **kwargs: (module, name, args)
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        return pid


def unsafe_load(data: bytes) -> Any:
    """Unpickle ``data`` like ``pickle.load`` would (runs payloads!); for control tests only."""
    return _UnsafeLoader(io.BytesIO(data)).load()


# ------------------------------------------------------------------------------ hostile zip files


def _local_record(name: str, data: bytes) -> bytes:
    """A zip local file header (stored, no extra field) followed by ``data``."""
    crc = zlib.crc32(data)
    header = struct.pack(
        "<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, 0, 0, 0x21, crc, len(data), len(data), len(name), 0
    )
    return header + name.encode() + data


def _central_record(name: str, data: bytes, offset: int) -> bytes:
    crc = zlib.crc32(data)
    header = struct.pack(
        "<4sHHHHHHIIIHHHHHII",
        b"PK\x01\x02", 20, 20, 0, 0, 0, 0x21, crc, len(data), len(data), len(name), 0, 0, 0, 0, 0,
        offset,
    )  # fmt: skip
    return header + name.encode()


def write_overlapping_zip(path: Path, nbytes: int) -> Path:
    """A zip checkpoint whose storage record ``data/0`` contains the whole record ``data/1``.

    Both records are valid to the zipfile module, so every byte of ``data/1`` is read twice
    (nesting more such records would read it again and again: a "quoted overlap" zip bomb).
    """
    inner_data = np.arange(nbytes, dtype=np.uint8).tobytes()
    inner = _local_record("archive/data/1", inner_data)
    outer_data = inner
    obj = {
        "outer": tensor(np.frombuffer(outer_data, np.uint8)),
        "inner": tensor(np.frombuffer(inner_data, np.uint8)),
    }
    pkl = dumps(obj)
    out = io.BytesIO()
    entries = []
    for name, data in [("archive/data.pkl", pkl), ("archive/data/0", outer_data)]:
        entries.append((name, data, out.tell()))
        out.write(_local_record(name, data))
    outer_offset = entries[-1][2]
    entries.append(("archive/data/1", inner_data, outer_offset + 30 + len("archive/data/0")))
    directory = b"".join(_central_record(*entry) for entry in entries)
    start = out.tell()
    out.write(directory)
    out.write(struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 3, 3, len(directory), start, 0))
    path.write_bytes(out.getvalue())
    return path


def set_zip_flags(path: Path, name: str, flags: int) -> Path:
    """Set the general-purpose flag bits of record ``name`` in the central directory of a zip
    (bit 0: encrypted), leaving everything else as it is."""
    data = bytearray(path.read_bytes())
    pos = data.index(b"PK\x01\x02")
    while True:
        (name_len,) = struct.unpack_from("<H", data, pos + 28)
        if data[pos + 46 : pos + 46 + name_len] == name.encode():
            struct.pack_into("<H", data, pos + 8, flags)
            break
        pos = data.index(b"PK\x01\x02", pos + 4)
    path.write_bytes(bytes(data))
    return path
