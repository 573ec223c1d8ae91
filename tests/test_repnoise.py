"""Representation Noising (common/repnoise.py): the reference's MMD against a hand value and a direct formula,
one step's terms and gradient against a hand computation on a tiny model, descent on the noise term, the probe,
state and snapshots, and a run through the stage script that stage 3 reads."""
import copy
import io
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from common.cli import UsageError
from common.data import BatchStream
from common.repnoise import RepNoise, gaussian_mmd
from common.stage2 import Stage2Settings
from common.train import Precision
from helpers import TinyNet, load_script, read_rows, tiny_domain

CPU = Precision(torch.device("cpu"))


def direct_mmd(x, y, mul=2.0, num=5):
    """MMD_loss of the reference as it is written there: squared distances from explicit differences, in float64."""
    total = torch.cat([x, y]).double()
    d = ((total[None, :, :] - total[:, None, :]) ** 2).sum(2)
    n, b = len(total), len(x)
    bandwidth = d.detach().sum() / (n ** 2 - n) / mul ** (num // 2)
    k = sum(torch.exp(-d / (bandwidth * mul ** i)) for i in range(num))
    return torch.mean(k[:b, :b] + k[b:, b:] - k[:b, b:] - k[b:, :b])


def tiny_repnoise(head_classes=10, **config):
    """A RepNoise on a TinyNet: MNIST-shaped restricted and Fashion-shaped original tiny domains."""
    torch.manual_seed(0)
    restricted, original = tiny_domain("MNIST", 1), tiny_domain("FashionMNIST", 2)
    defaults = dict(method="repnoise", lr=1e-2, bs=8, repnoise_layers=["conv", "pool"])
    return RepNoise(TinyNet(classes=head_classes), restricted, original, Stage2Settings(**{**defaults, **config}), CPU)


# ---- the MMD -------------------------------------------------------------------------------------------

def test_mmd_of_one_point_each_by_hand():
    # pooled distances: 0 on the diagonal, 1 between the points; m = 2 / (4 - 2) = 1, bandwidths 1/4 ... 4
    k_xy = sum(math.exp(-1 / s) for s in (0.25, 0.5, 1, 2, 4))
    assert gaussian_mmd(torch.zeros(1, 1), torch.ones(1, 1)).item() == pytest.approx(10 - 2 * k_xy, rel=1e-6), \
        "biased: the diagonals k(x, x) = k(y, y) = 5 count"


def test_mmd_equals_the_reference_formula_and_vanishes_only_for_identical_samples():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen) * 2 + 1
    assert gaussian_mmd(x, y).item() == pytest.approx(direct_mmd(x, y).item(), rel=1e-5)
    assert gaussian_mmd(x, x).item() == pytest.approx(0, abs=1e-6)
    assert gaussian_mmd(x, y).item() > 0.1
    same_law = gaussian_mmd(x, torch.randn(6, 5, generator=gen)).item()
    assert same_law > 0, "the biased estimate is positive for two samples of one law too"
    with pytest.raises(ValueError, match="one shape"):
        gaussian_mmd(x, y[:5])


def test_descending_the_mmd_to_fresh_noise_moves_a_representation_to_the_noise_law():
    gen = torch.Generator().manual_seed(0)
    h = (torch.rand(64, 16, generator=gen) * 2 + 3).requires_grad_()  # uniform on [3, 5]: far from N(0, I)
    held_out = torch.randn(64, 16, generator=gen)
    noise_to_noise = gaussian_mmd(torch.randn(64, 16, generator=gen), held_out).item()
    before = gaussian_mmd(h, held_out).item()
    opt = torch.optim.Adam([h], lr=0.1)
    for _ in range(300):
        loss = gaussian_mmd(h, torch.randn(64, 16, generator=gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert before > 20 * noise_to_noise
    assert gaussian_mmd(h, held_out).item() < 2 * noise_to_noise
    assert abs(h.mean().item()) < 0.5


# ---- one step ------------------------------------------------------------------------------------------

def _copied_stream(algo, name):
    domain, _, stream = algo.domains[name]
    twin = BatchStream(len(domain), stream.batch_size, seed=0)
    twin.load_state_dict(copy.deepcopy(stream.state_dict()))
    return domain, twin


def _recorded_grads(algo):
    grads, step = [], algo.optimizer.step

    def recording_step(*args, **kwargs):
        grads.append([p.grad.clone() for p in algo.model.parameters()])
        return step(*args, **kwargs)

    algo.optimizer.step = recording_step
    return grads


def _by_hand(net, domain, stream, keep_bn_stats=False):
    """TinyNet's forward written out: (conv output, pooled features, logits, labels) of the stream's next batch;
    `keep_bn_stats`: BatchNorm normalises by the batch's statistics without updating its running ones."""
    idx = stream.next()
    x = domain.to_input(domain.images[idx], CPU.device)
    conv = net.conv(x)
    bn = net.bn(conv) if not keep_bn_stats else F.batch_norm(conv, None, None, net.bn.weight, net.bn.bias,
                                                              training=True, eps=net.bn.eps)
    pooled = net.pool(torch.relu(bn)).flatten(1)
    return conv, pooled, net.fc(pooled), domain.labels[idx]


def test_a_step_reports_the_three_terms_and_descends_their_combination():
    alpha, beta = 0.7, 0.3
    algo = tiny_repnoise(repnoise_alpha=alpha, repnoise_beta=beta)
    net = copy.deepcopy(algo.model).train()
    (restricted, r_stream), (original, o_stream) = _copied_stream(algo, "restricted"), _copied_stream(algo, "original")
    noise_gen = torch.Generator().manual_seed(0)
    noise_gen.set_state(algo.noise_gen.get_state())
    grads = _recorded_grads(algo)
    values = algo.step()

    conv, pooled, logits_r, y_r = _by_hand(net, restricted, r_stream, keep_bn_stats=True)
    *_, logits_o, y_o = _by_hand(net, original, o_stream)
    hidden = [conv.flatten(1), pooled]
    noise = sum(direct_mmd(h, torch.randn(h.shape, generator=noise_gen)) for h in hidden) / 2
    ntr, restricted_ce = F.cross_entropy(logits_o, y_o), F.cross_entropy(logits_r, y_r)
    assert values == pytest.approx({"ntr_loss": ntr.item(), "noise_loss": noise.item(),
                                    "restricted_loss": restricted_ce.item()}, rel=1e-5)
    (ntr + beta * noise - alpha * torch.log(restricted_ce + 1)).backward()
    for p, g in zip(net.parameters(), grads[0]):
        assert torch.allclose(g, p.grad.float(), rtol=1e-4, atol=1e-6)
    for mine, hand in zip(algo.model.bn.buffers(), net.bn.buffers()):
        assert torch.equal(mine, hand), "BatchNorm's statistics are the original domain's alone"


def test_descent_on_the_noise_term_brings_a_layers_output_towards_noise():
    algo = tiny_repnoise(repnoise_alpha=0.0, repnoise_beta=10.0, repnoise_layers=["conv"])
    restricted = algo.domains["restricted"][0]
    x = restricted.to_input(restricted.images[:16], CPU.device)
    gen = torch.Generator().manual_seed(5)
    held_out = torch.randn(16, algo.model.conv(x).flatten(1).shape[1], generator=gen)
    distance = lambda: gaussian_mmd(algo.model.conv(x).flatten(1), held_out).item()
    before = distance()
    for _ in range(30):
        algo.step()
    assert distance() < 0.5 * before


def test_the_probe_is_the_head_the_body_ascends_through():
    algo = tiny_repnoise(repnoise_ascent_head="probe", repnoise_alpha=1.0, repnoise_beta=0.0)
    net = copy.deepcopy(algo.model).train()
    probe = copy.deepcopy(algo.probe)
    (restricted, r_stream), (original, o_stream) = _copied_stream(algo, "restricted"), _copied_stream(algo, "original")
    grads = _recorded_grads(algo)
    values = algo.step()
    _, pooled, _, y_r = _by_hand(net, restricted, r_stream, keep_bn_stats=True)
    assert values["restricted_loss"] == pytest.approx(F.cross_entropy(probe(pooled), y_r).item(), rel=1e-5)
    assert not torch.equal(probe.weight, algo.probe.weight), "the probe is fitted every loop"
    *_, logits_o, y_o = _by_hand(net, original, o_stream)
    F.cross_entropy(logits_o, y_o).backward()
    names = [n for n, _ in net.named_parameters()]
    head = {n: g for n, g in zip(names, grads[0]) if n.startswith("fc.")}
    assert all(torch.allclose(g, dict(net.named_parameters())[n].grad, atol=1e-7) for n, g in head.items()), \
        "the model's own head is trained by NTR alone"
    assert not torch.allclose(grads[0][names.index("conv.weight")], net.conv.weight.grad), "the body ascends"


def test_the_ascent_head_must_cover_the_restricted_classes():
    with pytest.raises(UsageError, match="--repnoise_ascent_head probe"):
        tiny_repnoise(head_classes=5)
    assert tiny_repnoise(head_classes=5, repnoise_ascent_head="probe").probe.out_features == 10


def test_unknown_layers_are_a_usage_error():
    with pytest.raises(UsageError, match="no module layer9"):
        tiny_repnoise(repnoise_layers=["conv", "layer9"])


# ---- state ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("head", ["model", "probe"])
def test_state_dict_round_trip_reproduces_the_next_steps(head):
    make = lambda: tiny_repnoise(repnoise_ascent_head=head, repnoise_beta=1.0)
    reference = make()
    reference.step()
    buffer = io.BytesIO()
    torch.save(reference.state_dict(), buffer)
    expected = [reference.step() for _ in range(2)]
    resumed = make()
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    got = [resumed.step() for _ in range(2)]
    assert got == [pytest.approx(e, rel=1e-5) for e in expected]
    for k, v in resumed.model.state_dict().items():
        assert torch.allclose(v.float(), reference.model.state_dict()[k].float(), atol=1e-6), k
    if head == "probe":
        assert torch.allclose(resumed.probe.weight, reference.probe.weight, atol=1e-6)


def test_restore_brings_back_weights_optimiser_and_probe_but_not_the_batches():
    algo = tiny_repnoise(repnoise_ascent_head="probe")
    snap = algo.snapshot()
    weights = copy.deepcopy(algo.model.state_dict())
    probe = algo.probe.weight.clone()
    algo.step()
    position = algo.domains["restricted"][2].pos
    algo.restore(snap)
    assert all(torch.equal(v, weights[k]) for k, v in algo.model.state_dict().items())
    assert torch.equal(algo.probe.weight, probe)
    assert algo.optimizer.state_dict()["state"] == {} and algo.probe_opt.state_dict()["state"] == {}
    assert algo.domains["restricted"][2].pos == position, "a rollback goes on with fresh batches"


# ---- through the stage script --------------------------------------------------------------------------

def _stage2(out, stage1_run, data_root, monkeypatch, *extra):
    argv = ["--method", "repnoise", "--model_path", str(stage1_run), "--dataset", "MNIST", "--bs", "16",
            "--total_loop", "3", "--eval_interval", "1", "--test_interval", "0", "--final_finetune_epochs", "0",
            "--data_root", str(data_root), "--out_dir", str(out), *extra]
    monkeypatch.setattr(sys, "argv", [str(load_script("stage2").__file__), *argv])
    return load_script("stage2").main(argv)


def test_a_repnoise_run_through_the_stage_script(tmp_path, data_root, stage1_run, monkeypatch, restore_signals):
    out = tmp_path / "run"
    assert _stage2(out, stage1_run, data_root, monkeypatch, "--repnoise_beta", "1") == 0
    rows = read_rows(out / "metrics.csv")
    assert list(rows[0]) == ["loop", "ntr_loss", "noise_loss", "restricted_loss", "orig_test_acc", "rolled_back",
                             "seconds"]
    assert len(rows) == 3 and all(float(r["noise_loss"]) > 0 and float(r["orig_test_acc"]) >= 0 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["loops_completed"] == 3 and (out / "checkpoints" / "final.pt").is_file()
    config = json.loads((out / "config.json").read_text())["config"]
    assert (config["method"], config["repnoise_layers"], config["repnoise_beta"]) == \
        ("repnoise", ["layer1", "layer2", "layer3"], 1.0)


@pytest.mark.slow
def test_stage3_reads_a_repnoise_run_with_a_probe(tmp_path, data_root, stage1_run, monkeypatch, restore_signals):
    out = tmp_path / "run"
    assert _stage2(out, stage1_run, data_root, monkeypatch, "--repnoise_ascent_head", "probe", "--repnoise_layers",
                   "layer1,avgpool") == 0
    assert len(read_rows(out / "metrics.csv")) == 3
    s3 = tmp_path / "s3"
    argv = ["--path", str(out), "--epochs", "1", "--bs", "16", "--data_root", str(data_root), "--out_dir", str(s3)]
    monkeypatch.setattr(sys, "argv", [str(load_script("stage3").__file__), *argv])
    assert load_script("stage3").main(argv) == 0
    results = json.loads((s3 / "summary.json").read_text())["results"]
    assert {r["start"] for r in results} == {"sophon", "normal", "scratch"}, "stage 3 names any stage-2 model sophon"
    config = json.loads((s3 / "config.json").read_text())["config"]
    assert Path(config["path"]) == (out / "checkpoints" / "final.pt").resolve()


def test_an_unknown_layer_through_the_script_is_a_usage_error(tmp_path, data_root, stage1_run, monkeypatch,
                                                             restore_signals):
    with pytest.raises(UsageError, match="--repnoise_layers: ResNet has no module layer9"):
        _stage2(tmp_path / "run", stage1_run, data_root, monkeypatch, "--repnoise_layers", "layer1,layer9")
    assert not (tmp_path / "run").exists(), "the method is built before the run folder is opened"
