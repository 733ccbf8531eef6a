"""The collectives in the suite's world of one process (tests/test_distributed.py runs them over several)."""

import math

from hypothesis import strategies as st

from opcheck import AWKWARD_DIMS, floats, make_tests, row


def shapes_case(data):
    count = data.draw(st.integers(1, 3), label="tensors")
    return [tuple(data.draw(st.lists(AWKWARD_DIMS, min_size=1, max_size=3), label="shape")) for _ in range(count)]


def all_reduce_case(data):
    return [floats(s, data) for s in shapes_case(data)], {"op": data.draw(st.sampled_from(["sum", "mean"]), label="op")}


def all_reduce_start_case(data):
    return [floats(s, data) for s in shapes_case(data)], {}


def all_reduce_finish_case(data):
    shapes = shapes_case(data)
    return [floats((sum(math.prod(s) for s in shapes),), data)], {
        "shapes": shapes, "op": data.draw(st.sampled_from(["sum", "mean"]), label="op")}


ROWS = [row("all_reduce", all_reduce_case, rtol=0, atol=0),
        row("all_reduce_start", all_reduce_start_case, rtol=0, atol=0),
        row("all_reduce_finish", all_reduce_finish_case, rtol=0, atol=0)]

test_forward, test_grad, test_nan = make_tests(ROWS)
