"""Forward-pass speed: our jitted mobilenet0.25 RetinaFace vs the ONNX export of the original.

Both run in this process on the same inputs (BGR minus mean, float32), timed in alternating blocks
(``common.alternating_medians``; ``--repeats`` calls each at batch 1, ``repeats / batch`` at batch
B); prints per-call medians,
their ratio (ours / anchor; < 1 means we are faster) and our compile time. Ours runs as
``Detector`` runs it: on our native CPU kernels when they build (``--kernels auto``, the default;
``retinaface_jax.backends.native``), else on XLA, jitted with ``retinaface_jax.compiler_options()`` and
called on the model state's flat leaves (calling a jitted function with the ``nnx.Module`` itself
flattens its graph on every call). ``--kernels xla`` times the Detector's XLA path
(``backends.planned_forward``), ``--kernels reference`` the plain model as a user's own
``jax.jit(model)`` runs it.

    python benchmarks/forward.py [--repeats 40] [--sizes 640x480,1024x624,1920x1080] [--batches 1,8]
                                 [--cpus N] [--kernels auto|native|xla|reference]

``--cpus 1`` pins the process to one CPU and gives onnxruntime one thread: a per-core comparison,
which separates arithmetic efficiency from how well each side uses several cores.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from common import alternating_medians, machine, onnx_anchor, pin_cpus, shared_dir, warm_up

from retinaface_jax import compiler_options, load_model
from retinaface_jax.backends.native.build import KERNEL_CHOICES
from retinaface_jax.backends.native.kernel_forward import kernel_forward, kernel_params
from retinaface_jax.backends.planned_forward import planned_forward
from retinaface_jax.inference.detector import choose_kernels
from retinaface_jax.malloc_tuning import reexec_with_tuned_malloc
from retinaface_jax.models.flat_state import flat_state


def main() -> None:
    reexec_with_tuned_malloc()  # as detect.py does
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--sizes", default="640x480,1024x624,1920x1080", help="WxH list")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--cpus", type=int, default=None, help="use only N CPUs (anchor: N threads)")
    p.add_argument("--kernels", default="auto", choices=(*KERNEL_CHOICES, "reference"))
    args = p.parse_args()
    cpus = pin_cpus(args.cpus)  # before JAX creates its CPU client
    shared = shared_dir()
    model = load_model(shared / "data/weights/mobilenet0.25_Final.pth")
    _, anchor = onnx_anchor(shared, threads=args.cpus)
    model.eval()
    kernels = "reference" if args.kernels == "reference" else choose_kernels(args.kernels, model)
    leaves, rebuild = flat_state(model)
    if kernels == "native":
        params, plan = kernel_params(model)  # mobilenet0.25: the whole model on the kernels
        weights = jax.device_put(params)
        forward = jax.jit(
            lambda p, x: kernel_forward(plan, p, x), compiler_options=compiler_options()
        )
        formulation = "native CPU kernels"
    elif kernels == "xla":
        weights = leaves
        forward = jax.jit(
            lambda w, x: planned_forward(rebuild(w), x), compiler_options=compiler_options()
        )
        formulation = "XLA (the Detector's planned forward)"
    else:
        weights = leaves
        forward = jax.jit(lambda w, x: rebuild(w)(x))
        formulation = "XLA (jax.jit(model), the plain reference model, default options)"
    print(f"machine: {machine()}; model on: {formulation}; CPUs used: {cpus}")
    print(
        f"{'input':>16} {'ours ms':>9} {'onnx ms':>9} {'ratio':>7} {'compile s':>10} {'max|d conf|':>12}"
    )
    rng = np.random.default_rng(0)
    for size in args.sizes.split(","):
        w, h = (int(v) for v in size.split("x"))
        for b in (int(v) for v in args.batches.split(",")):
            x = (rng.uniform(0, 255, (b, h, w, 3)) - (104, 117, 123)).astype(np.float32)
            t0 = time.perf_counter()
            compiled = forward.lower(weights, x).compile()
            compile_s = time.perf_counter() - t0
            xj = jax.device_put(x)
            ours_out = compiled(weights, xj)
            ref = anchor(x)
            conf = np.asarray(jax.nn.softmax(ours_out[1], -1))
            diff = float(np.max(np.abs(conf - ref[1])))
            reps = max(4, args.repeats // b)
            fns = {
                "ours": lambda c=compiled, v=xj: jax.block_until_ready(c(weights, v)),
                "onnx": lambda v=x: anchor(v),
            }
            warm_up(fns)
            t = alternating_medians(fns, reps, block=max(2, min(10, reps // 4)))
            ours, onnx = t["ours"], t["onnx"]
            print(
                f"{w}x{h} b{b:<3d} {ours * 1e3:9.1f} {onnx * 1e3:9.1f} {ours / onnx:7.2f} "
                f"{compile_s:10.1f} {diff:12.1e}"
            )


if __name__ == "__main__":
    main()
