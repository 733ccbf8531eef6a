"""References of kernels/sequence.metal: embeddings, arg-max, running flags; and reshape."""

import numpy as np


def embedding(ids, table):
    ids = np.asarray(ids).astype(np.int64)
    ok = (ids >= 0) & (ids < table.shape[0])
    return np.where(ok[:, None], table[np.where(ok, ids, 0)], 0.0)


def embedding_grad(g, ids, vocab):
    out = np.zeros((vocab, g.shape[1]))
    ids = np.asarray(ids).astype(np.int64)
    ok = (ids >= 0) & (ids < vocab)
    np.add.at(out, ids[ok], g[ok])
    return out


def argmax(x, axis, keepdims):
    return np.argmax(x, axis=axis, keepdims=keepdims).astype(np.int32)


def still_running(tokens, running, end):
    return ((np.asarray(running) != 0) & (np.asarray(tokens) != end)).astype(np.uint32)


def reshape(x, shape):
    return np.reshape(x, shape).copy()
