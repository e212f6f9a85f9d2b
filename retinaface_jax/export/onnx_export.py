"""ONNX export of the reference model with the original export's interface.

The graph is written node by node with ``onnx.helper`` by walking the reference modules
(``retinaface_jax.models``): each module type maps to the ONNX operators of its torch
counterpart, in NCHW, so the file has the layout, operators and tensor names of the original's
``torch.onnx.export``:

- ``Conv2d`` (+ the ``BatchNorm2d`` that follows it, folded into the weights and bias with the
  running statistics) -> ``Conv``; ``LeakyReLU`` -> ``LeakyRelu`` (``Relu`` for slope 0);
- ``FPN`` upsampling -> ``Resize`` (nearest, asymmetric, floor) to the lateral's shape, the
  operator the original's export uses for ``F.interpolate(..., mode='nearest')``;
- heads -> ``Conv``, ``Transpose(0, 2, 3, 1)`` (the original's ``permute``; the only
  transposes in the graph), ``Reshape [N, -1, width]``, ``Concat``; ``Softmax`` on ``conf``.

Why not a converter of the jitted function: our model is NHWC and its convolution is a
``lax.platform_dependent`` choice between CPU formulations and ``lax.conv``; a converter emits a
layout transpose around every convolution (or cannot follow ``platform_dependent``), which costs
speed in every runtime. The module structure is the one the original's export traced, so walking
it gives the same graph directly. Weights are initialisers named after the original's state-dict
entries (``body.stage1.0.0.weight``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from flax import nnx
from onnx import TensorProto, helper, numpy_helper

from retinaface_jax.config import dump_config
from retinaface_jax.models.layers import BatchNorm2d, Conv2d, LeakyReLU
from retinaface_jax.models.net import FPN, SSH, MobileNetV1
from retinaface_jax.models.resnet import Bottleneck, ResNet50
from retinaface_jax.models.retinaface import RetinaFace

DEFAULT_OPSET = 17  # the anchor's (the original's export)
MIN_OPSET = 13  # Resize with an empty roi and sizes, Softmax over the last axis only
INPUT_NAME = "input"
OUTPUT_NAMES = ("loc", "conf", "landms")


class _Graph:
    """Nodes and initialisers of the graph being written; unique names from torch-style paths."""

    def __init__(self, fold_batchnorm: bool):
        self.fold_batchnorm = fold_batchnorm
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._names: set[str] = set()

    def unique(self, name: str) -> str:
        base, i = name, 1
        while name in self._names:
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        return name

    def const(self, name: str, value: np.ndarray) -> str:
        name = self.unique(name)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(self, op: str, inputs: Sequence[str], name: str, output: str | None = None, **attrs):
        """Append ``op(inputs)``; returns its (single) output name."""
        name = self.unique(f"/{name}/{op}")
        out = output or f"{name}_output_0"
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=name, **attrs))
        return out


def _array(variable) -> np.ndarray:
    return np.asarray(variable[...], dtype=np.float32)


def _conv(g: _Graph, conv: Conv2d, x: str, name: str, bn: BatchNorm2d | None = None) -> str:
    """``Conv2d`` (NCHW ``Conv``), with the following ``BatchNorm2d`` folded in when given."""
    w = _array(conv.kernel).transpose(3, 2, 0, 1).astype(np.float64)  # HWIO -> OIHW
    b = None if conv.bias is None else _array(conv.bias).astype(np.float64)
    if bn is not None:  # y = (conv + b - mean) * scale / sqrt(var + eps) + bias
        s = _array(bn.scale).astype(np.float64) / np.sqrt(
            _array(bn.var).astype(np.float64) + bn.eps
        )
        b0 = np.zeros(w.shape[0]) if b is None else b
        b = (b0 - _array(bn.mean)) * s + _array(bn.bias)
        w = w * s[:, None, None, None]
    k, p = conv.kernel_size, conv.padding
    inputs = [x, g.const(f"{name}.weight", w.astype(np.float32))]
    if b is not None:
        inputs.append(g.const(f"{name}.bias", b.astype(np.float32)))
    return g.node(
        "Conv",
        inputs,
        name,
        kernel_shape=[k, k],
        strides=[conv.stride, conv.stride],
        pads=[p, p, p, p],
        group=conv.groups,
        dilations=[1, 1],
    )


def _batchnorm(g: _Graph, bn: BatchNorm2d, x: str, name: str) -> str:
    """``BatchNorm2d`` in inference mode (running statistics) as ``BatchNormalization``."""
    params = [
        g.const(f"{name}.{leaf}", _array(getattr(bn, attr)))
        for attr, leaf in (("scale", "weight"), ("bias", "bias"))
    ]
    stats = [
        g.const(f"{name}.{leaf}", _array(getattr(bn, attr)))
        for attr, leaf in (("mean", "running_mean"), ("var", "running_var"))
    ]
    return g.node("BatchNormalization", [x, *params, *stats], name, epsilon=float(bn.eps))


def _activation(g: _Graph, act: LeakyReLU, x: str, name: str) -> str:
    slope = float(act.negative_slope)
    if slope == 0.0:
        return g.node("Relu", [x], name)
    return g.node("LeakyRelu", [x], name, alpha=slope)


def _layers(g: _Graph, layers: Sequence[nnx.Module], x: str, name: str) -> str:
    """An ``nnx.Sequential``'s layers in order (torch indices in the names); a ``Conv2d``
    directly followed by a ``BatchNorm2d`` becomes one ``Conv`` when folding."""
    i = 0
    while i < len(layers):
        layer, sub = layers[i], f"{name}.{i}" if name else str(i)
        nxt = layers[i + 1] if i + 1 < len(layers) else None
        if isinstance(layer, Conv2d) and isinstance(nxt, BatchNorm2d) and g.fold_batchnorm:
            x = _conv(g, layer, x, sub, nxt)
            i += 2
            continue
        x = _module(g, layer, x, sub)
        i += 1
    return x


def _module(g: _Graph, m: nnx.Module, x: str, name: str) -> str:
    """One module of the reference model applied to the NCHW tensor named ``x``."""
    if isinstance(m, nnx.Sequential):
        return _layers(g, list(m.layers), x, name)
    if isinstance(m, Conv2d):
        return _conv(g, m, x, name)
    if isinstance(m, BatchNorm2d):
        return _batchnorm(g, m, x, name)
    if isinstance(m, LeakyReLU):
        return _activation(g, m, x, name)
    raise TypeError(f"ONNX export: no ONNX form for module {type(m).__name__} at {name!r}")


def _conv_bn(g: _Graph, conv: Conv2d, bn: BatchNorm2d, x: str, cname: str, bname: str) -> str:
    if g.fold_batchnorm:
        return _conv(g, conv, x, cname, bn)
    return _batchnorm(g, bn, _conv(g, conv, x, cname), bname)


def _resnet_block(g: _Graph, m: Bottleneck, x: str, name: str) -> str:
    """torchvision ``Bottleneck``: three conv-BN (ReLU after the first two), residual, ReLU."""
    out = g.node("Relu", [_conv_bn(g, m.conv1, m.bn1, x, f"{name}.conv1", f"{name}.bn1")], name)
    out = g.node("Relu", [_conv_bn(g, m.conv2, m.bn2, out, f"{name}.conv2", f"{name}.bn2")], name)
    out = _conv_bn(g, m.conv3, m.bn3, out, f"{name}.conv3", f"{name}.bn3")
    identity = x if m.downsample is None else _module(g, m.downsample, x, f"{name}.downsample")
    return g.node("Relu", [g.node("Add", [out, identity], name)], name)


def _backbone(g: _Graph, body: nnx.Module, x: str) -> list[str]:
    """Stage outputs at strides 8, 16, 32 (``MobileNetV1.features`` / ``ResNet50.features``)."""
    if isinstance(body, MobileNetV1):
        s1 = _module(g, body.stage1, x, "body.stage1")
        s2 = _module(g, body.stage2, s1, "body.stage2")
        return [s1, s2, _module(g, body.stage3, s2, "body.stage3")]
    if isinstance(body, ResNet50):
        y = _conv_bn(g, body.conv1, body.bn1, x, "body.conv1", "body.bn1")
        y = g.node("Relu", [y], "body.relu")
        y = g.node(
            "MaxPool", [y], "body.maxpool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]
        )
        outs = []
        for i in range(1, 5):
            layer = getattr(body, f"layer{i}")
            for j, block in enumerate(layer.layers):
                y = _resnet_block(g, block, y, f"body.layer{i}.{j}")
            outs.append(y)
        return outs[1:]
    raise TypeError(f"ONNX export: unknown backbone {type(body).__name__}")


def _fpn(g: _Graph, fpn: FPN, features: list[str]) -> list[str]:
    """Laterals, nearest upsampling to the lateral's size (``Resize`` with its shape), merges."""
    o1 = _module(g, fpn.output1, features[0], "fpn.output1")
    o2 = _module(g, fpn.output2, features[1], "fpn.output2")
    o3 = _module(g, fpn.output3, features[2], "fpn.output3")

    def upsample(x: str, like: str, name: str) -> str:
        size = g.node("Shape", [like], name)  # [N, C, h, w]: N and C equal x's
        return g.node(
            "Resize",
            [x, "", "", size],
            name,
            mode="nearest",
            coordinate_transformation_mode="asymmetric",
            nearest_mode="floor",
        )

    o2 = _module(
        g, fpn.merge2, g.node("Add", [o2, upsample(o3, o2, "fpn.up3")], "fpn"), "fpn.merge2"
    )
    o1 = _module(
        g, fpn.merge1, g.node("Add", [o1, upsample(o2, o1, "fpn.up2")], "fpn"), "fpn.merge1"
    )
    return [o1, o2, o3]


def _ssh(g: _Graph, m: SSH, x: str, name: str) -> str:
    c3 = _module(g, m.conv3X3, x, f"{name}.conv3X3")
    c5_1 = _module(g, m.conv5X5_1, x, f"{name}.conv5X5_1")
    c5 = _module(g, m.conv5X5_2, c5_1, f"{name}.conv5X5_2")
    c7_2 = _module(g, m.conv7X7_2, c5_1, f"{name}.conv7X7_2")
    c7 = _module(g, m.conv7x7_3, c7_2, f"{name}.conv7x7_3")
    return g.node("Relu", [g.node("Concat", [c3, c5, c7], name, axis=1)], name)


def _heads(g: _Graph, heads, features: list[str], name: str, output: str | None) -> str:
    """One head per level: ``Conv``, ``permute(0, 2, 3, 1)``, ``[N, -1, width]``, concatenated."""
    outs = []
    for i, (head, f) in enumerate(zip(heads, features, strict=True)):
        sub = f"{name}.{i}"
        y = _conv(g, head.conv1x1, f, f"{sub}.conv1x1")
        y = g.node("Transpose", [y], sub, perm=[0, 2, 3, 1])
        shape = g.const(f"{sub}.shape", np.array([0, -1, head.width], dtype=np.int64))
        outs.append(g.node("Reshape", [y, shape], sub))
    return g.node("Concat", outs, name, output=output, axis=1)


def build_onnx(
    model: RetinaFace, *, opset: int = DEFAULT_OPSET, fold_batchnorm: bool = True
) -> onnx.ModelProto:
    """The ONNX model of ``model`` (a reference ``RetinaFace``, inference semantics: BatchNorm
    with its running statistics), with the original export's interface.

    Input ``input [N, 3, H, W]`` float32 BGR minus the mean; outputs ``loc [N, P, 4]``,
    ``conf [N, P, 2]`` (softmax probabilities), ``landms [N, P, 10]``; N, H and W dynamic.
    ``fold_batchnorm=False`` writes ``BatchNormalization`` nodes instead of folding them.
    """
    if not isinstance(model, RetinaFace):
        raise TypeError(f"export_onnx: expected a RetinaFace model, got {type(model).__name__}")
    latest = onnx.defs.onnx_opset_version()
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= latest:
        raise ValueError(f"opset: expected an int in {MIN_OPSET}..{latest}, got {opset!r}")
    g = _Graph(fold_batchnorm)
    features = _backbone(g, model.body, INPUT_NAME)
    fpn = _fpn(g, model.fpn, features)
    ssh = [_ssh(g, getattr(model, f"ssh{i + 1}"), f, f"ssh{i + 1}") for i, f in enumerate(fpn)]
    _heads(g, model.BboxHead, ssh, "BboxHead", "loc")
    logits = _heads(g, model.ClassHead, ssh, "ClassHead", None)
    g.node("Softmax", [logits], "softmax", output="conf", axis=-1)
    _heads(g, model.LandmarkHead, ssh, "LandmarkHead", "landms")

    def value(name: str, dims: list) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)

    graph = helper.make_graph(
        g.nodes,
        "retinaface",
        [value(INPUT_NAME, ["n", 3, "h", "w"])],
        [value(n, ["n", "P", w]) for n, w in zip(OUTPUT_NAMES, (4, 2, 10), strict=True)],
        initializer=g.initializers,
    )
    opsets = [helper.make_opsetid("", opset)]
    proto = helper.make_model(
        graph,
        opset_imports=opsets,
        producer_name="retinaface_jax",
        ir_version=helper.find_min_ir_version_for(opsets),
    )
    helper.set_model_props(
        proto, {"backbone": model.cfg.backbone, "retinaface_jax.config": dump_config(model.cfg)}
    )
    return proto


def export_onnx(
    model: RetinaFace,
    path: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    fold_batchnorm: bool = True,
    check: bool = True,
) -> onnx.ModelProto:
    """Write ``model`` (reference ``RetinaFace``) to ``path`` as ONNX (:func:`build_onnx`), a
    drop-in for the original's export; ``check`` runs ``onnx.checker`` first. Returns the model."""
    proto = build_onnx(model, opset=opset, fold_batchnorm=fold_batchnorm)
    if check:
        onnx.checker.check_model(proto, full_check=True)
    path = Path(path)
    if path.parent and not path.parent.is_dir():
        raise FileNotFoundError(f"{path}: the output directory {path.parent} does not exist")
    onnx.save_model(proto, str(path))
    return proto
