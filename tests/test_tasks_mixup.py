"""Mixup/cutmix: mixed images and soft targets against hand computation."""
import pytest
import torch

from vitmha.tasks.mixup import Mixup, cutmix_box


def _batch():
    x = torch.arange(3 * 1 * 4 * 4, dtype=torch.float32).reshape(3, 1, 4, 4)
    y = torch.tensor([0, 2, 1])
    return x, y


def test_mixup_blends_with_the_reversed_batch():
    x, y = _batch()
    mixed, soft = Mixup(num_classes=3, mixup_alpha=1.0).mix(x, y, lam=0.7)
    assert torch.allclose(mixed[0], 0.7 * x[0] + 0.3 * x[2])
    assert torch.allclose(mixed[1], 0.7 * x[1] + 0.3 * x[1])
    expected = torch.tensor([[0.7, 0.3, 0.0],   # 0.7 * class 0 + 0.3 * class 1 (sample 2)
                             [0.0, 0.0, 1.0],   # the middle sample is mixed with itself
                             [0.3, 0.7, 0.0]])
    assert torch.allclose(soft, expected)


def test_cutmix_pastes_the_box_and_weights_targets_by_its_area():
    x, y = _batch()
    mixed, soft = Mixup(num_classes=3, cutmix_alpha=1.0).mix(x, y, lam=0.5, box=(0, 2, 1, 3))
    expected = x.clone()
    expected[0, :, 0:2, 1:3] = x[2, :, 0:2, 1:3]
    expected[2, :, 0:2, 1:3] = x[0, :, 0:2, 1:3]
    assert torch.equal(mixed, expected)
    lam = 1 - 4 / 16  # the box covers 4 of 16 pixels, whatever lam was asked for
    assert torch.allclose(soft[0], torch.tensor([lam, 1 - lam, 0.0]))
    assert torch.allclose(soft.sum(1), torch.ones(3))


def test_cutmix_box_is_inside_the_image_and_about_the_right_size():
    torch.manual_seed(0)
    for _ in range(50):
        y0, y1, x0, x1 = cutmix_box(32, 48, 0.75)
        assert 0 <= y0 <= y1 <= 32 and 0 <= x0 <= x1 <= 48
        assert (y1 - y0) <= 16 and (x1 - x0) <= 24


def test_disabled_mixup_returns_one_hot_and_the_same_images():
    x, y = _batch()
    mixed, soft = Mixup(num_classes=3)(x, y)
    assert mixed is x
    assert torch.equal(soft, torch.eye(3)[y])


def test_random_mixing_follows_torch_seed():
    x, y = _batch()
    m = Mixup(num_classes=3, mixup_alpha=0.8, cutmix_alpha=1.0)
    torch.manual_seed(3)
    a = m(x, y)
    torch.manual_seed(3)
    b = m(x, y)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.allclose(a[1].sum(1), torch.ones(3))


def test_mix_prob_zero_never_mixes():
    x, y = _batch()
    m = Mixup(num_classes=3, mixup_alpha=1.0, prob=0.0)
    assert not m.enabled
    assert m(x, y)[0] is x


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
def test_soft_targets_sum_to_one(lam):
    x, y = _batch()
    assert torch.allclose(Mixup(3, mixup_alpha=1.0).mix(x, y, lam)[1].sum(1), torch.ones(3))
