"""Regenerate the sample images in this folder (they are committed; nothing needs this script at run time).

    python data/samples/make_samples.py /path/to/unpacked/scikit-image-wheel/skimage/data

Photos come from scikit-image's bundled data (astronaut: NASA, public domain; chelsea and coffee: CC0),
downscaled and saved as JPEG. Digits are scikit-learn's 8×8 handwritten digits upsampled to 32×32 as
``DigitsDataModule`` does; shapes are ``SyntheticShapesDataModule`` scenes with their masks.
"""
import os
import sys

import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))


def photos(skimage_data: str) -> None:
    for name, size in (("astronaut.png", (192, 192)), ("chelsea.png", (240, 160)), ("coffee.png", (240, 160))):
        with Image.open(os.path.join(skimage_data, name)) as im:
            im = im.convert("RGB").resize(size, Image.LANCZOS)
            im.save(os.path.join(HERE, name.replace(".png", ".jpg")), quality=88, optimize=True)


def digits() -> None:
    from vitmha.data.sources import load_digits_split

    x, y, _, va = load_digits_split(32)
    seen = set()
    for i in va.tolist():
        label = int(y[i])
        if label in seen or label not in (0, 3, 7):
            continue
        seen.add(label)
        Image.fromarray((x[i, 0].numpy() * 255 + 0.5).astype(np.uint8), mode="L").save(
            os.path.join(HERE, f"digit_{label}.png"))


def shapes() -> None:
    from vitmha.data.sources import generate_shapes

    images, masks = generate_shapes(2, image_size=64, seed=0, stream=1)
    for i in range(2):
        Image.fromarray(images[i]).save(os.path.join(HERE, f"shapes_{i}.png"))
        Image.fromarray(masks[i], mode="L").save(os.path.join(HERE, f"shapes_{i}_mask.png"))


if __name__ == "__main__":
    if len(sys.argv) > 1:
        photos(sys.argv[1])
    digits()
    shapes()
