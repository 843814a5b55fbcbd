"""tools/export.py: ONNX (dynamic batch, onnxruntime parity), TorchScript, and timm-loadable safetensors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import load_tool  # noqa: F401
from vitmha.inference import load_task

export = load_tool("export")
SIZES = {"clf": 16, "seg": 32}


def _batch(size, n=3, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("which", ["clf", "seg"])
def test_onnx_matches_pytorch_on_a_batch_of_3(ckpts, tmp_path, which):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    out = tmp_path / f"{which}.onnx"
    info = export.main(["--checkpoint", ckpts[which], "--format", "onnx", "--output", out])
    model = onnx.load(str(out))
    assert model.opset_import[0].version >= 17
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"  # dynamic batch axis
    x = _batch(SIZES[which])
    with torch.no_grad():
        want = load_task(str(ckpts[which]))(x).numpy()
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    assert got.shape == want.shape
    if which == "seg":
        assert got.shape == (3, 4, 32, 32)  # per-pixel logits at the input size
    assert np.abs(got - want).max() < 1e-4
    assert info["max_abs_diff"] < 1e-4


def test_explicit_attention_path_exports_the_same_numbers(ckpts, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    task = load_task(str(ckpts["clf"]))
    model = export.Logits(task).eval()
    with export.explicit_attention(model):
        assert not any(getattr(m, "fused", False) for m in model.modules())
        torch.onnx.export(model, (_batch(16, 2),), str(tmp_path / "e.onnx"), input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}}, opset_version=17, dynamo=False)
    assert all(m.fused for m in model.modules() if hasattr(m, "fused"))  # restored
    x = _batch(16)
    got = ort.InferenceSession(str(tmp_path / "e.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        assert np.abs(got - task(x).numpy()).max() < 1e-4


@pytest.mark.parametrize("which", ["clf", "seg"])
def test_torchscript_returns_the_same_logits(ckpts, tmp_path, which):
    out = tmp_path / f"{which}.pt"
    export.main(["--checkpoint", ckpts[which], "--format", "torchscript", "--output", out])
    scripted = torch.jit.load(str(out))
    x = _batch(SIZES[which], seed=1)
    with torch.no_grad():
        assert torch.allclose(scripted(x), load_task(str(ckpts[which]))(x), atol=1e-5)


def test_safetensors_load_in_timm_with_the_printed_command(ckpts, tmp_path, capsys):
    timm = pytest.importorskip("timm")
    out = tmp_path / "clf.safetensors"
    info = export.main(["--checkpoint", ckpts["clf"], "--format", "safetensors", "--output", out])
    assert info["timm"] in capsys.readouterr().out
    model = eval(info["timm"], {"timm": timm}).eval()  # the exact command the tool printed
    x = _batch(16)
    with torch.no_grad():
        assert torch.allclose(model(x), load_task(str(ckpts["clf"]))(x), atol=1e-6)


def test_segmenter_backbone_safetensors_load_in_timm(ckpts, tmp_path):
    timm = pytest.importorskip("timm")
    info = export.main(["--checkpoint", ckpts["seg"], "--format", "safetensors", "--output", tmp_path / "bb.safetensors"])
    model = eval(info["timm"], {"timm": timm}).eval()
    x = _batch(32)
    with torch.no_grad():
        want = load_task(str(ckpts["seg"])).model.backbone.forward_features(x)
        assert torch.allclose(model.forward_features(x), want, atol=1e-6)


def test_missing_checkpoint_fails_cleanly_and_writes_nothing(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        export.main(["--checkpoint", tmp_path / "x.ckpt", "--format", "onnx", "--output", tmp_path / "m.onnx"])
    assert e.value.code == 2
    assert "x.ckpt: checkpoint not found" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()
