"""Saving and loading, tried as a careless or hostile user would (issue 20's rows 4, 7, 8, 11, 12 and 14):
one clear error for every bad input, and a model being overwritten survives its writer being killed."""

import json
import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

import mlmetal as mm
from mlmetal import io


def small(dev, hidden=3, seed=0):
    mm.nn.seed(seed)
    return mm.nn.Sequential(mm.nn.Linear(4, hidden, device=dev), mm.nn.Tanh(), mm.nn.Linear(hidden, 2, device=dev))


def saved_graph(dev, path, net=None, optimizer=True):
    """`net` saved as a graph over a (2, 4) input, with an SGD optimizer's state; returns the net."""
    net = net or small(dev)
    g = mm.Graph(dev)
    y = net(g.input("x", (2, 4)))
    mm.save(path, g, mm.optim.SGD(net.parameters(), lr=0.1, momentum=0.9) if optimizer else None,
            outputs={"y": y}, module=net)
    return net


def edit_graph_json(path: Path, fn):
    meta = json.loads((path / "graph.json").read_text())
    fn(meta)
    (path / "graph.json").write_text(json.dumps(meta))


def edit_weights_header(path: Path, fn):
    raw = (path / "weights.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    fn(header)
    new = json.dumps(header).encode()
    (path / "weights.safetensors").write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])


def load_within(path, dev, seconds=20):
    """mm.load(path) in a thread: its exception, or AssertionError if it is still waiting after `seconds`."""
    outcome = {}

    def run():
        try:
            mm.load(path, device=dev)
        except BaseException as e:  # noqa: BLE001 — handed to the test
            outcome["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    return t.is_alive(), outcome.get("error")


# ---------------------------------------------------------------- row 4: files that are not regular files

@pytest.mark.parametrize("member", ["graph.json", "weights.safetensors", "archive", "directory"])
def test_row4_named_pipe_or_directory_is_refused_without_waiting(dev, tmp_path, member):
    path = tmp_path / "m"
    saved_graph(dev, path)
    if member == "archive":
        path = tmp_path / "m.zip"
        os.mkfifo(path)
        blocking = path
    elif member == "directory":  # a directory where weights.safetensors is expected
        (path / "weights.safetensors").unlink()
        (path / "weights.safetensors").mkdir()
        blocking = None
    else:
        (path / member).unlink()
        os.mkfifo(path / member)
        blocking = path / member
    waiting, error = load_within(path, dev)
    if waiting:  # let the reader go (a writer opening the pipe ends its wait) before failing
        os.close(os.open(blocking, os.O_WRONLY | os.O_NONBLOCK))
    assert not waiting, f"mm.load waited on the named pipe {blocking}"
    assert isinstance(error, mm.FormatError), repr(error)
    kind = "a directory" if member == "directory" else "a named pipe"
    assert str(path) in str(error) and f"is {kind}, not a regular file" in str(error)


# ---------------------------------------------------------------- row 7: dtypes against what the graph declares

def test_row7_int32_trainable_parameter_is_refused(dev, tmp_path):
    path = tmp_path / "m"
    small(dev).save_weights(path)
    edit_graph_json(path, lambda m: m["parameters"][0].update(dtype="int32"))
    edit_weights_header(path, lambda h: h["layers.0.weight"].update(dtype="I32"))  # same bytes, now int32
    with pytest.raises(mm.FormatError, match=r"parameters\[0\].*layers.0.weight is int32; parameters are float32"):
        mm.load(path, device=dev)
    # the same in a graph's save, where the int32 parameter feeds a linear layer
    saved_graph(dev, path, optimizer=False)
    edit_graph_json(path, lambda m: m["parameters"][0].update(dtype="int32"))
    edit_weights_header(path, lambda h: h["layers.0.weight"].update(dtype="I32"))
    with pytest.raises(mm.FormatError, match="layers.0.weight is int32; parameters are float32"):
        mm.load(path, device=dev)


# ---------------------------------------------------------------- row 8: float attributes past float32's range

def test_row8_float_attribute_beyond_float32_is_refused_at_load(dev, tmp_path):
    g = mm.Graph(dev)
    y = mm.nn.GramMatrix(alpha=0.5)(g.input("x", (1, 2, 3, 3)))
    mm.save(tmp_path / "m", g, outputs={"y": y})
    edit_graph_json(tmp_path / "m", lambda m: m["nodes"][0]["attrs"].update(alpha=1e308))
    with pytest.raises(mm.FormatError, match=r"nodes\[0\].attrs.alpha: 1e\+308 is beyond float32's range"):
        mm.load(tmp_path / "m", device=dev)
    saved_graph(dev, tmp_path / "o")
    edit_graph_json(tmp_path / "o", lambda m: m["optimizer"]["attrs"].update(lr=-1e39))
    with pytest.raises(mm.FormatError, match=r"optimizer.attrs.lr: -1e\+39 is beyond float32's range"):
        mm.load(tmp_path / "o", device=dev)


# ---------------------------------------------------------------- row 11: how mm.save writes

@pytest.mark.parametrize("zipped", [False, True])
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_row11_save_honours_the_umask(dev, tmp_path, zipped, umask):
    net = small(dev)
    path = tmp_path / "new" / ("m.zip" if zipped else "m")
    old = os.umask(umask)
    try:
        mm.save(path, net)
        mm.save(path, net)  # and again, over itself
    finally:
        os.umask(old)
    files = [path] if zipped else [path / "graph.json", path / "weights.safetensors"]
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f
    for d in [tmp_path / "new"] + ([] if zipped else [path]):
        assert stat.S_IMODE(d.stat().st_mode) == 0o777 & ~umask, d
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporaries left


def test_row11_an_empty_path_is_refused(dev, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for bad in ["", ".", Path("")]:
        with pytest.raises(ValueError, match="names no model"):
            mm.save(bad, small(dev))
    assert not any(tmp_path.iterdir())


def test_row11_save_errors_name_the_users_path(dev, tmp_path):
    net = small(dev)
    (tmp_path / "afile").write_text("not a directory")
    (tmp_path / "d.zip").mkdir()
    (tmp_path / "f").write_text("a file where a model directory would go")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    cases = [(tmp_path / "afile" / "m", NotADirectoryError, "afile is not a directory"),
             (tmp_path / "afile" / "m.zip", NotADirectoryError, "afile is not a directory"),
             (tmp_path / "d.zip", IsADirectoryError, "d.zip is a directory"),
             (tmp_path / "f", FileExistsError, "f is a file"),
             (tmp_path / "notes", FileExistsError, "holds files other than a saved model's: todo.txt")]
    for path, kind, message in cases:
        with pytest.raises(kind) as e:
            mm.save(path, net)
        assert str(path) in str(e.value) and message in str(e.value) and ".tmp" not in str(e.value), e.value
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "d.zip", "f", "notes"]  # nothing half-written


KILLER = textwrap.dedent("""
    # Saves model B over model A, SIGKILLing itself just before the k-th file operation of the writer.
    import os, signal, sys
    import numpy as np
    from mlmetal import io

    path, k = sys.argv[1], int(sys.argv[2])
    graph_bytes, weight_bytes = (open(sys.argv[i], "rb").read() for i in (3, 4))
    calls = 0

    def hooked(fn):
        def call(*args, **kwargs):
            global calls
            calls += 1
            if calls == k:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)
        return call

    for name in ("open", "write", "close", "mkdir", "rename", "replace", "unlink", "rmdir", "chmod", "fsync"):
        setattr(os, name, hooked(getattr(os, name)))
    if hasattr(io, "_exchange"):
        io._exchange = hooked(io._exchange)
    io._write(io.Path(path), graph_bytes, weight_bytes)
    print(calls)
""")


@pytest.mark.parametrize("zipped", [False, True])
def test_row11_a_save_killed_at_any_write_leaves_the_old_or_the_new_model(dev, tmp_path, zipped):
    """Fuzz (issue item 6): SIGKILL at each file operation of a save over an existing model, in turn."""
    path = tmp_path / ("m.zip" if zipped else "m")
    a, b = small(dev, hidden=3, seed=1), small(dev, hidden=5, seed=2)  # B's shapes differ: a mix cannot load
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    saved_graph(dev, tmp_path / "b", b)
    members = [tmp_path / "b" / n for n in ("graph.json", "weights.safetensors")]
    outputs = {}
    for name, net in (("a", a), ("b", b)):
        g = mm.Graph(dev)
        outputs[name] = g.run({"x": x}, outputs=[net(g.input("x", (2, 4)))])[0]
    saved_graph(dev, path, a)
    seen, k = set(), 1
    while True:
        run = subprocess.run([sys.executable, "-c", KILLER, str(path), str(k), *map(str, members)],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode in (0, -signal.SIGKILL), run.stderr
        got = mm.load(path, device=dev).run({"x": x})["y"]
        which = [n for n, want in outputs.items() if np.array_equal(got, want)]
        assert which, f"killed at file operation {k}: the model at {path} is neither the old nor the new one"
        seen.add(which[0])
        if run.returncode == 0:
            break
        saved_graph(dev, path, a)  # back to the old model for the next point
        k += 1
    assert int(run.stdout) == k - 1 and k > 2 and seen == {"a", "b"}


# ---------------------------------------------------------------- row 12: memory a load costs

MEASURE = textwrap.dedent("""
    import resource, sys
    import mlmetal as mm
    dev = mm.device("cpu")
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in bytes on macOS, KiB on Linux
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = mm.load(sys.argv[1], device=dev)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * unit)
    assert model.parameters["w"].shape == (32 << 20,)
""")


def test_row12_loading_costs_about_the_tensors_size(tmp_path):
    """A 128 MiB weights file (sparse: written as a hole) loads for about 128 MiB of peak resident memory."""
    n = 32 << 20
    path = tmp_path / "m"
    path.mkdir()
    (path / "graph.json").write_text(json.dumps(
        {"format": "mlmetal", "version": 1, "kind": "module", "inputs": [], "nodes": [], "outputs": {},
         "parameters": [{"name": "w", "shape": [n], "dtype": "float32", "trainable": True}]}))
    header = json.dumps({"w": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}}).encode()
    with open(path / "weights.safetensors", "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(8 + len(header) + 4 * n)
    run = subprocess.run([sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    grown = int(run.stdout)
    assert grown < 1.25 * 4 * n, f"loading {4 * n >> 20} MiB of weights took {grown >> 20} MiB more peak memory"


# ---------------------------------------------------------------- row 14 (io part): errors name the archive

def test_row14_graph_json_size_error_names_the_archive(dev, tmp_path, monkeypatch):
    saved_graph(dev, tmp_path / "m.zip")
    monkeypatch.setattr(io, "MAX_JSON_BYTES", 100)
    with pytest.raises(mm.FormatError, match=rf"^{re.escape(str(tmp_path / 'm.zip'))}: graph.json: \d+ bytes; at most 100"):
        mm.load(tmp_path / "m.zip", device=dev)
