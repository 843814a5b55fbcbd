"""vitmha.precision: bf16 and int8 logits against fp32, the emulated-bf16 warning, ``--precision`` and
``export --int8`` through the installed command."""
from __future__ import annotations

import copy
import csv
import warnings

import pytest
import torch

import vitmha
from tests.helpers import randomize, run_tool
from vitmha import precision

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10)
BF16_TOL = 0.05   # max |logit| difference relative to the largest fp32 logit: bf16 keeps 8 bits of mantissa
INT8_TOL = 0.05   # the same for int8 weights and per-token int8 activations


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize(vitmha.create_backbone("vit_tiny_patch16_224", pretrained=False, **TINY), seed=1).eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b).abs().max() / b.abs().max())


@pytest.fixture
def batch():
    return torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def test_bf16_autocast_logits_match_fp32(batch):
    model = _model()
    with torch.no_grad():
        ref = model(batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(batch)
    assert got.dtype == torch.bfloat16
    assert _rel(got, ref) < BF16_TOL


def test_bf16_weights_logits_match_fp32(batch):
    model = _model()
    with torch.no_grad():
        ref = model(batch)
        got = copy.deepcopy(model).to(torch.bfloat16)(batch.to(torch.bfloat16))
    assert _rel(got, ref) < BF16_TOL


def test_prepare_inference_bf16_takes_fp32_inputs(batch, monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: "native")
    model = _model()
    with torch.no_grad():
        ref = model(batch)
        bf = precision.prepare_inference(copy.deepcopy(model), "bf16")
        got = bf.forward_features(batch)  # any entry point: the patch embedding casts
        logits = bf(batch)
    assert next(bf.parameters()).dtype == torch.bfloat16 and got.dtype == torch.bfloat16
    assert _rel(logits, ref) < BF16_TOL


def test_int8_logits_match_fp32_and_keep_the_argmax(batch):
    model = _model()
    with torch.no_grad():
        ref = model(batch)
        got = precision.prepare_inference(copy.deepcopy(model), "int8")(batch)
    assert _rel(got, ref) < INT8_TOL
    margin = ref.topk(2).values
    clear = (margin[:, 0] - margin[:, 1]) > 0.1 * ref.abs().max()  # ties may flip under any rounding
    assert clear.sum() >= 4
    assert torch.equal(got.argmax(-1)[clear], ref.argmax(-1)[clear])


def test_emulated_bf16_warns_once(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: "emulated")
    monkeypatch.setattr(precision, "_warned", False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        precision.prepare_inference(_model(), "bf16")
        precision.prepare_inference(_model(), "bf16")
    msgs = [str(w.message) for w in seen if "bf16" in str(w.message)]
    assert msgs == [precision.EMULATED_MESSAGE]


def test_native_bf16_does_not_warn(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: "native")
    monkeypatch.setattr(precision, "_warned", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        precision.prepare_inference(_model(), "bf16")


def test_trainer_warns_for_bf16_on_an_emulating_cpu(monkeypatch, tmp_path):
    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: "emulated")
    monkeypatch.setattr(precision, "_warned", False)
    with pytest.warns(RuntimeWarning, match="emulated"):
        vitmha.Trainer(accelerator="cpu", precision="bf16-mixed", logger=False, default_root_dir=tmp_path)


def test_cpu_bf16_support_reads_the_cpu_flags(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    for flags, want in (("fpu sse avx2 avx512f", "emulated"), ("fpu avx2 amx_bf16 amx_tile", "native"),
                        ("fpu avx512f avx512_bf16", "native")):
        info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        monkeypatch.setattr(precision, "CPUINFO", str(info))
        assert precision.cpu_bf16_support() == want


def test_unknown_precision_is_an_error():
    with pytest.raises(precision.PrecisionError, match="fp16"):
        precision.prepare_inference(_model(), "fp16")


def _probs(path):
    with open(path, newline="") as f:
        return {r[0]: (r[1], float(r[2])) for r in list(csv.reader(f))[1:]}


def test_predict_precision_int8_runs_via_the_command(ckpts, tmp_path):
    args = ["--checkpoint", ckpts["clf"], "--input", ckpts["clf_root"] / "val", "--no-progress"]
    out = {}
    for p in ("fp32", "int8"):
        r = run_tool("predict", *args, "--output", tmp_path / p, "--precision", p)
        assert r.returncode == 0, r.stderr
        out[p] = _probs(tmp_path / p / "predictions.csv")
    assert out["int8"].keys() == out["fp32"].keys() and len(out["fp32"]) == 9
    for k, (label, prob) in out["fp32"].items():
        assert out["int8"][k][1] == pytest.approx(prob, abs=0.02)


def test_export_onnx_int8_matches_fp32(ckpts, tmp_path):
    pytest.importorskip("onnxruntime")
    r = run_tool("export", "--checkpoint", ckpts["clf"], "--format", "onnx", "--int8", "--output", tmp_path / "m.onnx")
    assert r.returncode == 0, r.stderr
    assert "quantised" in r.stdout and (tmp_path / "m.onnx").is_file()
    import onnx

    ops = {n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul"}
