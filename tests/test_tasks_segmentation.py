"""SemanticSegmenter: logging names, checkpoints, sliding-window inference, predict at original size."""
import csv

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from vitmha.tasks import SemanticSegmenter
from vitmha.tasks.segmentation import sliding_window_inference

TINY = dict(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2)
K = 3


def tiny_model(**kw):
    kw.setdefault("num_classes", K)
    return SemanticSegmenter(backbone_kwargs=TINY, warmup_epochs=0.5, **kw)


def loader(n=8, seed=0, size=(32, 32)):
    g = torch.Generator().manual_seed(seed)
    masks = torch.randint(0, K, (n, *size), generator=g)
    masks[:, :4, :4] = 255
    return DataLoader(TensorDataset(torch.randn(n, 3, *size, generator=g), masks), batch_size=4)


@pytest.mark.parametrize("head", ["linear", "uper"])
def test_fit_logs_the_contract_metric_names(tmp_path, head):
    L.seed_everything(0)
    model = tiny_model(head=head, head_kwargs={"channels": 8} if head == "uper" else None,
                       class_names=["background", "cat", "road sign"], dice_weight=0.5)
    tr = L.Trainer(max_epochs=2, accelerator="cpu", logger=CSVLogger(tmp_path, name="log"), enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=tmp_path, log_every_n_steps=1)
    tr.fit(model, loader(), loader(seed=1))
    tr.test(model, loader(seed=2))
    with open(f"{tr.logger.log_dir}/metrics.csv") as f:
        cols = set(next(csv.reader(f)))
    for stage in ["val", "test"]:
        for m in ["loss", "miou", "pixel_acc", "dice", "iou_background", "iou_cat", "iou_road_sign"]:
            assert f"{stage}/{m}" in cols, f"{stage}/{m}"
    assert "train/loss" in cols
    assert model.test_confusion.shape == (K, K)
    assert int(model.test_confusion.sum()) == 8 * (32 * 32 - 16)  # ignored pixels not counted

    path = tmp_path / "seg.ckpt"
    tr.save_checkpoint(path)
    loaded = SemanticSegmenter.load_from_checkpoint(path, map_location="cpu").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded(x))


def test_all_ignored_batch_has_zero_loss():
    model = tiny_model()
    loss = model.loss(torch.randn(2, K, 8, 8), torch.full((2, 8, 8), 255))
    assert loss.item() == 0.0


def test_sliding_window_equal_to_image_is_a_plain_forward():
    model = tiny_model().eval()
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        assert torch.allclose(model.sliding_window_inference(x, window=(32, 48), stride=16), model(x), atol=1e-6)
        plain = model.model(x)
        slid = sliding_window_inference(model.model, x, (32, 48), (32, 48), K)
    assert torch.allclose(slid, plain, atol=1e-6)


def test_sliding_window_of_a_constant_model_is_that_constant():
    const = torch.tensor([1.0, -2.0, 0.5]).view(1, K, 1, 1)

    def fn(x):
        return const.expand(x.shape[0], K, *x.shape[-2:])

    out = sliding_window_inference(fn, torch.randn(2, 3, 70, 45), window=32, stride=20, num_classes=K)
    assert out.shape == (2, K, 70, 45)
    assert torch.allclose(out, const.expand_as(out))


def test_sliding_window_pads_images_smaller_than_the_window():
    seen = []

    def fn(x):
        seen.append(tuple(x.shape[-2:]))
        return x[:, :1].repeat(1, K, 1, 1)

    x = torch.randn(1, 3, 20, 50)
    out = sliding_window_inference(fn, x, window=32, stride=16, num_classes=K)
    assert set(seen) == {(32, 32)}
    assert out.shape == (1, K, 20, 50)
    assert torch.allclose(out[:, 0], x[:, 0])  # identity-like fn: averaging overlaps changes nothing


def test_predict_returns_masks_at_the_original_size():
    model = tiny_model(slide_window=32, slide_stride=16).eval()
    batch = {"image": torch.randn(2, 3, 32, 64), "path": ["a.png", "b.png"],
             "orig_size": torch.tensor([[100, 200], [31, 17]])}
    with torch.no_grad():
        out = model.predict_step(batch, 0)
    assert out["path"] == ["a.png", "b.png"]
    assert [tuple(m.shape) for m in out["mask"]] == [(100, 200), (31, 17)]
    assert all(m.dtype == torch.int64 and int(m.max()) < K for m in out["mask"])


def test_inputs_not_divisible_by_the_patch_size_are_padded():
    model = tiny_model().eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 30, 45)).shape == (1, K, 30, 45)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="head: expected one of"):
        tiny_model(head="fcn")
    with pytest.raises(ValueError, match="class_names: 2 names"):
        tiny_model(class_names=["a", "b"])
    with pytest.raises(ValueError, match="ignore_index: 1 is a class index"):
        tiny_model(ignore_index=1)
