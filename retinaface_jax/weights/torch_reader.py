"""Safe, torch-free reader for PyTorch checkpoint files (``torch.save`` output).

Reads both serialisation formats torch has used:

* legacy (before torch 1.6, and every official RetinaFace file): four pickles back to back
  (magic number, protocol version, system info, the object tree with persistent storage ids),
  a fifth pickle listing the storage keys, then each storage's raw bytes prefixed by its
  element count as an 8-byte little-endian integer;
* zip (torch >= 1.6): ``<archive>/data.pkl`` plus one ``<archive>/data/<key>`` record per storage
  and ``<archive>/byteorder``.

Nothing from the file is executed. The unpickler resolves only an explicit allowlist of
globals (the tensor rebuild functions, legacy storage classes, ``collections.OrderedDict`` and
a few harmless builtins), each mapped to our own stand-in rather than the real object, and
refuses everything else with :class:`UnsafeCheckpointError`. Tensors come back as contiguous
numpy arrays of the saved dtype, shape, strides and storage offset. Every size declared by the
file is checked against the bytes actually present, so truncated or corrupted files give a
:class:`CheckpointError` naming the file instead of a hang or a huge allocation.

Limits, so that a crafted file is refused within seconds and with bounded memory:

* memory budget: the arrays returned may hold at most ``BUDGET_FACTOR`` (4) times the storage
  bytes present in the file plus ``BUDGET_FLOOR`` (16 MiB) in total. Honest files materialise
  each stored byte about once (tensors sharing a storage a few times); only overlapping views
  (stride 0, or many tensors over one storage) can ask for more, and are refused beyond that;
* the pickles are read by the pure-Python unpickler (its memo is a dict: a huge memo index
  cannot make it allocate), dict keys and set items must be str, bytes, bool, None or 64-bit
  ints (no hash-flooding with crafted numbers), and BUILD is only accepted on an OrderedDict
  (whose state, e.g. ``_metadata``, is dropped);
* ints anywhere in the tree must fit in 64 bits; tensor sizes, strides and storage offsets and
  storage element counts must lie in ``[0, MAX_INDEX)`` (2**48), a tensor has at most
  ``MAX_RANK`` (32) dimensions, and its sizes multiplied (zeros counted as one) stay below
  ``MAX_INDEX``;
* containers nest at most ``MAX_DEPTH`` (100) deep and may not contain themselves (a cycle,
  e.g. ``{'state_dict': <itself>}``); shared references (the same tensor twice) are fine;
* zip records read may not add up to more bytes than the file holds (overlapping records).

Any other failure while parsing (``ValueError``, ``struct.error``, zipfile errors,
``MemoryError``...) is reported as a :class:`CheckpointError` naming the file, never raw.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CheckpointError",
    "UnsafeCheckpointError",
    "load_torch_checkpoint",
    "read_state_dict",
]

# Magic number and protocol version written at the start of legacy torch files.
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

# Total bytes of the returned arrays: at most BUDGET_FACTOR x the storage bytes in the file
# plus BUDGET_FLOOR (room for small expanded views in tiny files). See the module docstring.
BUDGET_FACTOR = 4
BUDGET_FLOOR = 16 << 20
# Bounds on what the file may declare (sizes, strides, offsets, counts; rank; nesting).
MAX_INDEX = 1 << 48
MAX_RANK = 32
MAX_DEPTH = 100
_INT_MIN, _INT_END = -(1 << 63), 1 << 64  # ints anywhere in the tree: int64 or uint64
_MAX_MEMO_INDEX = 1 << 32  # text PUT/GET indices (binary ones are 1 or 4 bytes anyway)


class CheckpointError(ValueError):
    """The checkpoint file is truncated, corrupted or not a tensor checkpoint."""


class UnsafeCheckpointError(CheckpointError):
    """The checkpoint asks for a global (function or class) outside the allowlist."""


def _bfloat16() -> np.dtype | None:
    try:
        import ml_dtypes
    except ImportError:  # pragma: no cover - ml_dtypes ships with jax
        return None
    return np.dtype(ml_dtypes.bfloat16)


# Legacy storage class name -> numpy dtype of one element.
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
    "UntypedStorage": np.dtype(np.uint8),
}
if (_bf16 := _bfloat16()) is not None:
    _STORAGE_DTYPES["BFloat16Storage"] = _bf16

# ``torch.<dtype>`` name -> numpy dtype, for _rebuild_tensor_v3 (dtypes without a storage class).
_TORCH_DTYPES: dict[str, np.dtype] = {
    "float64": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint64": np.dtype(np.uint64),
    "uint32": np.dtype(np.uint32),
    "uint16": np.dtype(np.uint16),
    "uint8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_),
    "complex64": np.dtype(np.complex64),
    "complex128": np.dtype(np.complex128),
}
if _bf16 is not None:
    import ml_dtypes

    _TORCH_DTYPES["bfloat16"] = _bf16
    _TORCH_DTYPES.update(
        {n: np.dtype(getattr(ml_dtypes, n)) for n in ("float8_e4m3fn", "float8_e5m2")}
    )


# ----------------------------------------------------------------------------------------------
# Stand-ins produced while unpickling. All are frozen and slotted, and the unpickler refuses BUILD
# on anything but an OrderedDict, so a crafted file cannot alter them after they were validated;
# arrays are only materialised after unpickling.


@dataclass(frozen=True, slots=True)
class _StorageType:
    """Stand-in for ``torch.FloatStorage`` etc.: only carries the element dtype."""

    name: str
    dtype: np.dtype


@dataclass(frozen=True, slots=True)
class _DType:
    """Stand-in for ``torch.float32`` etc. (the dtype argument of _rebuild_tensor_v3)."""

    name: str
    dtype: np.dtype


@dataclass(frozen=True, slots=True)
class _StorageRef:
    """A storage named by a persistent id: ``numel`` elements of ``dtype`` under ``key``.

    For legacy storage views, ``view`` is ``(root_key, offset, numel_of_root)`` and the data
    lives in the root storage starting at element ``offset``.
    """

    key: str
    dtype: np.dtype
    numel: int
    view: tuple[str, int, int] | None = None


@dataclass(frozen=True, slots=True)
class _TensorRef:
    """A tensor as ``_rebuild_tensor_v2`` describes it, resolved to numpy after unpickling."""

    storage: _StorageRef
    offset: int  # in elements of ``dtype``, as are the strides
    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: np.dtype  # the storage's dtype, except for _rebuild_tensor_v3
    conj: bool = False
    neg: bool = False


@dataclass(frozen=True, slots=True)
class _TypeMarker:
    """Stand-in for ``torch.Tensor`` / ``torch.nn.Parameter`` as used by _rebuild_from_type_v2."""

    name: str


class _SafeCallable:
    """Base of the allowlisted callables: no instance state, so BUILD cannot alter them."""

    __slots__ = ()


def _check_int(value: Any, what: str) -> int:
    """``value`` as an index-like int in ``[0, MAX_INDEX)``; anything else is refused."""
    if type(value) is not int:
        raise CheckpointError(f"{what} must be an int, got {type(value).__name__}")
    if value < 0:
        raise CheckpointError(f"{what} is negative ({_short_repr(value)})")
    if value >= MAX_INDEX:
        raise CheckpointError(
            f"{what} {_short_repr(value)} is absurdly large (limit {MAX_INDEX}, 2**48)"
        )
    return value


def _check_int_tuple(value: Any, what: str) -> tuple[int, ...]:
    """A size or stride: at most MAX_RANK ints, each checked by :func:`_check_int`."""
    if not isinstance(value, tuple | list):
        raise CheckpointError(f"{what} must be a tuple of ints, got {type(value).__name__}")
    if len(value) > MAX_RANK:
        raise CheckpointError(f"{what} has {len(value)} dimensions, more than {MAX_RANK}")
    return tuple(_check_int(v, what) for v in value)


class _RebuildTensorV2(_SafeCallable):
    """``torch._utils._rebuild_tensor_v2`` (and the older ``_rebuild_tensor``).

    Arguments: storage, offset, size, stride[, requires_grad, backward_hooks[, metadata]].
    """

    __slots__ = ()

    def __call__(self, storage, offset, size, stride, _grad=False, _hooks=None, metadata=None):
        return _tensor_ref(storage, offset, size, stride, None, metadata)


class _RebuildTensorV3(_SafeCallable):
    """``torch._utils._rebuild_tensor_v3``: an untyped storage read as ``dtype``.

    Arguments: storage, offset, size, stride, requires_grad, backward_hooks, dtype[, metadata].
    """

    __slots__ = ()

    def __call__(self, storage, offset, size, stride, _grad, _hooks, dtype, metadata=None):
        if not isinstance(dtype, _DType):
            raise CheckpointError(f"tensor dtype must be a torch dtype, got {type(dtype).__name__}")
        return _tensor_ref(storage, offset, size, stride, dtype.dtype, metadata)


def _tensor_ref(
    storage: Any, offset: Any, size: Any, stride: Any, dtype: np.dtype | None, metadata: Any
) -> _TensorRef:
    """Validate the arguments shared by the tensor rebuild functions."""
    if not isinstance(storage, _StorageRef):
        raise CheckpointError(
            f"tensor storage must come from a storage persistent id, got {type(storage).__name__}"
        )
    flags = {"conj": False, "neg": False}
    if metadata:
        if not isinstance(metadata, dict) or not set(metadata) <= set(flags):
            raise CheckpointError(f"unsupported tensor metadata {_short_repr(metadata)}")
        flags.update({k: bool(v) for k, v in metadata.items()})
    ref = _TensorRef(
        storage=storage,
        offset=_check_int(offset, "storage offset"),
        size=_check_int_tuple(size, "tensor size"),
        stride=_check_int_tuple(stride, "tensor stride"),
        dtype=storage.dtype if dtype is None else dtype,
        **flags,
    )
    if len(ref.size) != len(ref.stride):
        raise CheckpointError(f"tensor size {ref.size} and stride {ref.stride} differ in rank")
    if math.prod(max(n, 1) for n in ref.size) >= MAX_INDEX:
        raise CheckpointError(
            f"tensor size {ref.size} is absurd (its non-zero sizes multiply to 2**48 or more)"
        )
    return ref


class _RebuildParameter(_SafeCallable):
    """``torch._utils._rebuild_parameter[_with_state]``: a parameter is just its data here."""

    __slots__ = ()

    def __call__(self, data: Any, requires_grad: Any = False, *_hooks_and_state: Any) -> Any:
        if not isinstance(data, _TensorRef):
            raise CheckpointError(f"parameter data must be a tensor, got {type(data).__name__}")
        return data


class _RebuildFromTypeV2(_SafeCallable):
    """``torch._tensor._rebuild_from_type_v2`` for plain tensors and parameters only."""

    __slots__ = ()

    def __call__(self, func: Any, new_type: Any, args: Any, state: Any) -> Any:
        if not isinstance(func, _RebuildTensorV2 | _RebuildTensorV3 | _RebuildParameter):
            raise CheckpointError("_rebuild_from_type_v2 may only wrap a tensor rebuild function")
        if not isinstance(new_type, _TypeMarker) or not isinstance(args, tuple):
            raise CheckpointError("_rebuild_from_type_v2 got an unsupported tensor type")
        return func(*args)


class _CodecsEncode(_SafeCallable):
    """``_codecs.encode(text, 'latin1')``: how protocol-2 pickles spell a ``bytes`` object."""

    __slots__ = ()

    def __call__(self, text: Any, encoding: Any = "utf-8") -> bytes:
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise CheckpointError("_codecs.encode is only allowed as (str, 'latin1')")
        return text.encode("latin1")


def _check_key(key: Any) -> Any:
    """A dict key or set item: str, bytes, bool, None or a 64-bit int (hashes we trust)."""
    if type(key) is int:
        _check_int64(key, "dict key")
    elif not isinstance(key, str | bytes | bool | type(None)):
        raise CheckpointError(
            f"dict key or set item of type {type(key).__name__} is not allowed "
            "(expected str, bytes, bool, None or int)"
        )
    return key


def _check_int64(value: int, what: str) -> int:
    """An int that fits in 64 bits (signed or unsigned); bigger ones are absurd in a checkpoint."""
    if not _INT_MIN <= value < _INT_END:
        raise CheckpointError(f"{what} {_short_repr(value)} does not fit in 64 bits")
    return value


class _MakeOrderedDict(_SafeCallable):
    """``collections.OrderedDict``, with the keys of an initial list of pairs checked."""

    __slots__ = ()

    def __call__(self, items: Any = ()) -> OrderedDict:
        if not isinstance(items, list | tuple):
            raise CheckpointError("OrderedDict(...) may only get a list of (key, value) pairs")
        out = OrderedDict()
        for pair in items:
            if not (isinstance(pair, tuple | list) and len(pair) == 2):
                raise CheckpointError("OrderedDict(...) may only get (key, value) pairs")
            out[_check_key(pair[0])] = pair[1]
        return out


class _MakeSet(_SafeCallable):
    """``builtins.set`` / ``frozenset`` over a list of checked items."""

    __slots__ = ("kind",)

    def __init__(self, kind: type) -> None:
        self.kind = kind

    def __call__(self, items: Any = ()) -> set | frozenset:
        if not isinstance(items, list | tuple):
            raise CheckpointError(f"{self.kind.__name__}(...) may only get a list of items")
        return self.kind(_check_key(item) for item in items)


_REBUILD_TENSOR = _RebuildTensorV2()
_REBUILD_PARAMETER = _RebuildParameter()

# The allowlist: (module, name) -> the stand-in the unpickler gets. Nothing else resolves.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _REBUILD_TENSOR,
    ("torch._utils", "_rebuild_tensor"): _REBUILD_TENSOR,
    ("torch._utils", "_rebuild_tensor_v3"): _RebuildTensorV3(),
    ("torch._utils", "_rebuild_parameter"): _REBUILD_PARAMETER,
    ("torch._utils", "_rebuild_parameter_with_state"): _REBUILD_PARAMETER,
    ("torch._tensor", "_rebuild_from_type_v2"): _RebuildFromTypeV2(),
    ("torch", "Tensor"): _TypeMarker("torch.Tensor"),
    ("torch.nn.parameter", "Parameter"): _TypeMarker("torch.nn.parameter.Parameter"),
    ("collections", "OrderedDict"): _MakeOrderedDict(),
    ("builtins", "set"): _MakeSet(set),
    ("builtins", "frozenset"): _MakeSet(frozenset),
    ("builtins", "complex"): complex,
    # protocol 2 pickles written by Python 3 (torch's default) spell builtins the Python 2 way
    ("__builtin__", "set"): _MakeSet(set),
    ("__builtin__", "frozenset"): _MakeSet(frozenset),
    ("__builtin__", "complex"): complex,
    ("_codecs", "encode"): _CodecsEncode(),
    ("torch.storage", "UntypedStorage"): _StorageType("UntypedStorage", np.dtype(np.uint8)),
    **{("torch", name): _StorageType(name, dtype) for name, dtype in _STORAGE_DTYPES.items()},
    **{("torch", name): _DType(name, dtype) for name, dtype in _TORCH_DTYPES.items()},
}


# ----------------------------------------------------------------------------------------------
# Unpickling


def _text_memo_index(line: bytes) -> int:
    """The index of a text PUT/GET opcode, refused when it is not a small non-negative int."""
    digits = line.rstrip(b"\n")
    if not (digits.isdigit() and len(digits) <= 10 and int(digits) < _MAX_MEMO_INDEX):
        raise CheckpointError(f"bad memo index {_short_repr(digits)}")
    return int(digits)


class _SafeUnpickler(pickle._Unpickler):
    """Unpickler that resolves only allowlisted globals and storage persistent ids.

    Built on the pure-Python unpickler: the C one sizes its memo array by the largest index it
    sees, so 7 bytes of ``LONG_BINPUT 0x0fffffff`` make it allocate gigabytes. The opcodes that
    insert dict keys or set items check them (:func:`_check_key`), and BUILD only runs on an
    OrderedDict, whose state it drops.
    """

    dispatch = pickle._Unpickler.dispatch.copy()

    def _load_put(self) -> None:
        self.memo[_text_memo_index(self.readline())] = self.stack[-1]

    def _load_get(self) -> None:
        self.append(self.memo[_text_memo_index(self.readline())])

    def _load_setitem(self) -> None:
        _check_key(self.stack[-2])
        pickle._Unpickler.load_setitem(self)

    # After a MARK the pure-Python unpickler starts a fresh ``self.stack`` (the old one goes to
    # its metastack), so the items of SETITEMS, DICT, ADDITEMS and FROZENSET are all of it.

    def _load_setitems_or_dict(self, load: Any) -> None:
        for key in self.stack[::2]:
            _check_key(key)
        load(self)

    def _load_setitems(self) -> None:
        self._load_setitems_or_dict(pickle._Unpickler.load_setitems)

    def _load_dict(self) -> None:
        self._load_setitems_or_dict(pickle._Unpickler.load_dict)

    def _load_set_items(self, load: Any) -> None:
        for item in self.stack:
            _check_key(item)
        load(self)

    def _load_additems(self) -> None:
        self._load_set_items(pickle._Unpickler.load_additems)

    def _load_frozenset(self) -> None:
        self._load_set_items(pickle._Unpickler.load_frozenset)

    def _load_build(self) -> None:
        if type(self.stack[-2]) is not OrderedDict:
            raise CheckpointError(
                f"BUILD (setting object state) on {type(self.stack[-2]).__name__} is not allowed"
            )
        self.stack.pop()  # OrderedDict state (a state dict's _metadata) is not needed

    dispatch[pickle.PUT[0]] = _load_put
    dispatch[pickle.GET[0]] = _load_get
    dispatch[pickle.SETITEM[0]] = _load_setitem
    dispatch[pickle.SETITEMS[0]] = _load_setitems
    dispatch[pickle.DICT[0]] = _load_dict
    dispatch[pickle.ADDITEMS[0]] = _load_additems
    dispatch[pickle.FROZENSET[0]] = _load_frozenset
    dispatch[pickle.BUILD[0]] = _load_build

    def __init__(self, data: io.BytesIO, path: Path, storage_pid_len: int | None) -> None:
        super().__init__(data, encoding="utf-8")  # as torch.load, for Python 2 era strings
        self._path = path
        self._pid_len = storage_pid_len  # 5 (zip), 6 (legacy) or None (no storages allowed)
        self.storages: dict[str, _StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise UnsafeCheckpointError(
                f"{self._path}: refusing to load global '{module}.{name}': only the globals a "
                "tensor state dict needs are allowed (the file may contain pickled code or "
                "arbitrary objects; nothing from it was executed)"
            ) from None

    def persistent_load(self, pid: Any) -> _StorageRef:
        if self._pid_len is None:
            raise CheckpointError(f"unexpected persistent id {pid!r} outside the object pickle")
        if (
            not isinstance(pid, tuple)
            or len(pid) != self._pid_len
            or pid[0] != "storage"
            or not isinstance(pid[1], _StorageType)
        ):
            raise UnsafeCheckpointError(
                f"{self._path}: refusing persistent id {_short_repr(pid)}: only "
                f"('storage', <storage type>, key, location, numel"
                f"{', view' if self._pid_len == 6 else ''}) is allowed"
            )
        storage_type, key, location, numel = pid[1], pid[2], pid[3], pid[4]
        view = pid[5] if self._pid_len == 6 else None
        if not isinstance(key, str) or not isinstance(location, str):
            raise CheckpointError(f"storage key and location must be str in {_short_repr(pid)}")
        numel = _check_int(numel, "storage size")
        root = self._register(key, storage_type.dtype, numel)
        if view is None:
            return root
        if not (isinstance(view, tuple) and len(view) == 3 and isinstance(view[0], str)):
            raise CheckpointError(f"malformed storage view in {_short_repr(pid)}")
        view_key, offset, view_numel = view[0], view[1], view[2]
        offset = _check_int(offset, "storage view offset")
        view_numel = _check_int(view_numel, "storage view size")
        if offset + view_numel > numel:
            raise CheckpointError(f"storage view outside its storage in {_short_repr(pid)}")
        return _StorageRef(view_key, storage_type.dtype, view_numel, (key, offset, numel))

    def _register(self, key: str, dtype: np.dtype, numel: int) -> _StorageRef:
        ref = self.storages.get(key)
        if ref is None:
            ref = self.storages[key] = _StorageRef(key, dtype, numel)
        elif ref.dtype != dtype or ref.numel != numel:
            raise CheckpointError(f"storage {key!r} is declared twice with different dtype/size")
        return ref


def _short_repr(value: Any, limit: int = 200) -> str:
    """``repr(value)`` cut to ``limit`` characters; never raises (ints too big to print...)."""
    if isinstance(value, str | bytes) and len(value) > limit:
        value = value[:limit]
    elif type(value) is int and value.bit_length() > 256:
        return f"<int of {value.bit_length()} bits>"
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a repr that fails must not hide the real error
        return f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit] + "..."


def _unpickle(stream: io.BytesIO, path: Path, what: str, storage_pid_len: int | None):
    """Run one safe unpickle; return (object, storages). Any failure becomes CheckpointError."""
    unpickler = _SafeUnpickler(stream, path, storage_pid_len)
    try:
        obj = unpickler.load()
    except UnsafeCheckpointError:
        raise
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {what}: {e}") from None
    except RecursionError:
        raise CheckpointError(f"{path}: {what} is nested too deeply") from None
    except EOFError:
        raise CheckpointError(f"{path}: {what} is truncated (file ends inside a pickle)") from None
    except Exception as e:  # noqa: BLE001 - any parse failure means a corrupted file
        raise CheckpointError(
            f"{path}: {what} is corrupted or not a tensor checkpoint ({_describe(e)})"
        ) from e
    return obj, unpickler.storages


def _describe(error: BaseException) -> str:
    """``Type: message`` of an unexpected exception, cut short (its text may come from the file)."""
    try:
        text = str(error)
    except Exception:  # noqa: BLE001
        text = ""
    text = text if len(text) <= 200 else text[:200] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


# ----------------------------------------------------------------------------------------------
# Formats


def _read_legacy(data: bytes, path: Path) -> Any:
    stream = io.BytesIO(data)
    magic, _ = _unpickle(stream, path, "magic number", None)
    if magic != LEGACY_MAGIC:
        raise CheckpointError(f"{path}: bad magic number, not a PyTorch checkpoint")
    version, _ = _unpickle(stream, path, "protocol version", None)
    if version != LEGACY_PROTOCOL_VERSION:
        raise CheckpointError(
            f"{path}: unsupported legacy protocol version {_short_repr(version)} "
            f"(expected {LEGACY_PROTOCOL_VERSION})"
        )
    sys_info, _ = _unpickle(stream, path, "system info", None)
    if not isinstance(sys_info, dict):
        raise CheckpointError(f"{path}: system info is not a dict")
    obj, storages = _unpickle(stream, path, "object pickle", 6)
    keys, _ = _unpickle(stream, path, "storage key list", None)
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise CheckpointError(f"{path}: storage key list is not a list of str")
    if set(keys) != set(storages) or len(keys) != len(storages):
        raise CheckpointError(
            f"{path}: storage key list {_short_repr(sorted(keys))} does not match the storages "
            f"the object pickle uses {_short_repr(sorted(storages))}"
        )
    pos = stream.tell()
    buffers: dict[str, np.ndarray] = {}
    for key in keys:
        ref = storages[key]
        if pos + 8 > len(data):
            raise CheckpointError(f"{path}: truncated: file ends before storage {key!r}")
        (count,) = struct.unpack_from("<q", data, pos)
        pos += 8
        if count != ref.numel:
            raise CheckpointError(
                f"{path}: storage {key!r} holds {count} elements but the object pickle "
                f"declares {ref.numel}"
            )
        nbytes = count * ref.dtype.itemsize
        if pos + nbytes > len(data):
            raise CheckpointError(
                f"{path}: truncated: storage {key!r} needs {nbytes} bytes, only "
                f"{len(data) - pos} left in the file"
            )
        buffers[key] = np.frombuffer(data, np.uint8, count=nbytes, offset=pos)
        pos += nbytes
    return _materialise(obj, buffers, path, little=True)  # torch writes legacy storages as LE


def _read_zip(path: Path, size: int) -> Any:
    try:
        archive = zipfile.ZipFile(path)
    except Exception as e:  # noqa: BLE001 - BadZipFile, OSError, EOFError, ValueError...
        raise CheckpointError(
            f"{path}: corrupted or truncated zip checkpoint ({_describe(e)})"
        ) from e
    with archive:
        infos = {info.filename: info for info in archive.infolist()}
        pickles = [n for n in infos if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise CheckpointError(
                f"{path}: zip checkpoint must hold exactly one '<archive>/data.pkl', "
                f"found {len(pickles)}"
            )
        prefix = pickles[0][: -len("data.pkl")]
        left = [size]  # bytes the records read so far may still add up to (overlap guard)

        def read(name: str) -> bytes:
            info = infos.get(name)
            if info is None:
                raise CheckpointError(f"{path}: zip checkpoint has no record {_short_repr(name)}")
            if info.compress_type != zipfile.ZIP_STORED:
                raise CheckpointError(
                    f"{path}: record {_short_repr(name)} is compressed; torch stores none"
                )
            if info.file_size > left[0]:
                raise CheckpointError(
                    f"{path}: record {_short_repr(name)} declares {info.file_size} bytes, which "
                    f"with the records read before adds up to more than the file's {size} bytes "
                    "(overlapping or corrupted records)"
                )
            left[0] -= info.file_size
            try:
                return archive.read(info)
            except Exception as e:  # noqa: BLE001 - bad CRC, header, encryption flag...
                raise CheckpointError(
                    f"{path}: record {_short_repr(name)} is corrupted ({_describe(e)})"
                ) from e

        byteorder = "little"
        if prefix + "byteorder" in infos:
            byteorder = read(prefix + "byteorder").decode("ascii", "replace").strip()
            if byteorder not in ("little", "big"):
                raise CheckpointError(f"{path}: bad byteorder record {_short_repr(byteorder)}")
        obj, storages = _unpickle(io.BytesIO(read(prefix + "data.pkl")), path, "data.pkl", 5)
        buffers: dict[str, np.ndarray] = {}
        for key, ref in storages.items():
            raw = read(f"{prefix}data/{key}")
            nbytes = ref.numel * ref.dtype.itemsize
            if len(raw) < nbytes:
                raise CheckpointError(
                    f"{path}: storage record {key!r} has {len(raw)} bytes, its "
                    f"{ref.numel} x {ref.dtype} elements need {nbytes}"
                )
            buffers[key] = np.frombuffer(raw, np.uint8, count=nbytes)
    return _materialise(obj, buffers, path, little=byteorder == "little")


def _carrier(dtype: np.dtype) -> np.dtype:
    """The builtin numpy dtype whose bytes hold ``dtype`` (bool as uint8, bfloat16 as uint16)."""
    if dtype == np.bool_:
        return np.dtype(np.uint8)  # any non-zero byte is True, as in torch
    if dtype.isbuiltin == 1:  # numpy's own types; ml_dtypes report 2
        return dtype
    return np.dtype(f"u{dtype.itemsize}")


# ----------------------------------------------------------------------------------------------
# Materialisation: stand-ins -> numpy arrays


def _storage_elements(ref: _TensorRef, buffers: dict[str, np.ndarray], little: bool) -> np.ndarray:
    """The tensor's storage as a 1-D array of its element carrier type (a view of the file)."""
    storage, dtype = ref.storage, ref.dtype
    item = storage.dtype.itemsize
    if storage.view is None:
        raw = buffers[storage.key]
    else:
        root_key, start, _ = storage.view
        raw = buffers[root_key][start * item : (start + storage.numel) * item]
    carrier = _carrier(dtype).newbyteorder("<" if little else ">")
    numel_in_storage = raw.size // dtype.itemsize
    return raw[: numel_in_storage * dtype.itemsize].view(carrier)


def _last_element(ref: _TensorRef) -> int:
    """Index (in storage elements) of the last element a non-empty tensor reads."""
    return ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride, strict=True))


def _copy_tensor(ref: _TensorRef, base: np.ndarray) -> np.ndarray:
    """Copy the (validated, non-empty) strided view of ``base`` into a native contiguous array."""
    dtype, itemsize = ref.dtype, base.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        base[ref.offset :],
        shape=ref.size,
        strides=tuple(s * itemsize for s in ref.stride),
        writeable=False,
    )
    out = np.array(view, dtype=base.dtype.newbyteorder("="), order="C")
    if dtype == np.bool_:
        out = out != 0
    elif out.dtype != dtype:
        out = out.view(dtype)  # bfloat16 / float8 travel as unsigned ints
    if ref.conj:
        np.conjugate(out, out=out)
    if ref.neg:
        np.negative(out, out=out)
    return out


class _Materialiser:
    """Copies the unpickled tree, turning tensor stand-ins into numpy arrays, within limits.

    Shared objects stay shared (each is converted once), containers on the current path may not
    come back (a cycle), nesting stops at MAX_DEPTH and the arrays made so far may not exceed
    the memory budget (see the module docstring).
    """

    def __init__(self, buffers: dict[str, np.ndarray], little: bool) -> None:
        self.buffers, self.little = buffers, little
        present = sum(b.nbytes for b in buffers.values())
        self.budget = BUDGET_FACTOR * present + BUDGET_FLOOR
        self.spent = 0
        self.memo: dict[int, Any] = {}
        self.active: set[int] = set()  # ids of the containers being converted (current path)
        self.path: list[Any] = []  # keys / indices leading to the current object

    def where(self) -> str:
        return "".join(f"[{_short_repr(k, 60)}]" for k in self.path) or "<root>"

    def tensor(self, ref: _TensorRef) -> np.ndarray:
        """One tensor, after checking it stays inside its storage and within the budget."""
        base = _storage_elements(ref, self.buffers, self.little)
        if math.prod(ref.size) == 0:
            return np.zeros(ref.size, dtype=ref.dtype)
        last = _last_element(ref)
        if last >= base.size:
            raise CheckpointError(
                f"tensor of size {ref.size}, stride {ref.stride}, offset {ref.offset} reaches "
                f"element {last} of a storage of {base.size} elements"
            )
        nbytes = math.prod(ref.size) * ref.dtype.itemsize
        if self.spent + nbytes > self.budget:
            raise CheckpointError(
                f"tensor of size {ref.size} needs {nbytes} bytes, which would bring the arrays "
                f"read to {self.spent + nbytes} bytes, over the budget of {self.budget} "
                f"({BUDGET_FACTOR} x the storage bytes in the file + {BUDGET_FLOOR}); "
                "refusing overlapping (e.g. stride 0) views that large"
            )
        self.spent += nbytes
        return _copy_tensor(ref, base)

    def walk(self, x: Any) -> Any:
        if isinstance(x, _SCALARS):
            return _check_int64(x, "integer") if type(x) is int else x
        if id(x) in self.active:
            raise CheckpointError(
                f"object at {self.where()} contains itself (a reference cycle); a checkpoint "
                "is a tree of containers and tensors"
            )
        if id(x) in self.memo:
            return self.memo[id(x)]
        if isinstance(x, _TensorRef | _StorageRef):
            ref = x
            if isinstance(x, _StorageRef):  # a storage saved on its own: flat elements
                ref = _TensorRef(x, 0, (x.numel,), (1,), x.dtype)
            try:
                out = self.tensor(ref)
            except CheckpointError as e:
                raise CheckpointError(f"tensor {self.where()}: {e}") from None
        else:
            if len(self.path) >= MAX_DEPTH:
                raise CheckpointError(f"object tree is nested too deeply (over {MAX_DEPTH} levels)")
            self.active.add(id(x))
            out = self.container(x)
            self.active.discard(id(x))
        self.memo[id(x)] = out
        return out

    def child(self, key: Any, value: Any) -> Any:
        self.path.append(key)
        out = self.walk(value)
        self.path.pop()
        return out

    def container(self, x: Any) -> Any:
        kind = type(x)
        if kind in (dict, OrderedDict):
            out = kind()
            for k, v in x.items():
                out[_check_key(k)] = self.child(k, v)
            return out
        if kind in (list, tuple):
            return kind(self.child(i, v) for i, v in enumerate(x))
        if kind in (set, frozenset):
            return kind(_check_key(v) for v in x)
        raise CheckpointError(f"unsupported object of type {kind.__name__} at {self.where()}")


_SCALARS = (type(None), bool, int, float, complex, str, bytes)


def _materialise(obj: Any, buffers: dict[str, np.ndarray], path: Path, *, little: bool) -> Any:
    """The unpickled tree with numpy arrays for tensors; any refusal names ``path``."""
    try:
        return _Materialiser(buffers, little).walk(obj)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except RecursionError:
        raise CheckpointError(f"{path}: object tree is nested too deeply") from None


# ----------------------------------------------------------------------------------------------
# Public API


def load_torch_checkpoint(path: str | os.PathLike) -> Any:
    """Read a ``torch.save`` file (legacy or zip format) without torch and without executing it.

    Returns the saved object tree (dicts, OrderedDicts, lists, tuples, scalars) with every
    tensor replaced by a contiguous numpy array of its dtype and shape. Raises
    :class:`UnsafeCheckpointError` for any global outside the allowlist and
    :class:`CheckpointError` for truncated, corrupted, malicious or non-checkpoint files (see the
    limits in the module docstring); every message names the file.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read checkpoint ({e.strerror or e})") from None
    try:
        return _read(data, path)
    except CheckpointError as e:
        if str(path) in str(e):
            raise
        raise type(e)(f"{path}: {e}") from None
    except RecursionError:
        raise CheckpointError(f"{path}: object tree is nested too deeply") from None
    except Exception as e:  # noqa: BLE001 - whatever a crafted file triggers, report it as such
        raise CheckpointError(
            f"{path}: corrupted or not a tensor checkpoint ({_describe(e)})"
        ) from e


def _read(data: bytes, path: Path) -> Any:
    """Dispatch on the file's first bytes: zip archive or legacy pickles."""
    if data[:4] == b"PK\x03\x04":
        return _read_zip(path, len(data))
    if data[:2] == b"\x80\x02" or data[:1] == b"\x80":
        return _read_legacy(data, path)
    raise CheckpointError(
        f"{path}: not a PyTorch checkpoint (neither a zip archive nor a legacy pickle file)"
    )


_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net")


def read_state_dict(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The tensor state dict in ``source`` (a checkpoint path or an already loaded object).

    Unwraps ``{'state_dict': ...}`` / ``{'model': ...}`` wrappers, strips the ``module.`` prefix
    ``nn.DataParallel`` adds, and drops ``num_batches_tracked`` counters, which inference does
    not use. Every remaining key must be a str and every value an array. Errors are
    :class:`CheckpointError` naming the file (or "state dict" for a mapping).
    """
    name = str(source) if isinstance(source, str | os.PathLike) else "state dict"
    obj = load_torch_checkpoint(source) if isinstance(source, str | os.PathLike) else source
    obj = _unwrap(obj, name)
    out: dict[str, np.ndarray] = {}
    for k, v in obj.items():
        if not isinstance(k, str):
            raise CheckpointError(
                f"{name}: state dict key {_short_repr(k, 60)} is {type(k).__name__}, expected str"
            )
        if k.rsplit(".", 1)[-1] == "num_batches_tracked":
            continue
        if not isinstance(v, np.ndarray):
            if not (hasattr(v, "__array__") and hasattr(v, "shape")):  # e.g. a jax.Array
                raise CheckpointError(
                    f"{name}: entry {_short_repr(k, 100)} is {type(v).__name__}, not a tensor"
                )
            v = np.asarray(v)
        short = k.removeprefix("module.")
        if short in out:
            raise CheckpointError(
                f"{name}: key {_short_repr(short, 100)} appears with and without 'module.'"
            )
        out[short] = v
    return out


def _unwrap(obj: Any, name: str) -> Mapping:
    """Follow ``{'state_dict': ...}``-style wrappers down to the state dict; refuse cycles."""
    seen: set[int] = set()
    while isinstance(obj, Mapping):
        if id(obj) in seen:
            raise CheckpointError(
                f"{name}: the {'/'.join(_WRAPPER_KEYS)} wrapper entries form a cycle "
                "(a dict that contains itself)"
            )
        seen.add(id(obj))
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            return obj
        obj = inner
    raise CheckpointError(
        f"{name}: expected a mapping of names to tensors, got {type(obj).__name__}"
    )
