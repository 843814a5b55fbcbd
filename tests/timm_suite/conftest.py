"""Run timm's own tests/test_models.py (the pinned copy beside this file, unchanged) with its ``create_model``
answered by ``vitmha.create_backbone``, on the ViT architectures vitmha builds.

Only collected when ``VITMHA_TIMM_SUITE=1`` (tests/test_timm_suite.py and benchmarks/timm_suite.py set it in the
subprocess they start): a plain ``pytest tests/`` must not run timm's suite over every timm model.

``VITMHA_TIMM_ARCHS``: comma-separated glob patterns on the arch name (the part before a '.tag'); a test is kept
when its ``model_name`` matches one and vitmha builds that arch. Unset: every arch vitmha builds.
"""
from __future__ import annotations

import fnmatch
import os
from functools import lru_cache

import pytest

ENABLED = os.environ.get("VITMHA_TIMM_SUITE", "") not in ("", "0")
collect_ignore = [] if ENABLED else ["test_models.py"]

#: the modules of timm whose archs use (subclasses of) timm's VisionTransformer
VIT_MODULES = ("vision_transformer", "deit")
#: timm's markers (its pyproject.toml registers them)
MARKERS = ("base", "cfg", "torchscript", "features", "fxforward", "fxbackward", "timeout")


def pytest_configure(config) -> None:
    for m in MARKERS:
        config.addinivalue_line("markers", f"{m}: timm's test marker")


@lru_cache(maxsize=None)
def vitmha_builds(arch: str) -> bool:
    """Whether vitmha.create_backbone reproduces timm's ``arch`` (read on the meta device: no memory)."""
    from vitmha.models import UnsupportedArchError, arch_config

    try:
        arch_config(arch)
    except (UnsupportedArchError, ValueError):
        return False
    return True


@lru_cache(maxsize=None)
def vit_archs() -> frozenset:
    import timm

    return frozenset(a for m in VIT_MODULES for a in timm.list_models(module=m))


def selected(model_name: str, patterns) -> bool:
    """Whether the test of ``model_name`` ('arch' or 'arch.tag') runs: a ViT arch vitmha builds, matching."""
    arch = model_name.split(".")[0]
    if arch not in vit_archs() or (patterns and not any(fnmatch.fnmatch(arch, p) for p in patterns)):
        return False
    return vitmha_builds(arch)


#: the modules of the models that ``create_model`` built during the running test
BUILT: list = []


def create_model(model_name: str, **kwargs):
    """timm.create_model's place in the suite: vitmha.create_backbone, recording what it built."""
    import vitmha

    model = vitmha.create_backbone(model_name, **kwargs)
    BUILT.append(type(model).__module__)
    return model


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """Record in the report (junit ``vitmha_models_built``) how many vitmha models the test built."""
    BUILT.clear()
    yield
    item.user_properties.append(("vitmha_models_built", sum(m.startswith("vitmha.") for m in BUILT)))


def pytest_collection_modifyitems(config, items) -> None:
    if not ENABLED:
        return
    patterns = [p.strip() for p in os.environ.get("VITMHA_TIMM_ARCHS", "").split(",") if p.strip()]
    keep, drop = [], []
    for item in items:
        name = getattr(item, "callspec", None) and item.callspec.params.get("model_name")
        (keep if isinstance(name, str) and selected(name, patterns) else drop).append(item)
    for item in keep:
        # the suite did `from timm import create_model`: answer that name in its module with vitmha's factory
        item.module.create_model = create_model
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep
