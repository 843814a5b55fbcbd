"""timm's own tests/test_models.py, with its ``create_model`` answered by ``vitmha.create_backbone``.

The pinned copy in tests/timm_suite/ (byte for byte ../shared/timm_tests/test_models.py, timm's file) runs in a
subprocess under tests/timm_suite/conftest.py, on one small arch of every ViT family vitmha builds; every
test passes except those that download from the Hugging Face hub (no network in tests). The whole table, every
arch: benchmarks/timm_suite.md (``python benchmarks/timm_suite.py``). Families without a small arch in timm's
registry (qk-norm, SwiGLU, packed SwiGLU, QuickGELU, SigLIP's tanh GELU) get the suite's TorchScript / FX
checks in tests/test_models.py.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from tests.conftest import REAL_NAME, REAL_WEIGHTS, REPO

SUITE = REPO / "tests" / "timm_suite" / "test_models.py"
PINNED = REPO.parent / "shared" / "timm_tests" / "test_models.py"

#: arch -> the family it stands for (small archs: the run takes 2-3 minutes on one CPU thread)
ARCHS = {
    "vit_tiny_patch16_224": "plain: class token, token pooling",
    "test_vit": "dynamic image size",
    "test_vit2": "no class token, a register, average pooling, LayerScale",
    "test_vit3": "MAP attention pooling over registers",
    "test_vit4": "RMSNorm",
    "vit_wee_patch16_reg1_gap_256": "registers, position embedding on patches only, fc_norm",
    "vit_xsmall_patch16_clip_224": "CLIP pre-norm, no patch bias",
    "vit_base_patch16_rpn_224": "res-post-norm blocks",
    "deit_tiny_distilled_patch16_224": "DeiT distillation token and head",
}
#: every test function of the suite that takes a ViT arch
FUNCTIONS = ("test_model_inference", "test_model_forward", "test_model_backward", "test_model_default_cfgs_non_std",
             "test_model_load_pretrained", "test_model_forward_torchscript",
             "test_model_forward_intermediates_features", "test_model_forward_intermediates", "test_model_forward_fx",
             "test_model_backward_fx", "test_model_forward_fx_torchscript")
#: tests that cannot pass here, and why
DOWNLOADS = {
    "test_model_inference": "downloads timm's test tensors and image and the weights from the Hugging Face hub",
    "test_model_load_pretrained": "downloads the pretrained weights from the Hugging Face hub",
}
#: timm's own skips: the test's input size limit is below the arch's fixed input size
TIMM_SKIP = "Fixed input size model > limit."


def _outcome(case: ET.Element):
    for kind in ("failure", "error", "skipped"):
        el = case.find(kind)
        if el is not None:
            return ("failed" if kind != "skipped" else "skipped"), (el.get("message") or "")
    return "passed", ""


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """{(function, model_name): (outcome, message, vitmha models built)} of one run of the suite."""
    tmp = tmp_path_factory.mktemp("timm_suite")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PYTEST_"))}
    env.update(VITMHA_TIMM_SUITE="1", VITMHA_TIMM_ARCHS=",".join(ARCHS), OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp / "hub"), PYTHONWARNINGS="ignore")
    if REAL_WEIGHTS.is_file():                      # the one pretrained tag that is here: a seeded cache
        from vitmha.models.hub import seed_hf_cache

        seed_hf_cache(REAL_NAME, REAL_WEIGHTS, cache_dir=tmp / "hub")
    report = tmp / "junit.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", str(SUITE), "-q", "-p", "no:cacheprovider",
                           "-o", "addopts=", f"--junitxml={report}"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert report.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    results = {}
    for case in ET.parse(report).iter("testcase"):
        name = case.get("name")                                        # test_model_forward[1-vit_tiny_patch16_224]
        func, param = name.split("[", 1)
        model_name = param.rstrip("]").split("-", 1)[1]
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        results[(func, model_name)] = (*_outcome(case), int(props.get("vitmha_models_built", 0)))
    return results


def test_the_suite_is_timms_file_unchanged():
    if not PINNED.is_file():
        pytest.skip(f"{PINNED} is not here to compare with")
    assert hashlib.sha256(SUITE.read_bytes()).digest() == hashlib.sha256(PINNED.read_bytes()).digest()


def _expected(func: str, arch: str) -> bool:
    """Whether timm's suite runs ``func`` on ``arch`` (its own parametrisation)."""
    import timm

    if func == "test_model_inference":                   # timm's test archs with stored test tensors
        return bool(timm.list_pretrained(f"{arch}.*")) and arch.startswith("test_")
    if func == "test_model_load_pretrained":
        return bool(timm.list_pretrained(f"{arch}.*"))
    # timm leaves DeiT's distilled archs out of the FX-then-TorchScript test (FX traces torch.jit.is_scripting()
    # as False, so the scripted graph would return both heads while training)
    return not (func == "test_model_forward_fx_torchscript" and "distilled" in arch)


def test_every_arch_ran_every_test_function(suite):
    ran = {(f, m.split(".")[0]) for f, m in suite}
    want = {(f, a) for f in FUNCTIONS for a in ARCHS if _expected(f, a)}
    assert want - ran == set(), f"not collected: {sorted(want - ran)}"
    assert {a for _, a in ran} == set(ARCHS)


@pytest.mark.parametrize("func", FUNCTIONS)
def test_results(suite, func):
    """Each test passes, on a model vitmha built, unless it downloads (then it fails offline, saying so) or timm
    skips it for its input size."""
    rows = {m: r for (f, m), r in suite.items() if f == func}
    assert rows, f"{func}: nothing ran"
    for model_name, (outcome, message, built) in rows.items():
        here = func == "test_model_load_pretrained" and model_name == REAL_NAME and REAL_WEIGHTS.is_file()
        if func in DOWNLOADS and not here:
            assert outcome == "failed" and "HF_HUB_OFFLINE is set" in message, (model_name, outcome, message)
        elif outcome == "skipped":
            assert message.endswith(TIMM_SKIP), (model_name, message)
        else:
            assert outcome == "passed", (model_name, message[:2000])
            assert built >= 1, f"{func}[{model_name}]: no vitmha model was built"
