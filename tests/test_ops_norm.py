"""Instance, group, layer and batch normalisation against their references; running statistics; stability."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import mlmetal as mm
from conftest import rtol_for
from mlmetal.reference import norm as R
from opcheck import AWKWARD_DIMS, floats, make_storage_tests, make_tests, row


def image(data, small):
    if small:  # for finite differences: a few planes of a few pixels (≥ 2, so the variance is not 0)
        return (data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2)),
                data.draw(st.integers(1, 3)), data.draw(st.integers(2, 4)))
    return (data.draw(st.integers(1, 3)), data.draw(st.sampled_from([1, 3, 32, 33])),
            data.draw(AWKWARD_DIMS, label="h"), data.draw(AWKWARD_DIMS, label="w"))


def norm_case(op, small=False):
    def case(data):
        shape = image(data, small)
        if op == "batch_norm" and not small and data.draw(st.booleans(), label="flat"):
            shape = shape[:2]  # (N, C): batch norm of a fully connected layer
        if op.startswith("batch_norm") and np.prod(shape) // shape[1] < 2:
            shape = (2,) + shape[1:]
        c = shape[1]
        # Finite differences (eps 1e-3) need a spread well above eps: unit scale for small cases.
        scale = 1.0 if small else data.draw(st.sampled_from([0.1, 1.0, 10.0]), label="scale")
        x = floats(shape, data, scale=scale) + \
            np.float32(data.draw(st.sampled_from([0.0, 3.0, -50.0]), label="offset"))
        if small:  # a ramp keeps every group's spread well above the finite-difference step
            x = (x + 0.5 * np.arange(x[0, 0].size).reshape(shape[2:])).astype(np.float32)
        gamma, beta = floats((c,), data) + 1, floats((c,), data)
        if op == "instance_norm":
            return [x, gamma, beta], {"eps": 1e-5}
        mean, var = floats((c,), data), np.abs(floats((c,), data)) + 0.5
        if op == "batch_norm":
            return [x, gamma, beta, mean, var], {"training": data.draw(st.booleans(), label="training"),
                                                 "momentum": 0.1, "eps": 1e-5}
        g = floats(shape, data)
        if op == "batch_norm_inference_grad":
            return [g, x, gamma, mean, var], {"eps": 1e-5}
        return [g, x, gamma], {"eps": 1e-5}
    return case


def affine_case(op, small=False):
    """group_norm(_grad) or layer_norm(_grad): x, γ and β (or g, x, γ) and the attributes.

    Small cases (for finite differences) add a ramp along each group, so that every group's
    spread is well above the finite-difference step."""
    def case(data):
        draw = lambda s, label: data.draw(s, label=label)  # noqa: E731
        dims = st.integers(1, 3) if small else AWKWARD_DIMS
        if op.startswith("group_norm"):
            groups = draw(st.sampled_from([1, 2, 3] if small else [1, 2, 3, 8]), "groups")
            per_group = draw(st.integers(1, 2) if small else st.sampled_from([1, 2, 3, 5]), "channels per group")
            shape = (draw(st.integers(1, 2), "n"), groups * per_group,
                     *draw(st.lists(dims, min_size=0 if per_group > 1 else 1, max_size=2), "spatial"))
            params, attrs, lead = (shape[1],), {"num_groups": groups, "eps": 1e-5}, (shape[0], groups)
        else:
            params = tuple(draw(st.lists(dims, min_size=1, max_size=2), "normalized shape"))
            shape = tuple(draw(st.lists(dims, min_size=0, max_size=2), "leading")) + params
            attrs, lead = {"eps": 1e-5}, shape[:len(shape) - len(params)]
        scale = 1.0 if small else draw(st.sampled_from([0.1, 1.0, 10.0]), "scale")
        x = floats(shape, data, scale=scale) + np.float32(draw(st.sampled_from([0.0, 3.0, -50.0]), "offset"))
        group = x.size // max(1, int(np.prod(lead)))
        if small:
            x = (x.reshape(lead + (-1,)) + 0.5 * np.arange(group)).reshape(shape).astype(np.float32)
        gamma, beta = floats(params, data) + 1, floats(params, data)
        if op.endswith("_grad"):
            return [floats(shape, data), x, gamma], attrs
        return [x, gamma, beta], attrs
    return case


# Reductions run over up to N·H·W ≈ 5000 values, in float32. Normalising a plane of two or
# three values is steep (curvature ~ 1/σ²), so the float64 finite differences take small steps.
ROWS = [
    row("instance_norm", norm_case("instance_norm"), rtol=rtol_for(4096, 1e-5), atol=1e-4,
        grad_case=norm_case("instance_norm", small=True), fd_eps=1e-6),
    row("instance_norm_grad", norm_case("instance_norm_grad"), rtol=rtol_for(4096, 1e-5), atol=1e-3),
    row("batch_norm", norm_case("batch_norm"), rtol=rtol_for(4096, 1e-5), atol=1e-4,
        grad_case=norm_case("batch_norm", small=True), fd_eps=1e-6),
    row("batch_norm_grad", norm_case("batch_norm_grad"), rtol=rtol_for(4096, 1e-5), atol=1e-3),
    row("batch_norm_inference_grad", norm_case("batch_norm_inference_grad"), rtol=rtol_for(4096, 1e-5), atol=1e-3),
    row("group_norm", affine_case("group_norm"), rtol=rtol_for(4096, 1e-5), atol=1e-4,
        grad_case=affine_case("group_norm", small=True), fd_eps=1e-6),
    row("group_norm_grad", affine_case("group_norm_grad"), rtol=rtol_for(4096, 1e-5), atol=1e-3),
    row("layer_norm", affine_case("layer_norm"), rtol=rtol_for(4096, 1e-5), atol=1e-4,
        grad_case=affine_case("layer_norm", small=True), fd_eps=1e-6),
    row("layer_norm_grad", affine_case("layer_norm_grad"), rtol=rtol_for(4096, 1e-5), atol=1e-3),
]

test_forward, test_grad, test_nan = make_tests(ROWS)
test_storage, test_storage_grad = make_storage_tests(ROWS)


AFFINE = {  # op: (x's shape for planes of hw pixels, γ's shape, attributes)
    "instance_norm": (lambda hw: (2, 3, *hw), lambda hw: (3,), {}),
    "group_norm": (lambda hw: (2, 6, *hw), lambda hw: (6,), {"num_groups": 3}),
    "layer_norm": (lambda hw: (2, 3, *hw), lambda hw: hw, {}),
}


@pytest.mark.parametrize("op", AFFINE)
@pytest.mark.parametrize("threads", [32, 96, 256, 1024])
@pytest.mark.parametrize("hw", [(5, 7), (64, 64)])
def test_norms_at_every_threadgroup_size(dev, monkeypatch, op, threads, hw):
    """The cpu backend picks 32 threads a group; GPUs up to 1024. Every size must agree with the
    reference, the groups held in registers (NORM_CACHE) or not."""
    from mlmetal.ops import norm

    monkeypatch.setattr(norm, "_threads", lambda dev, m: min(threads, 32 * ((m + 31) // 32)))
    x_shape, gamma_shape, attrs = AFFINE[op][0](hw), AFFINE[op][1](hw), {**AFFINE[op][2], "eps": 1e-5}
    rng = np.random.default_rng(threads)
    x = (rng.standard_normal(x_shape) * 2 + 1).astype(np.float32)
    gamma, beta = (rng.standard_normal(gamma_shape).astype(np.float32) for _ in range(2))
    g = rng.standard_normal(x_shape).astype(np.float32)
    tensors = [mm.tensor(a, dev) for a in (x, gamma, beta)]
    y = getattr(mm.ops, op)(*tensors, **attrs)
    ref = mm.ops.REGISTRY[op].reference
    np.testing.assert_allclose(y.numpy(), ref(*(a.astype(np.float64) for a in (x, gamma, beta)), **attrs),
                               rtol=1e-4, atol=1e-4)
    grads = mm.ops.REGISTRY[op].grad(mm.tensor(g, dev), y, *tensors, **attrs)
    want = mm.ops.REGISTRY[f"{op}_grad"].reference(*(a.astype(np.float64) for a in (g, x, gamma)), **attrs)
    for got, w in zip(grads, want):  # dx, dgamma, dbeta
        np.testing.assert_allclose(got.numpy(), w, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("op", AFFINE)
def test_norms_are_stable_for_a_large_mean(dev, op):
    # Mean 1e4, standard deviation 1: E[x²] − E[x]² would lose every significant digit in float32,
    # and so would x − mean with the mean rounded to a float32 (its ulp is 1e-3).
    x_shape, gamma_shape, attrs = AFFINE[op][0]((64, 64)), AFFINE[op][1]((64, 64)), {**AFFINE[op][2], "eps": 1e-5}
    rng = np.random.default_rng(0)
    x = (1e4 + rng.standard_normal(x_shape)).astype(np.float32)
    g = rng.standard_normal(x_shape).astype(np.float32)
    ones, zeros = np.ones(gamma_shape, np.float32), np.zeros(gamma_shape, np.float32)
    y = getattr(mm.ops, op)(*(mm.tensor(a, dev) for a in (x, ones, zeros)), **attrs).numpy()
    np.testing.assert_allclose(y, mm.ops.REGISTRY[op].reference(x.astype(np.float64), ones, zeros, **attrs), atol=2e-3)
    dgamma = getattr(mm.ops, f"{op}_grad")(*(mm.tensor(a, dev) for a in (g, x, ones)), **attrs)[1].numpy()
    want = mm.ops.REGISTRY[f"{op}_grad"].reference(g.astype(np.float64), x.astype(np.float64), ones, **attrs)[1]
    np.testing.assert_allclose(dgamma, want, rtol=1e-3, atol=2e-3)


@given(data=st.data())
def test_batch_norm_updates_running_stats(dev, data):
    [x, gamma, beta, mean, var], attrs = norm_case("batch_norm")(data)
    momentum = data.draw(st.floats(0, 1), label="momentum")
    ts = [mm.tensor(a, dev) for a in (x, gamma, beta, mean, var)]
    mm.ops.batch_norm(*ts, training=True, momentum=momentum)
    want = R.batch_norm_running_stats(x.astype(np.float64), mean, var, momentum)
    np.testing.assert_allclose(ts[3].numpy(), want[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ts[4].numpy(), want[1], rtol=1e-4, atol=1e-4)


def test_batch_norm_inference_leaves_running_stats(dev):
    ts = [mm.tensor(np.ones(s, np.float32), dev) for s in [(2, 3, 4, 4), (3,), (3,), (3,), (3,)]]
    mm.ops.batch_norm(*ts, training=False)
    np.testing.assert_array_equal(ts[3].numpy(), 1)


@pytest.mark.parametrize("op, shapes, attrs, message", [
    ("instance_norm", [(2, 3, 4, 4), (4,), (3,)], {}, r"gamma must have shape \(3,\)"),
    ("instance_norm", [(2, 3), (3,), (3,)], {}, "N, C, H, W"),
    ("instance_norm", [(2, 3, 4, 4), (3,), (3,)], {"eps": -1.0}, "eps"),
    ("batch_norm", [(1, 3, 1, 1)] + [(3,)] * 4, {}, "more than one value"),
    ("batch_norm", [(2, 3, 4, 4), (3,), (3,), (2,), (3,)], {}, "running_mean"),
    ("batch_norm", [(2, 3, 4, 4)] + [(3,)] * 4, {"momentum": 2.0}, "momentum"),
    ("group_norm", [(2, 6, 4), (6,), (6,)], {"num_groups": 4}, "6 channels are not divisible by num_groups=4"),
    ("group_norm", [(2, 6, 4), (6,), (6,)], {"num_groups": 0}, "num_groups must be a positive int"),
    ("group_norm", [(2, 6, 4), (3,), (6,)], {"num_groups": 3}, r"gamma must have shape \(6,\)"),
    ("group_norm", [(6,), (6,), (6,)], {"num_groups": 3}, r"N, C, \.\.\."),
    ("layer_norm", [(2, 5, 4), (5,), (5,)], {}, r"input shape \(2, 5, 4\) does not end in gamma's shape \(5,\)"),
    ("layer_norm", [(2, 5, 4), (4,), (5,)], {}, r"beta's shape \(5,\) differs from gamma's \(4,\)"),
    ("layer_norm", [(4,), (2, 4), (2, 4)], {}, "does not end in gamma's shape"),
    ("layer_norm", [(2, 4), (4,), (4,)], {"eps": -1.0}, "eps"),
    ("layer_norm", [(0, 4), (4,), (4,)], {}, r"input shape \(0, 4\) has an empty dimension"),
    ("group_norm", [(2, 4, 0), (4,), (4,)], {"num_groups": 2}, "empty dimension"),
    ("instance_norm", [(2, 3, 0, 4), (3,), (3,)], {}, "empty dimension"),
    ("batch_norm", [(2, 3, 0)] + [(3,)] * 4, {}, "empty dimension"),
])
def test_norm_errors(dev, op, shapes, attrs, message):
    ts = [mm.tensor(np.zeros(s, np.float32), dev) for s in shapes]
    with pytest.raises(mm.ShapeError, match=message):
        getattr(mm.ops, op)(*ts, **attrs)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, mm.bfloat16])
@pytest.mark.parametrize("op", ["instance_norm", "instance_norm_grad"])
def test_instance_norm_of_planes_larger_than_the_register_cache(dev, op, dtype):
    # 130×130 pixels exceed NORM_CACHE·threads on every backend: the kernels re-read x instead.
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((1, 2, 130, 130)) * 2 + 1).astype(dtype)
    g = rng.standard_normal(x.shape).astype(dtype)
    gamma, beta = np.array([1.0, -0.5], np.float32), np.array([0.0, 2.0], np.float32)
    if op == "instance_norm":
        got = [mm.ops.instance_norm(*(mm.tensor(a, dev, dtype=a.dtype) for a in (x, gamma, beta))).numpy()]
        want = [R.instance_norm(x.astype(np.float64), gamma, beta, eps=1e-5)]
    else:
        got = [t.numpy() for t in mm.ops.instance_norm_grad(*(mm.tensor(a, dev, dtype=a.dtype) for a in (g, x, gamma)),
                                                            eps=1e-5)]
        want = R.instance_norm_grad(g.astype(np.float64), x.astype(np.float64), gamma, eps=1e-5)
    u = {np.float32: 0, np.float16: 2.0**-11, mm.bfloat16: 2.0**-8}[dtype]  # dx and y round once to the storage type
    for a, b in zip(got, want):
        np.testing.assert_allclose(a.astype(np.float64), b, rtol=1e-4 + u, atol=2e-3)


def test_layer_norm_of_more_rows_than_a_grid_axis_holds(dev):
    """70 000 rows: more groups than the 65 535 threadgroups a grid's y or z axis allows, and
    their γ and β gradients summed over chunks of rows."""
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((70_000, 3)) * 2 + 1).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    gamma = np.array([1.0, -0.5, 2.0], np.float32)
    got = mm.ops.layer_norm_grad(*(mm.tensor(a, dev) for a in (g, x, gamma)), eps=1e-5)
    want = R.layer_norm_grad(g.astype(np.float64), x.astype(np.float64), gamma, eps=1e-5)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a.numpy(), b, rtol=rtol_for(70_000, 1e-5), atol=1e-3)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_norm_layers_train_in_low_precision_with_float32_parameters(dev, dtype):
    """Batch, group and layer norm on low-precision activations in an autocast graph: their γ, β and
    running statistics stay float32 (so do their gradients, and the loss), and the gradients match
    a float32 graph's to the storage type's precision."""
    rng = np.random.default_rng(3)
    x, target = (rng.standard_normal((4, 6, 5, 5)).astype(np.float32) for _ in range(2))
    gammas = [rng.uniform(0.5, 1.5, shape) for shape in [(6,), (6,), (6, 5, 5)]]

    def run(compute_dtype):
        layers = [mm.nn.BatchNorm2d(6, device=dev), mm.nn.GroupNorm(3, 6, device=dev),
                  mm.nn.LayerNorm((6, 5, 5), device=dev)]
        for layer, gamma in zip(layers, gammas):
            layer.weight.assign(gamma)
        g = mm.Graph(dev, compute_dtype=compute_dtype)
        h = g.input("x", x.shape)
        if compute_dtype:
            h = h.astype(compute_dtype)
        for layer in layers:
            h = layer(h)
            assert h.dtype == mm.dtypes.as_dtype(compute_dtype or "float32")
        loss = mm.ops.mse_loss(h, mm.tensor(target, dev))
        assert loss.dtype == mm.float32
        training = g.training_graph(loss)
        value = training.step(x=x)
        params = [layers[0].running_mean] + [p for layer in layers for p in (layer.weight, layer.bias)]
        assert all(p.dtype == mm.float32 for p in params)
        return value, [p.grad.numpy() for p in params[1:]], layers[0].running_mean.numpy()

    want, want_grads, want_mean = run(None)
    got, got_grads, got_mean = run(dtype)
    u = 2.0**-11 if dtype == "float16" else 2.0**-8
    np.testing.assert_allclose(got, want, rtol=8 * u)
    np.testing.assert_allclose(got_mean, want_mean, atol=2 * u)
    for a, b in zip(got_grads, want_grads):
        np.testing.assert_allclose(a, b, rtol=0, atol=8 * u * np.abs(b).max())


@pytest.mark.parametrize("op, shapes, low", [
    ("instance_norm", [(2, 3, 4), (3,), (3,)], 1),
    ("batch_norm", [(2, 3, 4)] + [(3,)] * 4, 3),
    ("layer_norm_grad", [(2, 3), (2, 3), (3,)], 2),
])
def test_norm_parameters_must_be_float32(dev, op, shapes, low):
    """γ, β and the running statistics are float32 beside bfloat16 activations; another dtype is
    refused (not cast, which would leave running statistics updated in a copy)."""
    activations = 2 if op.endswith("_grad") else 1  # (g and) x
    ts = [mm.tensor(np.ones(s, np.float32), dev, dtype=mm.bfloat16 if i < activations or i == low else mm.float32)
          for i, s in enumerate(shapes)]
    with pytest.raises(mm.DTypeError, match=f"input {low} .* is bfloat16; it takes float32"):
        getattr(mm.ops, op)(*ts, eps=1e-5)
