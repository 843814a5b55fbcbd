"""The real ImageNet ViT-Ti/16 (AugReg, ../shared/weights): vitmha reproduces timm on it, classifies real
photos correctly with the preprocessing of its pretrained config, loads through `pretrained=True` from an
offline Hugging Face cache, and hands that config's mean/std to the data pipeline without being told."""
from __future__ import annotations

import csv

import pytest
import timm
import torch

import vitmha
from vitmha.inference import eval_transform, pretrained_backbone, read_image

from tests.conftest import REAL_NAME, REPO

SAMPLES = REPO / "data" / "samples"
CAT_CLASSES = range(281, 286)       # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def _timm(real_weights, **kw):
    return timm.create_model("vit_tiny_patch16_224", pretrained=True,
                             pretrained_cfg_overlay=dict(file=str(real_weights)), **kw).eval()


def _photo(name: str, size: int = 224) -> torch.Tensor:
    """data/samples/<name> through the pretrained config's eval transform (crop 0.9, mean = std = 0.5)."""
    _, pre = pretrained_backbone("vit_tiny_patch16_224", False)
    pre.image_size = size
    return eval_transform(pre, "classification")(image=read_image(str(SAMPLES / name)))["image"][None]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the reference's largest magnitude."""
    return ((a - b).abs().max() / a.abs().max()).item()


@pytest.mark.parametrize("kw, size", [({}, 224), ({"img_size": 112}, 112), ({"img_size": 112, "patch_size": 8}, 112)],
                         ids=["224px", "112px-resampled-pos-embed", "112px-patch8-resampled-kernel"])
def test_logits_and_intermediates_equal_timm(real_weights, kw, size):
    ref = _timm(real_weights, **kw)
    ours = vitmha.create_backbone("vit_tiny_patch16_224", pretrained=str(real_weights), **kw).eval()
    x = torch.cat([_photo("chelsea.jpg", size), _photo("coffee.jpg", size)])
    with torch.no_grad():
        assert _rel(ref(x), ours(x)) <= 1e-5
        a = ref.forward_intermediates(x, indices=4, intermediates_only=True)
        b = ours.forward_intermediates(x, indices=4, intermediates_only=True)
    assert len(a) == len(b) == 4
    for u, v in zip(a, b):
        assert u.shape == v.shape and _rel(u, v) <= 1e-5


def test_classifies_real_photos(real_weights):
    bb = vitmha.create_backbone("vit_tiny_patch16_224", pretrained=str(real_weights)).eval()
    with torch.no_grad():
        probs = bb(torch.cat([_photo("chelsea.jpg"), _photo("coffee.jpg")])).softmax(-1)
    cat, coffee = probs.argmax(-1).tolist()
    assert cat in CAT_CLASSES and coffee == ESPRESSO
    assert probs[0, list(CAT_CLASSES)].sum() > 0.9 and probs[1, ESPRESSO] > 0.7


def test_pretrained_true_reads_the_offline_hub_cache(offline_hub, real_weights):
    from safetensors.torch import load_file

    bb = vitmha.create_backbone(REAL_NAME, pretrained=True)
    expected = load_file(str(real_weights))
    assert all(torch.equal(v, expected[k]) for k, v in bb.state_dict().items())
    # and timm itself, through its own pretrained config, finds the same file
    ref = timm.create_model(REAL_NAME, pretrained=True)
    assert torch.equal(ref.head.weight, bb.head.weight)
    assert bb.pretrained_cfg["mean"] == bb.pretrained_cfg["std"] == (0.5, 0.5, 0.5)


def test_pretrained_true_without_the_file_says_how_to_get_it(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(vitmha.models.WeightsError, match="not available here"):
        vitmha.create_backbone(REAL_NAME, pretrained=True)


def test_cli_takes_mean_std_from_the_pretrained_config(offline_hub, tmp_path):
    """Only the backbone is named: the ImageFolder pipeline normalises with the tag's mean = std = 0.5."""
    from PIL import Image

    from vitmha.cli import VitmhaCLI

    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / "imgs" / split / c).mkdir(parents=True)
            Image.new("RGB", (20, 20), (200, 10, 10) if c == "a" else (10, 10, 200)).save(
                tmp_path / "imgs" / split / c / "0.png")
    cli = VitmhaCLI(args=["--model", "vitmha.tasks.ImageClassifier", "--model.init_args.backbone", REAL_NAME,
                          "--model.init_args.pretrained", "true",
                          "--model.init_args.backbone_kwargs", "{img_size: 32, patch_size: 8}",
                          "--data", "vitmha.data.ImageFolderDataModule", "--data.init_args.root",
                          str(tmp_path / "imgs"), "--data.init_args.image_size", "32",
                          "--trainer.default_root_dir", str(tmp_path / "run")], run=False)
    assert cli.datamodule.mean == cli.datamodule.std == (0.5, 0.5, 0.5)
    assert cli.model.hparams.num_classes == 2
    # the encoder is the real one (block weights equal the file's), with a fresh 2-class head
    from safetensors.torch import load_file

    w = load_file(str(offline_hub.glob("models--*/snapshots/*/model.safetensors").__next__()))
    assert torch.equal(cli.model.model.blocks[5].mlp.fc1.weight, w["blocks.5.mlp.fc1.weight"])


def test_keep_blocks_through_the_cli_is_timms_first_blocks(offline_hub, tmp_path):
    """`backbone_kwargs: {keep_blocks: 9}` with `pretrained: true`: the model's blocks are the file's first 9,
    and its tokens after them equal timm's full model's 9th intermediate (before the final norm)."""
    from vitmha.cli import VitmhaCLI

    real = next(offline_hub.glob("models--*/snapshots/*/model.safetensors"))
    with pytest.warns(UserWarning, match=r"keeping the first 9 of the checkpoint's 12 blocks"):
        cli = VitmhaCLI(args=["--model", "vitmha.tasks.ImageClassifier", "--model.init_args.backbone", REAL_NAME,
                              "--model.init_args.pretrained", "true", "--model.init_args.num_classes", "10",
                              "--model.init_args.backbone_kwargs", "{img_size: 28, patch_size: 7, keep_blocks: 9}",
                              "--data", "vitmha.data.DigitsDataModule", "--data.init_args.image_size", "28",
                              "--trainer.default_root_dir", str(tmp_path / "run")], run=False)
    ours = cli.model.model.eval()
    assert len(ours.blocks) == 9
    ref = _timm(real, img_size=28, patch_size=7)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        a = ref.forward_intermediates(x, indices=[8], norm=False, intermediates_only=True, output_fmt="NLC")[0]
        b = ours.forward_intermediates(x, indices=[8], norm=False, intermediates_only=True, output_fmt="NLC")[0]
    assert a.shape == b.shape and _rel(a, b) <= 1e-5


def test_zero_shot_predict_names_the_imagenet_classes(offline_hub, tmp_path):
    from tests.helpers import load_tool

    predict = load_tool("predict")
    out = tmp_path / "preds"
    predict.main(["--backbone", REAL_NAME, "--pretrained", "true", "--input", SAMPLES / "chelsea.jpg",
                  SAMPLES / "coffee.jpg", SAMPLES / "astronaut.jpg", "--output", out, "--no-progress"])
    rows = {r["path"].rsplit("/", 1)[-1]: r for r in csv.DictReader(open(out / "predictions.csv"))}
    assert list(rows["chelsea.jpg"])[:5] == ["path", "label1", "prob1", "label2", "prob2"]
    cats = set(pretrained_backbone(REAL_NAME, False)[1].classes[i] for i in CAT_CLASSES)
    assert rows["chelsea.jpg"]["label1"] in cats
    assert rows["coffee.jpg"]["label1"] == "espresso"
    assert float(rows["coffee.jpg"]["prob1"]) > 0.7


def test_attention_rollout_lands_on_the_cat(real_weights):
    """The cat of chelsea.jpg (outlined by hand) on a grey canvas covers 14 % of the image; the rollout of the
    class token's attention puts 0.40 on it (measured; benchmarks/attention_share.py has every layer)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("attention_share", REPO / "benchmarks" / "attention_share.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bb, pre = pretrained_backbone(REAL_NAME, str(real_weights))
    pre.crop_pct = None
    (_, photo, photo_mask), (_, grey, grey_mask) = bench.cat_scenes()
    area, cls, rollout, _ = bench.attention_shares(bb, pre, grey, grey_mask)
    assert 0.1 < area < 0.2
    assert rollout[-1] > 2.5 * area
    assert max(cls) > 4 * area


def test_timm_data_pipeline_takes_the_real_model(real_weights):
    """timm.data reads vitmha's pretrained_cfg as its own: the same config, transform and classes."""
    from timm.data import create_transform, resolve_data_config
    from PIL import Image

    bb = vitmha.create_backbone(REAL_NAME, pretrained=str(real_weights)).eval()
    assert bb.pretrained_cfg == timm.create_model(REAL_NAME).pretrained_cfg
    config = resolve_data_config(model=bb)
    assert config == resolve_data_config(model=_timm(real_weights))
    x = create_transform(**config)(Image.open(SAMPLES / "coffee.jpg").convert("RGB"))[None]
    with torch.no_grad():
        assert bb(x).argmax(-1).item() == ESPRESSO
