"""Style transfer: the losses move the right way, the loss network stays fixed, and `mlmetal style` runs end to end."""

import numpy as np
import pytest

import mlmetal as mm
from mlmetal.apps.style import LOSS_LAYERS, StyleTransfer, default_content, default_style, save_image
from mlmetal.cli import main

SIZE = 16  # tiny: the loss network still pools twice (16 → 8 → 4)


@pytest.fixture
def model(dev):
    mm.nn.seed(0)
    return StyleTransfer(dev, default_style(SIZE), default_content(SIZE))


def test_only_the_transformer_trains_and_the_loss_network_stays_fixed(model):
    assert {id(p) for p in model.train.parameters} == {id(p) for p in model.transformer.parameters()}
    frozen = [p.numpy() for p in model.loss_net.parameters()]
    model.step()
    for p, before in zip(model.loss_net.parameters(), frozen):
        np.testing.assert_array_equal(p.numpy(), before)


def test_style_loss_falls_while_content_loss_stays_bounded(model):
    style0, content0, _ = model.measure()
    for _ in range(40):
        model.step()
    style, content, image = model.measure()
    assert style < style0 / 3
    assert content < 2 * content0
    assert image.shape == (3, SIZE, SIZE) and 0 <= image.min() and image.max() <= 1


def test_style_command_writes_images_and_weights(tmp_path, capsys):
    rc = main(["style", "--device", "cpu", "--size", str(SIZE), "--steps", "4", "--every", "2", "--out", str(tmp_path)])
    assert rc == 0
    for name in ("step_00002.png", "step_00004.png", "stylised.png", "style.png", "content.png", "transformer.zip"):
        assert (tmp_path / name).exists(), name
    out = capsys.readouterr().out
    assert "trained after 4 step(s)" in out
    lines = {line.split()[0]: line for line in out.splitlines() if "loss" in line}
    for key in ("style", "content"):
        start, end = (float(v) for v in lines[key].split()[2:5:2])
        assert np.isfinite(start) and np.isfinite(end)


def test_images_and_loss_weights_from_files(tmp_path, capsys):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    weights, cin = {}, 3
    for layer in LOSS_LAYERS:
        if layer != "pool":
            weights[f"{layer[0]}.weight"] = rng.normal(0, 0.3, (8, cin, 3, 3)).astype(np.float32)
            weights[f"{layer[0]}.bias"] = np.zeros(8, np.float32)
            cin = 8
    save_file(weights, str(tmp_path / "vgg.safetensors"))
    save_image(default_style(40), tmp_path / "style.png")  # another size: it is resized on loading
    rc = main(["style", "--device", "cpu", "--size", str(SIZE), "--steps", "2", "--style", str(tmp_path / "style.png"),
               "--loss-weights", str(tmp_path / "vgg.safetensors"), "--out", str(tmp_path / "out")])
    assert rc == 0 and (tmp_path / "out" / "stylised.png").exists()


def test_ctrl_c_saves_what_it_has_and_exits_130(tmp_path, monkeypatch):
    calls = []

    def interrupted(self):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return 1.0

    monkeypatch.setattr(StyleTransfer, "step", interrupted)
    rc = main(["style", "--device", "cpu", "--size", str(SIZE), "--out", str(tmp_path)])
    assert rc == 130
    assert (tmp_path / "transformer.zip").exists() and (tmp_path / "stylised.png").exists()
