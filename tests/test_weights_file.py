"""module.save_weights / load_weights to one .safetensors file, as MLX's (issue 16, item 10):
what the ecosystem's readers see, strict loading, and files refused before anything changes."""

import json
import struct

import numpy as np
import pytest
import safetensors.numpy

import mlmetal as mm


def net(dev, width=4):
    return mm.nn.Sequential(mm.nn.Conv2d(2, width, 3, device=dev), mm.nn.BatchNorm2d(width, device=dev),
                            mm.nn.ReLU(), mm.nn.Linear(width, 3, bias=False, device=dev))


def test_one_file_readable_by_safetensors(dev, tmp_path):
    a = net(dev)
    path = tmp_path / "w.safetensors"
    a.save_weights(path)
    assert path.is_file()
    arrays = safetensors.numpy.load_file(path)
    mine = a.named_parameters()
    assert set(arrays) == set(mine) == {"layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias",
                                        "layers.1.running_mean", "layers.1.running_var", "layers.3.weight"}
    for name, p in mine.items():
        assert arrays[name].dtype == np.float32
        np.testing.assert_array_equal(arrays[name], p.numpy())
    mm.nn.seed(1)
    b = net(dev)
    assert b.load_weights(path) is b
    for name, p in b.named_parameters().items():
        np.testing.assert_array_equal(p.numpy(), arrays[name])


def test_readable_by_safetensors_torch(dev, tmp_path):
    torch_st = pytest.importorskip("safetensors.torch", reason="PyTorch is not installed")
    a = net(dev)
    a.save_weights(tmp_path / "w.safetensors")
    tensors = torch_st.load_file(str(tmp_path / "w.safetensors"))
    for name, p in a.named_parameters().items():
        np.testing.assert_array_equal(tensors[name].numpy(), p.numpy())


def test_other_paths_keep_the_saved_model_format(dev, tmp_path):
    net(dev).save_weights(tmp_path / "w")
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["graph.json", "weights.safetensors"]
    net(dev).save_weights(tmp_path / "w.zip")
    assert (tmp_path / "w.zip").is_file()
    net(dev).load_weights(tmp_path / "w.zip")


def test_strict_load_reports_every_mismatch_and_changes_nothing(dev, tmp_path):
    net(dev).save_weights(tmp_path / "w.safetensors")
    other = mm.nn.Sequential(mm.nn.Conv2d(2, 5, 3, device=dev), mm.nn.ReLU(), mm.nn.ReLU(), mm.nn.ReLU(),
                             mm.nn.Linear(4, 3, device=dev))
    before = {n: p.numpy() for n, p in other.named_parameters().items()}
    with pytest.raises(mm.FormatError) as e:
        other.load_weights(tmp_path / "w.safetensors")
    message = str(e.value)
    assert str(tmp_path / "w.safetensors") in message
    assert "missing layers.4.weight, layers.4.bias" in message
    assert "unexpected layers.1.bias, " in message and "layers.1.running_mean" in message and "layers.3.weight" in message
    assert "wrong shape or dtype layers.0.weight (5, 2, 3, 3) float32 (saved (4, 2, 3, 3) float32)" in message
    for n, p in other.named_parameters().items():
        np.testing.assert_array_equal(p.numpy(), before[n])
    # not strict: what matches loads, the rest stays; a wrong shape is still refused
    part = mm.nn.Sequential(mm.nn.Conv2d(2, 4, 3, device=dev))
    part.load_weights(tmp_path / "w.safetensors", strict=False)
    np.testing.assert_array_equal(part.layers[0].weight.numpy(),
                                  safetensors.numpy.load_file(tmp_path / "w.safetensors")["layers.0.weight"])
    with pytest.raises(mm.FormatError, match="wrong shape or dtype layers.0.weight"):
        other.load_weights(tmp_path / "w.safetensors", strict=False)


def _rewrite(path, edit):
    """The file at `path` with its header edited by `edit(header)` (the data kept)."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    data = edit(header, raw[8 + n:])
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


@pytest.mark.parametrize("edit, message", [
    (lambda h, d: (h["layers.3.weight"].update(dtype="F64"), d)[1], r"dtype 'F64' is not one mlmetal stores \(F32, F16, BF16, I32, U32\)"),
    (lambda h, d: d[:-4], "the file has .* bytes; its header describes"),
    (lambda h, d: (h["layers.3.weight"].update(data_offsets=[0, 4]), d)[1], "do not span the 12 elements"),
    (lambda h, d: (h.__setitem__("layers.3.weight", [1]), d)[1], "expected an object"),
])
def test_malformed_files_are_refused_before_anything_changes(dev, tmp_path, edit, message):
    a = net(dev)
    path = tmp_path / "w.safetensors"
    a.save_weights(path)
    _rewrite(path, edit)
    b = net(dev)
    before = {n: p.numpy() for n, p in b.named_parameters().items()}
    with pytest.raises(mm.FormatError, match=message):
        b.load_weights(path)
    for n, p in b.named_parameters().items():
        np.testing.assert_array_equal(p.numpy(), before[n])


def test_paths_that_cannot_be_loaded_or_saved(dev, tmp_path):
    with pytest.raises(mm.FormatError, match="the weights file does not exist"):
        net(dev).load_weights(tmp_path / "none.safetensors")
    (tmp_path / "d.safetensors").mkdir()
    with pytest.raises(IsADirectoryError, match="a .safetensors file is a file"):
        net(dev).save_weights(tmp_path / "d.safetensors")
    with pytest.raises(mm.FormatError, match="is a directory, not a regular file"):
        net(dev).load_weights(tmp_path / "d.safetensors")
    path = tmp_path / "w.safetensors"
    net(dev).save_weights(path)
    net(dev, width=6).save_weights(path)  # replaced in one rename, nothing left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.safetensors", "w.safetensors"]
    assert safetensors.numpy.load_file(path)["layers.3.weight"].shape == (3, 6)
