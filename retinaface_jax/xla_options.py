"""XLA compiler options for RetinaFace programs on the CPU backend.

XLA's CPU backend hands convolutions, matmuls and reductions to YNNPACK by default. For this
model's shapes (small channel counts, large spatial sizes) YNNPACK's convolutions and their
weight gradients are markedly slower than XLA's own (Eigen) kernels: the forward and the train
step are both faster with XLA's own (the train step together with the formulation changes in
``backends.xla_cpu.conv_ops`` that XLA's own kernels allow). Our jitted programs
(the detector's, the train step) are compiled with these options; pass
``compiler_options=compiler_options()`` to your own ``jax.jit`` on CPU for the same effect.
Other backends get ``None`` (nothing changes).

The option is an XLA debug flag. If a future jaxlib no longer knows it, :func:`compiler_options`
warns once and returns ``None``, so programs still compile (at the default speed).
"""

from __future__ import annotations

import functools
import warnings

import jax
import numpy as np

CPU_OPTIONS: dict[str, str] = {
    # an empty list: no YNNPACK fusions (convolutions, matmuls, reductions run on XLA's kernels)
    "xla_cpu_experimental_ynn_fusion_type": "",
}


def compiler_options(backend: str | None = None) -> dict[str, str] | None:
    """``jax.jit(..., compiler_options=...)`` for ``backend`` (default: JAX's default backend).

    ``CPU_OPTIONS`` on the CPU backend when this jaxlib accepts them, otherwise ``None``.
    """
    backend = backend or jax.default_backend()
    if backend != "cpu" or not _cpu_options_supported():
        return None
    return dict(CPU_OPTIONS)


@functools.cache
def _cpu_options_supported() -> bool:
    """Compile a tiny CPU program with ``CPU_OPTIONS`` once; False (with a warning) if XLA refuses.

    The probe runs on a CPU device even when another backend is the default.
    """
    try:
        x = jax.device_put(np.zeros((2,), np.float32), jax.devices("cpu")[0])
        jax.jit(lambda v: v + 1).lower(x).compile(compiler_options=dict(CPU_OPTIONS))
    except Exception as err:  # XLA reports an unknown option as a runtime error
        warnings.warn(
            f"XLA does not accept the CPU compiler options {CPU_OPTIONS} ({err}); "
            "compiling with XLA's defaults (slower convolutions on CPU)",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True
