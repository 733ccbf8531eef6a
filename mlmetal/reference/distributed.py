"""Reference of the collective (mlmetal/ops/distributed.py) in the suite's world of one process."""


def all_reduce(*xs, op="sum"):
    """The sum or mean over one rank: each input itself."""
    return tuple(xs) if len(xs) > 1 else xs[0]
