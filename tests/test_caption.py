"""Early-exit decoding: the captioner learns to spell held-out digits, and predication stops the
decoder on the device without changing what it spells."""

import numpy as np
import pytest

pytest.importorskip("sklearn", reason="scikit-learn provides the digits (in the test extra)")

import mlmetal as mm  # noqa: E402
from mlmetal.apps.caption import END, NAMES, STEPS, Captioner, Decoder, read, spell, train_caption  # noqa: E402
from mlmetal.cli import main  # noqa: E402


def test_spelling_tokens_round_trip():
    assert all(read(spell(d)) == NAMES[d] and len(spell(d)) == STEPS for d in range(10))
    assert spell(7)[5:] == [END] * (STEPS - 5)


@pytest.fixture(scope="module")
def trained(dev):
    return train_caption(dev, epochs=15, progress=False)


def test_captioner_spells_90_percent_of_held_out_digits(trained):
    assert trained["accuracy"] >= 0.9, trained["history"]
    losses = [h["loss"] for h in trained["history"]]
    assert losses[-1] < 0.05 * losses[0]


def test_predicated_decoding_spells_the_same_and_switches_itself_off(trained, dev):
    x, _ = trained["test"]
    x = x[:100]
    on = Decoder(trained["net"], dev, len(x), predicated=True)
    off = Decoder(trained["net"], dev, len(x), predicated=False)
    tokens_on, tokens_off = on.run(x), off.run(x)
    assert [read(s) for s in tokens_on.T] == [read(s) for s in tokens_off.T]
    assert on.flags.numpy()[0] == 0  # every sequence ended within 20 steps: the word turned the rest off
    # every sequence ended before step 20, so the skipped steps were never needed
    ended = [list(s).index(END) for s in tokens_off.T]
    assert max(ended) < 19
    np.testing.assert_array_equal(tokens_on[:max(ended) + 1], tokens_off[:max(ended) + 1])


def test_caption_command_at_size_16_writes_weights_and_report(tmp_path, capsys):
    rc = main(["caption", "--device", "cpu", "--epochs", "1", "--steps", "2", "--size", "16", "--no-progress",
               "--out", str(tmp_path)])
    assert rc == 0
    Captioner(mm.device("cpu"), size=16).load_weights(tmp_path / "captioner.zip")  # strict: the 16×16 encoder's shapes
    report = (tmp_path / "report.txt").read_text()
    assert "held-out digits spelled right after 2 steps" in report and "images 16×16" in report
    assert "captioner.zip" in capsys.readouterr().out


def test_ctrl_c_saves_what_it_has_and_exits_130(tmp_path, monkeypatch):
    calls = []
    step = mm.graph.Training.step

    def interrupted(self, *a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step(self, *a, **kw)

    monkeypatch.setattr(mm.graph.Training, "step", interrupted)
    rc = main(["caption", "--device", "cpu", "--no-progress", "--out", str(tmp_path)])
    assert rc == 130
    assert (tmp_path / "captioner.zip").exists()
    assert "after 2 steps (interrupted)" in (tmp_path / "report.txt").read_text()
