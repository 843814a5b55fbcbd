"""ImageClassifier: metrics, logging names, checkpoints, exact resume, EMA, freezing, non-finite loss."""
import csv
import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score
from torch.utils.data import DataLoader, TensorDataset

from vitmha.tasks import ImageClassifier
from vitmha.tasks.base import default_lr
from vitmha.tasks.classification import classification_metrics

TINY = dict(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2)
C = 5


def tiny_model(**kw):
    kw.setdefault("num_classes", C)
    return ImageClassifier(backbone_kwargs=TINY, warmup_epochs=0.5, **kw)


def loader(n=16, seed=0, bs=4, shuffle=False):
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, C, (n,), generator=g))
    return DataLoader(data, batch_size=bs, shuffle=shuffle)


def trainer(tmp_path, epochs=2, **kw):
    kw.setdefault("logger", CSVLogger(tmp_path, name="log"))
    return L.Trainer(max_epochs=epochs, accelerator="cpu", default_root_dir=tmp_path, enable_progress_bar=False,
                     enable_model_summary=False, log_every_n_steps=1, **kw)


def read_csv_columns(logger):
    with open(f"{logger.log_dir}/metrics.csv") as f:
        return set(next(csv.reader(f)))


def test_metrics_match_sklearn():
    preds = torch.tensor([0, 1, 2, 2, 4, 3, 0, 1, 1, 4, 2, 0])
    target = torch.tensor([0, 1, 1, 2, 4, 3, 3, 1, 0, 4, 2, 2])
    logits = torch.nn.functional.one_hot(preds, C).float()
    metrics = classification_metrics(C, "val/")
    metrics.update(logits, target)
    got = {k: float(v) for k, v in metrics.compute().items()}
    p, t = preds.numpy(), target.numpy()
    assert got["val/acc"] == pytest.approx(accuracy_score(t, p))
    assert got["val/f1"] == pytest.approx(f1_score(t, p, average="macro"))
    assert got["val/precision"] == pytest.approx(precision_score(t, p, average="macro"))
    assert got["val/recall"] == pytest.approx(recall_score(t, p, average="macro"))
    assert got["val/acc_top5"] == 1.0


def test_top5_only_with_five_or_more_classes():
    assert "acc_top5" not in classification_metrics(4, "val/")
    assert "acc_top5" in classification_metrics(5, "val/")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One 2-epoch fit + test shared by the tests below."""
    tmp = tmp_path_factory.mktemp("cls")
    L.seed_everything(0)
    model = tiny_model(ema_decay=0.9)
    tr = trainer(tmp)
    tr.fit(model, loader(shuffle=True), loader(seed=1))
    tr.test(model, loader(seed=2))
    return model, tr


def test_fit_logs_the_contract_metric_names(fitted):
    model, tr = fitted
    cols = read_csv_columns(tr.logger)
    for name in ["train/loss", "val/loss", "val/acc", "val/acc_top5", "val/f1", "val/precision", "val/recall",
                 "test/loss", "test/acc", "test/acc_top5", "test/f1", "test/precision", "test/recall"]:
        assert name in cols, name


def test_test_confusion_matrix_is_kept(fitted):
    model, _ = fitted
    assert model.test_confusion.shape == (C, C)
    assert int(model.test_confusion.sum()) == 16


def test_load_from_checkpoint_gives_the_same_logits(fitted, tmp_path):
    model, tr = fitted
    path = tmp_path / "m.ckpt"
    tr.save_checkpoint(path)
    loaded = ImageClassifier.load_from_checkpoint(path, map_location="cpu")
    x = torch.randn(3, 3, 16, 16)
    model.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
        assert torch.equal(model.model(x), loaded.model(x))
    assert loaded.hparams.ema_decay == 0.9
    for (name, a), b in zip(model.ema.state_dict().items(), loaded.ema.state_dict().values()):
        assert torch.equal(a, b), name


def test_checkpoint_with_ema_loads_as_pretrained_with_the_ema_weights(fitted, tmp_path):
    import vitmha

    model, tr = fitted
    path = tmp_path / "ema.ckpt"
    tr.save_checkpoint(path)
    with pytest.warns(UserWarning, match="loading the EMA weights"):
        bb = vitmha.create_backbone("vit_tiny_patch16_224", pretrained=str(path), num_classes=C, **TINY).eval()
    x = torch.randn(2, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        assert torch.equal(bb(x), model.ema.module(x))


def test_eval_forward_uses_ema_weights(fitted):
    model, _ = fitted
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), model.ema.module(x))
        assert not torch.equal(model(x), model.model(x))


def test_predict_step_returns_paths_probs_and_preds(fitted):
    model, _ = fitted
    model.eval()
    batch = {"image": torch.randn(3, 3, 16, 16), "path": ["a.png", "b.png", "c.png"],
             "orig_size": torch.tensor([[16, 16]] * 3)}
    with torch.no_grad():
        out = model.predict_step(batch, 0)
    assert out["path"] == ["a.png", "b.png", "c.png"]
    assert out["probs"].shape == (3, C)
    assert torch.allclose(out["probs"].sum(1), torch.ones(3))
    assert torch.equal(out["pred"], out["probs"].argmax(1))


class _StopAfter(L.Callback):
    def __init__(self, epochs):
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


def _fit(tmp_path, stop_after=None, ckpt_path=None):
    """3-epoch schedule with every source of randomness on; optionally stopped early like a killed run."""
    L.seed_everything(7)
    model = tiny_model(drop_path_rate=0.2, mixup_alpha=0.8, cutmix_alpha=1.0, ema_decay=0.9)
    tr = trainer(tmp_path, epochs=3, logger=False, enable_checkpointing=False,
                 callbacks=[_StopAfter(stop_after)] if stop_after else [])
    tr.fit(model, loader(shuffle=True), loader(seed=1), ckpt_path=ckpt_path)
    return model, tr


def test_resume_from_end_of_epoch_checkpoint_is_bitwise_identical(tmp_path):
    straight, _ = _fit(tmp_path / "a")
    _, tr = _fit(tmp_path / "b", stop_after=1)
    tr.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed, _ = _fit(tmp_path / "c", ckpt_path=str(tmp_path / "epoch1.ckpt"))
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_linear_probe_trains_only_the_head(tmp_path):
    L.seed_everything(0)
    model = tiny_model(freeze_backbone=True)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    trainer(tmp_path, epochs=1, logger=False, enable_checkpointing=False).fit(model, loader())
    after = model.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"head.weight", "head.bias"}


def test_freeze_blocks_keeps_the_embeddings_and_first_blocks_unchanged(tmp_path):
    L.seed_everything(0)
    model = tiny_model(freeze_blocks=1)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    trainer(tmp_path, epochs=1, logger=False, enable_checkpointing=False).fit(model, loader())
    after = model.model.state_dict()
    changed = {k.split(".")[0] + ("." + k.split(".")[1] if k.startswith("blocks.") else "")
               for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"blocks.1", "norm", "head"}


def test_freeze_blocks_deeper_than_the_backbone_is_an_error():
    with pytest.raises(ValueError, match="freeze_blocks=3, but the backbone has 2 blocks"):
        tiny_model(freeze_blocks=3)


def test_unfreeze_at_epoch_trains_the_backbone_afterwards(tmp_path):
    L.seed_everything(0)
    model = tiny_model(freeze_backbone=True, unfreeze_at_epoch=1)
    before = model.model.blocks[0].attn.qkv.weight.clone()
    trainer(tmp_path, epochs=2, logger=False, enable_checkpointing=False).fit(model, loader())
    assert not torch.equal(before, model.model.blocks[0].attn.qkv.weight)
    assert all(p.requires_grad for p in model.model.parameters())


class _NanAt:
    """Makes the model's forward return NaN logits on training batch ``batch_idx`` of epoch ``epoch``."""

    def __init__(self, epoch, batch_idx):
        self.epoch, self.batch_idx = epoch, batch_idx

    def callback(self):
        cb_self = self

        class Inject(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if trainer.current_epoch == cb_self.epoch and batch_idx == cb_self.batch_idx:
                    batch[0].fill_(float("nan"))

        return Inject()


def test_nonfinite_loss_error_names_epoch_and_step(tmp_path):
    model = tiny_model()
    tr = trainer(tmp_path, epochs=2, logger=False, enable_checkpointing=False,
                 callbacks=[_NanAt(epoch=1, batch_idx=2).callback()])
    with pytest.raises(FloatingPointError, match=r"non-finite loss \(nan\) at epoch 1, step 6"):
        tr.fit(model, loader())


def test_nonfinite_loss_skip_skips_counts_and_warns(tmp_path):
    L.seed_everything(0)
    model = tiny_model(nonfinite="skip")
    tr = trainer(tmp_path, epochs=1, callbacks=[_NanAt(epoch=0, batch_idx=1).callback()],
                 enable_checkpointing=False)
    with pytest.warns(RuntimeWarning, match="skipped 1 batch"):
        tr.fit(model, loader())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert tr.callback_metrics["train/skipped_batches"] == 1
    assert "train/skipped_batches" in read_csv_columns(tr.logger)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="scheduler"):
        tiny_model(scheduler="step")
    with pytest.raises(ValueError, match="nonfinite"):
        tiny_model(nonfinite="ignore")
    with pytest.raises(ValueError, match="unfreeze_at_epoch: needs freeze_backbone"):
        tiny_model(unfreeze_at_epoch=2)


def test_default_lr_depends_on_pretraining():
    assert tiny_model().learning_rate == 1e-3
    assert tiny_model(lr=2e-4).learning_rate == 2e-4
    assert default_lr(pretrained="w.safetensors", trains_few=False) == 1e-4
    assert default_lr(pretrained=True, trains_few=True) == 1e-3
    assert default_lr(pretrained=False, trains_few=False) == 1e-3


def test_tta_hflip_averages_the_softmax_of_the_image_and_its_mirror(tmp_path):
    L.seed_everything(0)
    model = tiny_model(tta_hflip=True)
    torch.nn.init.normal_(model.model.head.weight)  # the from-scratch init zeroes the head
    model.eval()
    x, y = next(iter(loader(n=8, bs=8, seed=3)))
    with torch.no_grad():
        ref = (model.model(x).softmax(1) + model.model(x.flip(-1)).softmax(1)) / 2
        out = model.predict_step(x, 0)
    assert torch.allclose(out["probs"], ref, atol=1e-6)
    assert not torch.allclose(out["probs"], model.model(x).softmax(1), atol=1e-4)
    tr = trainer(tmp_path, logger=CSVLogger(tmp_path, name="tta"))
    (metrics,) = tr.validate(model, DataLoader(TensorDataset(x, y), batch_size=8), verbose=False)
    assert metrics["val/loss"] == pytest.approx(float(torch.nn.functional.nll_loss(ref.log(), y)), rel=1e-5)
    assert metrics["val/acc"] == pytest.approx(float((ref.argmax(1) == y).float().mean()))


def test_without_tta_the_eval_loss_is_the_plain_cross_entropy(tmp_path):
    L.seed_everything(0)
    model = tiny_model()
    torch.nn.init.normal_(model.model.head.weight)
    x, y = next(iter(loader(n=8, bs=8, seed=3)))
    tr = trainer(tmp_path, logger=CSVLogger(tmp_path, name="plain"))
    (metrics,) = tr.validate(model, DataLoader(TensorDataset(x, y), batch_size=8), verbose=False)
    model.eval()
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(model.model(x), y)
    assert metrics["val/loss"] == pytest.approx(float(ref), rel=1e-5)
