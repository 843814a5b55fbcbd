"""Fixtures shared by the test modules: the real pretrained ViT-Ti and an offline Hugging Face cache."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REAL_NAME = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
REAL_WEIGHTS = Path(os.environ.get("VITMHA_REAL_WEIGHTS")
                    or REPO.parent / "shared" / "weights" / f"{REAL_NAME}.safetensors")


def require_dataset(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, with a dataset that is not installed turned into a skip naming the install
    command; under ``VITMHA_REQUIRE_DATA=1`` (CI, which installs the data) the error is raised instead."""
    from vitmha.data import DatasetNotInstalledError

    try:
        return fn(*args, **kwargs)
    except DatasetNotInstalledError as e:
        if os.environ.get("VITMHA_REQUIRE_DATA", "") not in ("", "0"):
            raise
        pytest.skip(f"{e.name} not installed: {e.install}")


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory):
    """A tiny classifier (colour ImageFolder) and segmenter (synthetic shapes), each fitted one epoch and
    saved as a Lightning checkpoint; paths by name ("clf", "seg", "clf_root", "seg_root")."""
    from tests.helpers import build_checkpoints

    return build_checkpoints(tmp_path_factory.mktemp("tool_ckpts"))


@pytest.fixture(scope="session")
def real_weights() -> Path:
    """timm's real ImageNet ViT-Ti/16 (AugReg) as a .safetensors file. Skips when it is absent, except in CI
    (``VITMHA_REQUIRE_DATA=1``), where a missing file fails."""
    if not REAL_WEIGHTS.is_file():
        msg = (f"real pretrained weights not found at {REAL_WEIGHTS}: put timm's {REAL_NAME} there as "
               f"'{REAL_NAME}.safetensors' (the project's ../shared/weights/) or set VITMHA_REAL_WEIGHTS")
        if os.environ.get("VITMHA_REQUIRE_DATA", "") not in ("", "0"):
            pytest.fail(msg)
        pytest.skip(msg)
    return REAL_WEIGHTS


@pytest.fixture(scope="session")
def hf_cache_dir(real_weights, tmp_path_factory) -> Path:
    """A temporary Hugging Face hub cache seeded with the real weights as timm's REAL_NAME (a link: shared/
    is read-only)."""
    from vitmha.models.hub import seed_hf_cache

    root = tmp_path_factory.mktemp("hf_cache")
    seed_hf_cache(REAL_NAME, real_weights, cache_dir=root)
    return root


@pytest.fixture
def offline_hub(hf_cache_dir, monkeypatch) -> Path:
    """``pretrained=True`` reads the seeded cache, offline, in this process and in subprocesses it starts."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_cache_dir))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_cache_dir))
    return hf_cache_dir
