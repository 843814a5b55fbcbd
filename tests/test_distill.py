"""The ``distill`` option (vitmha.tasks.distill): losses against hand-computed KL/CE and timm's distillation
tasks, the teacher frozen and out of the student's checkpoint, and a distilled run that resumes bitwise."""
from __future__ import annotations

import json
import warnings

import lightning as L
import pytest
import timm
import torch
import torch.nn.functional as F

from tests.helpers import CLF_BACKBONE, MEAN, STD, TINY_VIT, classifier_args, make_folder, run_dirs
from vitmha.tasks.base import TaskConfigError
from vitmha.tasks.distill import (Distiller, Teacher, hard_binary_distillation_loss, hard_distillation_loss,
                                  parse_distill, soft_binary_distillation_loss, soft_distillation_loss)

TIMM_TINY = dict(img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2, num_classes=5)


def _logits(seed, shape=(6, 5)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3


# ------------------------------------------------------------------------------------------------ losses
@pytest.mark.parametrize("tau", [1.0, 2.0, 4.0])
def test_soft_loss_is_the_hand_computed_kl_times_tau_squared(tau):
    s, t = _logits(0).double(), _logits(1).double()
    ps, pt = (s / tau).softmax(-1), (t / tau).softmax(-1)
    hand = (pt * (pt.log() - ps.log())).sum(-1).mean() * tau ** 2
    assert soft_distillation_loss(s, t, tau).item() == pytest.approx(hand.item(), rel=1e-5)
    ref = F.kl_div((s / tau).log_softmax(-1), (t / tau).softmax(-1), reduction="batchmean") * tau ** 2  # torch's KL
    assert soft_distillation_loss(s, t, tau).item() == pytest.approx(ref.item(), rel=1e-5)
    assert soft_distillation_loss(t, t, tau).item() == pytest.approx(0.0, abs=1e-6)
    # log-probabilities of the teacher (what a vitmha teacher gives) are its logits up to a shift
    assert soft_distillation_loss(s, t.log_softmax(-1), tau).item() == pytest.approx(hand.item(), rel=1e-5)


def test_hard_loss_is_cross_entropy_to_the_teachers_argmax():
    s, t = _logits(0), _logits(1)
    hand = -s.log_softmax(-1).gather(1, t.argmax(-1, keepdim=True)).mean()
    assert hard_distillation_loss(s, t).item() == pytest.approx(hand.item(), rel=1e-6)


def test_binary_losses_are_the_bernoulli_kl_and_bce_to_the_teachers_labels():
    from torch.distributions import Bernoulli, kl_divergence

    s, t, tau = _logits(0), _logits(1), 2.0
    ref = kl_divergence(Bernoulli(logits=t / tau), Bernoulli(logits=s / tau)).mean() * tau ** 2
    assert soft_binary_distillation_loss(s, t, tau).item() == pytest.approx(ref.item(), rel=1e-5)
    labels = (t.sigmoid() > 0.5).float()
    ref = -(labels * s.sigmoid().log() + (1 - labels) * (1 - s.sigmoid()).log()).mean()
    assert hard_binary_distillation_loss(s, labels).item() == pytest.approx(ref.item(), rel=1e-5)


def _distiller(student, teacher_module, kind="soft", alpha=0.5, tau=1.0, token=False):
    """A Distiller with a timm teacher, the student's batches normalised as its pretrained config says."""
    d = Distiller(parse_distill({"teacher": "t.ckpt", "kind": kind, "alpha": alpha, "tau": tau, "token": token}),
                  "classification", 5)
    cfg = teacher_module.pretrained_cfg
    d.teacher = Teacher(teacher_module, lambda m, x: m(x), cfg["mean"], cfg["std"], None, 5)
    d.mean, d.std = tuple(student.pretrained_cfg["mean"]), tuple(student.pretrained_cfg["std"])
    return d


@pytest.mark.parametrize("alpha,tau", [(0.5, 1.0), (0.3, 4.0)])
def test_the_total_loss_equals_timms_logit_distillation_task(alpha, tau):
    from timm.task import LogitDistillationTask

    torch.manual_seed(0)
    student, teacher = timm.create_model("vit_tiny_patch16_224", **TIMM_TINY), timm.create_model(
        "vit_tiny_patch16_224", **TIMM_TINY)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 4])
    ref = LogitDistillationTask(student, teacher, criterion=torch.nn.CrossEntropyLoss(), temperature=tau,
                                task_loss_weight=1 - alpha, distill_loss_weight=alpha, verbose=False)
    ref.train()
    expected = ref(x, y)["loss"]
    student.train()
    got = _distiller(student, teacher, "soft", alpha, tau).loss(None, x, student(x), y, F.cross_entropy)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_token_distillation_equals_timms_token_task_on_a_distilled_deit(kind):
    from timm.task import TokenDistillationTask

    torch.manual_seed(0)
    student = timm.create_model("deit_tiny_distilled_patch16_224", **TIMM_TINY)
    teacher = timm.create_model("vit_tiny_patch16_224", **TIMM_TINY)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 4])
    ref = TokenDistillationTask(student, teacher, criterion=torch.nn.CrossEntropyLoss(), distill_type=kind,
                                temperature=2.0, task_loss_weight=0.5, distill_loss_weight=0.5, verbose=False)
    ref.train()
    expected = ref(x, y)["loss"]
    assert student.pretrained_cfg["mean"] != teacher.pretrained_cfg["mean"]  # the teacher's batch is re-normalised
    out = student(x)  # set_distilled_training(True) by timm's task: (class logits, distillation logits)
    assert isinstance(out, tuple)
    got = _distiller(student, teacher, kind, 0.5, 2.0, token=True).loss(None, x, out, y, F.cross_entropy)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


# ------------------------------------------------------------------------------------------------ the option
@pytest.mark.parametrize("value,message", [
    ({"kind": "soft"}, "distill.teacher"),
    ({"teacher": "t.ckpt", "kind": "medium"}, "distill.kind"),
    ({"teacher": "t.ckpt", "alpha": 1.5}, "distill.alpha"),
    ({"teacher": "t.ckpt", "tau": 0}, "distill.tau"),
    ({"teacher": "t.ckpt", "temperature": 2}, "distill.temperature: unknown key"),
    ({"teacher": "t.ckpt", "token": "yes"}, "distill.token"),
    ("t.ckpt", "distill: expected a mapping"),
])
def test_bad_distill_options_are_one_line_errors_naming_the_key(value, message):
    with pytest.raises(TaskConfigError, match=message):
        parse_distill(value)


def test_token_needs_a_distilled_architecture():
    from vitmha.tasks import ImageClassifier

    with pytest.raises(TaskConfigError, match="distill.token: vit_tiny_patch16_224 has no distillation token"):
        ImageClassifier(num_classes=3, backbone_kwargs=CLF_BACKBONE, distill={"teacher": "t.ckpt", "token": True})


def test_the_teacher_gets_its_own_normalisation_grey_channels_and_size():
    from vitmha.robustness import to_model, to_pixels

    t = Teacher(torch.nn.Sequential(torch.nn.Flatten()), lambda m, x: m(x), (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), 8, 5)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(t.inputs(x, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)), x)  # same statistics: the batch as it is
    assert torch.allclose(t.inputs(x, MEAN, STD), to_model(to_pixels(x, MEAN, STD), t.mean, t.std), atol=1e-6)
    grey = torch.randn(2, 1, 16, 16)
    p = to_pixels(grey, (0.5,), (0.25,)).expand(-1, 3, -1, -1)
    ref = to_model(F.interpolate(p, size=(8, 8), mode="bicubic", align_corners=False), t.mean, t.std)
    assert torch.allclose(t.inputs(grey, (0.5,), (0.25,)), ref, atol=1e-6)


# ------------------------------------------------------------------------------------------------ in a task
def _trainer(root, **kwargs) -> L.Trainer:
    return L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=root, **kwargs)


def _dm(root):
    from vitmha.data import ImageFolderDataModule

    return ImageFolderDataModule(root=str(root), image_size=16, batch_size=4, num_workers=0, mean=MEAN, std=STD)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny fitted 3-class teacher checkpoint and its data."""
    from vitmha.tasks import ImageClassifier

    base = tmp_path_factory.mktemp("distill")
    root = make_folder(base / "colours")
    L.seed_everything(0, verbose=False)
    task = ImageClassifier(num_classes=3, backbone_kwargs={**CLF_BACKBONE, "depth": 3}, warmup_epochs=0, lr=3e-3)
    tr = _trainer(base)
    tr.fit(task, datamodule=_dm(root))
    tr.save_checkpoint(base / "teacher.ckpt")
    return {"ckpt": base / "teacher.ckpt", "root": root, "base": base}


def test_a_distilled_step_is_the_mix_of_the_task_loss_and_the_teachers_kl(teacher, tmp_path):
    from vitmha.inference import load_task
    from vitmha.tasks import ImageClassifier

    L.seed_everything(0, verbose=False)
    spec = {"teacher": str(teacher["ckpt"]), "kind": "soft", "alpha": 0.7, "tau": 2.0}
    student = ImageClassifier(num_classes=3, backbone_kwargs=CLF_BACKBONE, distill=spec, label_smoothing=0.1)
    trainer = _trainer(tmp_path, max_steps=1)
    trainer.fit(student, datamodule=_dm(teacher["root"]))  # setup('fit') loads the teacher
    t = student.distiller.teacher
    assert t is not None and not t.module.training
    assert not any(p.requires_grad for p in t.module.parameters())
    ref_teacher = load_task(str(teacher["ckpt"]))
    for (k, a), b in zip(t.module.state_dict().items(), ref_teacher.state_dict().values()):
        assert torch.equal(a, b), k  # never trained
    student.train()
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        logits = student.model(x)
        expected = 0.3 * student.train_loss(logits, y) + 0.7 * soft_distillation_loss(
            logits, ref_teacher.eval_log_probs(x), 2.0)
        got = student.distiller.loss(student, x, logits, y, student.train_loss)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    assert not any(k.startswith(("teacher", "distiller")) for k in student.state_dict())


def test_the_student_checkpoint_holds_no_teacher_and_loads_without_it(teacher, tmp_path):
    import shutil

    import vitmha
    from vitmha.tasks import ImageClassifier

    moved = tmp_path / "teacher.ckpt"
    shutil.copy(teacher["ckpt"], moved)
    L.seed_everything(0, verbose=False)
    student = ImageClassifier(num_classes=3, backbone_kwargs=CLF_BACKBONE, warmup_epochs=0,
                              distill={"teacher": str(moved), "kind": "hard"})
    trainer = _trainer(tmp_path)
    trainer.fit(student, datamodule=_dm(teacher["root"]))
    trainer.save_checkpoint(tmp_path / "student.ckpt")
    moved.unlink()  # the teacher is gone: the student still loads, tests and predicts
    ckpt = torch.load(tmp_path / "student.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["distill"]["teacher"] == str(moved)
    plain = ImageClassifier(num_classes=3, backbone_kwargs=CLF_BACKBONE)
    assert set(ckpt["state_dict"]) == set(plain.state_dict())  # the student's weights only
    pred = vitmha.load(tmp_path / "student.ckpt").predict(sorted(teacher["root"].glob("test/*/*.png"))[:1])
    assert pred[0]["label"] in ("blue", "green", "red")


def test_a_teacher_with_other_classes_or_a_missing_file_is_one_error(teacher, tmp_path):
    from vitmha.tasks import ImageClassifier

    four = ImageClassifier(num_classes=4, backbone_kwargs=CLF_BACKBONE, distill={"teacher": str(teacher["ckpt"])})
    with pytest.raises(TaskConfigError, match="has 3 outputs, the student 4 classes"):
        four.distiller.prepare(four)
    gone = ImageClassifier(num_classes=3, backbone_kwargs=CLF_BACKBONE, distill={"teacher": str(tmp_path / "no.ckpt")})
    with pytest.raises(TaskConfigError, match="no such file"):
        gone.distiller.prepare(gone)


def test_a_timm_named_teacher_with_its_pretrained_weights(teacher, tmp_path):
    from vitmha.models import create_backbone
    from vitmha.models.weights import save_timm_safetensors
    from vitmha.tasks import ImageClassifier

    weights = tmp_path / "t.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        save_timm_safetensors(create_backbone("vit_tiny_patch16_224", num_classes=3, **CLF_BACKBONE), weights)
    student = ImageClassifier(num_classes=3, backbone_kwargs=CLF_BACKBONE, distill={
        "teacher": "vit_tiny_patch16_224", "teacher_pretrained": str(weights),
        "teacher_kwargs": {**CLF_BACKBONE, "num_classes": 3}})
    student.distiller.prepare(student)
    t = student.distiller.teacher
    x = torch.randn(2, 3, 16, 16)
    ref = create_backbone("vit_tiny_patch16_224", pretrained=str(weights), num_classes=3, **CLF_BACKBONE).eval()
    assert torch.allclose(student.distiller.teacher_logits(x), ref(t.inputs(x, student.distiller.mean,
                                                                             student.distiller.std)), atol=1e-6)


def test_a_distilled_run_resumes_to_the_same_weights(tmp_path):
    from tests.test_resume import max_abs_diff
    from vitmha.cli import cli_main

    def fit(root, epochs, *extra):
        cli_main(["fit", *classifier_args(root, "--trainer.max_epochs", str(epochs), "--trainer.deterministic", "true",
                                          "--model.init_args.scheduler", "constant", *extra)])
        return run_dirs(root)[-1] / "checkpoints" / "last.ckpt"

    teacher_ckpt = fit(tmp_path / "teacher", 1)
    distill = json.dumps({"teacher": str(teacher_ckpt), "kind": "soft", "alpha": 0.5, "tau": 2.0})
    args = ("--model.init_args.distill", distill, "--model.init_args.drop_path_rate", "0.1",
            "--model.init_args.backbone_kwargs", json.dumps({**json.loads(TINY_VIT), "depth": 2}))
    first = fit(tmp_path / "a", 1, *args)
    resumed = fit(tmp_path / "a", 2, *args, "--ckpt_path", str(first))
    straight = fit(tmp_path / "b", 2, *args)
    plain = fit(tmp_path / "c", 2, *args[2:])
    assert max_abs_diff(resumed, straight) == 0.0
    assert max_abs_diff(plain, straight) > 0  # the teacher changed the training


def test_token_distillation_trains_the_distillation_head_on_the_teacher(teacher, tmp_path):
    from vitmha.inference import load_task
    from vitmha.tasks import ImageClassifier

    L.seed_everything(0, verbose=False)
    spec = {"teacher": str(teacher["ckpt"]), "kind": "hard", "alpha": 0.5, "token": True}
    student = ImageClassifier(backbone="deit_tiny_distilled_patch16_224", num_classes=3, backbone_kwargs=CLF_BACKBONE,
                              warmup_epochs=0, distill=spec)
    trainer = _trainer(tmp_path)
    trainer.fit(student, datamodule=_dm(teacher["root"]))
    student.train()
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    ref_teacher = load_task(str(teacher["ckpt"]))
    with torch.no_grad():
        cls, dist = student.model(x)  # training: both heads
        expected = 0.5 * student.train_loss(cls, y) + 0.5 * F.cross_entropy(dist, ref_teacher.eval_log_probs(x).argmax(-1))
        got = student.distiller.loss(student, x, (cls, dist), y, student.train_loss)
        assert got.item() == pytest.approx(expected.item(), rel=1e-6)
        student.eval()
        assert torch.allclose(student(x), (student.model.head(student.model.forward_features(x)[:, 0])
                                           + student.model.head_dist(student.model.forward_features(x)[:, 1])) / 2,
                              atol=1e-6)  # inference: the mean of the two heads
    trainer.save_checkpoint(tmp_path / "deit.ckpt")
    loaded = load_task(str(tmp_path / "deit.ckpt"))
    assert torch.allclose(loaded(x), student(x), atol=1e-6)


def test_a_multilabel_student_mixes_its_bce_with_the_teachers_bernoulli_kl(tmp_path):
    from vitmha.inference import load_task
    from vitmha.tasks import MultiLabelClassifier

    torch.manual_seed(0)
    teacher = MultiLabelClassifier(num_classes=4, backbone_kwargs=CLF_BACKBONE)
    path = tmp_path / "ml_teacher.ckpt"
    torch.save({"state_dict": teacher.state_dict(), "hyper_parameters": dict(teacher.hparams),
                "pytorch-lightning_version": L.__version__}, path)
    spec = {"teacher": str(path), "kind": "soft", "alpha": 0.4, "tau": 2.0}
    student = MultiLabelClassifier(num_classes=4, backbone_kwargs=CLF_BACKBONE, distill=spec)
    student.distiller.prepare(student)
    t = student.distiller.teacher
    assert not t.module.training and not any(p.requires_grad for p in t.module.parameters())
    x, y = torch.randn(3, 3, 16, 16), torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0], [1, 1, 1, 0]]).float()
    ref_teacher = load_task(str(path)).eval()
    student.train()
    out = student.model(x)
    with torch.no_grad():
        teacher_logits = torch.logit(ref_teacher.eval_probs(x), eps=1e-7)
    weight = student.train_loss_weight()
    expected = 0.6 * student.loss(out, y, weight) + 0.4 * soft_binary_distillation_loss(out, teacher_logits, 2.0)
    got = student.distiller.loss(student, x, out, y, lambda o, target: student.loss(o, target, weight))
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    got.backward()  # the gradient reaches the student only
    assert student.model.head.weight.grad is not None
    assert all(p.grad is None for p in t.module.parameters())
    assert not any(k.startswith(("teacher", "distiller")) for k in student.state_dict())
