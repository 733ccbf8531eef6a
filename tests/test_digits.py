"""A small CNN trained through a derived training graph learns scikit-learn's handwritten digits."""

import pytest

pytest.importorskip("sklearn", reason="scikit-learn provides the digits (in the test extra)")

from mlmetal.apps.digits import train_digits  # noqa: E402


def test_digits_cnn_reaches_95_percent(dev):
    result = train_digits(dev, epochs=12, progress=False)
    assert result["accuracy"] >= 0.95, result["history"]
    losses = [h["loss"] for h in result["history"]]
    assert losses[-1] < 0.25 * losses[0]
