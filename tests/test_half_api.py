"""float16 and bfloat16 from the user's side: factories, `.numpy()`, `Module.astype`, the optimizers'
refusal, and save / load carrying the dtypes bit for bit (issue 17)."""

import ml_dtypes
import numpy as np
import pytest

import mlmetal as mm
from mlmetal import io
from conftest import cuda_reason

LOW = [mm.float16, mm.bfloat16]
IDS = ["float16", "bfloat16"]


def bits(a) -> list:
    """The 16-bit patterns of a float16 / bfloat16 array (NaNs compare by their bits)."""
    return np.ascontiguousarray(a).view(np.uint16).ravel().tolist()


# ---------------------------------------------------------------- tensors and factories

@pytest.mark.parametrize("dtype", LOW, ids=IDS)
def test_numpy_gives_the_storage_type(dev, dtype):
    x = mm.tensor(np.array([0.1, -3.0, 1e-6, 65504.0], np.float32), dev)
    h = x.astype(dtype)
    a = h.numpy()
    assert h.dtype == dtype and a.dtype == dtype
    assert a.dtype.type is (np.float16 if dtype == np.float16 else ml_dtypes.bfloat16)
    assert bits(a) == bits(x.numpy().astype(dtype))
    assert np.asarray(h).dtype == dtype


@pytest.mark.parametrize("n", [0, 1, 2, 3, 33])
@pytest.mark.parametrize("dtype", LOW, ids=IDS)
def test_filled_factories_write_every_element_exactly(dev, dtype, n):
    for value in (0.0, 1.0, -2.5, 0.1, -0.0, float("inf"), float("-inf"), float("nan"), 1e-6):
        t = mm.full((n,), value, dev, dtype)
        assert t.dtype == dtype and t.shape == (n,)
        assert bits(t.numpy()) == bits(np.full(n, value, dtype))  # rounded as NumPy rounds, to nearest even
    assert bits(mm.zeros((n, 2), dev, dtype).numpy()) == [0] * (2 * n)
    assert bits(mm.ones(n, dev, dtype).numpy()) == bits(np.ones(n, dtype))


def test_factories_take_dtype_names_and_refuse_what_the_dtype_cannot_hold(dev):
    assert mm.zeros(3, dev, "bfloat16").dtype == mm.bfloat16 and mm.ones(3, dev, "half").dtype == mm.float16
    with pytest.raises(mm.DTypeError, match="70000 is not a value of float16"):
        mm.full(2, 70000, dev, mm.float16)
    assert bits(mm.full(2, 65504, dev, mm.float16).numpy()) == bits(np.full(2, 65504, np.float16))
    with pytest.raises(mm.DTypeError, match="1e\\+39 is not a value of bfloat16"):
        mm.full(2, 1e39, dev, mm.bfloat16)
    with pytest.raises(mm.DTypeError, match="unknown dtype 'float8'"):
        mm.zeros(2, dev, "float8")
    with pytest.raises(mm.DTypeError, match="not int32"):
        mm.rand(2, dev, dtype=np.int32)


@pytest.mark.parametrize("dtype", LOW, ids=IDS)
def test_arange_rounds_its_values_once(dev, dtype):
    for args in [(5,), (0.0, 1.0, 0.1), (-3, 300, 7)]:
        t = mm.arange(*args, device=dev, dtype=dtype)
        assert t.dtype == dtype and bits(t.numpy()) == bits(np.arange(*args, dtype=np.float64).astype(dtype))


@pytest.mark.parametrize("dtype", LOW, ids=IDS)
def test_rand_and_randn_round_the_float32_stream(dev, dtype):
    n = 20_000
    mm.random.seed(5)
    u, z = mm.rand(n, dev, dtype=dtype), mm.randn((4, 50), dev, dtype=dtype)
    mm.random.seed(5)
    u32, z32 = mm.rand(n, dev).numpy(), mm.randn((4, 50), dev).numpy()
    below_one = np.nextafter(dtype.type(1), dtype.type(0))  # the largest number of the type under 1
    expected = u32.astype(dtype)
    expected[expected == 1] = below_one
    assert u.dtype == dtype and bits(u.numpy()) == bits(expected)
    assert z.dtype == dtype and bits(z.numpy()) == bits(z32.astype(dtype))
    values = u.numpy().astype(np.float64)
    assert values.min() >= 0 and values.max() == float(below_one)  # [0, 1); 20000 draws reach the top step


# ---------------------------------------------------------------- Module.astype

def net_of(dev):
    mm.nn.seed(3)
    return mm.nn.Sequential(mm.nn.Conv2d(2, 3, 3, device=dev), mm.nn.BatchNorm2d(3, device=dev),
                            mm.nn.GroupNorm(1, 3, affine=False, device=dev), mm.nn.Flatten(),
                            mm.nn.Linear(3, 5, device=dev))


@pytest.mark.parametrize("dtype", LOW, ids=IDS)
def test_module_astype_converts_every_floating_tensor_in_place(dev, dtype):
    net = net_of(dev)
    params = net.named_parameters()
    before = {name: p.numpy() for name, p in params.items()}
    constants = [net.layers[2].weight, net.layers[2].bias]  # GroupNorm without affine: plain tensors
    assert net.astype(dtype) is net
    assert net.named_parameters() == params  # the same objects: references to them hold
    for name, p in params.items():
        norm = name.startswith(("layers.1.", "layers.2."))  # normalisation layers keep float32 γ, β, statistics
        assert isinstance(p, mm.nn.Parameter) and p.dtype == (np.float32 if norm else dtype), name
        assert bits(p.numpy()) == bits(before[name] if norm else before[name].astype(dtype)), name
    assert params["layers.1.running_var"].statistic and not params["layers.1.running_var"].trainable
    assert all(c.dtype == np.float32 for c in constants)
    net.astype("float32")  # and back, holding the rounded values
    assert all(p.dtype == np.float32 and np.array_equal(p.numpy(), before[n].astype(dtype).astype(np.float32))
               for n, p in params.items() if not n.startswith(("layers.1.", "layers.2.")))


def test_module_astype_refuses_integer_types_and_drops_gradients(dev):
    net = net_of(dev)
    with pytest.raises(TypeError, match="not int32"):
        net.astype(np.int32)
    w = net.layers[0].weight
    w.grad = mm.zeros(w.shape, dev)
    net.astype(mm.bfloat16)
    assert w.grad is None


class Scaled(mm.nn.Module):
    """x · s with a parameter s that may be stored in low precision (read through astype)."""

    def __init__(self, dev):
        self.s = mm.nn.Parameter(np.linspace(0.5, 2, 4).astype(np.float32), dev)

    def forward(self, x):
        return x * self.s.astype(mm.float32)


@pytest.mark.parametrize("dtype", LOW, ids=IDS)
def test_optimizers_refuse_low_precision_parameters(dev, dtype):
    net = Scaled(dev).astype(dtype)
    g = mm.Graph(dev)
    loss = mm.ops.mse_loss(net(g.input("x", (3, 4))), g.input("t", (3, 4)))
    refused = rf"{dtype}.*float32|float32.*{dtype}"  # the message names both, whichever check says it
    with pytest.raises(mm.DTypeError, match=refused):
        loss.training_graph(optimizer=mm.optim.Adam(net.parameters()))
    net.s.grad = mm.zeros(4, dev, dtype)
    with pytest.raises(mm.DTypeError, match=refused):
        mm.optim.SGD(net.parameters(), lr=0.1).step()


# ---------------------------------------------------------------- save and load

def half_net(dev):
    """A module with float16, bfloat16 and float32 parameters of odd element counts."""
    net = net_of(dev)
    net.layers[0].astype(mm.float16)   # 3·2·3·3 = 54 and 3 elements
    net.layers[4].astype(mm.bfloat16)  # 15 and 5
    return net


def same_bits(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        x, y = a[name].numpy(), b[name].numpy()
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert np.array_equal(x.view(np.uint8), y.view(np.uint8)), name


@pytest.mark.parametrize("path", ["w", "w.zip", "w.safetensors"])
def test_weights_round_trip_bit_for_bit(dev, tmp_path, path, monkeypatch):
    monkeypatch.setattr(io, "READ_CHUNK", 3)  # chunks that split 2-byte elements, at odd offsets
    net = half_net(dev)
    net.save_weights(tmp_path / path)
    other = half_net(dev)
    for p in other.parameters():
        p.assign(np.zeros(p.shape, p.dtype))
    other.load_weights(tmp_path / path)
    same_bits(net.named_parameters(), other.named_parameters())
    if path != "w.safetensors":
        model = mm.load(tmp_path / path, device=dev)
        same_bits(net.named_parameters(), model.parameters)


def test_safetensors_say_f16_and_bf16_and_pytorch_reads_them(dev, tmp_path):
    net = half_net(dev)
    net.save_weights(tmp_path / "w.safetensors")
    header = io._safetensors_header(open(tmp_path / "w.safetensors", "rb"), (tmp_path / "w.safetensors").stat().st_size,
                                    "w")[1]
    assert header["layers.0.weight"]["dtype"] == "F16" and header["layers.4.bias"]["dtype"] == "BF16"
    assert header["layers.1.running_mean"]["dtype"] == "F32"
    torch_st = pytest.importorskip("safetensors.torch", reason="PyTorch is not installed")
    torch = pytest.importorskip("torch")
    loaded = torch_st.load_file(str(tmp_path / "w.safetensors"))
    assert loaded["layers.0.weight"].dtype == torch.float16 and loaded["layers.4.weight"].dtype == torch.bfloat16
    for name, p in net.named_parameters().items():
        if p.dtype != np.float32:
            assert bits(loaded[name].view(torch.int16).numpy()) == bits(p.numpy()), name


def test_a_dtype_mismatch_is_reported_and_changes_nothing(dev, tmp_path):
    net = half_net(dev)
    net.save_weights(tmp_path / "w.zip")
    other = net_of(dev)  # float32 throughout
    before = {n: p.numpy() for n, p in other.named_parameters().items()}
    with pytest.raises(mm.FormatError, match=r"wrong shape or dtype layers.0.weight \(3, 2, 3, 3\) float32 "
                                             r"\(saved \(3, 2, 3, 3\) float16\)"):
        other.load_weights(tmp_path / "w.zip")
    assert all(np.array_equal(p.numpy(), before[n]) for n, p in other.named_parameters().items())


def half_graph(dev):
    """A graph with float16 and bfloat16 inputs and parameters, read through astype nodes, and a float16 output."""
    net = half_net(dev)
    g = mm.Graph(dev)
    x = g.input("x", (2, 2, 3, 3), mm.bfloat16)
    conv = net.layers[0]
    y = mm.ops.conv2d(x.astype(mm.float32), conv.weight.astype(mm.float32), conv.bias.astype(mm.float32))
    out = (y.flatten(1) @ net.layers[4].weight.astype(mm.float32).T).astype(mm.float16)
    return net, g, out


def test_a_graph_with_half_inputs_and_astype_nodes_round_trips(dev, tmp_path):
    net, g, out = half_graph(dev)
    x = np.random.default_rng(0).standard_normal((2, 2, 3, 3)).astype(mm.bfloat16)
    expected = g.run({"x": x}, outputs=[out])[0]
    assert expected.dtype == np.float16
    mm.save(tmp_path / "g.zip", g, outputs={"y": out}, module=net)
    model = mm.load(tmp_path / "g.zip", device=dev)
    assert model.inputs["x"].dtype == mm.bfloat16 and model.outputs["y"].dtype == np.float16
    assert [n.op for n in model.graph.nodes].count("astype") == 5
    assert bits(model.run({"x": x})["y"]) == bits(expected)


def test_a_half_model_saved_on_cpu_loads_on_cpu(tmp_path):
    cpu = mm.device("cpu")
    net, g, out = half_graph(cpu)
    x = np.random.default_rng(1).standard_normal((2, 2, 3, 3)).astype(mm.bfloat16)
    mm.save(tmp_path / "g", g, outputs={"y": out}, module=net)
    assert bits(mm.load(tmp_path / "g", device="cpu").run({"x": x})["y"]) == bits(g.run({"x": x}, outputs=[out])[0])


@pytest.mark.skipif(cuda_reason() is not None, reason=f"cuda backend unavailable: {cuda_reason()}")
def test_a_half_model_saved_on_cpu_loads_on_cuda(tmp_path):
    net, g, out = half_graph(mm.device("cpu"))
    x = np.random.default_rng(1).standard_normal((2, 2, 3, 3)).astype(mm.bfloat16)
    mm.save(tmp_path / "g", g, outputs={"y": out}, module=net)
    model = mm.load(tmp_path / "g", device="cuda")
    assert {p.dtype for p in model.parameters.values()} == {np.dtype(np.float16), mm.bfloat16}
    same_bits({n: p for n, p in net.named_parameters().items() if n in model.parameters}, model.parameters)
    got, expected = model.run({"x": x})["y"], g.run({"x": x}, outputs=[out])[0]
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), expected.astype(np.float32), rtol=2**-10)


def test_a_tensor_shared_by_two_modules_converts_once(dev):
    shared = mm.nn.Linear(3, 3, device=dev)
    net = mm.nn.Sequential(shared, mm.nn.ReLU(), shared)
    w = shared.weight.numpy()
    net.astype(mm.bfloat16)
    assert bits(shared.weight.numpy()) == bits(w.astype(mm.bfloat16))
