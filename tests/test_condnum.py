"""Condition-number immunization (common/condnum.py): the terms against a hand computation in numpy, gradient
descent moving the condition number the way each term says, the correlation variant's invariance to
per-coordinate rescaling, the step's batches and BatchNorm statistics, state and snapshots, and a run through
the stage script that stage 3 reads."""
import io
import json
import math
import sys

import numpy as np
import pytest
import torch
from torch import nn

from common.cli import UsageError
from common.condnum import (CondNum, condition_terms, feature_samples, log_condition, r_ill, r_well, spectrum)
from common.stage2 import Stage2Settings
from common.train import Precision
from helpers import SCRIPTS, load_script, read_rows, run_script, tiny_domain

CPU = Precision(torch.device("cpu"))


def _features(eigenvalues, n, seed=0):
    """n x d features whose S = X^T X is diag(eigenvalues): orthonormal columns scaled by their roots."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, len(eigenvalues), generator=gen, dtype=torch.float64))
    return q * torch.tensor(eigenvalues, dtype=torch.float64).sqrt()


def test_terms_on_a_known_covariance_match_a_hand_computation():
    lam = np.array([9.0, 4.0, 2.0, 1.0, 0.5, 0.25])
    eigs, d = spectrum(_features(lam, 30))
    normed = np.sort(lam / lam.mean())  # S scaled to mean eigenvalue 1
    assert d == 6 and np.allclose(eigs.numpy(), normed, rtol=1e-10)
    frob2 = (normed ** 2).sum()  # ||S||_F^2
    assert r_well(eigs, d).item() == pytest.approx(normed.max() ** 2 / 2 - frob2 / (2 * d), rel=1e-10)
    assert r_ill(eigs, d).item() == pytest.approx(1 / (frob2 / (2 * d) - normed.min() ** 2 / 2), rel=1e-10)
    assert log_condition(eigs).item() == pytest.approx(math.log(36.0), rel=1e-10)
    assert r_well(spectrum(_features([2.0] * 4, 10))[0], 4).item() == pytest.approx(0, abs=1e-12), \
        "R_well is zero at equal eigenvalues"


def test_spectrum_with_fewer_samples_than_dimensions_or_a_dead_channel_keeps_the_nonzero_eigenvalues():
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x[:, 3] = 0  # a dead channel
    s = (x.T @ x).numpy()
    full = np.linalg.eigvalsh(s / (np.trace(s) / 12))
    eigs, d = spectrum(x)
    assert d == 12 and len(eigs) == 5
    assert np.allclose(eigs.numpy(), full[-5:], rtol=1e-9) and full[-6] < 1e-12 * full[-1]
    dead = torch.cat([_features([3.0, 2.0, 1.0], 20), torch.zeros(20, 1, dtype=torch.float64)], 1)
    assert log_condition(spectrum(dead)[0]).item() == pytest.approx(math.log(3.0), rel=1e-10)


def test_a_layer_map_is_one_sample_per_position():
    fmap = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
    samples = feature_samples(fmap)
    assert samples.shape == (8, 3)
    assert torch.equal(samples[5], fmap[1, :, 0, 1])  # image 1, position (0, 1): its 3 channels
    assert feature_samples(fmap[:, :, 0, 0]).shape == (2, 3)


def test_the_terms_gradients_match_finite_differences():
    x = _features([5.0, 3.0, 2.0, 1.0], 12, seed=2) + 0.01 * torch.randn(12, 4, dtype=torch.float64)
    x.requires_grad_(True)
    for term in (lambda v: r_well(*spectrum(v)), lambda v: r_ill(*spectrum(v)),
                 lambda v: r_ill(*spectrum(v, correlation=True)), lambda v: log_condition(spectrum(v)[0])):
        assert torch.autograd.gradcheck(term, (x,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("term", ["bounds", "kappa"])
def test_gradient_descent_on_each_term_moves_the_condition_number_its_way(term):
    start = torch.randn(60, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    start = start * torch.linspace(0.5, 2, 8, dtype=torch.float64)
    kappa0 = log_condition(spectrum(start)[0]).item()
    for which, direction in ((0, -1), (1, +1)):  # the well term lowers kappa, the ill term raises it
        x = start.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([x], lr=1e-2)
        for _ in range(50):
            optimizer.zero_grad()
            condition_terms(term, x, x, adam_aware=False)[which].backward()
            optimizer.step()
        moved = log_condition(spectrum(x.detach())[0]).item() - kappa0
        assert direction * moved > 0.2, (term, which, moved)


def test_the_correlation_variant_is_invariant_to_per_coordinate_rescaling_and_the_plain_one_is_not():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(200, 6, generator=gen, dtype=torch.float64) @ torch.randn(6, 6, generator=gen, dtype=torch.float64)
    scaled = x * torch.tensor([0.2, 5.0, 1.0, 0.5, 3.0, 1.5], dtype=torch.float64)
    for term in (r_ill, r_well):
        corr = [term(*spectrum(v, correlation=True)).item() for v in (x, scaled)]
        plain = [term(*spectrum(v)).item() for v in (x, scaled)]
        assert corr[1] == pytest.approx(corr[0], rel=1e-4)
        assert abs(plain[1] / plain[0] - 1) > 0.1
    assert spectrum(3 * x)[0] == pytest.approx(spectrum(x)[0], rel=1e-10), "both see only the spectrum's shape"


# ---- the method on a tiny ResNet-layout model ------------------------------------------------------------------

class TinyResNet(nn.Module):
    """A stem, two stages named as torchvision's (layer1, layer2), pooling and a Linear head `fc`."""

    def __init__(self, width=4, classes=10):
        super().__init__()
        block = lambda cin, cout, stride: nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout),
                                                        nn.ReLU())
        self.conv1, self.layer1, self.layer2 = block(3, width, 1), block(width, width, 1), block(width, 2 * width, 2)
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(2 * width, classes)

    def forward(self, x):
        return self.fc(self.avgpool(self.layer2(self.layer1(self.conv1(x)))).flatten(1))


def _method(**config):
    torch.manual_seed(0)
    model = TinyResNet()
    model.head_path = "fc"
    restricted, original = tiny_domain("MNIST", 1), tiny_domain("FashionMNIST", 2)
    settings = Stage2Settings(**{"lr": 1e-3, "bs": 10, "condnum_layers": ["layer1", "layer2", "head"], **config})
    return CondNum(model, original, restricted, settings, CPU)


def _weights(algo):
    return {k: v.detach().clone() for k, v in algo.model.state_dict().items()}


def test_step_is_one_adam_step_on_the_combined_loss_and_reports_each_layers_condition():
    algo = _method(condnum_well=0.1, condnum_ill=2.0)
    before = _weights(algo)
    values = algo.step()
    assert list(values) == ["ntr_loss", "well_loss", "ill_loss", "logcond_orig_layer1", "logcond_orig_layer2",
                            "logcond_orig_head", "logcond_restricted_layer1", "logcond_restricted_layer2",
                            "logcond_restricted_head"]
    assert all(math.isfinite(v) for v in values.values()) and values["ntr_loss"] > 0 and values["ill_loss"] > 0
    assert algo.optimizer.state_dict()["state"][0]["step"] == 1
    assert any(not torch.equal(v, before[k]) for k, v in algo.model.state_dict().items())


def test_the_terms_change_the_step_and_weights_zero_leave_plain_cross_entropy():
    def gradient(**config):
        algo = _method(**config)
        grads = []
        algo.optimizer.step = lambda: grads.extend(p.grad.clone() for p in algo.model.parameters())
        algo.step()
        return grads
    ce_only = _method(condnum_well=0.0, condnum_ill=0.0)
    x, y = ce_only.batch("original")
    loss = nn.functional.cross_entropy(ce_only.model(x), y)
    expected = torch.autograd.grad(loss, list(ce_only.model.parameters()))
    plain = gradient(condnum_well=0.0, condnum_ill=0.0)
    assert all(torch.allclose(g, e, atol=1e-7) for g, e in zip(plain, expected))
    for config in ({"condnum_well": 1.0, "condnum_ill": 0.0}, {"condnum_well": 0.0, "condnum_ill": 1.0},
                   {"condnum_well": 0.0, "condnum_ill": 1.0, "condnum_adam_aware": True}):
        changed = gradient(**config)
        assert any(not torch.allclose(g, p, atol=1e-6) for g, p in zip(changed, plain)), config


def test_batchnorm_running_statistics_are_the_original_batches_alone():
    algo = _method()
    reference = TinyResNet()
    reference.load_state_dict(algo.model.state_dict())
    reference.train()
    x, _ = algo.batch("original")
    algo.streams["original"].load_state_dict(_method().streams["original"].state_dict())  # rewind that batch
    reference(x)
    algo.step()
    for (name, got), want in zip(algo.model.named_buffers(), reference.buffers()):
        assert torch.allclose(got.float(), want.float(), atol=1e-6), name


def _round_trip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_state_dict_round_trip_reproduces_the_next_steps():
    config = dict(condnum_adam_aware=True, condnum_term="kappa", condnum_well=0.5)
    reference = _method(**config)
    reference.step()
    state = _round_trip(reference.state_dict())
    expected = [reference.step() for _ in range(2)]
    resumed = _method(**config)
    resumed.load_state_dict(state)
    got = [resumed.step() for _ in range(2)]
    for e, g in zip(expected, got):
        assert g == pytest.approx(e, rel=1e-6)
    for k, v in resumed.model.state_dict().items():
        assert torch.allclose(v.float(), reference.model.state_dict()[k].float(), atol=1e-6), k


def test_restore_brings_back_weights_and_adam_but_not_the_batches():
    algo = _method()
    snap = algo.snapshot()
    weights = _weights(algo)
    algo.step()
    position = algo.streams["restricted"].pos, algo.streams["original"].pos
    algo.restore(snap)
    assert all(torch.equal(v, weights[k]) for k, v in algo.model.state_dict().items())
    assert algo.optimizer.state_dict()["state"] == {}
    assert (algo.streams["restricted"].pos, algo.streams["original"].pos) == position


def test_a_stage_the_model_does_not_have_is_a_usage_error():
    with pytest.raises(UsageError, match="--condnum_layers layer3"):
        _method(condnum_layers=["layer1", "layer3"])
    with pytest.raises(UsageError, match="--condnum_layers"):
        load_script("stage2").parse_args(["--method", "condnum", "--condnum_layers", "layer1,layer9"])


@pytest.mark.slow
def test_a_run_through_the_stage_script_that_stage3_reads(tmp_path, data_root, stage1_run, monkeypatch,
                                                          restore_signals):
    out = tmp_path / "run"
    argv = ["--method", "condnum", "--condnum_adam_aware", "--model_path", str(stage1_run), "--dataset", "MNIST",
            "--bs", "20", "--total_loop", "3", "--eval_interval", "1", "--test_interval", "0",
            "--final_finetune_epochs", "1", "--finetune_epochs", "1", "--lr", "1e-3", "--data_root", str(data_root),
            "--out_dir", str(out)]
    monkeypatch.setattr(sys, "argv", [str(SCRIPTS["stage2"]), *argv])
    assert load_script("stage2").main(argv) == 0
    rows = read_rows(out / "metrics.csv")
    layers = ("layer1", "layer2", "layer3", "head")
    assert list(rows[0]) == ["loop", "ntr_loss", "well_loss", "ill_loss",
                             *(f"logcond_{d}_{n}" for d in ("orig", "restricted") for n in layers),
                             "orig_test_acc", "rolled_back", "seconds"]
    assert [r["loop"] for r in rows] == ["1", "2", "3"]
    assert all(math.isfinite(float(r["logcond_restricted_layer3"])) for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["loops_completed"] == 3 and (out / "checkpoints" / "final.pt").is_file()
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["method"] == "condnum" and config["condnum_adam_aware"] is True
    s3 = tmp_path / "s3"
    proc = run_script("stage3", "--path", out, "--starts", "sophon,scratch", "--epochs", "1", "--bs", "16",
                      "--data_root", data_root, "--out_dir", s3)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((s3 / "summary.json").read_text())["results"]
    assert {r["start"] for r in results} == {"sophon", "scratch"}
