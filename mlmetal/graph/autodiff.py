"""Training graphs: the tape walked backwards, each forward node's gradient rule appending its
gradient nodes (DESIGN §3, MPS's `trainingGraph(sourceGradient:nodeHandler:)`).

The rules are the ops' own (`Op.grad`), the same that run eagerly; an addition joins the
gradients where a tensor fans out; `stop_gradient` and frozen parameters cut the walk.
"""

from __future__ import annotations

from typing import Callable

from .. import ops
from .tape import GraphError, GraphTensor, Node, Tape


def gradients(tape: Tape, loss: GraphTensor, source_gradient: GraphTensor | None = None,
              node_handler: Callable | None = None, wrt: list[GraphTensor] | None = None, loss_scale=None
              ) -> tuple[dict[GraphTensor, GraphTensor], list[Node]]:
    """Append the gradient nodes of everything `loss` depends on; returns (the gradient of each
    trainable leaf that gets one, the gradient nodes kept). See `Graph.training_graph`.

    `wrt` names the tensors to differentiate with respect to (graph inputs, say: mm.grad's
    arguments) in place of the trainable leaves. `loss_scale` (a loss scaler's state) starts
    the pass from the scale read on the device, in place of ones: every gradient is scaled.
    """
    forward = list(tape.nodes)
    needs = needs_gradient(tape, forward, wrt)
    if not needs.get(loss, False):
        raise GraphError("nothing in this graph has a gradient to compute: the loss depends on no trainable "
                         "parameter (or every path to one is cut by stop_gradient)")
    if loss_scale is not None:
        source_gradient = ops.loss_scale_gradient(loss_scale, loss)
        source_gradient.node.gradient_of = loss.node  # gradient machinery, not the forward graph's (io.save)
    elif source_gradient is None:
        source_gradient = ops.initial_gradient(loss)
    grads: dict[GraphTensor, GraphTensor] = {loss: source_gradient}
    created: list[Node] = []
    for node in reversed(forward):
        outs = [grads.get(o) for o in node.outputs]
        if all(g is None for g in outs) or not any(needs.get(x, False) for x in node.inputs):
            continue
        rule = ops.REGISTRY[node.op].grad
        if rule is None:
            raise GraphError(f"op {node.op} has no gradient rule, but a gradient flows through it")
        g = outs[0] if len(outs) == 1 else tuple(outs)
        out = node.outputs[0] if len(node.outputs) == 1 else tuple(node.outputs)
        with tape.recording() as made:
            in_grads = rule(g, out, *node.inputs, **node.attrs)
            _check(node, in_grads)
            for x, gx in zip(node.inputs, in_grads):
                if gx is None or not needs.get(x, False):
                    continue
                grads[x] = ops.add(grads[x], gx) if x in grads else gx  # fan-out: one addition joins them
        for m in made:
            m.gradient_of = node
        created += made
    targets = tape.leaves.values() if wrt is None else wrt
    param_grads = {t: grads[t] for t in targets if needs.get(t, False) and t in grads}
    created = _prune(tape, created, param_grads)
    if node_handler is not None:
        created = _handle(tape, created, param_grads, node_handler)
    return param_grads, created


def _check(node: Node, in_grads) -> None:
    """One gradient (or None) per input, with the input's shape and dtype."""
    if not isinstance(in_grads, (tuple, list)) or len(in_grads) != len(node.inputs):
        count = len(in_grads) if isinstance(in_grads, (tuple, list)) else type(in_grads).__name__
        raise GraphError(f"the gradient rule of {node.op} gave {count} gradients for its {len(node.inputs)} inputs")
    for i, (x, gx) in enumerate(zip(node.inputs, in_grads)):
        if gx is not None and (not isinstance(gx, GraphTensor) or (gx.shape, gx.dtype) != (x.shape, x.dtype)):
            got = f"{gx.shape} {gx.dtype}" if isinstance(gx, GraphTensor) else type(gx).__name__
            raise GraphError(f"the gradient rule of {node.op} gave input {i} a gradient of {got}; "
                             f"the input is {x.shape} {x.dtype}")


def needs_gradient(tape: Tape, nodes: list[Node], wrt: list[GraphTensor] | None = None) -> dict[GraphTensor, bool]:
    """Which tensors carry a gradient: trainable parameters (or the tensors `wrt`) and everything
    computed from them."""
    needs: dict[GraphTensor, bool] = {}
    for t in tape.leaves.values() if wrt is None else wrt:
        needs[t] = not t.stop_gradient and (wrt is not None or getattr(t.value, "trainable", False))
    for node in nodes:
        flows = any(needs.get(x, False) for x in node.inputs)
        for o in node.outputs:
            needs[o] = flows and not o.stop_gradient
    return needs


def _prune(tape: Tape, created: list[Node], param_grads: dict) -> list[Node]:
    """Drop the gradient nodes no parameter gradient depends on (e.g. an input gradient above a cut)."""
    live, todo = set(), [g.node for g in param_grads.values() if g.node is not None]
    while todo:
        n = todo.pop()
        if n in live:
            continue
        live.add(n)
        todo += [x.node for x in n.inputs if x.node is not None]
    for n in created:
        if n not in live:
            tape.nodes.remove(n)
    return [n for n in created if n in live]


def _handle(tape: Tape, created: list[Node], param_grads: dict, node_handler) -> list[Node]:
    """Show every gradient node to `node_handler`; a node it drops takes its branch with it.

    Where a dropped branch met another at a fan-out addition, the other branch's gradient
    flows on alone.
    """
    dropped: set[GraphTensor] = set()
    alias: dict[GraphTensor, GraphTensor] = {}
    kept = []
    for n in created:
        n.inputs = [alias.get(x, x) for x in n.inputs]
        lost = [x for x in n.inputs if x in dropped]
        if n.op == "add" and len(lost) == 1 and n.gradient_of is not None and len(n.inputs) == 2:
            alias[n.outputs[0]] = n.inputs[1] if lost[0] is n.inputs[0] else n.inputs[0]
            tape.nodes.remove(n)
            continue
        if lost or node_handler(n) is False:
            dropped.update(n.outputs)
            tape.nodes.remove(n)
            continue
        kept.append(n)
    for t, g in list(param_grads.items()):
        g = alias.get(g, g)
        if g in dropped:
            del param_grads[t]
        else:
            param_grads[t] = g
    return _prune(tape, kept, param_grads)
