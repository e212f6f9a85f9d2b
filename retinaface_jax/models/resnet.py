"""ResNet50 body in the torchvision layout (``conv1``, ``bn1``, ``layer1``-``layer4``).

Bottleneck v1.5 (stride on the 3x3 conv), as torchvision's ``resnet50``; ``features`` returns
layer2-layer4 (strides 8, 16, 32), which is what the original's IntermediateLayerGetter returns for
``return_layers = {'layer2': 1, 'layer3': 2, 'layer4': 3}``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from retinaface_jax.models.layers import BatchNorm2d, Conv2d, Rngs, initialized_at_once


class Bottleneck(nnx.Module):
    """1x1 reduce -> 3x3 (stride) -> 1x1 expand (x4), residual, ReLU."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, *, rngs: Rngs):
        out = planes * self.expansion
        self.conv1 = Conv2d(inplanes, planes, 1, 1, 0, bias=False, rngs=rngs)
        self.bn1 = BatchNorm2d(planes)
        self.conv2 = Conv2d(planes, planes, 3, stride, 1, bias=False, rngs=rngs)
        self.bn2 = BatchNorm2d(planes)
        self.conv3 = Conv2d(planes, out, 1, 1, 0, bias=False, rngs=rngs)
        self.bn3 = BatchNorm2d(out)
        downsample = None
        if stride != 1 or inplanes != out:
            downsample = nnx.Sequential(
                Conv2d(inplanes, out, 1, stride, 0, bias=False, rngs=rngs), BatchNorm2d(out)
            )
        self.downsample = nnx.data(downsample)

    def __call__(self, x: jax.Array) -> jax.Array:
        out = jax.nn.relu(self.bn1(self.conv1(x)))
        out = jax.nn.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return jax.nn.relu(out + identity)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """``nn.MaxPool2d(3, stride=2, padding=1)`` (padding never wins the max)."""
    pad = ((0, 0), (1, 1), (1, 1), (0, 0))
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1), pad)


class ResNet50(nnx.Module):
    """torchvision ResNet50 without the classifier; ``features(x)`` -> [layer2, layer3, layer4]."""

    @initialized_at_once
    def __init__(self, *, rngs: Rngs):
        self.conv1 = Conv2d(3, 64, 7, 2, 3, bias=False, rngs=rngs)
        self.bn1 = BatchNorm2d(64)
        inplanes = 64
        layers = []
        for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            seq = []
            for b in range(blocks):
                seq.append(Bottleneck(inplanes, planes, stride if b == 0 else 1, rngs=rngs))
                inplanes = planes * Bottleneck.expansion
            layers.append(nnx.Sequential(*seq))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers

    def features(self, x: jax.Array) -> list[jax.Array]:
        """Stage outputs at strides 8, 16, 32 (layer2, layer3, layer4)."""
        x = max_pool_3x3_s2(jax.nn.relu(self.bn1(self.conv1(x))))
        c2 = self.layer2(self.layer1(x))
        c3 = self.layer3(c2)
        return [c2, c3, self.layer4(c3)]
