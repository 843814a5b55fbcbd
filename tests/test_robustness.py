"""vitmha.robustness and ``vitmha evaluate --robustness``: corruptions in pixel space, FGSM/PGD with ε in
[0, 1] pixel units through the normalisation, and a clean row that is the logged metric."""
from __future__ import annotations

import csv

import cv2
import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader, Subset

import vitmha
from tests.helpers import MEAN, STD, assert_real_png, load_tool
from vitmha import robustness as rb
from vitmha.inference import load_task

evaluate = load_tool("evaluate")
ATOL = 1e-6  # float32 round trip pixels -> normalised -> pixels


def _pixels(shape=(2, 3, 16, 16), seed=0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def _tiny_classifier() -> torch.nn.Module:
    torch.manual_seed(0)
    return vitmha.VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                    num_classes=3).eval()


def _ce(model):
    return lambda x, y: F.cross_entropy(model(x), y, reduction="sum")


# ------------------------------------------------------------------------------------------ corruptions
@pytest.mark.parametrize("name", list(rb.CORRUPTIONS))
def test_every_corruption_at_severity_0_returns_the_input(name):
    x = _pixels()
    assert torch.equal(rb.corrupt(x, name, 0, torch.Generator().manual_seed(1)), x)


@pytest.mark.parametrize("fn, identity", [(rb.gaussian_noise, 0.0), (rb.gaussian_blur, 0.0), (rb.brightness, 0.0),
                                          (rb.contrast, 1.0), (rb.jpeg, None)])
def test_identity_settings_return_the_input(fn, identity):
    x = _pixels()
    assert torch.equal(fn(x, identity), x)


@pytest.mark.parametrize("size, sigma, radius", [(24, 0.5, 2), (24, 1.0, 3), (24, 2.0, 6),
                                                 ((5, 7), 2.0, 4)])  # radius ceil(3σ), at most the side - 1
def test_gaussian_blur_equals_opencv(size, sigma, radius):
    h, w = (size, size) if isinstance(size, int) else size
    x = _pixels((1, 3, h, w))
    img = x[0].permute(1, 2, 0).numpy()
    k = 2 * radius + 1
    ref = cv2.GaussianBlur(img, (k, k), sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)
    np.testing.assert_allclose(rb.gaussian_blur(x, sigma)[0].permute(1, 2, 0).numpy(), ref, atol=1e-5)


def test_the_explanations_blur_their_baseline_with_the_same_gaussian_blur():
    from vitmha import explain

    x = _pixels((1, 3, 32, 32))
    assert explain.gaussian_blur is rb.gaussian_blur
    assert torch.equal(explain.baseline_image(x, "blur", (8, 8)), rb.gaussian_blur(x, 4.0))
    with pytest.raises(rb.RobustnessError, match="sigma -1 is negative"):
        rb.gaussian_blur(x, -1)


def test_gaussian_noise_has_the_stated_sigma_and_is_seeded():
    x = torch.full((4, 3, 32, 32), 0.5)  # mid-grey: the clamp to [0, 1] does not cut the noise
    a = rb.gaussian_noise(x, 0.06, torch.Generator().manual_seed(3))
    assert torch.equal(a, rb.gaussian_noise(x, 0.06, torch.Generator().manual_seed(3)))
    assert (a - x).std().item() == pytest.approx(0.06, rel=0.03)
    assert (a - x).mean().abs().item() < 0.002


def test_brightness_contrast_and_jpeg_do_what_they_say():
    x = 0.2 + 0.6 * _pixels()  # inside (0, 1): no clipping at these settings
    assert torch.allclose(rb.brightness(x, 0.1), x + 0.1)
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    y = rb.contrast(x, 0.5)
    assert torch.allclose(y.mean(dim=(1, 2, 3), keepdim=True), m, atol=1e-6)
    assert torch.allclose(y - m, 0.5 * (x - m), atol=1e-6)
    smooth = rb.gaussian_blur(x, 2.0)  # JPEG keeps smooth images; the error grows as the quality drops
    errors = [(rb.jpeg(smooth, q) - smooth).abs().mean().item() for q in (95, 50, 10)]
    assert errors[0] < 0.01 and errors[0] < errors[1] < errors[2]


def test_unknown_corruption_and_level_are_errors():
    with pytest.raises(rb.RobustnessError, match="unknown corruption 'fog'"):
        rb.corrupt(_pixels(), "fog", 1)
    with pytest.raises(rb.RobustnessError, match="level 6"):
        rb.corrupt(_pixels(), "jpeg", 6)


# ------------------------------------------------------------------------------------------ attacks
def test_fgsm_equals_a_hand_computed_sign_gradient_step_in_pixel_space():
    model, eps = _tiny_classifier(), 8 / 255
    p = _pixels((4, 3, 16, 16))
    y = torch.tensor([0, 1, 2, 0])
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    x = (p - mean) / std
    # by hand: the gradient of the loss with respect to the pixels, through the normalisation
    q = p.clone().requires_grad_(True)
    F.cross_entropy(model((q - mean) / std), y).backward()
    expected = (p + eps * q.grad.sign()).clamp(0, 1)

    adv = rb.fgsm(_ce(model), x, y, eps, MEAN, STD)
    adv_pixels = adv * std + mean
    torch.testing.assert_close(adv_pixels, expected, atol=ATOL, rtol=0)
    delta = (adv_pixels - p).abs()
    assert delta.max().item() <= eps + ATOL  # ε is in pixel units, not in normalised units
    inside = (expected > 0) & (expected < 1)
    assert torch.allclose(delta[inside], torch.full_like(delta[inside], eps), atol=ATOL)
    assert adv_pixels.min().item() >= -ATOL and adv_pixels.max().item() <= 1 + ATOL


@pytest.mark.parametrize("eps", [2 / 255, 8 / 255, 32 / 255])
def test_pgd_stays_in_the_eps_ball_and_does_not_lower_the_loss_below_fgsm(eps):
    model = _tiny_classifier()
    p = _pixels((32, 3, 16, 16), seed=1)
    y = torch.arange(32) % 3
    x = rb.to_model(p, MEAN, STD)
    loss = lambda a: F.cross_entropy(model(a), y, reduction="none")  # noqa: E731
    with torch.no_grad():
        l_clean, l_fgsm = loss(x), loss(rb.fgsm(_ce(model), x, y, eps, MEAN, STD))
    for early_stop in (False, True):
        adv = rb.pgd(_ce(model), x, y, eps, MEAN, STD, steps=10, generator=torch.Generator().manual_seed(0),
                     early_stop=early_stop)
        a = rb.to_pixels(adv, MEAN, STD)
        assert (a - p).abs().max().item() <= eps + ATOL
        assert a.min().item() >= -ATOL and a.max().item() <= 1 + ATOL
    with torch.no_grad():
        l_pgd = loss(adv)
    assert l_fgsm.mean() > l_clean.mean()
    assert l_pgd.mean() >= l_fgsm.mean() - 1e-6


def test_pgd_is_seeded_and_early_stop_keeps_fooled_samples_fooled():
    model = _tiny_classifier()
    x = rb.to_model(_pixels((16, 3, 16, 16), seed=2), MEAN, STD)
    y = torch.arange(16) % 3

    def loss_and_fooled(a, t):
        logits = model(a)
        return F.cross_entropy(logits, t, reduction="sum"), logits.argmax(-1) != t

    def run(seed):
        return rb.pgd(loss_and_fooled, x, y, 16 / 255, MEAN, STD, generator=torch.Generator().manual_seed(seed),
                      early_stop=True)

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))
    with torch.no_grad():
        assert (model(run(0)).argmax(-1) != y).float().mean() >= (model(x).argmax(-1) != y).float().mean()


def test_segmentation_attack_loss_is_the_pixel_cross_entropy_without_ignored_pixels():
    from vitmha.tasks import SemanticSegmenter

    torch.manual_seed(0)
    task = SemanticSegmenter(num_classes=3, backbone_kwargs=dict(img_size=16, patch_size=8, embed_dim=16, depth=1,
                                                                 num_heads=2)).eval()
    x = rb.to_model(_pixels((2, 3, 16, 16)), MEAN, STD)
    y = torch.randint(0, 3, (2, 16, 16), generator=torch.Generator().manual_seed(0))
    y[:, :5] = 255
    logits = task.predict_logits(x)
    valid = y != 255
    expected = F.cross_entropy(logits.permute(0, 2, 3, 1)[valid], y[valid], reduction="sum")
    torch.testing.assert_close(rb.attack_loss(task)(x, y), expected, rtol=1e-5, atol=1e-5)
    ignored = torch.full_like(y, 255)  # nothing to attack: no gradient, FGSM leaves the pixels as they were
    adv = rb.fgsm(rb.attack_loss(task), x, ignored, 8 / 255, MEAN, STD)
    torch.testing.assert_close(rb.to_pixels(adv, MEAN, STD), rb.to_pixels(x, MEAN, STD), atol=ATOL, rtol=0)


def test_sweep_is_deterministic_and_every_row_scores_the_same_samples():
    from vitmha.tasks import ImageClassifier

    torch.manual_seed(0)
    task = ImageClassifier(num_classes=3, backbone_kwargs=dict(img_size=16, patch_size=8, embed_dim=16, depth=1,
                                                               num_heads=2)).eval()
    x = rb.to_model(_pixels((10, 3, 16, 16), seed=3), MEAN, STD)
    y = torch.arange(10) % 3
    batches = [(x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:], y[8:])]
    spec = rb.RobustnessSpec.create(subset=6)
    a = rb.robustness_sweep(task, batches, MEAN, STD, spec)
    b = rb.robustness_sweep(task, batches, MEAN, STD, spec)
    assert [(r.perturbation, r.level, r.score) for r in a.rows] == [(r.perturbation, r.level, r.score) for r in b.rows]
    assert len(a.rows) == 1 + 5 * 3 + 2 * 3 and {r.samples for r in a.rows} == {6}
    assert [r.value for r in a.rows if r.perturbation == "pgd"] == list(rb.DEFAULT_EPS)
    full = rb.RobustnessSpec.create(full=True)
    assert full.levels == (1, 2, 3, 4, 5) and full.eps == rb.FULL_EPS


def test_default_and_full_sweeps_agree_on_the_rows_they_share():
    from vitmha.tasks import SemanticSegmenter

    torch.manual_seed(0)
    task = SemanticSegmenter(num_classes=3, backbone_kwargs=dict(img_size=16, patch_size=8, embed_dim=16, depth=1,
                                                                 num_heads=2)).eval()
    x = rb.to_model(_pixels((4, 3, 16, 16), seed=4), MEAN, STD)
    y = torch.randint(0, 3, (4, 16, 16), generator=torch.Generator().manual_seed(1))
    batches = [(x[:2], y[:2]), (x[2:], y[2:])]
    names = "gaussian_noise,pgd"
    short = rb.robustness_sweep(task, batches, MEAN, STD, rb.RobustnessSpec.create(perturbations=names))
    full = rb.robustness_sweep(task, batches, MEAN, STD, rb.RobustnessSpec.create(full=True, perturbations=names))
    in_full = {(r.perturbation, r.value): r.score for r in full.rows}
    assert len(set(in_full.values())) > 5  # mIoU over 1,024 pixels: the noise and PGD's random start show
    assert [r.score for r in short.rows] == [in_full[(r.perturbation, r.value)] for r in short.rows]


def _tiny_task_batches(n=10):
    from vitmha.tasks import ImageClassifier

    torch.manual_seed(0)
    task = ImageClassifier(num_classes=3, backbone_kwargs=dict(img_size=16, patch_size=8, embed_dim=16, depth=1,
                                                               num_heads=2)).eval()
    x = rb.to_model(_pixels((n, 3, 16, 16), seed=3), MEAN, STD)
    return task, x, torch.arange(n) % 3


def test_a_sweep_scores_the_whole_split_by_default_and_says_so():
    task, x, y = _tiny_task_batches(10)
    loader = DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    spec = rb.RobustnessSpec.create(perturbations="jpeg")
    whole = rb.robustness_sweep(task, loader, MEAN, STD, spec)
    assert whole.samples == 10 and not whole.subset and {r.samples for r in whole.rows} == {10}
    assert whole.describe() == "the whole split (10 samples)"
    cut = rb.robustness_sweep(task, loader, MEAN, STD, rb.RobustnessSpec.create(perturbations="jpeg", subset=6))
    assert cut.samples == 6 and cut.subset and cut.describe() == "a subset: the first 6 of 10 samples"
    at_a_batch_edge = rb.robustness_sweep(task, loader, MEAN, STD, rb.RobustnessSpec.create(perturbations="jpeg",
                                                                                          subset=8))
    assert at_a_batch_edge.subset and at_a_batch_edge.samples == 8
    more = rb.robustness_sweep(task, loader, MEAN, STD, rb.RobustnessSpec.create(perturbations="jpeg", subset=50))
    assert more.samples == 10 and not more.subset  # a subset as large as the split is the whole split
    listed = rb.robustness_sweep(task, [(x[:4], y[:4]), (x[4:], y[4:])], MEAN, STD,
                                 rb.RobustnessSpec.create(perturbations="jpeg", subset=5))
    assert listed.describe() == "a subset: the first 5 samples"  # batches without a dataset: no split size


def test_csv_and_json_say_how_many_samples_and_whether_a_subset(tmp_path):
    import json

    task, x, y = _tiny_task_batches(10)
    loader = DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    res = rb.robustness_sweep(task, loader, MEAN, STD, rb.RobustnessSpec.create(perturbations="fgsm", subset=5))
    rows = _csv(rb.write_csv(res, str(tmp_path / "r.csv")))
    assert {(r["samples"], r["subset"]) for r in rows} == {("5", "true")}
    doc = json.loads(open(rb.write_json(res, str(tmp_path / "r.json"))).read())
    assert (doc["samples"], doc["subset"], doc["split_samples"]) == (5, True, 10)
    assert doc["described"] == "a subset: the first 5 of 10 samples" and doc["spec"]["subset"] == 5
    assert [r["score"] for r in doc["rows"]] == [r.score for r in res.rows]
    assert not list(tmp_path.glob("*.tmp-*"))


def test_only_classifiers_and_segmenters_are_swept():
    other = torch.nn.Linear(2, 2)
    other.task = "multilabel"
    with pytest.raises(rb.RobustnessError, match="a multilabel task: the robustness sweep handles classifiers"):
        rb.robustness_sweep(other, [], MEAN, STD)


@pytest.mark.parametrize("text, expected", [("4/255", (4 / 255,)), ("0, 0.01", (0.0, 0.01))])
def test_eps_are_parsed_in_pixel_units(text, expected):
    assert rb.parse_eps(text) == pytest.approx(expected)


# ------------------------------------------------------------------------------------------ the tool
@pytest.fixture(scope="module")
def mislabelled(ckpts, tmp_path_factory):
    """The tiny classifier's colour folder with two test images filed under another class, so that its test
    accuracy is 7/9 (not a round 1.0) and 4/5 on the first five."""
    import shutil

    root = tmp_path_factory.mktemp("mislabelled") / "colours"
    shutil.copytree(ckpts["clf_root"], root)
    shutil.move(root / "test" / "green" / "green0.png", root / "test" / "blue" / "green0.png")
    shutil.move(root / "test" / "red" / "red0.png", root / "test" / "green" / "red0.png")
    return root


def _config(tmp_path, ckpts, kind, root=None):
    if kind == "clf":
        section = {"class_path": "vitmha.data.ImageFolderDataModule", "init_args": dict(
            root=str(root or ckpts["clf_root"]), image_size=16, batch_size=4, num_workers=0, mean=MEAN, std=STD)}
    else:
        section = {"class_path": "vitmha.data.SegmentationFolderDataModule", "init_args": dict(
            root=str(ckpts["seg_root"]), num_classes=4, image_size=32, batch_size=3, num_workers=0)}
    path = tmp_path / f"{kind}.yaml"
    path.write_text(yaml.safe_dump({"data": section}))
    return path


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("kind, split, metric", [("clf", "test", "test/acc"), ("seg", "val", "val/miou")])
def test_clean_row_of_the_whole_split_is_the_logged_metric_exactly(ckpts, mislabelled, tmp_path, kind, split, metric):
    args = ["--checkpoint", ckpts[kind], "--config", _config(tmp_path, ckpts, kind, mislabelled), "--split", split]
    plain = evaluate.main(args + ["--output", tmp_path / "plain"])
    out = tmp_path / "robust"
    res = evaluate.main(args + ["--output", out, "--robustness"])  # the whole split by default
    sweep = res["robustness"]
    assert not sweep.subset and sweep.describe() == f"the whole split ({sweep.samples} samples)"
    assert sweep.metric == metric
    assert sweep.clean() == plain["logged"][metric] == res["logged"][metric]  # exactly
    if kind == "clf":
        assert sweep.clean() == float(torch.tensor(7 / 9))  # 7 of the 9 test images, as a float32
    rows = _csv(out / "robustness.csv")
    assert [r["perturbation"] for r in rows][:2] == ["clean", "gaussian_noise"]
    assert len(rows) == 1 + 5 * 3 + 2 * 3
    assert float(rows[0]["score"]) == pytest.approx(plain["logged"][metric], abs=5e-7)
    assert {(int(r["samples"]), r["subset"]) for r in rows} == {(sweep.samples, "false")}
    assert all(0.0 <= float(r["score"]) <= 1.0 for r in rows)
    assert_real_png(out / "robustness.png")
    assert (out / "summary.json").is_file()  # the usual report is still written


@pytest.mark.parametrize("kind, split, n, flag", [("clf", "test", 5, "--subset"),
                                                 ("seg", "val", 2, "--robustness_subset")])  # the old spelling
def test_clean_row_of_a_subset_is_the_metric_of_that_subset(ckpts, mislabelled, tmp_path, kind, split, n, flag):
    cfg = _config(tmp_path, ckpts, kind, mislabelled)
    res = evaluate.main(["--checkpoint", ckpts[kind], "--config", cfg, "--split", split, "--output", tmp_path / "r",
                         "--robustness", flag, str(n), "--robustness_corruptions", "jpeg,fgsm",
                         "--robustness_full"])
    sweep = res["robustness"]
    assert [r.perturbation for r in sweep.rows] == ["clean"] + ["jpeg"] * 5 + ["fgsm"] * 5
    assert sweep.samples == n and sweep.subset
    assert {r["subset"] for r in _csv(tmp_path / "r" / "robustness.csv")} == {"true"}
    # the same first n samples evaluated on their own by trainer.test/validate, as the tool's first run does
    dm = evaluate.build_datamodule(yaml.safe_load(cfg.read_text())["data"], load_task(str(ckpts[kind])), str(cfg))
    dm.setup("test" if split == "test" else "fit")
    full = dm.test_dataloader() if split == "test" else dm.val_dataloader()
    loader = DataLoader(Subset(full.dataset, range(n)), batch_size=full.batch_size, collate_fn=full.collate_fn)
    task = load_task(str(ckpts[kind]))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    logged = (trainer.test if split == "test" else trainer.validate)(task, dataloaders=loader, verbose=False)[0]
    assert sweep.clean() == logged[sweep.metric]
    if kind == "clf":
        assert sweep.clean() == float(torch.tensor(4 / 5))  # green0 filed under blue is the 4th of the first 5


@pytest.mark.parametrize("extra, message", [
    (["--robustness", "--robustness_corruptions", "gaussian_noise,fog"],
     "error: --robustness_corruptions: unknown corruption 'fog'; expected any of gaussian_noise"),
    (["--robustness", "--robustness_eps", "0.01,-0.03"], "error: --robustness_eps: ε -0.03 is negative"),
    (["--robustness", "--robustness_eps", "8"],
     "error: --robustness_eps: ε 8 is above 1; ε is in [0, 1] pixel units"),
    (["--robustness", "--robustness_subset", "-1"], "error: --subset: subset -1 is negative"),
    (["--robustness_full"], "error: --robustness_full: only applies with --robustness"),
])
def test_bad_robustness_options_are_one_line_errors(ckpts, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--checkpoint", ckpts["clf"], "--output", tmp_path / "o"] + extra)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()
