"""The GAN: its two training graphs train what they should, and `mlmetal gan` runs end to end."""

import numpy as np
import pytest

pytest.importorskip("sklearn", reason="scikit-learn provides the digits (in the test extra)")

import mlmetal as mm  # noqa: E402
from mlmetal.apps.digits import DigitsCNN  # noqa: E402
from mlmetal.apps.gan import GAN, LATENT, Generator, confident_fraction, real_digits  # noqa: E402
from mlmetal.cli import main  # noqa: E402


@pytest.fixture
def gan(dev):
    mm.nn.seed(0)
    return GAN(dev, batch=64)


def test_each_training_graph_updates_only_its_own_network(gan):
    d_params = {id(p) for p in gan.discriminator.parameters()}
    g_params = {id(p) for p in gan.generator.parameters()}
    assert {id(p) for p in gan.train_d.parameters} == d_params
    assert {id(p) for p in gan.train_g.parameters} == g_params
    # the generator's graph went through the discriminator, which is trainable again afterwards
    assert all(p.trainable for p in gan.discriminator.parameters())


def test_discriminator_losses_on_real_and_fake_move_apart(gan):
    x = real_digits()
    real, fake = gan.discriminator_losses(x[:64])
    rng = np.random.default_rng(0)
    for _ in range(30):
        gan.train_d.step(real=x[rng.integers(0, len(x), 64)])
    real_after, fake_after = gan.discriminator_losses(x[:64])
    assert real_after < real - 0.2 and fake_after < fake - 0.05  # it tells them apart better...
    for _ in range(30):
        gan.train_g.step()
    # ...until the generator, trained alone, fools it: the fake loss climbs, the real one stays
    real_fooled, fake_fooled = gan.discriminator_losses(x[:64])
    assert fake_fooled > fake_after + 0.3 and abs(real_fooled - real_after) < 1e-6


def test_every_step_draws_a_fresh_latent_batch_on_the_device(gan):
    z = gan.train_g.graph.nodes[0]
    assert z.op == "random_tensor"
    stream = z.attrs["generator"]
    before = stream.position
    losses = gan.step(real_digits()[:64])
    assert np.isfinite(losses).all()
    assert stream.position == before + 2 * 64 * LATENT  # one batch for each graph


def test_gan_command_writes_grids_and_weights(tmp_path, capsys):
    rc = main(["gan", "--device", "cpu", "--epochs", "2", "--batch", "512", "--no-judge", "--out", str(tmp_path)])
    assert rc == 0
    assert (tmp_path / "samples_000.png").exists() and (tmp_path / "samples_001.png").exists()
    assert (tmp_path / "samples.png").exists() and (tmp_path / "generator.zip").exists()
    assert "trained after 2 epoch(s)" in capsys.readouterr().out


def test_ctrl_c_saves_what_it_has_and_exits_130(tmp_path, monkeypatch):
    calls = []

    def interrupted(self, real):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return 1.0, 1.0

    monkeypatch.setattr(GAN, "step", interrupted)
    rc = main(["gan", "--device", "cpu", "--batch", "512", "--no-judge", "--out", str(tmp_path)])
    assert rc == 130
    assert (tmp_path / "generator.zip").exists() and (tmp_path / "samples.png").exists()


def test_size_16_trains_on_upscaled_digits_and_writes_16_pixel_samples(tmp_path, capsys):
    from PIL import Image

    rc = main(["gan", "--device", "cpu", "--size", "16", "--steps", "2", "--batch", "32", "--no-judge",
               "--out", str(tmp_path)])
    assert rc == 0
    # 64 samples in an 8×8 grid of 16-pixel digits with one-pixel gutters, each pixel 2×2 on screen
    assert Image.open(tmp_path / "samples.png").size == (2 * (8 * 17 + 1),) * 2
    generator = Generator(mm.device("cpu"), size=16).load_weights(tmp_path / "generator.zip")  # strict: same shapes
    g = mm.Graph(mm.device("cpu"))
    assert generator(g.input("z", (2, LATENT))).shape == (2, 1, 16, 16)


def test_larger_samples_are_judged_average_pooled_to_8x8(dev):
    big = real_digits(16, dev)
    assert big.shape == (1797, 1, 16, 16) and big.min() >= -1 and big.max() <= 1
    mm.nn.seed(0)
    classifier = DigitsCNN(dev)
    images = (big[:40] + 1) / 2
    pooled = images.reshape(40, 1, 8, 2, 8, 2).mean(axis=(3, 5))
    sure, classes = confident_fraction(classifier, dev, images, threshold=0.1)
    assert sure == 1.0 and classes.sum() == 40  # every image counted once, at 8×8
    np.testing.assert_array_equal(classes, confident_fraction(classifier, dev, pooled, threshold=0.1)[1])


def test_size_must_be_8_times_a_power_of_two(capsys):
    with pytest.raises(SystemExit) as e:
        main(["gan", "--device", "cpu", "--size", "24", "--no-judge"])
    assert e.value.code == 2 and "argument --size: expected 8, 16, 32, … (8·2^k), got 24" in capsys.readouterr().err
