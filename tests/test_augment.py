"""DeiT's augmentation recipe: RandAugment with timm's semantics (rand-m9-mstd0.5-inc1), TrivialAugment and
random erasing, as albumentations transforms; the ops are checked against timm's PIL-based ones."""
from __future__ import annotations

import math

import albumentations as A
import cv2
import numpy as np
import pytest
import timm.data.auto_augment as timm_aa
import torch
from PIL import Image

from vitmha.data import ImageFolderDataModule
from vitmha.data.sampling import seed_pipeline
from vitmha.data.transforms import (AUGMENT_OPS, RandAugment, RandomErasing, TrivialAugment, auto_augment_transform,
                                    build_transforms, classification_train_recipe, rand_augment_arg,
                                    trivial_augment_arg)

FILL = (10, 20, 30)
NEAREST, BILINEAR = Image.Resampling.NEAREST, Image.Resampling.BILINEAR


def noisy(h: int = 37, w: int = 29, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img[5:20, 3:15] = rng.integers(100, 140, (15, 12, 3))  # a flatter patch: histograms with gaps
    return img


def smooth(h: int = 40, w: int = 50) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 4, yy * 5, (xx + yy) * 2 + 20], -1).astype(np.uint8)


# ----------------------------------------------------------------- ops
@pytest.mark.parametrize("name", sorted(AUGMENT_OPS))
@pytest.mark.parametrize("magnitude", [0.0, 5.0, 9.0, 10.0])
def test_every_op_runs_on_uint8_rgb_and_keeps_shape_and_dtype(name, magnitude):
    import random

    img = noisy()
    fn, geometric = AUGMENT_OPS[name]
    arg = rand_augment_arg(name, magnitude, True, random.Random(0))
    out = fn(img, arg, FILL, cv2.INTER_LINEAR) if geometric else fn(img, arg)
    assert out.shape == img.shape and out.dtype == np.uint8


PIXEL_OPS = [
    ("AutoContrast", None, lambda p, a: timm_aa.auto_contrast(p)),
    ("Equalize", None, lambda p, a: timm_aa.equalize(p)),
    ("Invert", None, lambda p, a: timm_aa.invert(p)),
    *[("Posterize", b, lambda p, a: timm_aa.posterize(p, a)) for b in (1, 3, 4, 8)],
    *[("Solarize", t, lambda p, a: timm_aa.solarize(p, a)) for t in (0, 26, 128, 256)],
    *[("SolarizeAdd", v, lambda p, a: timm_aa.solarize_add(p, a)) for v in (0, 55, 99)],
    *[(op, f, fn) for f in (0.1, 0.55, 1.0, 1.9) for op, fn in (
        ("Color", lambda p, a: timm_aa.color(p, a)), ("Contrast", lambda p, a: timm_aa.contrast(p, a)),
        ("Brightness", lambda p, a: timm_aa.brightness(p, a)), ("Sharpness", lambda p, a: timm_aa.sharpness(p, a)))],
]


@pytest.mark.parametrize("name,arg,reference", PIXEL_OPS)
def test_pixel_ops_equal_timms_pil_ops_exactly(name, arg, reference):
    img = noisy()
    expected = np.asarray(reference(Image.fromarray(img), arg))
    np.testing.assert_array_equal(AUGMENT_OPS[name][0](img, arg), expected)


GEOMETRIC_OPS = [("Rotate", 13.0, timm_aa.rotate), ("Rotate", -27.0, timm_aa.rotate),
                 ("ShearX", 0.23, timm_aa.shear_x), ("ShearY", -0.23, timm_aa.shear_y),
                 ("TranslateXRel", 0.13, timm_aa.translate_x_rel), ("TranslateYRel", -0.41, timm_aa.translate_y_rel)]


@pytest.mark.parametrize("name,arg,reference", GEOMETRIC_OPS)
def test_geometric_ops_sample_where_timms_pil_ops_do(name, arg, reference):
    """Nearest neighbour: the same source pixel for (almost) every output pixel (ties at exactly half a pixel
    may round apart); bilinear on a smooth image: within 2 levels away from the filled border (cv2 blends the
    last pixel with the fill, PIL does not)."""
    fn = AUGMENT_OPS[name][0]
    img = noisy()
    same = fn(img, arg, FILL, cv2.INTER_NEAREST) == np.asarray(reference(Image.fromarray(img), arg, resample=NEAREST,
                                                                           fillcolor=FILL))
    assert same.all(-1).mean() > 0.99

    img = smooth()
    ours = fn(img, arg, FILL, cv2.INTER_LINEAR).astype(int)
    theirs = np.asarray(reference(Image.fromarray(img), arg, resample=BILINEAR, fillcolor=FILL)).astype(int)
    inside = fn(np.full_like(img, 255), arg, (0, 0, 0), cv2.INTER_NEAREST).min(-1) == 255
    inside = cv2.erode(inside.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    assert inside.mean() > 0.3
    assert np.abs(ours - theirs)[inside].max() <= 2


@pytest.mark.parametrize("name", ["Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
                                  "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                                  "SharpnessIncreasing", "ShearX", "TranslateXRel", "Posterize", "Solarize", "Color"])
@pytest.mark.parametrize("magnitude", [0.0, 3.3, 9.0, 10.0])
def test_magnitude_to_argument_follows_timm(name, magnitude):
    import random

    increasing = name.endswith("Increasing")
    op = name[:-len("Increasing")] if increasing else name
    (expected,) = timm_aa.LEVEL_TO_ARG[name](magnitude, {"translate_pct": 0.45}) or (None,)
    got = rand_augment_arg(op, magnitude, increasing, random.Random(1))
    if op in ("Color", "Contrast", "Brightness", "Sharpness") and increasing:
        assert abs(got - 1.0) == pytest.approx(abs(expected - 1.0))  # timm draws the sign too
    elif isinstance(expected, float):
        assert abs(got) == pytest.approx(abs(expected))
    else:
        assert got == expected


# ----------------------------------------------------------------- RandAugment / TrivialAugment
def test_rand_augment_string_is_parsed_as_timm_does():
    t = auto_augment_transform("rand-m9-mstd0.5-inc1", fill=FILL)
    assert isinstance(t, RandAugment)
    assert (t.num_ops, t.magnitude, t.magnitude_std, t.magnitude_max, t.increasing, t.op_prob, t.fill) == (
        2, 9.0, 0.5, 10.0, True, 0.5, FILL)
    t = auto_augment_transform("rand-m7-n3-mstd101-mmax9-p0.8")
    assert (t.num_ops, t.magnitude, math.isinf(t.magnitude_std), t.magnitude_max, t.increasing, t.op_prob) == (
        3, 7.0, True, 9.0, False, 0.8)
    assert isinstance(auto_augment_transform("trivial"), TrivialAugment)
    assert auto_augment_transform(None) is None
    with pytest.raises(ValueError, match=r"auto_augment: 'rand-m9-x2': unknown section 'x2'"):
        auto_augment_transform("rand-m9-x2")
    with pytest.raises(ValueError, match="auto_augment: unknown policy 'autoaug'"):
        auto_augment_transform("autoaug")


def _run(transform, img, seed):
    pipe = A.Compose([transform])
    pipe.set_random_seed(seed)
    return pipe(image=img)["image"]


@pytest.mark.parametrize("policy", ["rand-m9-mstd0.5-inc1", "trivial"])
def test_policies_are_deterministic_given_the_seed_and_vary_with_it(policy):
    t = auto_augment_transform(policy, fill=FILL)
    img = noisy(32, 32)
    outs = [_run(t, img, s) for s in range(12)]
    assert all(np.array_equal(_run(t, img, s), outs[s]) for s in range(12))
    assert len({o.tobytes() for o in outs}) >= 6
    assert all(o.shape == img.shape and o.dtype == np.uint8 for o in outs)


def test_rand_augment_draws_two_ops_half_applied_at_magnitude_nine():
    """Over many draws: 2 ops per image each applied with probability 0.5, ops uniform over timm's 15, and
    the magnitude noise N(9, 0.5) clipped at 10 (rotation = 3 * magnitude degrees)."""
    t = RandAugment(fill=FILL)
    t.set_random_seed(0)
    ops = [op for _ in range(3000) for op in t.get_params()["ops"]]
    assert len(ops) / 3000 == pytest.approx(1.0, abs=0.05)
    counts = {n: sum(o[0] == n for o in ops) for n in RandAugment.OP_NAMES}
    assert min(counts.values()) > 0.6 * len(ops) / 15 and max(counts.values()) < 1.4 * len(ops) / 15
    degrees = np.abs([o[1] for o in ops if o[0] == "Rotate"])
    assert degrees.max() <= 30.0 and np.mean(degrees) / 3 == pytest.approx(9.0, abs=0.15)


def test_trivial_augment_ranges_follow_torchvision_wide():
    import random

    rng = random.Random(0)
    assert trivial_augment_arg("Posterize", 0, rng) == 8 and trivial_augment_arg("Posterize", 30, rng) == 2
    assert trivial_augment_arg("Solarize", 0, rng) == 255 and trivial_augment_arg("Solarize", 30, rng) == 0
    assert abs(trivial_augment_arg("Rotate", 30, rng)) == pytest.approx(135.0)
    assert abs(trivial_augment_arg("Color", 30, rng) - 1) == pytest.approx(0.99)
    t = TrivialAugment()
    t.set_random_seed(0)
    assert all(len(t.get_params()["ops"]) == 1 for _ in range(50))


def test_float_images_are_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="RandAugment works on .* uint8 images before Normalize"):
        _run(RandAugment(op_prob=1.0), noisy().astype(np.float32), 0)


# ----------------------------------------------------------------- random erasing
@pytest.mark.parametrize("dtype", [np.float32, np.uint8])
def test_erasing_changes_one_box_of_the_drawn_size_and_nothing_else(dtype):
    img = (np.random.default_rng(0).normal(size=(40, 48, 3)) if dtype == np.float32 else noisy(40, 48)).astype(dtype)
    t = RandomErasing(p=1.0)
    for seed in range(40):
        out = _run(t, img, seed)
        assert out.dtype == img.dtype and out.shape == img.shape
        changed = (out != img).any(-1)
        ys, xs = np.nonzero(changed)
        if len(ys) == 0:  # 10 tries may all miss (boxes larger than the image): nothing erased
            continue
        box = np.zeros_like(changed)
        box[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = True
        assert changed[box].mean() > 0.95 and not changed[~box].any()  # one rectangle, outside untouched
        h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        assert 0.02 * 40 * 48 * 0.5 <= h * w <= 40 * 48 / 3 * 1.3


def test_pixel_mode_fills_standard_normal_noise_after_normalize():
    t = RandomErasing(p=1.0, scale=(0.3, 0.3), ratio=(1.0, 1.0))
    img = np.full((64, 64, 3), 7.0, np.float32)
    out = _run(t, img, 3)
    noise = out[out != 7.0]
    assert noise.size > 3000 and abs(noise.mean()) < 0.1 and abs(noise.std() - 1) < 0.1


def test_erasing_probability():
    img = noisy(32, 32).astype(np.float32)
    t = RandomErasing(p=0.25)
    erased = np.mean([not np.array_equal(_run(t, img, s), img) for s in range(400)])
    assert erased == pytest.approx(0.25, abs=0.07)


# ----------------------------------------------------------------- from the data module's settings
def _folder(root):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


def test_the_deit_recipe_from_data_module_settings(tmp_path):
    dm = ImageFolderDataModule(str(_folder(tmp_path / "d")), image_size=16, batch_size=4, num_workers=0, seed=1,
                               mean=[0.5, 0.4, 0.3], std=[0.2, 0.2, 0.2], auto_augment="rand-m9-mstd0.5-inc1",
                               reprob=0.25)
    names = [type(t).__name__ for t in dm.train_transform.transforms]
    assert names == ["RandomResizedCrop", "HorizontalFlip", "RandAugment", "Normalize", "RandomErasing", "ToTensorV2"]
    assert dm.train_transform.transforms[2].fill == (128.0, 102.0, 76.0)  # the dataset mean in pixels
    dm.setup("fit")
    ds = dm.datasets["train"]
    x, _ = ds[(3, 5)]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert torch.equal(ds[(3, 5)][0], x) and not torch.equal(ds[(3, 6)][0], x)  # a function of (seed, epoch, i)
    with pytest.raises(ValueError, match="auto_augment: unknown policy"):
        ImageFolderDataModule(str(tmp_path / "d"), auto_augment="augmix")


def test_transforms_usable_in_a_yaml_spec():
    pipe = build_transforms([{"class_path": "vitmha.data.transforms.RandAugment", "init_args": {"magnitude": 5}},
                             "Normalize",
                             {"class_path": "vitmha.data.transforms.RandomErasing", "init_args": {"p": 1.0}}])
    seed_pipeline(pipe, 0, (2, 1))
    out = pipe(image=noisy(24, 24))["image"]
    assert out.shape == (3, 24, 24) and out.dtype == torch.float32
    with pytest.raises(ValueError, match="RandomErasing"):
        build_transforms([{"class_path": "vitmha.data.transforms.RandomErasing", "init_args": {"count": 0}}])


def test_recipe_without_policy_is_the_default_pipeline():
    plain = classification_train_recipe(16, (0.5,) * 3, (0.2,) * 3)
    assert "OneOf" in [type(t).__name__ for t in plain.transforms]
