"""FTE losses against hand-computed values (numpy, float64)."""
import math

import numpy as np
import pytest
import torch

from common.losses import FTE_LOSSES, entropy_gap, inverse_ce, inverse_code, kl_uniform

Z = np.array([[1.0, 2.0, 0.5, -0.3], [-1.0, 0.0, 3.0, 0.2], [0.3, 0.3, 0.3, 0.3]])
Y = np.array([1, 2, 0])


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _expected_kl(z):
    p = _softmax(z)
    c = z.shape[1]
    return np.mean([sum((1 / c) * math.log((1 / c) / p[i, k]) for k in range(c)) for i in range(len(z))])


def _expected_inverse(z, y):
    p = _softmax(z)
    return np.mean([-math.log(1 - p[i, y[i]]) for i in range(len(z))])


def _expected_inverse_code(z, y):
    p = _softmax(1 - z)
    return np.mean([-math.log(p[i, y[i]]) for i in range(len(z))])


def _expected_entropy_gap(z):
    p = _softmax(z)
    return np.mean([math.log(z.shape[1]) + sum(p[i, k] * math.log(p[i, k]) for k in range(z.shape[1]))
                    for i in range(len(z))])


def _t(a, dtype=torch.float32):
    return torch.tensor(a, dtype=dtype)


def test_kl_matches_hand_value():
    got = kl_uniform(_t(Z), _t(Y, torch.int64)).item()
    assert got == pytest.approx(_expected_kl(Z), rel=1e-5, abs=1e-6)


def test_kl_is_zero_only_for_uniform_prediction_and_uses_head_width():
    assert kl_uniform(torch.zeros(2, 7)).item() == pytest.approx(0.0, abs=1e-6)
    z = np.array([[0.0, 0.0, 5.0]])  # C = 3 from the logits, not a fixed 10
    assert kl_uniform(_t(z)).item() == pytest.approx(_expected_kl(z), rel=1e-5)


def test_entropy_gap_matches_hand_value_and_is_bounded():
    assert entropy_gap(_t(Z)).item() == pytest.approx(_expected_entropy_gap(Z), rel=1e-5, abs=1e-6)
    assert entropy_gap(torch.zeros(3, 5)).item() == pytest.approx(0.0, abs=1e-6)
    confident = torch.tensor([[1e4, 0.0, 0.0, 0.0]])  # KL(u || p) grows without bound here; log C - H stays <= log C
    assert entropy_gap(confident).item() == pytest.approx(math.log(4), rel=1e-5)
    assert kl_uniform(confident).item() > 1e3


def test_inverse_matches_hand_value():
    got = inverse_ce(_t(Z), _t(Y, torch.int64)).item()
    assert got == pytest.approx(_expected_inverse(Z, Y), rel=1e-5, abs=1e-6)


def test_inverse_code_matches_hand_value():
    got = inverse_code(_t(Z), _t(Y, torch.int64)).item()
    assert got == pytest.approx(_expected_inverse_code(Z, Y), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name,expected", [("inverse", lambda: _expected_inverse(Z, Y)),
                                           ("inverse_code", lambda: _expected_inverse_code(Z, Y)),
                                           ("kl", lambda: _expected_kl(Z)),
                                           ("entropy", lambda: _expected_entropy_gap(Z))])
def test_each_loss_type_name_computes_its_loss(name, expected):
    # --loss_type NAME looks the loss up here
    got = FTE_LOSSES[name](_t(Z), _t(Y, torch.int64)).item()
    assert got == pytest.approx(expected(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("big", [50.0, 1e3, 1e4])
def test_inverse_finite_when_label_probability_is_one(big):
    # p_y rounds to exactly 1 in float32 here, so a naive -log(1 - p_y) would be inf
    z = torch.tensor([[big, 0.0, -1.0, 2.0]], requires_grad=True)
    y = torch.tensor([0])
    assert 1 - torch.softmax(z, 1)[0, 0].item() == 0.0
    loss = inverse_ce(z, y)
    assert torch.isfinite(loss)
    # -log(1 - p_y) = lse(z) - lse(z_others) ~= big - lse([0, -1, 2])
    expected = big - math.log(math.exp(0) + math.exp(-1) + math.exp(2))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert torch.isfinite(z.grad).all()
