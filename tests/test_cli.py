"""The command line: every command answers --help, the demo checks its own results, errors exit 2."""

import pytest

from mlmetal import cli


def test_demo_computes_what_numpy_does(dev, capsys):
    assert cli.main(["demo", "--device", dev.name, "--size", "5000"]) == 0
    out = capsys.readouterr().out
    assert out.count("matches numpy") == 2 and "DIFFERS" not in out


def test_info_lists_every_backend(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("cpu", "cuda", "metal")) and "compile cache" in out


@pytest.mark.parametrize("command", ["demo", "info", "bench", *(app.COMMAND for app in cli._apps())])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0 and "usage: mlmetal" in capsys.readouterr().out


@pytest.mark.parametrize("command", [app.COMMAND for app in cli._apps()])
def test_every_training_command_takes_the_common_flags(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    out = capsys.readouterr().out
    missing = [flag for flag in ("--device", "--seed", "--out", "--steps", "--size", "--no-progress") if flag not in out]
    assert not missing, f"mlmetal {command} lacks {missing}"


def test_unknown_benchmark_and_device_exit_2(capsys):
    assert cli.main(["bench", "nope"]) == 2
    assert cli.main(["demo", "--device", "metal"]) == 2 or __import__("sys").platform == "darwin"


def test_ctrl_c_before_training_exits_130_without_a_traceback(monkeypatch, capsys):
    from mlmetal.apps import gan

    def interrupted(*args, **kwargs):  # Ctrl-C while the judging classifier trains
        raise KeyboardInterrupt

    monkeypatch.setattr(gan, "train_digits", interrupted)
    assert cli.main(["gan", "--steps", "1"]) == 130
    assert "mlmetal gan: interrupted" in capsys.readouterr().err


@pytest.mark.parametrize("command", [app.COMMAND for app in cli._apps()])
def test_every_training_command_takes_autocast(command, monkeypatch, tmp_path):
    got = {}
    for app in cli._apps():
        monkeypatch.setattr(app, "run", lambda args: got.update(vars(args)) or 0)
    for value, dtype in [("bfloat16", "bfloat16"), ("bf16", "bfloat16"), ("float16", "float16"), ("half", "float16")]:
        assert cli.main([command, "--autocast", value, "--out", str(tmp_path)]) == 0 and got["autocast"] == dtype
    assert cli.main([command, "--out", str(tmp_path)]) == 0 and got["autocast"] is None


@pytest.mark.parametrize("value", ["float32", "fp8", "int32", ""])
@pytest.mark.parametrize("command", [app.COMMAND for app in cli._apps()])
def test_a_bad_autocast_is_one_line_and_exits_2(command, value, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    for app in cli._apps():
        monkeypatch.setattr(app, "run", lambda args: pytest.fail("trained with a bad --autocast"))
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--autocast", value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last == f"mlmetal {command}: error: argument --autocast: expected bfloat16 or float16, got {value!r}"


def test_threadgroups_a_multiprocessor_holds_follow_cudas_occupancy_rules():
    """sm_90: 64K registers a multiprocessor, allocated a warp at a time in units of 256; 228 KB of
    shared memory, 1 KB of it reserved a threadgroup; 2048 threads; 32 threadgroups."""
    from mlmetal.runtime.cuda import Resources

    def held(registers, smem, threads):
        return Resources("k", registers, 0, 0, 0, smem).threadgroups(threads)

    assert held(255, 24192, 128) == (2, "registers")  # 256·32 a warp, 4 warps: 32768 a threadgroup
    assert held(168, 24192, 128) == (3, "registers")  # 5376 a warp: 21504, three fit 65536
    assert held(170, 24192, 128) == (2, "registers")  # 170·32 rounds up to 5632: 22528, three do not
    assert held(32, 0, 128) == (16, "threads")
    assert held(32, 100000, 128) == (2, "threadgroup memory")
    assert held(16, 0, 32) == (32, "threadgroups")
    assert held(64, 0, 1024) == (1, "registers")
