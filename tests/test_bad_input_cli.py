"""The command line, tried as a careless user would (issue 20, row 9): every bad flag is one line naming the
flag and the allowed values, exit status 2, no traceback, before anything is trained."""

from pathlib import Path

import pytest

from mlmetal import cli

TEXT = str(Path(__file__).resolve().parents[1] / "README.md")  # a readable file that is neither image nor weights
BAD = [
    ("demo", "--size", "0", "expected an integer from 4 to"),
    ("demo", "--size", "-5", "expected an integer from 4 to"),
    ("demo", "--device", "nope", "invalid choice: 'nope' (choose from"),
    ("denoise", "--size", "50", "expected a multiple of 2**depth = 4 (--depth 2), got 50"),
    ("denoise", "--size", "0", "expected an integer ≥ 1, got '0'"),
    ("denoise", "--batch", "0", "expected an integer ≥ 1, got '0'"),
    ("denoise", "--batch", "33", "expected at most --scenes = 32, got 33"),
    ("denoise", "--lr", "-1", "expected a finite number > 0, got '-1'"),
    ("denoise", "--lr", "nan", "expected a finite number > 0, got 'nan'"),
    ("denoise", "--depth", "0", "expected an integer ≥ 1, got '0'"),
    ("denoise", "--spp", "0", "expected an integer ≥ 1, got '0'"),
    ("denoise", "--out", "/proc/nope", "cannot create directory '/proc/nope'"),
    ("denoise", "--steps", "-3", "expected an integer ≥ 1, got '-3'"),
    ("caption", "--size", "12", "expected a multiple of 8, got 12"),
    ("caption", "--seed", "-1", "expected an integer from 0 to 2147483647, got '-1'"),
    ("gan", "--size", "12", "expected 8, 16, 32, … (8·2^k), got 12"),
    ("gan", "--steps", "0", "expected an integer ≥ 1, got '0'"),
    ("style", "--size", "2", "expected an even integer ≥ 4, got 2"),
    ("style", "--style", "no-such-image.png", "expected a readable file, got 'no-such-image.png' (no such file)"),
    ("style", "--content", TEXT, f"cannot read {TEXT!r} as an image"),
    ("style", "--loss-weights", TEXT, f"cannot read {TEXT!r} as safetensors"),
    ("style", "--every", "0", "expected an integer ≥ 1, got '0'"),
]


@pytest.mark.parametrize("command, flag, value, message", BAD, ids=[" ".join(b[:3]) for b in BAD])
def test_row9_a_bad_flag_is_one_line_naming_it_and_exits_2(command, flag, value, message, monkeypatch, capsys,
                                                             tmp_path):
    monkeypatch.chdir(tmp_path)  # the default output directories land here, if anything is created
    for app in cli._apps():  # nothing may start training: a bad flag is caught while parsing
        monkeypatch.setattr(app, "run", lambda args: pytest.fail(f"mlmetal {command} ran with {flag} {value}"))
    with pytest.raises(SystemExit) as e:
        cli.main([command, flag, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"mlmetal {command}: error: argument {flag}: ") and message in last, err


@pytest.mark.parametrize("command", [app.COMMAND for app in cli._apps()])
def test_row9_every_training_command_takes_the_common_flags(command, monkeypatch, tmp_path):
    """--device --seed --out --steps --size --no-progress, parsed the same way by every command."""
    got = {}
    for app in cli._apps():
        monkeypatch.setattr(app, "run", lambda args: got.update(vars(args)) or 0)
    assert cli.main([command, "--device", "cpu", "--seed", "3", "--out", str(tmp_path / "o"), "--steps", "2",
                     "--size", "16", "--no-progress"]) == 0
    assert (got["device"], got["seed"], got["out"], got["steps"], got["size"], got["progress"]) == \
        ("cpu", 3, str(tmp_path / "o"), 2, 16, False)
    assert (tmp_path / "o").is_dir()
