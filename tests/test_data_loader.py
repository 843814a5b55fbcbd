"""The train loader's decode-at-the-crop's-size path (``CropFirst``): the pipeline's own draws in its own order,
bitwise its result when an image is decoded whole, and a JPEG decoded at 1/k when the crop allows."""
import os

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from vitmha.data import ImageFolderDataModule
from vitmha.data.datasets import CropFirst, ImageLabelDataset
from vitmha.data.io import read_rgb, read_rgb_reduced
from vitmha.data.sampling import seed_pipeline
from vitmha.data.transforms import IMAGENET_MEAN, IMAGENET_STD

RNG = np.random.default_rng(0)


def photo(h: int, w: int) -> np.ndarray:
    """A smooth scene with detail at every scale (so that downscaling filters differ measurably)."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(40 * xx * (1 + yy)), np.cos(60 * yy * (1 + xx)), np.sin(25 * (xx + yy) ** 2)], -1)
    return np.clip(127 + 90 * base + RNG.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


class Plain(ImageLabelDataset):
    """The same dataset running the whole pipeline on the fully decoded image (the reference)."""

    def _augment(self, path, key):
        seed_pipeline(self.transform, self.seed, key)
        return self.transform(image=self.read(path))["image"]


def folder(root, size, ext, n=4):
    for split in ("train", "val"):
        for c in ("a", "b"):
            os.makedirs(root / split / c, exist_ok=True)
            for i in range(n):
                Image.fromarray(photo(*size)).save(root / split / c / f"{i}.{ext}", quality=92)
    return root


def _pair(dm):
    dm.setup("fit")
    fast = dm.datasets["train"]
    return fast, Plain(fast.items, fast.transform, fast.image_size, seed=fast.seed)


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_an_image_decoded_whole_gives_bitwise_the_pipelines_result(tmp_path, ext):
    """Both random streams (python: the crop, flips, RandAugment; numpy: random erasing's noise) drawn in the
    pipeline's order; the JPEGs are small enough for the crop to need every pixel."""
    dm = ImageFolderDataModule(str(folder(tmp_path, (40, 56), ext)), image_size=32, num_workers=0, hflip=0.5,
                               auto_augment="rand-m9-mstd0.5-inc1", reprob=0.5)
    fast, plain = _pair(dm)
    assert CropFirst.applies(fast.transform)
    for key in [(i, e) for e in (0, 3) for i in range(len(fast))]:
        assert torch.equal(fast[key][0], plain[key][0]), key
    # the default (light colour/geometry ops) pipeline too, and through the loader with worker processes
    dm = ImageFolderDataModule(str(tmp_path), image_size=32, batch_size=4, num_workers=2, persistent_workers=False)
    fast, plain = _pair(dm)
    x, _ = next(iter(dm.train_dataloader()))
    keys = dm.train_dataloader().sampler.keys()[:4]
    assert torch.equal(x, torch.stack([plain[k][0] for k in keys]))


def _to_uint8_levels(t: torch.Tensor) -> np.ndarray:
    x = t.numpy().transpose(1, 2, 0) * np.asarray(IMAGENET_STD) + np.asarray(IMAGENET_MEAN)
    return x * 255.0


def test_a_big_jpeg_is_decoded_at_the_scale_its_crop_needs_and_is_closer_to_an_antialiased_resize(tmp_path):
    """768x1024 photos cropped to 32 px: the crop (0.8-1 of the area) is >= 8x the output, so libjpeg decodes at
    1/8. Reference: the same crop of the full image resized with cv2.INTER_AREA (no aliasing). The full-size
    path (crop + bilinear resize, what albumentations does) aliases; the 1/8 decode is nearer the reference."""
    crop = [{"class_path": "RandomResizedCrop", "init_args": {"size": [32, 32], "scale": [0.8, 1.0]}}]
    dm = ImageFolderDataModule(str(folder(tmp_path, (768, 1024), "jpg", n=3)), image_size=32, num_workers=0,
                               train_transforms=crop)
    fast, plain = _pair(dm)
    pipeline = fast.transform
    used, err_fast, err_plain = [], [], []
    for key in [(i, e) for e in (0, 1) for i in range(len(fast))]:
        path = fast.items[key[0]][0]
        # the crop the pipeline draws for this key, on the full-size upright image
        seed_pipeline(pipeline, fast.seed, key)
        pipeline.py_random.random()
        x1, y1, x2, y2 = pipeline.transforms[0].get_params_dependent_on_data({"shape": (768, 1024)}, {})[
            "crop_coords"]
        reference = cv2.resize(read_rgb(path)[y1:y2, x1:x2].astype(np.float32), (32, 32),
                               interpolation=cv2.INTER_AREA)
        used.append(read_rgb_reduced(path, lambda w, h: 8)[1])
        out_fast, out_plain = _to_uint8_levels(fast[key][0]), _to_uint8_levels(plain[key][0])
        err_fast.append(np.abs(out_fast - reference).mean())
        err_plain.append(np.abs(out_plain - reference).mean())
    assert used == [8] * len(used)
    med_fast, med_plain = np.median(err_fast), np.median(err_plain)
    assert med_fast < 0.9 * med_plain, (med_fast, med_plain)


def test_reduced_decode_is_upright_and_scaled(tmp_path):
    scene = photo(640, 480)  # portrait scene, 480 wide
    scene[:64, :64] = (255, 0, 0)
    ex = Image.Exif()
    ex[0x0112] = 6
    path = str(tmp_path / "phone.jpg")
    Image.fromarray(np.ascontiguousarray(np.rot90(scene, 1))).save(path, exif=ex.tobytes(), quality=95)
    seen = []
    a, k = read_rgb_reduced(path, lambda w, h: seen.append((w, h)) or 4)
    assert seen == [(480, 640)] and k == 4 and a.shape == (160, 120, 3)
    assert a[:14, :14, 0].mean() > 200 and a[:14, :14, 1].mean() < 50  # the red corner, top-left
    full = read_rgb(path)
    np.testing.assert_allclose(a.astype(float).mean((0, 1)), full.astype(float).mean((0, 1)), atol=2.0)
    png = str(tmp_path / "x.png")
    Image.fromarray(scene).save(png)
    b, k = read_rgb_reduced(png, lambda w, h: 4)  # other formats: read whole
    assert k == 1 and np.array_equal(b, scene)
