"""load_model / load_backbone / convert: sources, errors, native round trip, no torch."""

from __future__ import annotations

import subprocess
import sys
from collections import OrderedDict

import jax
import numpy as np
import pytest
from torch_files import tensor, write_legacy, write_zip

from retinaface_jax import RetinaFace, get_config, load_backbone, load_model
from retinaface_jax.convert import main as convert_main
from retinaface_jax.models.net import MobileNetV1
from retinaface_jax.weights.load import WeightsError, infer_backbone
from retinaface_jax.weights.names import export_state_dict


@pytest.fixture(scope="module")
def mnet_sd() -> dict[str, np.ndarray]:
    """A full torch-layout state dict of a randomly initialised mobilenet0.25 RetinaFace."""
    return export_state_dict(RetinaFace("mobilenet0.25"))


def outputs(model, x):
    return [np.asarray(o) for o in jax.jit(lambda m, x: m(x))(model, x)]


X = np.random.default_rng(0).normal(0, 50, (1, 64, 96, 3)).astype(np.float32)


def test_mapping_round_trip_and_inference_mode(mnet_sd):
    model = load_model(mnet_sd)
    assert model.cfg.backbone == "mobilenet0.25"
    assert model.body.stage1.layers[0].layers[1].use_running_average
    again = export_state_dict(model)
    assert again.keys() == mnet_sd.keys()
    for k in mnet_sd:
        np.testing.assert_array_equal(again[k], mnet_sd[k])


def test_wrappers_prefixes_and_formats(tmp_path, mnet_sd):
    ref = outputs(load_model(mnet_sd), X)
    wrapped = {
        "epoch": 3,
        "state_dict": OrderedDict((f"module.{k}", tensor(v)) for k, v in mnet_sd.items()),
    }
    for writer in (write_legacy, write_zip):
        path = writer(tmp_path / f"{writer.__name__}.pth", wrapped)
        for a, b in zip(outputs(load_model(path), X), ref):
            np.testing.assert_array_equal(a, b)


def test_backbone_inferred_or_given(mnet_sd):
    assert infer_backbone(mnet_sd) == "mobilenet0.25"
    assert infer_backbone({"body.layer1.0.conv1.weight": 0}) == "resnet50"
    with pytest.raises(WeightsError, match="cannot infer the backbone"):
        infer_backbone({"foo.weight": 0})
    with pytest.raises(WeightsError, match="missing keys"):
        load_model(mnet_sd, backbone="resnet50")


def test_mismatches_listed_in_one_error(mnet_sd):
    sd = dict(mnet_sd)
    del sd["fpn.output1.0.weight"]
    sd["extra.weight"] = np.zeros(3, np.float32)
    sd["ssh1.conv3X3.1.weight"] = np.zeros(5, np.float32)
    with pytest.raises(WeightsError) as e:
        load_model(sd)
    msg = str(e.value)
    assert "fpn.output1.0.weight" in msg and "extra.weight" in msg
    assert "ssh1.conv3X3.1.weight: got (5,), expected (32,)" in msg


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_model(tmp_path / "nope.pth")


def test_convert_cli_native_bit_identical(shared, tmp_path):
    src = shared / "data/weights/mobilenet0.25_Final.pth"
    assert convert_main([str(src), str(tmp_path / "native")]) == 0
    a, b = load_model(src), load_model(tmp_path / "native")
    assert b.cfg == get_config("mobilenet0.25")
    for u, v in zip(outputs(a, X), outputs(b, X)):
        np.testing.assert_array_equal(u, v)
    # never overwrites without being asked
    assert convert_main([str(src), str(tmp_path / "native")]) == 2


def test_imagenet_backbone(shared):
    path = shared / "data/weights/mobilenetV1X0.25_pretrain.tar"
    model = load_backbone(RetinaFace("mobilenet0.25"), path)
    from retinaface_jax.weights.torch_reader import read_state_dict

    sd = read_state_dict(path)
    np.testing.assert_array_equal(
        np.asarray(model.body.stage2.layers[0].layers[3].kernel[...]),
        sd["stage2.0.3.weight"].transpose(2, 3, 1, 0),
    )
    classifier = load_backbone(
        MobileNetV1(include_top=True, rngs=__import__("flax").nnx.Rngs(0)), path
    )
    classifier.eval()
    logits = classifier(X[:, :, :64] / 58.0)
    assert logits.shape == (1, 1000) and np.isfinite(np.asarray(logits)).all()


def test_package_never_imports_torch():
    code = (
        "import sys, importlib, pkgutil, retinaface_jax\n"
        "for m in pkgutil.walk_packages(retinaface_jax.__path__, 'retinaface_jax.'):\n"
        "    if not m.name.endswith('__main__'):\n"
        "        importlib.import_module(m.name)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_load_model_refuses_self_referential_checkpoint_quickly(tmp_path):
    """126 bytes of ``{'state_dict': <itself>}`` used to hang load_model forever."""
    from test_torch_reader import refused, self_referential

    from retinaface_jax.weights.torch_reader import CheckpointError

    for writer in (write_legacy, write_zip):
        path = writer(tmp_path / f"cycle_{writer.__name__}.pth", self_referential("state_dict"))
        assert "contains itself" in refused(path, CheckpointError, load=load_model)


def test_load_model_names_the_file_when_backbone_unknown(tmp_path):
    path = write_zip(tmp_path / "other.pth", {"foo.weight": tensor(np.ones(2, np.float32))})
    with pytest.raises(WeightsError, match=f"{path}: cannot infer the backbone"):
        load_model(path)
