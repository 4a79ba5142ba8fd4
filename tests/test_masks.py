"""Reference segmentation: explicit mask, alpha channel, rembg only with a model on disk."""

import sys
import types

import numpy as np
import pytest
from PIL import Image

from anystory_cli.errors import InputError
from anystory_cli.masks import prepare_reference


def opaque_square():
    rgb = np.zeros((40, 40, 3), np.uint8)
    rgb[10:30, 12:28] = (200, 30, 30)
    return Image.fromarray(rgb)


def test_alpha_channel_is_the_mask_and_the_crop_is_square():
    rgba = np.zeros((40, 60, 4), np.uint8)
    rgba[5:25, 30:40] = (10, 200, 10, 255)
    reference = prepare_reference(Image.fromarray(rgba), size=32)
    assert reference.rgb.shape == (32, 32, 3) and reference.mask.shape == (32, 32)
    assert (reference.rgb[reference.mask == 0] == 0).all(), "background must be zero"
    assert reference.mask.mean() == pytest.approx(0.5 / (1.1**2), abs=0.1)  # 10x20 in a 22x22 square


def test_no_mask_no_alpha_and_no_rembg_says_how_to_give_one(monkeypatch):
    monkeypatch.setitem(sys.modules, "rembg", None)  # rembg not installed
    with pytest.raises(InputError, match=r"pass a mask image .*U2NET_HOME"):
        prepare_reference(opaque_square(), size=32)


def _fake_rembg(monkeypatch, model_on_disk: bool):
    """rembg's surface as this module uses it: a model lookup and remove(only_mask=True)."""
    calls = []
    fake = types.ModuleType("rembg")
    fake.new_session = lambda name: calls.append(("session", name)) or object()

    def remove(image, session, only_mask):
        calls.append(("remove", only_mask))
        mask = np.zeros((image.height, image.width), np.uint8)
        mask[10:30, 12:28] = 255
        return Image.fromarray(mask)

    fake.remove = remove
    sessions = types.ModuleType("rembg.sessions")
    u2net = types.ModuleType("rembg.sessions.u2net")
    u2net.U2netSession = type("U2netSession", (), {
        "resolve_existing": staticmethod(lambda fname: "/models/u2net.onnx" if model_on_disk else None)})
    for name, module in {"rembg": fake, "rembg.sessions": sessions, "rembg.sessions.u2net": u2net}.items():
        monkeypatch.setitem(sys.modules, name, module)
    from anystory_cli import masks

    masks._rembg_session.cache_clear()
    return calls


def test_rembg_without_its_model_on_disk_never_downloads(monkeypatch):
    calls = _fake_rembg(monkeypatch, model_on_disk=False)
    with pytest.raises(InputError, match="no u2net model on disk"):
        prepare_reference(opaque_square(), size=32)
    assert calls == [], "no session may be created: rembg would download its model"


def test_rembg_with_its_model_on_disk_segments(monkeypatch):
    calls = _fake_rembg(monkeypatch, model_on_disk=True)
    reference = prepare_reference(opaque_square(), size=32)
    assert ("remove", True) in calls
    assert reference.mask.sum() > 0 and (reference.rgb[reference.mask == 0] == 0).all()
