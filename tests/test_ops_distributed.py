"""all_reduce in the suite's world of one process (tests/test_distributed.py runs it over several)."""

from hypothesis import strategies as st

from opcheck import AWKWARD_DIMS, floats, make_tests, row


def all_reduce_case(data):
    count = data.draw(st.integers(1, 3), label="tensors")
    shapes = [data.draw(st.lists(AWKWARD_DIMS, min_size=1, max_size=3), label="shape") for _ in range(count)]
    return [floats(s, data) for s in shapes], {"op": data.draw(st.sampled_from(["sum", "mean"]), label="op")}


ROWS = [row("all_reduce", all_reduce_case, rtol=0, atol=0)]

test_forward, test_grad, test_nan = make_tests(ROWS)
