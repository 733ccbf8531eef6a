"""Reference of conv_transpose2d (mlmetal/ops/conv_transpose.py), from its definition: each input
pixel scatters its weighted window into the output, which is then cropped by the padding."""

import numpy as np


def conv_transpose2d(x, w, b=None, *, stride, padding, output_padding, dilation, groups):
    n, cin, h, wd = x.shape
    _, cout_g, kh, kw = w.shape
    (sh, sw), (ph, pw), (oh_pad, ow_pad), (dh, dw) = stride, padding, output_padding, dilation
    full_h, full_w = (h - 1) * sh + dh * (kh - 1) + 1 + oh_pad, (wd - 1) * sw + dw * (kw - 1) + 1 + ow_pad
    full = np.zeros((n, groups, cout_g, full_h, full_w))
    xg = x.reshape(n, groups, cin // groups, h, wd)
    wg = w.reshape(groups, cin // groups, cout_g, kh, kw)
    for ky in range(kh):
        for kx in range(kw):
            taps = full[..., ky * dh: ky * dh + sh * (h - 1) + 1: sh, kx * dw: kx * dw + sw * (wd - 1) + 1: sw]
            taps += np.einsum("ngcyx,gco->ngoyx", xg, wg[..., ky, kx])
    y = full[..., ph: full_h - ph, pw: full_w - pw].reshape(n, groups * cout_g, full_h - 2 * ph, full_w - 2 * pw)
    return y if b is None else y + b[None, :, None, None]
