"""Elementwise ops against their references (table rows for the generic checker)."""

from hypothesis import strategies as st

from opcheck import AWKWARD_DIMS, floats, make_tests, row


def same_shape(n_inputs):
    def case(data):
        shape = data.draw(st.lists(AWKWARD_DIMS, min_size=1, max_size=4), label="shape")
        return [floats(shape, data) for _ in range(n_inputs)], {}
    return case


def small_same_shape(n_inputs):
    def case(data):
        shape = data.draw(st.lists(st.integers(1, 5), min_size=1, max_size=3), label="shape")
        return [floats(shape, data) for _ in range(n_inputs)], {}
    return case


ROWS = [
    row("add", same_shape(2), grad_case=small_same_shape(2)),
]

test_forward, test_grad = make_tests(ROWS)
