"""Mixup/cutmix (timm's Mixup in batch mode): the task's wrapper against timm itself."""
import numpy as np
import pytest
import torch
from timm.data import Mixup as TimmMixup

from vitmha.tasks.mixup import Mixup


def _batch(n):
    torch.manual_seed(0)
    return torch.randn(n, 3, 8, 8), torch.randint(0, 4, (n,))


@pytest.mark.parametrize("mixup,cutmix", [(1.0, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_an_even_batch_is_mixed_exactly_as_timm_mixes_it(mixup, cutmix):
    x, y = _batch(6)
    np.random.seed(3)
    got_x, got_y = Mixup(4, mixup, cutmix)(x.clone(), y)
    np.random.seed(3)
    ref = TimmMixup(mixup_alpha=mixup, cutmix_alpha=cutmix, mode="batch", label_smoothing=0.0, num_classes=4)
    want_x, want_y = ref(x.clone(), y)
    assert torch.equal(got_x, want_x) and torch.equal(got_y, want_y)
    assert torch.allclose(got_y.sum(1), torch.ones(6))


def test_the_input_batch_is_left_as_it_was():
    x, y = _batch(4)
    before = x.clone()
    Mixup(4, 1.0)(x, y)
    assert torch.equal(x, before)


def test_an_odd_batch_mixes_all_but_the_last_image():
    x, y = _batch(5)
    np.random.seed(1)
    got_x, got_y = Mixup(4, 1.0)(x.clone(), y)
    np.random.seed(1)
    want_x, want_y = TimmMixup(mixup_alpha=1.0, mode="batch", label_smoothing=0.0, num_classes=4)(x[:4].clone(), y[:4])
    assert torch.equal(got_x[:4], want_x) and torch.equal(got_y[:4], want_y)
    assert torch.equal(got_x[4], x[4]) and torch.equal(got_y[4], torch.nn.functional.one_hot(y[4], 4).float())


def test_off_gives_one_hot_targets_and_the_same_images():
    x, y = _batch(4)
    m = Mixup(4, mixup_alpha=1.0, prob=0.0)
    assert not m.enabled
    got_x, got_y = m(x, y)
    assert got_x is x and torch.equal(got_y, torch.nn.functional.one_hot(y, 4).float())


def test_the_same_numpy_seed_draws_the_same_mix():
    x, y = _batch(4)
    outs = []
    for _ in range(2):
        np.random.seed(7)
        outs.append(Mixup(4, 0.8, 1.0)(x.clone(), y))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
