"""References of kernels/conv.metal: convolution as a sum over window taps of channel products."""

import numpy as np


def _geometry(h, w, kh, kw, stride, padding, dilation):
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def _tap(a, ky, kx, oh, ow, stride, dilation):
    """The (oh, ow) positions of padded images `a` that window tap (ky, kx) reads."""
    (sh, sw), (dh, dw) = stride, dilation
    return a[..., ky * dh: ky * dh + sh * (oh - 1) + 1: sh, kx * dw: kx * dw + sw * (ow - 1) + 1: sw]


def _by_group(a, groups):
    """(N, C, ...) -> (N, groups, C/groups, ...)."""
    return a.reshape(a.shape[0], groups, a.shape[1] // groups, *a.shape[2:])


def conv2d(x, w, b=None, *, stride, padding, dilation, groups, activation=None):
    n, _, h, wd = x.shape
    cout, cin_g, kh, kw = w.shape
    oh, ow = _geometry(h, wd, kh, kw, stride, padding, dilation)
    (ph, pw) = padding
    xg = _by_group(np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw))), groups)
    wg = w.reshape(groups, cout // groups, cin_g, kh, kw)
    y = np.zeros((n, groups, cout // groups, oh, ow))
    for ky in range(kh):
        for kx in range(kw):
            y += np.einsum("ngcyx,goc->ngoyx", _tap(xg, ky, kx, oh, ow, stride, dilation), wg[..., ky, kx])
    y = y.reshape(n, cout, oh, ow)
    y = y if b is None else y + b[None, :, None, None]
    return np.maximum(y, 0.0) if activation == "relu" else y


def conv2d_input_grad(g, w, mask=None, *, input_size, stride, padding, dilation, groups):
    n, cout, oh, ow = g.shape
    _, cin_g, kh, kw = w.shape
    (h, wd), (ph, pw) = input_size, padding
    dxp = np.zeros((n, groups, cin_g, h + 2 * ph, wd + 2 * pw))
    gg = _by_group(g, groups)
    wg = w.reshape(groups, cout // groups, cin_g, kh, kw)
    for ky in range(kh):
        for kx in range(kw):
            _tap(dxp, ky, kx, oh, ow, stride, dilation)[...] += np.einsum("ngoyx,goc->ngcyx", gg, wg[..., ky, kx])
    dx = dxp[..., ph: ph + h, pw: pw + wd].reshape(n, groups * cin_g, h, wd)
    return dx if mask is None else np.where(mask <= 0, 0.0, dx)  # relu_grad(dx, mask)


def conv2d_weight_grad(g, x, *, kernel_size, stride, padding, dilation, groups):
    n, cout, oh, ow = g.shape
    kh, kw = kernel_size
    (ph, pw) = padding
    xg = _by_group(np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw))), groups)
    gg = _by_group(g, groups)
    dw = np.zeros((groups, cout // groups, x.shape[1] // groups, kh, kw))
    for ky in range(kh):
        for kx in range(kw):
            dw[..., ky, kx] = np.einsum("ngoyx,ngcyx->goc", gg, _tap(xg, ky, kx, oh, ow, stride, dilation))
    return dw.reshape(cout, x.shape[1] // groups, kh, kw)


def conv2d_bias_grad(g):
    return g.sum(axis=(0, 2, 3))
