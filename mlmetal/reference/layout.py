"""References of kernels/layout.metal: concatenating and slicing along the channels (dim 1), permuting
axes, strided slices and broadcasts."""

import numpy as np


def concat(*xs):
    return np.concatenate(xs, axis=1)


def slice_channels(x, start, stop):
    return x[:, start:stop].copy()


def slice_channels_grad(g, channels, start):
    out = np.zeros(g.shape[:1] + (channels,) + g.shape[2:])
    out[:, start:start + g.shape[1]] = g
    return out


def broadcast_to(x, shape):
    return np.broadcast_to(x, shape).copy()


def transpose(x, perm):
    return np.transpose(x, perm).copy()


def _index(start, stop, step, drop):
    return tuple(i if d in drop else slice(i, j, k) for d, (i, j, k) in enumerate(zip(start, stop, step)))


def strided_slice(x, start, stop, step, drop):
    return np.array(x[_index(start, stop, step, drop)])


def strided_slice_grad(g, shape, start, stop, step, drop):
    out = np.zeros(shape)
    out[_index(start, stop, step, drop)] = g
    return out
