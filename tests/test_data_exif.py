"""Photos are read upright: the EXIF Orientation tag is applied by every reader (training, evaluation,
prediction); masks are read as stored and a mask that follows a photo's stored pixel grid is reported."""
import os

import numpy as np
import pytest
import tifffile
from PIL import Image, ImageOps

from vitmha.data import DataValidationError, ImageFolderDataModule, SegmentationFolderDataModule
from vitmha.data.io import image_reader, image_size_of, read_native, read_rgb

RNG = np.random.default_rng(0)
STORED = RNG.integers(0, 256, (6, 10, 3), dtype=np.uint8)  # 10 wide, 6 high as stored


def _exif(orientation: int) -> bytes:
    ex = Image.Exif()
    ex[0x0112] = orientation
    return ex.tobytes()


def _save(path, array, orientation, **kw):
    if str(path).endswith((".tif", ".tiff")):
        tifffile.imwrite(path, array, extratags=[(274, "H", 1, orientation, True)])
    else:
        Image.fromarray(array).save(path, exif=_exif(orientation), **kw)
    return str(path)


@pytest.mark.parametrize("ext", ["jpg", "png", "webp", "tif"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_reads_as_pil_exif_transpose_shows_it(tmp_path, ext, orientation):
    """Reference: Pillow's ImageOps.exif_transpose of the same file (the image as a viewer displays it)."""
    path = _save(tmp_path / f"x.{ext}", STORED, orientation, **({"lossless": True} if ext == "webp" else {}))
    with Image.open(path) as im:
        expected = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    got = read_rgb(path)
    assert got.shape == expected.shape and np.array_equal(got, expected)
    assert got.flags.c_contiguous
    assert np.array_equal(read_native(path), expected)  # the reader of in_chans != 3
    np.testing.assert_allclose(image_reader(3, 255.0)(path), expected / 255.0, atol=1e-7)
    assert image_size_of(path) == (expected.shape[1], expected.shape[0])  # header only, upright


def test_a_phone_photo_stored_sideways_comes_out_upright(tmp_path):
    """A portrait photo as a phone writes it: the sensor's landscape grid plus orientation 6 (turn 90° clockwise
    to view). Decoded, the marker at the top-left of the scene is at the top-left of the array."""
    scene = np.zeros((40, 24, 3), np.uint8)  # portrait: 24 wide, 40 high
    scene[:8, :8] = (255, 0, 0)
    stored = np.rot90(scene, 1)  # what the sensor recorded: the scene turned 90° counter-clockwise
    path = _save(tmp_path / "phone.jpg", np.ascontiguousarray(stored), 6, quality=95)
    a = read_rgb(path)
    assert a.shape == (40, 24, 3)
    assert a[:8, :8, 0].mean() > 200 and a[:8, :8, 1:].mean() < 40  # red corner top-left
    assert a[-8:, -8:].mean() < 30


def test_the_data_modules_train_evaluate_and_predict_on_upright_images(tmp_path):
    for split in ("train", "val"):
        for c in ("a", "b"):
            os.makedirs(tmp_path / split / c)
            _save(tmp_path / split / c / "0.jpg", STORED, 6)
    os.makedirs(tmp_path / "predict")
    _save(tmp_path / "predict" / "p.jpg", STORED, 8)
    dm = ImageFolderDataModule(str(tmp_path), image_size=8, batch_size=2, num_workers=0,
                               train_transforms=[{"class_path": "CenterCrop", "init_args": {"height": 8, "width": 6}},
                                                 {"class_path": "PadIfNeeded", "init_args": {"min_height": 8,
                                                                                            "min_width": 8}}])
    dm.setup("fit")
    # a 6-wide crop fits only the upright (6 wide x 10 high) image; the stored 10 x 6 one is too low for 8 rows
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 8, 8)
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    assert batch["orig_size"].tolist() == [[10, 6]]  # (H, W) upright


def test_segmentation_masks_are_read_as_stored_and_a_mask_on_the_stored_grid_is_explained(tmp_path):
    """The photo is 6 x 10 upright (stored 10 x 6 with orientation 6). A mask drawn on the upright photo is
    accepted; one written for the stored grid is refused with the reason."""
    for split in ("train", "val"):
        os.makedirs(tmp_path / split / "images")
        os.makedirs(tmp_path / split / "masks")
        _save(tmp_path / split / "images" / "p.jpg", STORED, 6)
    upright_mask = np.zeros((10, 6), np.uint8)
    upright_mask[:3] = 1
    Image.fromarray(upright_mask).save(tmp_path / "train" / "masks" / "p.png")
    Image.fromarray(np.zeros((6, 10), np.uint8)).save(tmp_path / "val" / "masks" / "p.png")  # stored grid
    dm = SegmentationFolderDataModule(str(tmp_path), num_classes=2, image_size=8, batch_size=1, num_workers=0)
    with pytest.raises(DataValidationError) as e:
        dm.setup("fit")
    problems = dict(e.value.problems)
    assert list(problems) == ["val/masks/p.png"]
    assert "10×6, image is 6×10 (W×H): the mask follows the image's stored pixels" in problems["val/masks/p.png"]
    assert "EXIF orientation 6" in problems["val/masks/p.png"]

    Image.fromarray(upright_mask).save(tmp_path / "val" / "masks" / "p.png")
    dm = SegmentationFolderDataModule(str(tmp_path), num_classes=2, image_size=8, batch_size=1, num_workers=0,
                                      val_transforms=[{"class_path": "PadIfNeeded",
                                                       "init_args": {"min_height": 10, "min_width": 10}},
                                                      {"class_path": "CenterCrop",
                                                       "init_args": {"height": 8, "width": 8}}])
    dm.setup("fit")
    image, mask = dm.datasets["val"][0]
    # the mask's labelled top rows (unrotated) line up with the upright image's top rows after the same ops
    assert mask[:2, 1:7].unique().tolist() == [1] and mask[4:7].unique().tolist() == [0]
    assert image.shape == (3, 8, 8)
