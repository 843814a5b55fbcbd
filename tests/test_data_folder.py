"""ImageFolderDataModule: discovery, image formats, CSV lists, validation before training, predict."""
import os
import warnings

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from vitmha.data import DataValidationError, ImageFolderDataModule
from vitmha.data.io import read_rgb

RNG = np.random.default_rng(0)


def _rgb(size=12):
    return RNG.integers(0, 256, (size, size, 3), dtype=np.uint8)


def make_tree(root, splits=("train", "val"), classes=("cat", "dog"), n=2, ext="png"):
    for split in splits:
        for c in classes:
            os.makedirs(root / split / c, exist_ok=True)
            for i in range(n):
                Image.fromarray(_rgb()).save(root / split / c / f"{i}.{ext}")
    return root


def dm_for(root, **kw):
    kw.setdefault("image_size", 16)
    kw.setdefault("batch_size", 4)
    kw.setdefault("num_workers", 0)
    return ImageFolderDataModule(str(root), **kw)


def test_classes_are_sorted_train_folders_and_known_after_init(tmp_path):
    make_tree(tmp_path, classes=("zebra", "ant", "mole"))
    dm = dm_for(tmp_path)
    assert dm.classes == ["ant", "mole", "zebra"] and dm.num_classes == 3


def test_num_classes_that_disagrees_with_folders_is_an_error(tmp_path):
    make_tree(tmp_path)
    with pytest.raises(DataValidationError, match="num_classes=5 was given but the data has 2 classes"):
        dm_for(tmp_path, num_classes=5)


def test_batches_are_float_images_and_int64_labels(tmp_path):
    make_tree(tmp_path, n=3)
    dm = dm_for(tmp_path)
    dm.setup("fit")
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        x, y = next(iter(loader))
        assert isinstance(next(iter(loader)), tuple)
        assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32
        assert y.dtype == torch.int64 and set(y.tolist()) <= {0, 1}


def test_every_image_format_reads_as_rgb_uint8(tmp_path):
    g16 = (np.arange(144, dtype=np.uint16).reshape(12, 12) * 455)  # 0..65065
    files = {
        "a.PNG": Image.fromarray(_rgb()),
        "b.jpg": Image.fromarray(_rgb()),
        "c.JPEG": Image.fromarray(_rgb()),
        "d.bmp": Image.fromarray(_rgb()),
        "e.webp": Image.fromarray(_rgb()),
        "f_grey.png": Image.fromarray(_rgb()[:, :, 0]),
        "g_rgba.png": Image.fromarray(np.dstack([_rgb(), np.full((12, 12), 7, np.uint8)]), "RGBA"),
        "h_palette.png": Image.fromarray(_rgb()).convert("P"),
        "i_16bit.png": Image.fromarray(g16),
    }
    folder = tmp_path / "train" / "x"
    os.makedirs(folder)
    for name, im in files.items():
        im.save(folder / name)
    tifffile.imwrite(folder / "j_16bit.tif", g16)
    tifffile.imwrite(folder / "k_rgb16.tiff", np.stack([g16] * 3, -1))
    for name in sorted(os.listdir(folder)):
        a = read_rgb(str(folder / name))
        assert a.shape == (12, 12, 3) and a.dtype == np.uint8, name
    # 16-bit is scaled by the full range, not clipped at 255
    for name in ("i_16bit.png", "j_16bit.tif", "k_rgb16.tiff"):
        a = read_rgb(str(folder / name))[:, :, 0].astype(int)
        np.testing.assert_allclose(a, np.round(g16 / 257.0), atol=1)
    a = read_rgb(str(folder / "g_rgba.png"))  # alpha dropped: colour kept
    assert (a != 7).any()


def test_csv_lists_with_names_and_ints(tmp_path):
    os.makedirs(tmp_path / "imgs")
    for i in range(4):
        Image.fromarray(_rgb()).save(tmp_path / "imgs" / f"{i}.png")
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "train.csv").write_text("path,label\n../imgs/0.png,cat\n../imgs/1.png,dog\n")
    (tmp_path / "lists" / "val.csv").write_text("../imgs/2.png,dog\n../imgs/3.png,0\n")
    dm = dm_for(tmp_path, csv="lists")
    assert dm.classes == ["cat", "dog"]
    items = dm.validate_files()
    assert [lab for _, lab in items["train"]] == [0, 1] and [lab for _, lab in items["val"]] == [1, 0]
    x, y = next(iter(dm.val_dataloader()))
    assert y.tolist() == [1, 0]


def test_csv_problems_name_file_and_line(tmp_path):
    Image.fromarray(_rgb()).save(tmp_path / "ok.png")
    (tmp_path / "train.csv").write_text("ok.png,0\nok.png,1\n")
    (tmp_path / "val.csv").write_text("ok.png,7\nmissing.png,1\n")
    dm = dm_for(tmp_path, csv=".")
    with pytest.raises(DataValidationError) as e:
        dm.setup("fit")
    msg = str(e.value)
    assert "val.csv:1: label 7 outside 0..1" in msg and "missing.png: file listed in val.csv:2 does not exist" in msg


def test_all_problems_reported_at_once_each_line_starting_with_the_path(tmp_path):
    make_tree(tmp_path, classes=("a", "b", "c"))
    (tmp_path / "train" / "a" / "1.png").write_bytes((tmp_path / "train" / "a" / "1.png").read_bytes()[:60])
    for f in os.listdir(tmp_path / "train" / "b"):
        os.remove(tmp_path / "train" / "b" / f)
    (tmp_path / "train" / "c" / "notes.txt").write_text("hi")
    os.makedirs(tmp_path / "val" / "d")
    Image.fromarray(_rgb()).save(tmp_path / "val" / "d" / "0.png")
    Image.fromarray(_rgb()).save(tmp_path / "val" / "c" / "trunc.jpg")
    data = (tmp_path / "val" / "c" / "trunc.jpg").read_bytes()
    (tmp_path / "val" / "c" / "trunc.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataValidationError) as e:
        dm_for(tmp_path).setup("fit")
    problems = dict(e.value.problems)
    assert "empty class folder" in problems["train/b"]
    assert "unreadable image" in problems["train/a/1.png"]
    assert "unsupported file type" in problems["train/c/notes.txt"]
    assert "not in train" in problems["val/d"]
    assert "unreadable image" in problems["val/c/trunc.jpg"]
    lines = str(e.value).splitlines()[1:]
    assert len(lines) == 5 and all(line.split(":")[0] in problems for line in lines)


def test_missing_val_split_is_reported(tmp_path):
    make_tree(tmp_path, splits=("train",))
    with pytest.raises(DataValidationError, match=r"val/: missing split folder"):
        dm_for(tmp_path).setup("fit")


def test_skip_bad_files_warns_once_with_the_count(tmp_path):
    make_tree(tmp_path, n=3)
    (tmp_path / "train" / "cat" / "0.png").write_bytes(b"not an image")
    (tmp_path / "train" / "dog" / "x.txt").write_text("?")
    dm = dm_for(tmp_path, skip_bad_files=True)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        dm.setup("fit")
    msgs = [str(x.message) for x in w if "skip_bad_files" in str(x.message)]
    assert len(msgs) == 1 and f"skipped 2 file(s) under {tmp_path}: " in msgs[0]
    assert "1 × unreadable image (e.g. train/cat/0.png)" in msgs[0]
    assert "1 × unsupported file type (e.g. train/dog/x.txt)" in msgs[0]
    assert len(dm.datasets["train"]) == 5


def _info_lines(caplog):
    return [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]


def test_hidden_and_system_files_are_skipped_and_said_once_grouped_by_reason(tmp_path, caplog):
    """A folder as macOS/Windows leave it: .DS_Store, Thumbs.db, AppleDouble ._ copies, a hidden folder."""
    make_tree(tmp_path, n=2)
    for d in ("train/cat", "train/dog", "val/cat"):
        (tmp_path / d / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (tmp_path / "train" / "dog" / "Thumbs.db").write_bytes(b"\xd0\xcf")
    (tmp_path / "train" / "cat" / "._0.png").write_bytes(b"\0\5\x16\7")  # image extension, not an image
    os.makedirs(tmp_path / "train" / "cat" / ".ipynb_checkpoints")
    Image.fromarray(_rgb()).save(tmp_path / "train" / "cat" / ".ipynb_checkpoints" / "copy.png")
    dm = dm_for(tmp_path, num_workers=2, persistent_workers=False)
    with caplog.at_level("INFO"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing is wrong with the data: no warning
            dm.setup("fit")
            dm.setup("fit")  # a second setup says nothing new
    lines = _info_lines(caplog)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"skipped 6 file(s) under {tmp_path}: "
                               "5 × hidden or system file (e.g. train/cat/.DS_Store)")
    assert "1 × hidden or system folder, not read (e.g. train/cat/.ipynb_checkpoints/)" in lines[0]
    assert len(dm.datasets["train"]) == 4 and len(dm.datasets["val"]) == 4
    x, y = next(iter(dm.train_dataloader()))  # loads in two worker processes
    assert x.shape == (4, 3, 16, 16)


def test_a_clean_folder_says_nothing_and_predict_reports_what_it_left_out(tmp_path, caplog):
    make_tree(tmp_path)
    os.makedirs(tmp_path / "predict")
    Image.fromarray(_rgb()).save(tmp_path / "predict" / "a.png")
    (tmp_path / "predict" / "notes.txt").write_text("taken on holiday")
    (tmp_path / "predict" / ".DS_Store").write_bytes(b"\0")
    dm = dm_for(tmp_path)
    with caplog.at_level("INFO"):
        dm.setup("fit")
        assert _info_lines(caplog) == []
        dm.setup("predict")
    lines = _info_lines(caplog)
    assert len(lines) == 1 and "skipped 2 file(s)" in lines[0]
    assert "1 × hidden or system file (e.g. predict/.DS_Store)" in lines[0]
    assert "1 × unsupported file type (e.g. predict/notes.txt)" in lines[0]
    assert len(dm.datasets["predict"]) == 1


def test_predict_batches_are_dicts_with_paths_and_original_sizes(tmp_path):
    make_tree(tmp_path)
    os.makedirs(tmp_path / "predict")
    Image.fromarray(np.zeros((10, 20, 3), np.uint8)).save(tmp_path / "predict" / "wide.png")
    Image.fromarray(np.zeros((30, 5), np.uint8)).save(tmp_path / "predict" / "tall.jpg")
    dm = dm_for(tmp_path)
    dm.setup("predict")
    b = next(iter(dm.predict_dataloader()))
    assert b["image"].shape == (2, 3, 16, 16)
    assert [os.path.basename(p) for p in b["path"]] == ["tall.jpg", "wide.png"]
    assert b["orig_size"].dtype == torch.long and b["orig_size"].tolist() == [[30, 5], [10, 20]]


def test_predict_paths_accept_files_folders_and_globs(tmp_path):
    make_tree(tmp_path)
    dm = dm_for(tmp_path, predict_paths=["train/cat", str(tmp_path / "val" / "*" / "0.png"), "train/dog/1.png"])
    dm.setup("predict")
    assert len(dm.datasets["predict"]) == 2 + 2 + 1
    dm = dm_for(tmp_path, predict_paths=["nothing/*.png"])
    with pytest.raises(DataValidationError, match="nothing/\\*.png: no such file"):
        dm.setup("predict")


def test_train_transforms_spec_that_does_not_resize_is_explained(tmp_path):
    make_tree(tmp_path)
    dm = dm_for(tmp_path, train_transforms=["HorizontalFlip"])
    dm.setup("fit")
    with pytest.raises(ValueError, match="train_transforms produced an image of 12×12"):
        dm.datasets["train"][(0, 0)]
