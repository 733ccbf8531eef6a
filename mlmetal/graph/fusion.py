"""Fusing nodes of a plan: a conv2d or instance_norm whose only reader is a relu becomes one node
of that op that applies the relu as its kernels store (`activation="relu"`), saving the relu's
pass over the output and the buffer of the value before it. In the backward pass, likewise, a
conv2d_input_grad whose only reader is a relu_grad (the gradient flowing back into a relu's output)
takes the relu_grad's mask as a third input (`conv2d_input_grad(g, w, mask)`), and an add whose
only reader is a relu_grad (the two parts of the gradient of a relu output read twice, by a Gram
and the next layer, say) becomes one `relu_grad_add(g, h, mask)`.

It rewrites the plan's list of nodes, never the tape: another plan of the same graph (other
outputs, say, that need the value before the relu) decides for itself. The fused node takes the
producer's place and writes the relu's output tensor; the gradient nodes that read that tensor
(relu's rule reads its output) read what they read before, bit for bit.
"""

from __future__ import annotations

from collections import Counter

from .tape import GraphTensor, Node

FUSES_RELU = ("conv2d", "instance_norm")  # ops with an `activation` attribute that takes "relu"


def fuse_activations(nodes: list[Node], outputs: tuple[GraphTensor, ...]) -> list[Node]:
    """`nodes` (a plan's, in order) with each conv2d → relu or instance_norm → relu pair whose
    intermediate tensor nothing else reads (nor is an output) fused into one node."""
    readers = Counter(x for n in nodes for x in n.inputs)
    keep = set(outputs)
    fused: dict[Node, Node] = {}  # producer -> its fused replacement
    dropped: set[Node] = set()
    for relu in nodes:
        if relu.op != "relu" or relu.is_update:
            continue
        (t,) = relu.inputs
        (y,) = relu.outputs
        src = t.node
        if (src is None or src.op not in FUSES_RELU or src.attrs.get("activation") is not None or src.is_update
                or len(src.outputs) != 1 or src.predicate is not relu.predicate or readers[t] != 1 or t in keep
                or t.value is not None or y.value is not None or y.dtype != t.dtype):
            continue
        fused[src] = Node(src.op, list(src.inputs), {**src.attrs, "activation": "relu"}, outputs=[y],
                          gradient_of=src.gradient_of, predicate=src.predicate)
        dropped.add(relu)
    nodes = [fused.get(n, n) for n in nodes if n not in dropped]
    return _fuse_relu_grads(nodes, keep)


def _fuse_relu_grads(nodes: list[Node], keep: set) -> list[Node]:
    """Each relu_grad whose gradient input nothing else reads, made by a conv2d_input_grad (which
    then takes the mask as a third input) or by an add of two same-shaped tensors (which becomes
    one relu_grad_add), fused into that producer, where the producer was (so its inputs are free
    as early as before), by a mask made before it."""
    readers = Counter(x for n in nodes for x in n.inputs)
    made_at = {o: i for i, n in enumerate(nodes) for o in n.outputs}
    fused: dict[Node, Node] = {}
    dropped: set[Node] = set()
    for n in nodes:
        if n.op != "relu_grad" or n.is_update:
            continue
        t, mask = n.inputs
        (u,) = n.outputs
        src = t.node
        if (src is None or len(src.inputs) != 2 or src.is_update or t not in made_at
                or src.predicate is not n.predicate or readers[t] != 1 or t in keep or t.value is not None
                or u.value is not None or u.dtype != t.dtype or mask.dtype != t.dtype
                or made_at.get(mask, -1) >= made_at[t]):  # the mask must be there when t is made
            continue
        if src.op == "conv2d_input_grad":
            fused[src] = Node(src.op, [*src.inputs, mask], dict(src.attrs), outputs=[u], gradient_of=src.gradient_of,
                              predicate=src.predicate)
        elif src.op == "add" and all(x.shape == t.shape and x.dtype == t.dtype for x in src.inputs):
            fused[src] = Node("relu_grad_add", [*src.inputs, mask], {}, outputs=[u], gradient_of=n.gradient_of,
                              predicate=n.predicate)
        else:
            continue
        dropped.add(n)
    return [fused.get(n, n) for n in nodes if n not in dropped]
