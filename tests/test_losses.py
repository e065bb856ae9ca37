import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgeskin.errors import ConfigError
from edgeskin.train.losses import FocalLoss, class_weights, distillation_kl, make_loss


def _batch(seed=0, n=16, c=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) * 3, torch.randint(0, c, (n,), generator=g)


def test_focal_gamma0_is_cross_entropy_unweighted():
    logits, y = _batch()
    assert torch.allclose(FocalLoss(gamma=0.0)(logits, y), F.cross_entropy(logits, y), atol=1e-6)


def test_focal_gamma0_is_weighted_cross_entropy():
    logits, y = _batch(1)
    w = torch.tensor([0.9, 0.6, 0.3, 2.6, 0.3, 0.2, 2.2])
    assert torch.allclose(FocalLoss(gamma=0.0, alpha=w)(logits, y), F.cross_entropy(logits, y, weight=w), atol=1e-6)


def test_focal_downweights_easy_examples():
    # One easy (confident, correct) and one hard sample: gamma>0 shrinks the easy one far more.
    logits = torch.tensor([[8.0, 0.0], [0.0, 0.5]])
    y = torch.tensor([0, 0])
    ce = F.cross_entropy(logits, y, reduction="none")
    fl = torch.stack([FocalLoss(gamma=2.0)(logits[i : i + 1], y[i : i + 1]) for i in range(2)])
    assert (fl < ce).all()
    assert fl[0] / ce[0] < 1e-5 < fl[1] / ce[1]


def test_focal_matches_hand_formula():
    logits, y = _batch(2, n=5, c=3)
    p = torch.softmax(logits, 1)[torch.arange(5), y]
    expected = (-(1 - p) ** 2 * torch.log(p)).mean()
    assert torch.allclose(FocalLoss(gamma=2.0)(logits, y), expected, atol=1e-6)


def test_class_weights_inverse_frequency_mean_one():
    w = class_weights([10, 20, 40, 0])
    assert w[3] == 0
    assert np.isclose(w[:3].mean(), 1.0)
    assert np.isclose(w[0] / w[1], 2.0) and np.isclose(w[1] / w[2], 2.0)


def test_make_loss_kinds():
    logits, y = _batch(3)
    w = class_weights([5, 1, 3, 4, 2, 9, 1])
    assert torch.allclose(make_loss("wce", w)(logits, y),
                          F.cross_entropy(logits, y, weight=torch.tensor(w, dtype=torch.float32)), atol=1e-6)
    assert torch.allclose(make_loss("ce", None)(logits, y), F.cross_entropy(logits, y), atol=1e-6)
    with pytest.raises(ConfigError):
        make_loss("hinge", None)


def test_distillation_kl_zero_when_equal_and_positive_otherwise():
    logits, _ = _batch(4)
    teacher = torch.softmax(logits, 1)
    assert distillation_kl(logits, teacher, 4.0).abs() < 1e-5
    assert distillation_kl(logits + torch.randn_like(logits), teacher, 4.0) > 1e-3


def test_distillation_temperature_hand_computation():
    s = torch.tensor([[1.0, 2.0, 0.5]])
    t_logits = torch.tensor([[0.0, 3.0, 1.0]])
    T = 2.0
    ps, pt = torch.softmax(s / T, 1), torch.softmax(t_logits / T, 1)
    expected = (pt * (pt.log() - ps.log())).sum() * T * T
    got = distillation_kl(s, torch.softmax(t_logits, 1), T)
    assert torch.allclose(got, expected, atol=1e-5)
