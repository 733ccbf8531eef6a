"""The README's Python examples run as written (on the backend under test)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_examples_run(dev, monkeypatch, tmp_path):
    monkeypatch.setenv("MLMETAL_DEVICE", dev.name)
    monkeypatch.chdir(tmp_path)  # the examples write files
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks
    namespace = {}
    for block in blocks:  # later examples may use names earlier ones defined, as a reader would
        exec(compile(block, str(README), "exec"), namespace)
