"""`mlmetal denoise`: the U-Net's shapes and gradients, and the whole command at a tiny size."""

import math
import re

import numpy as np

import mlmetal as mm
from mlmetal import cli
from mlmetal.apps import denoise
from mlmetal.apps.denoise import UNet, inputs_of, training_graph

# A few seconds end to end: 16×16 renders, a 4-channel U-Net, a handful of steps.
TINY = ["--size", "16", "--width", "4", "--depth", "2", "--epochs", "3", "--scenes", "4", "--batch", "2",
        "--spp", "1", "--clean-spp", "16", "--refresh-every", "2", "--halve-every", "2", "--test", "2",
        "--no-progress"]


def test_unet_shapes_and_training_gradients(dev):
    mm.nn.seed(0)
    net = UNet(width=4, depth=2, device=dev)
    # Apple's layout: three conv+ReLU pairs per encoder stage, two per decoder stage and the bottleneck
    assert [len(s.layers) // 2 for s in net.encoder] == [3, 3]
    assert [len(s.layers) // 2 for s in net.decoder] == [2, 2] and len(net.bottleneck.layers) // 2 == 2
    assert net.encoder[0].layers[0].weight.shape == (4, 9, 3, 3)  # noisy rgb + albedo + normal
    assert net.decoder[0].layers[0].weight.shape == (8, 16 + 8, 3, 3)  # upsampled bottleneck + skip

    g = mm.Graph(dev)
    assert net(*inputs_of(g, 2, 16)).shape == (2, 3, 16, 16)

    train = training_graph(net, batch=2, size=16, lr=1e-3, log_weight=0.5)
    rng = np.random.default_rng(0)
    feed = {k: rng.uniform(0, 1, (2, 3, 16, 16)).astype(np.float32) for k in ("noisy", "albedo", "normal", "clean")}
    loss = train.step(**feed)
    assert math.isfinite(loss) and loss > 0
    grads = {name: p.grad.numpy() for name, p in net.named_parameters().items()}
    assert len(grads) == len(train.param_grads) == 2 * (3 + 3 + 2 + 2 + 2) + 2
    assert all(np.abs(g).max() > 0 for g in grads.values()), [n for n, g in grads.items() if not g.any()]


def _psnr(stdout: str) -> tuple[float, float]:
    m = re.search(r"noisy (\S+) dB -> denoised (\S+) dB", stdout)
    assert m, stdout
    return float(m.group(1)), float(m.group(2))


def test_denoise_command_writes_model_pictures_and_psnr(dev, tmp_path, capsys):
    assert cli.main(["denoise", "--device", dev.name, "--out", str(tmp_path), *TINY]) == 0
    before, after = _psnr(capsys.readouterr().out)
    assert math.isfinite(before) and math.isfinite(after)
    for name in ("denoiser.zip", "loss.png", "triptych-0.png", "triptych-1.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    model = mm.load(tmp_path / "denoiser.zip", device=dev)
    assert set(model.inputs) == {"noisy", "albedo", "normal"} and model.outputs["rgb"].shape == (2, 3, 16, 16)

    from PIL import Image

    assert Image.open(tmp_path / "triptych-0.png").size == (3 * 16 * 4 + 2 * 4, 16 * 4)


def test_ctrl_c_saves_what_it_has_and_exits_130(dev, tmp_path, capsys, monkeypatch):
    real_fit = mm.train.fit

    def interrupted_fit(step, *args, **kwargs):
        calls = []

        def stepped(**batch):
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return step(**batch)

        return real_fit(stepped, *args, **kwargs)

    monkeypatch.setattr(mm.train, "fit", interrupted_fit)
    assert denoise.run(cli_args(dev, tmp_path)) == 130
    out = capsys.readouterr()
    assert "interrupted after 2 steps" in out.err
    assert all(math.isfinite(v) for v in _psnr(out.out))
    assert (tmp_path / "denoiser.zip").exists() and (tmp_path / "loss.png").exists()


def cli_args(dev, out):
    """The parsed arguments of `mlmetal denoise` at the tiny size."""
    import argparse

    parser = argparse.ArgumentParser(parents=[cli.training_flags(**denoise.FLAGS)])
    denoise.add_arguments(parser)
    return parser.parse_args(["--device", dev.name, "--out", str(out), *TINY])


def test_every_flag_is_documented():
    import argparse

    parser = argparse.ArgumentParser(parents=[cli.training_flags(**denoise.FLAGS)])
    denoise.add_arguments(parser)
    text = parser.format_help()
    for flag in ("--device", "--seed", "--out", "--epochs", "--size", "--spp", "--refresh-every", "--halve-every"):
        assert flag in text
    assert all(a.help for a in parser._actions)


def test_denoise_command_trains_under_autocast_and_says_so(dev, tmp_path, capsys, monkeypatch):
    built = []
    graph = mm.Graph

    def recording(*args, **kwargs):  # the graphs the command builds, with their compute dtypes
        g = graph(*args, **kwargs)
        built.append(g.compute_dtype)
        return g

    monkeypatch.setattr(mm, "Graph", recording)
    assert cli.main(["denoise", "--device", dev.name, "--out", str(tmp_path), "--autocast", "bfloat16", *TINY]) == 0
    out = capsys.readouterr().out
    assert out.startswith("training under bfloat16 autocast: convolutions, matmuls and Gram matrices in bfloat16")
    assert re.search(r"trained \d+ steps on \w+ under bfloat16 autocast in", out), out
    assert all(math.isfinite(v) for v in _psnr(out))
    assert built[0] == mm.bfloat16 and built.count(mm.bfloat16) == 1  # the training graph; validation and the
    # deployed model run in float32
    model = mm.load(tmp_path / "denoiser.zip", device=dev)
    assert {p.dtype for p in model.parameters.values()} == {np.dtype(np.float32)}


def test_float16_autocast_trains_with_a_loss_scaler(dev):
    mm.nn.seed(0)
    net = UNet(width=4, depth=2, device=dev)
    train = training_graph(net, batch=2, size=16, lr=1e-3, log_weight=0.5, autocast="float16")
    assert isinstance(train.loss_scaler, mm.train.LossScaler)
    assert training_graph(UNet(width=4, depth=2, device=dev), 2, 16, 1e-3, 0.5, autocast="bfloat16").optimizer
    rng = np.random.default_rng(0)
    feed = {k: rng.uniform(0, 1, (2, 3, 16, 16)).astype(np.float32) for k in ("noisy", "albedo", "normal", "clean")}
    assert math.isfinite(train.step(**feed)) and train.loss_scaler.scale == 2.0**16
