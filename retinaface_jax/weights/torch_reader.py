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

# A copy bigger than its storage only happens for overlapping (e.g. expanded, stride 0) views;
# refuse those above this size instead of letting a tiny file demand gigabytes.
_MAX_EXPANDED_BYTES = 1 << 28


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
# Stand-ins produced while unpickling. All are frozen and slotted, so a BUILD opcode in a crafted
# file cannot set attributes on them; arrays are only materialised after unpickling.


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
    if type(value) is not int:
        raise CheckpointError(f"{what} must be an int, got {type(value).__name__}")
    return value


def _check_int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple | list):
        raise CheckpointError(f"{what} must be a tuple of ints, got {type(value).__name__}")
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
            raise CheckpointError(f"unsupported tensor metadata {metadata!r}")
        flags.update({k: bool(v) for k, v in metadata.items()})
    return _TensorRef(
        storage=storage,
        offset=_check_int(offset, "storage offset"),
        size=_check_int_tuple(size, "tensor size"),
        stride=_check_int_tuple(stride, "tensor stride"),
        dtype=storage.dtype if dtype is None else dtype,
        **flags,
    )


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
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("_codecs", "encode"): _CodecsEncode(),
    ("torch.storage", "UntypedStorage"): _StorageType("UntypedStorage", np.dtype(np.uint8)),
    **{("torch", name): _StorageType(name, dtype) for name, dtype in _STORAGE_DTYPES.items()},
    **{("torch", name): _DType(name, dtype) for name, dtype in _TORCH_DTYPES.items()},
}


# ----------------------------------------------------------------------------------------------
# Unpickling


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allowlisted globals and storage persistent ids."""

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
        if _check_int(numel, "storage size") < 0:
            raise CheckpointError(f"negative storage size in {_short_repr(pid)}")
        root = self._register(key, storage_type.dtype, numel)
        if view is None:
            return root
        if not (isinstance(view, tuple) and len(view) == 3 and isinstance(view[0], str)):
            raise CheckpointError(f"malformed storage view in {_short_repr(pid)}")
        view_key, offset, view_numel = view[0], view[1], view[2]
        offset = _check_int(offset, "storage view offset")
        view_numel = _check_int(view_numel, "storage view size")
        if offset < 0 or view_numel < 0 or offset + view_numel > numel:
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
    text = repr(value)
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
            f"{path}: {what} is corrupted or not a tensor checkpoint ({type(e).__name__}: {e})"
        ) from None
    return obj, unpickler.storages


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
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise CheckpointError(f"{path}: corrupted or truncated zip checkpoint ({e})") from None
    with archive:
        infos = {info.filename: info for info in archive.infolist()}
        pickles = [n for n in infos if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise CheckpointError(
                f"{path}: zip checkpoint must hold exactly one '<archive>/data.pkl', "
                f"found {len(pickles)}"
            )
        prefix = pickles[0][: -len("data.pkl")]

        def read(name: str) -> bytes:
            info = infos.get(name)
            if info is None:
                raise CheckpointError(f"{path}: zip checkpoint has no record {name!r}")
            if info.compress_type != zipfile.ZIP_STORED:
                raise CheckpointError(f"{path}: record {name!r} is compressed; torch stores none")
            if info.file_size > size:
                raise CheckpointError(
                    f"{path}: record {name!r} declares {info.file_size} bytes, more than the "
                    f"file holds ({size})"
                )
            try:
                return archive.read(info)
            except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
                raise CheckpointError(f"{path}: record {name!r} is corrupted ({e})") from None

        byteorder = "little"
        if prefix + "byteorder" in infos:
            byteorder = read(prefix + "byteorder").decode("ascii", "replace").strip()
            if byteorder not in ("little", "big"):
                raise CheckpointError(f"{path}: bad byteorder record {byteorder!r}")
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


def _tensor_array(ref: _TensorRef, buffers: dict[str, np.ndarray], little: bool) -> np.ndarray:
    """Copy one tensor out of its storage bytes (``buffers``: key -> uint8 array)."""
    storage, dtype = ref.storage, ref.dtype
    item = storage.dtype.itemsize
    if storage.view is None:
        raw = buffers[storage.key]
    else:
        root_key, start, _ = storage.view
        raw = buffers[root_key][start * item : (start + storage.numel) * item]
    carrier = _carrier(dtype).newbyteorder("<" if little else ">")
    numel_in_storage = raw.size // dtype.itemsize
    base = raw[: numel_in_storage * dtype.itemsize].view(carrier)
    if len(ref.size) != len(ref.stride):
        raise CheckpointError(f"tensor size {ref.size} and stride {ref.stride} differ in rank")
    if any(s < 0 for s in ref.size) or any(s < 0 for s in ref.stride) or ref.offset < 0:
        raise CheckpointError(
            f"negative size/stride/offset in tensor {ref.size}/{ref.stride}/{ref.offset}"
        )
    numel = math.prod(ref.size)
    if numel == 0:
        return np.zeros(ref.size, dtype=dtype)
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride, strict=True))
    if last >= numel_in_storage:
        raise CheckpointError(
            f"tensor of size {ref.size}, stride {ref.stride}, offset {ref.offset} reaches "
            f"element {last} of a storage of {numel_in_storage} elements"
        )
    if numel > numel_in_storage and numel * dtype.itemsize > _MAX_EXPANDED_BYTES:
        raise CheckpointError(
            f"tensor of size {ref.size} would need {numel * dtype.itemsize} bytes from a storage "
            f"of {numel_in_storage} elements; refusing such a large overlapping view"
        )
    itemsize = base.dtype.itemsize
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
        out = np.conj(out)
    if ref.neg:
        out = np.negative(out)
    return out


_SCALARS = (type(None), bool, int, float, complex, str, bytes)


def _materialise(obj: Any, buffers: dict[str, np.ndarray], path: Path, *, little: bool) -> Any:
    """Copy the unpickled tree, turning tensor stand-ins into numpy arrays."""
    memo: dict[int, Any] = {}

    def key(k: Any) -> Any:
        if isinstance(k, _SCALARS) or (isinstance(k, tuple) and all(map(_is_scalar, k))):
            return k
        raise CheckpointError(f"unsupported dict key of type {type(k).__name__}")

    def walk(x: Any, where: str) -> Any:
        if isinstance(x, _SCALARS):
            return x
        if id(x) in memo:
            return memo[id(x)]
        if isinstance(x, _TensorRef | _StorageRef):
            try:
                ref = x
                if isinstance(x, _StorageRef):  # a storage saved on its own: flat elements
                    ref = _TensorRef(x, 0, (x.numel,), (1,), x.dtype)
                out: Any = _tensor_array(ref, buffers, little)
            except CheckpointError as e:
                raise CheckpointError(f"tensor {where or '<root>'}: {e}") from None
        elif type(x) in (dict, OrderedDict):
            out = memo[id(x)] = type(x)()
            for k, v in x.items():
                out[key(k)] = walk(v, f"{where}[{k!r}]")
        elif type(x) is list:
            out = memo[id(x)] = []
            out.extend(walk(v, f"{where}[{i}]") for i, v in enumerate(x))
        elif type(x) is tuple:
            out = tuple(walk(v, f"{where}[{i}]") for i, v in enumerate(x))
        elif type(x) in (set, frozenset):
            out = type(x)(key(v) for v in x)
        else:
            raise CheckpointError(
                f"unsupported object of type {type(x).__name__} at {where or '<root>'}"
            )
        memo[id(x)] = out
        return out

    try:
        return walk(obj, "")
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except RecursionError:
        raise CheckpointError(f"{path}: object tree is nested too deeply") from None


def _is_scalar(x: Any) -> bool:
    return isinstance(x, _SCALARS)


# ----------------------------------------------------------------------------------------------
# Public API


def load_torch_checkpoint(path: str | os.PathLike) -> Any:
    """Read a ``torch.save`` file (legacy or zip format) without torch and without executing it.

    Returns the saved object tree (dicts, OrderedDicts, lists, tuples, scalars) with every
    tensor replaced by a contiguous numpy array of its dtype and shape. Raises
    :class:`UnsafeCheckpointError` for any global outside the allowlist and
    :class:`CheckpointError` for truncated, corrupted or non-checkpoint files.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read checkpoint ({e.strerror or e})") from None
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
    not use. Every remaining value must be an array.
    """
    name = str(source) if isinstance(source, str | os.PathLike) else "state dict"
    obj = load_torch_checkpoint(source) if isinstance(source, str | os.PathLike) else source
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{name}: expected a mapping of names to tensors, got {type(obj)}")
    out: dict[str, np.ndarray] = {}
    for k, v in obj.items():
        k = str(k)
        if k.rsplit(".", 1)[-1] == "num_batches_tracked":
            continue
        if not isinstance(v, np.ndarray):
            if not (hasattr(v, "__array__") and hasattr(v, "shape")):  # e.g. a jax.Array
                raise CheckpointError(f"{name}: entry {k!r} is {type(v).__name__}, not a tensor")
            v = np.asarray(v)
        short = k.removeprefix("module.")
        if short in out:
            raise CheckpointError(f"{name}: key {short!r} appears with and without 'module.'")
        out[short] = v
    return out
