"""Any number of input channels: pretrained RGB patch kernels adapted as timm adapts them, images read with their
own channels (grey, 16-bit, multi-band TIFF), per-channel and ``auto`` normalisation, and the tools on such runs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

import vitmha
from tests.conftest import REAL_NAME, require_dataset
from tests.helpers import load_tool, randomize, rel_err
from vitmha.data import DataValidationError, ImageFolderDataModule, SegmentationFolderDataModule
from vitmha.data.io import check_image, read_channels
from vitmha.data.transforms import IMAGENET_MEAN, IMAGENET_STD, resolve_mean_std
from vitmha.models.weights import adapt_input_channels

TINY = dict(img_size=32, depth=2)
ARCH = "vit_tiny_patch16_224"


def _random_timm_file(tmp_path: Path) -> Path:
    """A randomised timm ViT-Ti (RGB) saved as .safetensors: the 'pretrained' weights of these tests."""
    torch.manual_seed(0)
    ref = randomize(timm.create_model(ARCH, pretrained=False, **TINY))
    path = tmp_path / "rgb.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    return path


# ------------------------------------------------------------------------------------------ weights
@pytest.mark.parametrize("in_chans", [1, 2, 4, 13])
@pytest.mark.parametrize("patch_size", [16, 8])
def test_rgb_weights_adapted_to_in_chans_give_timms_outputs(tmp_path, in_chans, patch_size):
    path = _random_timm_file(tmp_path)
    ref = timm.create_model(ARCH, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), in_chans=in_chans,
                            patch_size=patch_size, **TINY).eval()
    ours = vitmha.create_backbone(ARCH, pretrained=str(path), in_chans=in_chans, patch_size=patch_size, **TINY).eval()
    assert ours.patch_embed.proj.weight.shape == (192, in_chans, patch_size, patch_size)
    x = torch.randn(2, in_chans, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_err(ref.forward_features(x), ours.forward_features(x)) < 1e-5
        assert rel_err(ref(x), ours(x)) < 1e-5


@pytest.mark.parametrize("in_chans", [1, 2, 4, 13])
def test_adapted_kernel_equals_timms_adapt_input_conv(in_chans):
    from timm.models._manipulate import adapt_input_conv

    w = torch.randn(8, 3, 4, 4)
    assert torch.equal(adapt_input_channels(w, in_chans), adapt_input_conv(in_chans, w.clone()))
    assert torch.equal(adapt_input_channels(w, 3), w)


def _task_checkpoint(tmp_path: Path) -> Path:
    """A vitmha ImageClassifier (RGB, weight EMA) saved as a Lightning checkpoint, weights randomised."""
    import lightning as L

    from vitmha.tasks import ImageClassifier

    task = ImageClassifier(num_classes=3, backbone=ARCH, backbone_kwargs=dict(TINY), ema_decay=0.9)
    randomize(task.model)
    task.ema.module.load_state_dict(task.model.state_dict())
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_epochs=0)
    trainer.strategy.connect(task)
    path = tmp_path / "task.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.mark.parametrize("in_chans,tile", [(1, 1), (6, 2)])
@pytest.mark.parametrize("patch_size", [16, 8])
def test_a_task_checkpoint_at_another_patch_size_adapts_to_in_chans(tmp_path, in_chans, tile, patch_size):
    """Summed kernels on a grey image, or the kernels twice at half weight on the image's channels twice, give
    the embedding of the RGB model: the adapted model must equal the RGB one (both resampled to the patch size)."""
    ckpt = _task_checkpoint(tmp_path)
    rgb = vitmha.create_backbone(ARCH, pretrained=str(ckpt), num_classes=3, patch_size=patch_size, **TINY).eval()
    ours = vitmha.create_backbone(ARCH, pretrained=str(ckpt), num_classes=3, patch_size=patch_size, in_chans=in_chans,
                                  **TINY).eval()
    x = torch.randn(2, 3 if in_chans > 1 else 1, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = rgb(x.repeat(1, 3, 1, 1) if in_chans == 1 else x)
        got = ours(x if in_chans == 1 else x.repeat(1, tile, 1, 1))
    assert rel_err(want, got) < 1e-5


def test_real_vit_ti_adapted_to_grey_and_4_bands_matches_timm(real_weights):
    for in_chans in (1, 4):
        ref = timm.create_model(ARCH, pretrained=True, pretrained_cfg_overlay=dict(file=str(real_weights)),
                                in_chans=in_chans).eval()
        ours = vitmha.create_backbone(REAL_NAME, pretrained=str(real_weights), in_chans=in_chans).eval()
        x = torch.randn(1, in_chans, 224, 224, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert rel_err(ref(x), ours(x)) < 1e-5, in_chans


def test_real_vit_ti_on_grey_gives_the_rgb_models_logits_for_the_replicated_image(real_weights):
    from vitmha.inference import eval_transform, pretrained_backbone, read_image

    sample = Path(__file__).resolve().parents[1] / "data" / "samples" / "chelsea.jpg"
    rgb_bb, _ = pretrained_backbone(REAL_NAME, str(real_weights))
    bb, pre = pretrained_backbone(REAL_NAME, str(real_weights), {"in_chans": 1})
    assert pre.in_chans == 1 and pre.mean == (0.5,) and pre.std == (0.5,)  # AugReg's 0.5 / 0.5, one channel
    grey = np.asarray(Image.open(sample).convert("L"), np.float32)[:, :, None] / 255
    x = eval_transform(pre, "classification")(image=grey)["image"][None]
    assert x.shape == (1, 1, 224, 224)
    with torch.no_grad():
        assert rel_err(rgb_bb(x.repeat(1, 3, 1, 1)), bb(x)) < 1e-5
    with pytest.raises(Exception, match=r"chelsea\.jpg: 3 channel\(s\) \(RGB"):
        read_image(str(sample), pre)


# ------------------------------------------------------------------------------------------ mean / std
def test_default_mean_std_follow_the_adapted_kernels():
    assert resolve_mean_std(in_chans=1) == ((sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,))
    mean, std = resolve_mean_std(in_chans=4)
    assert mean == IMAGENET_MEAN + IMAGENET_MEAN[:1] and std == IMAGENET_STD + IMAGENET_STD[:1]
    assert resolve_mean_std(backbone=REAL_NAME, in_chans=1) == ((0.5,), (0.5,))
    assert resolve_mean_std([0.2], [0.1], in_chans=13) == ((0.2,) * 13, (0.1,) * 13)  # one value for all


def test_explicit_mean_std_need_one_value_per_channel():
    with pytest.raises(ValueError, match=r"need 4 values .*in_chans=4"):
        resolve_mean_std([0.5, 0.5, 0.5], [0.2, 0.2, 0.2], in_chans=4)


# ------------------------------------------------------------------------------------------ reading
def test_grey_and_16_bit_images_keep_their_one_channel_as_float(tmp_path):
    g8 = np.random.default_rng(0).integers(0, 256, (12, 10), dtype=np.uint8)
    g16 = np.random.default_rng(1).integers(0, 65536, (12, 10), dtype=np.uint16)
    Image.fromarray(g8).save(tmp_path / "g.png")
    Image.fromarray(g8).save(tmp_path / "g.jpg", quality=100)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    tifffile.imwrite(tmp_path / "g16.tif", g16)
    np.testing.assert_allclose(read_channels(str(tmp_path / "g.png"), 1)[:, :, 0], g8 / 255, atol=1e-7)
    assert read_channels(str(tmp_path / "g.jpg"), 1).shape == (12, 10, 1)
    for name in ("g16.png", "g16.tif"):
        a = read_channels(str(tmp_path / name), 1)
        assert a.dtype == np.float32 and a.shape == (12, 10, 1)
        np.testing.assert_allclose(a[:, :, 0], g16 / 65535, atol=1e-7)
    np.testing.assert_allclose(read_channels(str(tmp_path / "g16.tif"), 1, max_pixel_value=4095)[:, :, 0],
                               g16 / 4095, rtol=1e-6)


def test_multi_band_tiff_reads_the_same_bands_in_every_layout(tmp_path):
    bands = np.random.default_rng(0).integers(0, 65536, (13, 9, 11), dtype=np.uint16)  # (C, H, W)
    tifffile.imwrite(tmp_path / "planar.tif", bands, planarconfig="separate")
    tifffile.imwrite(tmp_path / "pages.tif", bands)                                     # one page per band
    tifffile.imwrite(tmp_path / "contig.tif", np.moveaxis(bands, 0, -1), photometric="minisblack",
                     planarconfig="contig")
    want = np.moveaxis(bands, 0, -1) / 65535
    for name in ("planar.tif", "pages.tif", "contig.tif"):
        np.testing.assert_allclose(read_channels(str(tmp_path / name), 13), want, atol=1e-7, err_msg=name)


def test_an_image_with_another_channel_count_is_named(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match=r"rgb\.png: 3 channel\(s\) \(RGB.*expected in_chans=1"):
        read_channels(str(tmp_path / "rgb.png"), 1)
    assert "expected in_chans=4" in check_image(str(tmp_path / "rgb.png"), in_chans=4)
    tifffile.imwrite(tmp_path / "bands.tif", np.zeros((5, 8, 8), np.uint16))
    assert "5 channels" in check_image(str(tmp_path / "bands.tif"))  # read as RGB it would lose 2 bands


# ------------------------------------------------------------------------------------------ data modules
def _grey_folder(root: Path, size: int = 16, n: int = 6) -> Path:
    """root/{train,val}/{horizontal,vertical}/*.png: 8-bit grey noise with horizontal or vertical stripes."""
    rng = np.random.default_rng(0)
    stripes = (np.arange(size) // 2 % 2 * 120).astype(np.uint8)
    for split in ("train", "val"):
        for c, name in enumerate(("horizontal", "vertical")):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 100, (size, size), dtype=np.uint8)
                img += stripes[:, None] if c == 0 else stripes[None, :]
                Image.fromarray(img).save(root / split / name / f"{i}.png")
    return root


def test_grey_folder_gives_one_channel_batches_normalised_per_channel(tmp_path):
    root = _grey_folder(tmp_path / "grey")
    dm = ImageFolderDataModule(root=str(root), image_size=16, batch_size=12, num_workers=0, in_chans=1,
                               mean=[0.3], std=[0.2])
    dm.setup("fit")
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (12, 1, 16, 16) and x.dtype == torch.float32
    paths = [p for p, _ in dm.validate_files()["val"]][:12]
    want = np.stack([np.asarray(Image.open(p), np.float32) / 255 for p in paths])[:, None]
    np.testing.assert_allclose(x.numpy(), (want - 0.3) / 0.2, atol=1e-5)


def test_an_rgb_image_in_a_grey_folder_is_reported_by_name(tmp_path):
    root = _grey_folder(tmp_path / "grey")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "val" / "vertical" / "colour.png")
    dm = ImageFolderDataModule(root=str(root), image_size=16, num_workers=0, in_chans=1)
    with pytest.raises(DataValidationError, match=r"val/vertical/colour\.png: 3 channel\(s\) \(RGB.*in_chans=1"):
        dm.setup("fit")


def test_mean_std_auto_are_the_training_pixels_statistics_and_kept_for_predict(tmp_path):
    root = _grey_folder(tmp_path / "grey")
    dm = ImageFolderDataModule(root=str(root), image_size=16, num_workers=0, in_chans=1, mean="auto", std="auto")
    dm.setup("fit")
    pixels = np.concatenate([np.asarray(Image.open(p), np.float64).ravel() / 255
                             for p, _ in dm.validate_files()["train"]])
    np.testing.assert_allclose(dm.mean, [pixels.mean()], rtol=1e-6)  # pixels read as float32
    np.testing.assert_allclose(dm.std, [pixels.std()], rtol=1e-6)
    assert dm.hparams["mean"] == list(dm.mean) and dm.hparams["std"] == list(dm.std)  # what checkpoints hold
    fresh = ImageFolderDataModule(root=str(root), image_size=16, num_workers=0, in_chans=1, mean="auto", std="auto")
    fresh.load_state_dict(dm.state_dict())  # as Lightning restores it before predicting
    assert fresh.mean == dm.mean and fresh.std == dm.std


def test_colour_transforms_are_left_out_for_bands_and_refused_in_a_users_spec(tmp_path):
    root = _grey_folder(tmp_path / "grey")
    dm = ImageFolderDataModule(root=str(root), image_size=16, num_workers=0, in_chans=1)
    names = {type(t).__name__ for t in dm.train_transform.transforms}
    assert "RandomResizedCrop" in names
    # one channel keeps the colour ops albumentations applies to grey; 4 bands cannot take ColorJitter / ToGray
    seg = _band_seg_folder(tmp_path / "bands", bands=4, n_train=2, n_val=1)
    sdm = SegmentationFolderDataModule(root=str(seg), num_classes=2, image_size=16, num_workers=0, in_chans=4)
    assert "ColorJitter" not in str(sdm.train_transform) and "HorizontalFlip" in str(sdm.train_transform)
    with pytest.raises(ValueError, match=r"train_transforms: ColorJitter .*3-channel"):
        SegmentationFolderDataModule(root=str(seg), num_classes=2, image_size=16, num_workers=0, in_chans=4,
                                     train_transforms=["HorizontalFlip", "ColorJitter"])


def test_a_data_module_whose_channels_differ_from_the_models_stops_with_a_clear_error(tmp_path):
    import lightning as L

    from vitmha.tasks import ImageClassifier

    root = _grey_folder(tmp_path / "grey")
    dm = ImageFolderDataModule(root=str(root), image_size=16, batch_size=4, num_workers=0, in_chans=1)
    model = ImageClassifier(num_classes=2, warmup_epochs=0, backbone_kwargs=dict(img_size=16, patch_size=8,
                                                                                 embed_dim=16, depth=1, num_heads=2))
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    with pytest.raises(DataValidationError, match=r"in_chans: .*1 channel.*takes 3.*backbone_kwargs\.in_chans: 1"):
        trainer.fit(model, datamodule=dm)


def test_fashion_mnist_in_one_channel_is_the_first_channel_of_the_rgb_batch():
    from vitmha.data import FashionMNISTDataModule

    grey = FashionMNISTDataModule(image_size=28, augment=False, batch_size=8, backbone=REAL_NAME, in_chans=1)
    rgb = FashionMNISTDataModule(image_size=28, augment=False, batch_size=8, backbone=REAL_NAME)
    require_dataset(grey.setup, "fit")
    rgb.setup("fit")
    x1, y1 = next(iter(grey.val_dataloader()))
    x3, y3 = next(iter(rgb.val_dataloader()))
    assert x1.shape == (8, 1, 28, 28) and x3.shape == (8, 3, 28, 28)
    assert torch.equal(y1, y3) and torch.equal(x1[:, 0], x3[:, 0])
    with pytest.raises(ValueError, match="in_chans must be 1 .* or 3"):
        FashionMNISTDataModule(in_chans=2)


def test_digits_in_one_channel_train_a_grey_model_through_the_cli(tmp_path):
    """The built-in digits take in_chans 1 from the model's backbone_kwargs (one-channel batches equal to the
    RGB batches' first channel) and a one-channel ViT trains on them; the RGB module on a grey model is named."""
    import lightning as L

    from vitmha.cli import VitmhaCLI
    from vitmha.data import DigitsDataModule
    from vitmha.tasks import ImageClassifier

    grey = DigitsDataModule(image_size=16, augment=False, in_chans=1, mean=[0.5], std=[0.25])
    rgb = DigitsDataModule(image_size=16, augment=False, mean=[0.5], std=[0.25])     # one value for every channel
    grey.setup("fit"), rgb.setup("fit")
    (x1, y1), (x3, y3) = next(iter(grey.val_dataloader())), next(iter(rgb.val_dataloader()))
    assert x1.shape[1] == 1 and x3.shape[1] == 3
    assert torch.equal(y1, y3) and torch.equal(x1[:, 0], x3[:, 0])
    with pytest.raises(ValueError, match="in_chans must be 1 .* or 3"):
        DigitsDataModule(in_chans=4)

    kwargs = dict(in_chans=1, img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2)
    VitmhaCLI(args=["fit", "--model", "vitmha.tasks.ImageClassifier", "--model.init_args.backbone_kwargs",
                    json.dumps(kwargs), "--model.init_args.warmup_epochs", "0",
                    "--data", "vitmha.data.DigitsDataModule", "--data.init_args.image_size", "16",
                    "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1",
                    "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"])
    assert list(tmp_path.rglob("last.ckpt"))

    model = ImageClassifier(num_classes=10, warmup_epochs=0, backbone_kwargs=kwargs)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    with pytest.raises(DataValidationError, match=r"3 channel.*takes 1"):
        trainer.fit(model, datamodule=DigitsDataModule(image_size=16))


def test_nuclei_in_one_channel_is_the_first_channel_of_the_rgb_tiles():
    from vitmha.data import NucleiDataModule

    assert NucleiDataModule(in_chans=1).mean == (sum(IMAGENET_MEAN) / 3,)  # the RGB default, averaged
    grey = NucleiDataModule(batch_size=4, in_chans=1, mean=[0.4], std=[0.2])
    rgb = NucleiDataModule(batch_size=4, mean=[0.4], std=[0.2])  # one value for every channel
    require_dataset(grey.setup, "fit")
    rgb.setup("fit")
    (x1, m1), (x3, m3) = next(iter(grey.val_dataloader())), next(iter(rgb.val_dataloader()))
    assert x1.shape == (4, 1, 64, 64) and x3.shape == (4, 3, 64, 64)
    assert torch.equal(m1, m3) and torch.equal(x1[:, 0], x3[:, 0])


def test_the_cli_reads_images_with_the_models_in_chans(tmp_path):
    from vitmha.cli import VitmhaCLI

    root = _grey_folder(tmp_path / "grey")
    kwargs = json.dumps(dict(in_chans=1, img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2))
    cli = VitmhaCLI(args=["--model", "vitmha.tasks.ImageClassifier", "--model.init_args.backbone_kwargs", kwargs,
                          "--data", "vitmha.data.ImageFolderDataModule", "--data.init_args.root", str(root),
                          "--data.init_args.image_size", "16", "--trainer.default_root_dir", str(tmp_path)],
                    run=False)
    assert cli.datamodule.in_chans == 1 and len(cli.datamodule.mean) == 1


# ------------------------------------------------------------------------------------------ end to end
def _band_seg_folder(root: Path, bands: int = 13, n_train: int = 8, n_val: int = 3, size: int = 24) -> Path:
    """A synthetic multispectral segmentation folder: 16-bit TIFFs (train planar (C, H, W), val (H, W, C)) whose
    class-1 square is brighter in the odd bands only (no single RGB-like band pair shows it alone)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        (root / split / "masks").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            mask = np.zeros((size, size), np.uint8)
            y, x = rng.integers(0, size // 2, 2)
            mask[y:y + size // 2, x:x + size // 2] = 1
            img = rng.integers(1000, 3000, (bands, size, size)).astype(np.uint16)
            img[1::2, mask == 1] += 4000
            if split == "train":
                tifffile.imwrite(root / split / "images" / f"s{i}.tif", img, planarconfig="separate")
            else:
                tifffile.imwrite(root / split / "images" / f"s{i}.tif", np.moveaxis(img, 0, -1),
                                 photometric="minisblack", planarconfig="contig")
            Image.fromarray(mask).save(root / split / "masks" / f"s{i}.png")
    return root


def test_13_band_segmentation_trains_predicts_and_exports_through_the_tools(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from vitmha.cli import cli_main
    from vitmha.inference import eval_transform, load_task, preprocess_config, read_checkpoint, read_image

    root = _band_seg_folder(tmp_path / "bands")
    vit = dict(in_chans=13, img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2)
    load_tool("train").main([
        "--seed_everything", "0", "--model", "vitmha.tasks.SemanticSegmenter", "--model.init_args.head", "linear",
        "--model.init_args.backbone_kwargs", json.dumps(vit), "--model.init_args.warmup_epochs", "0",
        "--model.init_args.lr", "0.003", "--data", "vitmha.data.SegmentationFolderDataModule",
        "--data.init_args.root", str(root), "--data.init_args.num_classes", "2",
        "--data.init_args.image_size", "16", "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0",
        "--data.init_args.mean", "auto", "--data.init_args.std", "auto", "--trainer.max_epochs", "2",
        "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path / "runs"),
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"])
    run = next((tmp_path / "runs" / "lightning_logs").glob("version_*"))
    ckpt = run / "checkpoints" / "last.ckpt"
    saved = read_checkpoint(str(ckpt))
    assert saved["datamodule_hyper_parameters"]["in_chans"] == 13
    assert len(saved["datamodule_hyper_parameters"]["mean"]) == 13  # 'auto' replaced by the computed values

    images = sorted((root / "val" / "images").glob("*.tif"))
    load_tool("predict").main(["--checkpoint", ckpt, "--input", *images, "--output", tmp_path / "preds",
                               "--mode", "resize", "--no-progress"])  # as `vitmha predict`: no sliding window
    (root / "train").rename(tmp_path / "train_elsewhere")  # 'auto' mean/std must come from the checkpoint now
    import vitmha

    in_python = vitmha.load(ckpt).predict(images, mode="resize")
    for p, got in zip(images, in_python):  # the command and vitmha.load (mean/std from the checkpoint) agree
        tool = np.asarray(Image.open(tmp_path / "preds" / f"{p.stem}_mask.png"))
        assert tool.shape == (24, 24) and np.array_equal(tool, got["mask"]), p.name

    info = load_tool("export").main(["--checkpoint", ckpt, "--format", "onnx", "--output", tmp_path / "m.onnx"])
    assert info["max_abs_diff"] < 1e-4
    task = load_task(str(ckpt))
    pre = preprocess_config(task, saved)
    assert pre.in_chans == 13 and pre.raw
    x = torch.stack([eval_transform(pre, "segmentation")(image=read_image(str(p), pre))["image"] for p in images])
    assert x.shape == (3, 13, 16, 16)
    got = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"input": x.numpy()})[0]
    with torch.no_grad():
        want = task(x).numpy()
    assert got.shape == (3, 2, 16, 16) and np.abs(got - want).max() < 1e-4

    load_tool("export").main(["--checkpoint", ckpt, "--format", "safetensors", "--output", tmp_path / "bb.safetensors"])
    ref = timm.create_model(ARCH, pretrained=True, in_chans=13, img_size=16, patch_size=4, embed_dim=16, depth=2,
                            num_heads=2, num_classes=0, dynamic_img_size=True,
                            pretrained_cfg_overlay=dict(file=str(tmp_path / "bb.safetensors"), num_classes=0)).eval()
    with torch.no_grad():  # timm takes the 13-band backbone as it is
        assert rel_err(ref.forward_features(x), task.backbone_module().forward_features(x)) < 1e-5

    out = tmp_path / "att.png"
    maps = load_tool("attention").main(["--checkpoint", ckpt, "--input", images[0], "--output", out])
    assert out.is_file() and maps["grid"] == (4, 4)


def test_predict_names_an_image_with_the_wrong_channel_count(tmp_path, capsys):
    import lightning as L

    from vitmha.tasks import SemanticSegmenter

    root = _band_seg_folder(tmp_path / "bands", bands=4, n_train=2, n_val=1)
    dm = SegmentationFolderDataModule(root=str(root), num_classes=2, image_size=16, batch_size=2, num_workers=0,
                                      in_chans=4)
    task = SemanticSegmenter(num_classes=2, head="linear", warmup_epochs=0,
                             backbone_kwargs=dict(in_chans=4, img_size=16, patch_size=4, embed_dim=16, depth=1,
                                                  num_heads=2))
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    trainer.fit(task, datamodule=dm)
    trainer.save_checkpoint(tmp_path / "t.ckpt")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(SystemExit) as exc:
        load_tool("predict").main(["--checkpoint", tmp_path / "t.ckpt", "--input", tmp_path / "rgb.png",
                                   "--output", tmp_path / "o", "--no-progress"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "rgb.png: 3 channel(s)" in err and "in_chans=4" in err and "\n" not in err


def test_a_grey_model_from_the_real_vit_ti_fine_tunes_on_a_grey_folder(real_weights, tmp_path):
    import lightning as L

    from vitmha.tasks import ImageClassifier

    root = _grey_folder(tmp_path / "grey", size=32, n=8)
    L.seed_everything(0, verbose=False)
    dm = ImageFolderDataModule(root=str(root), image_size=32, batch_size=8, num_workers=0, in_chans=1,
                               backbone=REAL_NAME, scale=(1.0, 1.0))
    task = ImageClassifier(num_classes=2, backbone=REAL_NAME, pretrained=str(real_weights), lr=3e-4, warmup_epochs=0,
                           backbone_kwargs=dict(img_size=32, patch_size=8, in_chans=1))
    trainer = L.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(task, datamodule=dm)
    acc = trainer.validate(task, datamodule=dm, verbose=False)[0]["val/acc"]
    assert acc >= 0.9, acc
    trainer.save_checkpoint(tmp_path / "grey.ckpt")  # tools/predict.py reads the grey PNGs as the run did
    load_tool("predict").main(["--checkpoint", tmp_path / "grey.ckpt", "--input", root / "val",
                               "--output", tmp_path / "preds", "--no-progress"])
    import csv

    with open(tmp_path / "preds" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 16
    assert sum(Path(r["path"]).parent.name == r["label1"] for r in rows) / len(rows) == acc
