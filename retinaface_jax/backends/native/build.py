"""Compile, cache, load and register the hand-written CPU convolution kernels (``cpu_conv.cc``).

Runtime compilation. The kernels are C++ XLA FFI handlers. Like ``torch.utils.cpp_extension.load``
or Triton, they are compiled on the user's machine the first time they are needed rather than when
the package is installed: ``pip install`` has no build step, and ``-march=native`` is safe because
the library only ever runs on the CPU that built it.

Cache key. The library is cached as ``<cache_dir>/kernels/cpu_conv-<key>.so`` (``cache_dir`` is
``$RETINAFACE_CACHE`` or ``~/.cache/retinaface_jax``, see ``retinaface_jax.user_cache``). The
key is a sha256 over everything that determines the binary: the source (``cpu_conv.cc`` and the
headers in ``src/`` it includes: every file of :data:`SOURCES`, name and contents, in order), the
compiler (path and first line of ``--version``), the flags, the jaxlib version (which fixes the FFI
headers), the machine architecture and the CPU identity (model name and feature flags). A cache
shared between machines (network home directory, container volume) therefore never loads a library
built for another CPU, and an edited source or upgraded jaxlib gets a fresh build. Old entries are
left behind.

Atomic builds. The compiler writes a temporary file in the cache directory that is then
``os.replace``d into place, so two processes building at once are both fine (the last identical file
wins), a killed build never leaves a half-written library under the final name, and a process that
has the old file mapped keeps it. If the cache directory cannot be written, the library is built into
a fresh temporary directory instead (and so compiled again by every process).

Fallback. :func:`native_kernels_available` is what model code calls: once per process it builds or
reuses the library, loads it and registers the FFI targets (:data:`TARGETS`) with JAX. It never
raises: on any failure (no compiler, compile error or timeout, load error, missing symbol) it warns
once with a ``RuntimeWarning`` naming the command, the source and the tail of the compiler's stderr,
and returns False so callers use the (slower) XLA formulation of the convolutions.
``RETINAFACE_NATIVE_KERNELS=0`` turns the kernels off without compiling anything.

JAX is imported inside the functions only: importing this module stays cheap.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import secrets
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

logger = logging.getLogger(__name__)

SOURCE: Path = Path(__file__).with_name("cpu_conv.cc")
"""The C++ source compiled, shipped as package data next to this module: the library's one
translation unit, which includes the kernel families in ``src/`` (a unity build)."""

SOURCES: tuple[Path, ...] = (
    SOURCE,
    *(
        SOURCE.parent / "src" / name
        for name in (
            "common.h",
            "conv.h",
            "depthwise.h",
            "weight_grad.h",
            "batchnorm.h",
            "topk_nms.h",
            "match_overlaps.h",
        )
    ),
)
"""Every file of the kernels' source (:data:`SOURCE` first, then the headers it includes, in its
include order): all go into the cache key. The headers are found relative to the including file."""

TARGETS: dict[str, str] = {
    "retinaface_conv": "RfConv",
    "retinaface_conv_u8": "RfConvU8",
    "retinaface_conv_winograd": "RfConvWinograd",
    "retinaface_conv_dw": "RfConvDw",
    "retinaface_heads": "RfHeads",
    "retinaface_topk_nms": "RfTopkNms",
    "retinaface_depthwise": "RfDepthwise",
    "retinaface_depthwise_grad": "RfDepthwiseGrad",
    "retinaface_depthwise_bn": "RfDepthwiseBn",
    "retinaface_depthwise_bn_grad": "RfDepthwiseBnGrad",
    "retinaface_conv_bn": "RfConvBn",
    "retinaface_conv_bn_grad": "RfConvBnGrad",
    "retinaface_moments": "RfMoments",
    "retinaface_bn_grad_sums": "RfBnGradSums",
    "retinaface_weight_grad": "RfWeightGrad",
    "retinaface_weight_grad_u8": "RfWeightGradU8",
    "retinaface_match_overlaps": "RfMatchOverlaps",
}
"""FFI target name -> handler symbol exported by the library (``XLA_FFI_DEFINE_HANDLER_SYMBOL``)."""

CXXFLAGS: tuple[str, ...] = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
"""Compiler flags (plus ``-I<jax.ffi.include_dir()>``). No ``-ffast-math``: results must match XLA."""

COMPILERS: tuple[str, ...] = ("g++", "c++", "clang++")
"""Compilers tried in order (via ``shutil.which``) when ``$CXX`` is not set."""

COMPILE_TIMEOUT: float = 300.0
"""Seconds before a compile is killed (with its whole process group) and counted as a failure."""

ENV_SWITCH = "RETINAFACE_NATIVE_KERNELS"
"""Set to ``0`` to disable the native kernels without trying to compile them."""

KERNEL_CHOICES: tuple[str, ...] = ("auto", "native", "xla")
# the train step's choices: also the plain model differentiated as it is (train.step.train_kernels)
TRAIN_KERNEL_CHOICES: tuple[str, ...] = (*KERNEL_CHOICES, "reference")
"""What a ``Detector`` may run on (``kernels=``, ``--kernels``): ``auto`` picks the native kernels
when they are usable, ``native`` requires them, ``xla`` never uses them."""

_SUPPORTED_SYSTEMS = ("linux", "darwin")
_SUPPORTED_MACHINES = ("x86_64", "amd64", "aarch64", "arm64")
# /proc/cpuinfo keys identifying the CPU: x86 has "model name" and "flags"; aarch64 has the others.
_CPUINFO_KEYS = ("model name", "flags", "Features", "CPU implementer", "CPU part")
_STDERR_TAIL = 20

_lock = threading.Lock()
_available: bool | None = None  # the once-per-process answer of native_kernels_available
_library: ctypes.CDLL | None = None  # kept referenced: the registered handlers live in it


class NativeKernelError(RuntimeError):
    """The native kernels could not be built or loaded (the message says which command and why)."""


def _compiler() -> list[str]:
    """The compiler command: ``$CXX`` (may carry arguments, e.g. ``ccache g++``) or g++/c++/clang++."""
    env = os.environ.get("CXX", "").strip()
    if env:
        cmd = shlex.split(env)
        return [shutil.which(cmd[0]) or cmd[0], *cmd[1:]]
    for name in COMPILERS:
        path = shutil.which(name)
        if path:
            return [path]
    raise NativeKernelError(
        f"no C++ compiler found: set $CXX or install one of {', '.join(COMPILERS)} "
        f"(needed to compile {SOURCE})"
    )


def _compiler_version(cmd: list[str]) -> str:
    """First line of ``<compiler> --version`` ('' if it cannot be run): part of the cache key."""
    try:
        done = subprocess.run(
            [*cmd, "--version"], capture_output=True, text=True, errors="replace", timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    lines = done.stdout.strip().splitlines()
    return lines[0].strip() if lines else ""


def _cpu_identity() -> str:
    """What ``-march=native`` depends on: /proc/cpuinfo model and feature flags on Linux."""
    if sys.platform.startswith("linux"):
        try:
            text = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            text = ""
        found: dict[str, str] = {}
        for line in text.splitlines():
            key, sep, value = line.partition(":")
            key = key.strip()
            if sep and key in _CPUINFO_KEYS and key not in found:
                found[key] = value.strip()
        if found:
            return "\n".join(f"{key}: {found[key]}" for key in sorted(found))
    return platform.processor()


def _digest(cmd: list[str]) -> str:
    """sha256 (hex) of everything the compiled binary depends on; see the module docstring."""
    import jaxlib  # cheap: does not import jax

    sources: list[bytes] = []
    for path in SOURCES:
        try:
            sources += [path.name.encode(), path.read_bytes()]
        except OSError as err:
            raise NativeKernelError(f"cannot read the kernel source {path}: {err}") from err
    h = hashlib.sha256()
    parts = (
        *sources,
        shlex.join(cmd),
        _compiler_version(cmd),
        " ".join(CXXFLAGS),
        jaxlib.__version__,
        platform.machine(),
        _cpu_identity(),
    )
    for part in parts:
        data = part if isinstance(part, bytes) else part.encode()
        h.update(len(data).to_bytes(8, "little"))  # length-prefixed: no ambiguity between fields
        h.update(data)
    return h.hexdigest()


def _library_path(cmd: list[str]) -> Path:
    from retinaface_jax.user_cache import cache_dir

    return cache_dir() / "kernels" / f"{SOURCE.stem}-{_digest(cmd)[:16]}.so"


def library_path() -> Path:
    """Where the library for this source, compiler, jaxlib and CPU is cached (nothing is built).

    Raises :class:`NativeKernelError` if no compiler is found: the compiler is part of the key.
    """
    return _library_path(_compiler())


def _stderr_tail(stderr: str) -> str:
    lines = stderr.rstrip().splitlines()[-_STDERR_TAIL:]
    return "\n".join("    " + line for line in lines) if lines else "    (empty)"


def _compile(cmd: list[str], out: Path) -> None:
    """Run the compiler on :data:`SOURCE` writing ``out``; NativeKernelError on any failure."""
    import jax.ffi

    argv = [*cmd, *CXXFLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(out)]

    def failure(what: str, stderr: str) -> NativeKernelError:
        return NativeKernelError(
            f"compiling the native CPU kernels failed: {what}\n"
            f"  command: {shlex.join(argv)}\n"
            f"  source:  {SOURCE} (with {SOURCE.parent / 'src'}/*.h)\n"
            f"  compiler stderr (last {_STDERR_TAIL} lines at most):\n{_stderr_tail(stderr)}"
        )

    try:
        # own session: on timeout the whole group (driver, cc1plus, as, ld) is killed
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            start_new_session=True,
        )
    except OSError as err:
        raise failure(f"the compiler could not be started ({err})", "") from err
    try:
        _, stderr = proc.communicate(timeout=COMPILE_TIMEOUT)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            proc.kill()
        _, stderr = proc.communicate()
        raise failure(f"timed out after {COMPILE_TIMEOUT:g} s", stderr) from None
    if proc.returncode != 0:
        raise failure(f"the compiler exited with status {proc.returncode}", stderr)


def _reserve_output(target: Path) -> Path:
    """Create an empty, uniquely named temporary file beside ``target`` (OSError if not writable)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    tmp.open("xb").close()  # not mkstemp: its 0600 mode would make a shared cache unreadable
    return tmp


def build(force: bool = False) -> Path:
    """Compile the kernels unless the cached library exists (or ``force``); return its path.

    Raises :class:`NativeKernelError` (naming the command, the source and the compiler's stderr) on
    failure. The cache entry appears atomically; if the cache directory is not writable the library
    is built into a new temporary directory instead.
    """
    cmd = _compiler()
    target = _library_path(cmd)
    if target.is_file() and not force:
        return target
    try:
        tmp = _reserve_output(target)
    except OSError as err:
        try:
            fallback = Path(tempfile.mkdtemp(prefix="retinaface_kernels-"))
        except OSError as err2:
            raise NativeKernelError(
                f"cannot write the kernel cache {target.parent} ({err}) nor a temporary "
                f"directory ({err2})"
            ) from err2
        logger.warning(
            "kernel cache %s is not writable (%s); building into %s", target.parent, err, fallback
        )
        target = fallback / target.name
        tmp = _reserve_output(target)
    try:
        start = time.perf_counter()
        _compile(cmd, tmp)
        try:
            os.replace(tmp, target)
        except OSError as err:
            raise NativeKernelError(f"cannot move the compiled library to {target}: {err}") from err
        logger.info(
            "compiled native CPU kernels in %.1f s -> %s", time.perf_counter() - start, target
        )
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _file_extent(data: bytes) -> int:
    """Bytes an ELF or Mach-O 64 shared library needs according to its own headers."""
    if data[:4] == b"\x7fELF" and len(data) >= 64:
        if data[4] != 2:
            raise ValueError("not a 64-bit ELF file")
        e = "<" if data[5] == 1 else ">"
        phoff, shoff = struct.unpack_from(e + "QQ", data, 32)
        phentsize, phnum, shentsize, shnum = struct.unpack_from(e + "HHHH", data, 54)
        end = max(phoff + phentsize * phnum, shoff + shentsize * shnum)
        if phoff + phentsize * phnum > len(data):
            return end
        for i in range(phnum):  # p_offset and p_filesz of every program header
            offset = struct.unpack_from(e + "Q", data, phoff + i * phentsize + 8)[0]
            filesz = struct.unpack_from(e + "Q", data, phoff + i * phentsize + 32)[0]
            end = max(end, offset + filesz)
        return end
    if data[:4] == b"\xcf\xfa\xed\xfe" and len(data) >= 32:  # Mach-O 64, little-endian
        ncmds, sizeofcmds = struct.unpack_from("<II", data, 16)
        end, pos = 32 + sizeofcmds, 32
        for _ in range(ncmds):
            if pos + 8 > len(data):
                return max(end, pos + 8)
            cmd, cmdsize = struct.unpack_from("<II", data, pos)
            if cmd == 0x19 and pos + 56 <= len(data):  # LC_SEGMENT_64: fileoff, filesize
                fileoff, filesize = struct.unpack_from("<QQ", data, pos + 40)
                end = max(end, fileoff + filesize)
            pos += max(cmdsize, 8)
        return end
    raise ValueError("not an ELF or Mach-O 64 shared library")


def _check_complete(path: Path) -> None:
    """Reject a truncated library before dlopen: mapping one can kill the process with SIGBUS."""
    try:
        data = path.read_bytes()
        needed = _file_extent(data)
    except (OSError, ValueError, struct.error) as err:
        raise NativeKernelError(f"cannot load the native CPU kernels from {path}: {err}") from err
    if needed > len(data):
        raise NativeKernelError(
            f"cannot load the native CPU kernels from {path}: truncated "
            f"({len(data)} bytes, its headers describe {needed})"
        )


def _load(path: Path) -> ctypes.CDLL:
    """dlopen the library and check that it exports every handler in :data:`TARGETS`."""
    _check_complete(path)
    try:
        lib = ctypes.cdll.LoadLibrary(str(path))
        for symbol in TARGETS.values():
            getattr(lib, symbol)
    except (OSError, AttributeError) as err:
        raise NativeKernelError(f"cannot load the native CPU kernels from {path}: {err}") from err
    return lib


def _build_and_load() -> ctypes.CDLL:
    """Load the cached library, rebuilding it once if the cached file does not load (truncated...)."""
    path = build()
    try:
        return _load(path)
    except NativeKernelError as err:
        logger.warning("%s; rebuilding it", err)
    return _load(build(force=True))


def _register(lib: ctypes.CDLL) -> None:
    import jax.ffi

    for name, symbol in TARGETS.items():
        capsule = jax.ffi.pycapsule(getattr(lib, symbol))
        jax.ffi.register_ffi_target(name, capsule, platform="cpu")


def _platform_supported() -> bool:
    return sys.platform.startswith(_SUPPORTED_SYSTEMS) and (
        platform.machine().lower() in _SUPPORTED_MACHINES
    )


def _initialise() -> bool:
    global _library
    if os.environ.get(ENV_SWITCH, "").strip().lower() in ("0", "false", "no", "off"):
        logger.debug("native CPU kernels disabled by %s", ENV_SWITCH)
        return False
    if not _platform_supported():
        logger.debug("native CPU kernels not supported on %s/%s", sys.platform, platform.machine())
        return False
    try:
        lib = _build_and_load()
        _register(lib)
    except Exception as err:  # never raise: the XLA formulation always works
        warnings.warn(
            "retinaface_jax: native CPU kernels unavailable, falling back to the XLA formulation "
            f"of the convolutions (slower). {err}\n"
            f"(set {ENV_SWITCH}=0 to skip the native kernels and this warning)",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    _library = lib
    return True


def native_kernels_available() -> bool:
    """Whether the FFI targets in :data:`TARGETS` are registered with JAX for the CPU.

    The first call in a process builds (or reuses the cached) library, loads and registers it;
    later calls return the same answer. Thread-safe; never raises (failures warn once and give
    False, and the caller should use the XLA formulation).
    """
    global _available
    if _available is None:
        with _lock:
            if _available is None:
                _available = _initialise()
    return _available
