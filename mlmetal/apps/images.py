"""Pictures the apps write: arrays in [0, 1] to Pillow images."""

import numpy as np


def to_image(x: np.ndarray, scale: int = 1):
    """A (3, H, W) display image in [0, 1] as a Pillow RGB image, enlarged `scale`× (nearest)."""
    from PIL import Image

    pixels = (np.clip(x.transpose(1, 2, 0), 0, 1) * 255 + 0.5).astype(np.uint8)
    img = Image.fromarray(pixels, "RGB")
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img
