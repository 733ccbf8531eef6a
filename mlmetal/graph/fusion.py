"""Fusing nodes of a plan: a conv2d or instance_norm whose only reader is a relu becomes one node
of that op that applies the relu as its kernels store (`activation="relu"`), saving the relu's
pass over the output and the buffer of the value before it.

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
    return [fused.get(n, n) for n in nodes if n not in dropped]
