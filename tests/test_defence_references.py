"""The defences against their references (issue 39): the augmentation, ft_sam's smoothed loss, NAD's attention
on maps of known attention and the layers it reads, FST's head, CLP's pruned channels, ANP's noisy BatchNorm, mask
step and pruned neurons, SAU's shared adversarial examples and loss, i-BAU's hypergradient and perturbation, the
backdoor re-activation, and fst, clp and anp through the backdoor stage-3 script."""
import copy
import functools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import common.defences as dfn
import common.defences_pruning as pruning
import common.defences_unlearning as unlearning
from common.backdoor import BackdoorEval
from common.cli import UsageError
from common.defence_run import DefenceConfig, DefenceRun, random_crop
from common.defences import DefenceCell, run_defence
from common.defences_pruning import anp_prune, anp_step, bn_neurons, channel_lipschitz, clp_prune, perturbed_bn
from common.defences_tuning import (NAD_LAYERS, fst_penalty, fst_reinit_head, nad_loss, project_norm,
                                    smooth_cross_entropy)
from common.defences_unlearning import (fixed_point_hypergradient, gradient_descent_map, init_perturbation,
                                        patch_mask, sau_loss, shared_pgd, universal_perturbation)
from common.models import build_model
from common.report import _defence_lines
from common.train import Precision
from common.verdicts import defence_verdicts
from helpers import TinyNet, linear_model, load_script
from test_finetune import _domain
from test_defences import _args
from test_procedures import _checkpoint

CPU = torch.device("cpu")


def _cell(defence, epochs=1, bs=8, seed=0):
    return DefenceCell(defence, 0.01, bs, epochs, seed, 1.0, dfn.DEFENCE_SCHEDULES[defence])


# ---- augmentation -----------------------------------------------------------------------------------------------

def test_random_crop_is_a_zero_padded_window_at_drawn_offsets():
    x = torch.rand(3, 2, 5, 6)
    out = random_crop(x, 2, torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)
    dy, dx = torch.randint(0, 5, (3,), generator=gen), torch.randint(0, 5, (3,), generator=gen)
    padded = torch.zeros(3, 2, 9, 10)
    padded[:, :, 2:7, 2:8] = x
    for i in range(3):
        assert torch.equal(out[i], padded[i, :, dy[i]:dy[i] + 5, dx[i]:dx[i] + 6])
    assert {(int(a), int(b)) for a, b in zip(dy, dx)} != {(2, 2)}, "the offsets move the window"


def test_every_defence_but_super_ft_and_clp_crops_its_batches():
    crops = {name: DefenceRun(_domain(), _cell(name), DefenceConfig(), CPU, Precision(CPU), None, None,
                              torch.Generator()).pixel_fn() is not None for name in dfn.DEFENCES}
    assert crops == {"ft": True, "ft_sam": True, "super_ft": False, "fine_pruning": True, "nad": True, "fst": True,
                     "clp": False, "anp": True, "sau": False, "i_bau": True}
    run = DefenceRun(_domain(), _cell("ft"), DefenceConfig(defence_crop=0), CPU, Precision(CPU), None, None,
                     torch.Generator())
    assert run.pixel_fn() is None


# ---- ft_sam -----------------------------------------------------------------------------------------------------

def test_smooth_cross_entropy_by_hand_and_backdoorbench_s_gradient():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]], requires_grad=True)
    y = torch.tensor([0, 1])
    target = [[0.9, 0.05, 0.05], [0.05, 0.9, 0.05]]  # 1 - 0.1 on the true class, 0.1 / 2 on each other
    by_hand = 0.0
    for row, t in zip(logits.tolist(), target):
        log_z = math.log(sum(math.exp(v) for v in row))
        by_hand -= sum(ti * (v - log_z) for ti, v in zip(t, row)) / 2
    ours = smooth_cross_entropy(logits, y, 0.1)
    assert float(ours.detach()) == pytest.approx(by_hand, rel=1e-6)
    # BackdoorBench's smooth_crossentropy: KL divergence to the same target, the same gradient
    bb = F.kl_div(F.log_softmax(logits, 1), torch.tensor(target), reduction="none").sum(-1).mean()
    g_ours, = torch.autograd.grad(ours, logits)
    g_bb, = torch.autograd.grad(bb, logits)
    assert torch.allclose(g_ours, g_bb, atol=1e-6)


def test_ft_sam_defaults_are_backdoorbench_s():
    cfg = DefenceConfig()
    assert (cfg.sam_rho, cfg.sam_adaptive, cfg.sam_label_smoothing) == (2.0, True, 0.1)


# ---- nad --------------------------------------------------------------------------------------------------------

def test_nad_loss_on_maps_of_known_attention():
    """A student whose energy is all at one of 2 x 2 positions (attention [1, 0, 0, 0]) against a teacher's
    uniform map ([0.5] * 4): mean squared difference (0.25 + 3 * 0.25) / 4 = 0.25, times beta; a 1 x 1 map
    normalises to 1 whatever it holds, so it adds nothing (why NAD does not read layer4 at 32 px)."""
    logits, y = torch.zeros(1, 4), torch.tensor([2])
    student = torch.zeros(1, 3, 2, 2)
    student[0, 1, 0, 0] = 2.0
    teacher = torch.ones(1, 3, 2, 2)
    loss = nad_loss(logits, y, [student], [teacher], betas=(5000.0,))
    assert float(loss) == pytest.approx(math.log(4) + 5000 * 0.25, rel=1e-5)
    one_by_one = nad_loss(logits, y, [torch.rand(1, 3, 1, 1)], [torch.rand(1, 3, 1, 1)], betas=(5000.0,))
    assert float(one_by_one) == pytest.approx(math.log(4), abs=1e-4)


def test_nad_reads_the_resnet_stages_that_carry_attention_at_32_px():
    model = build_model("resnet18", 10).eval()
    sizes = {}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: sizes.update({n: o.shape[-1]}))
             for n in NAD_LAYERS + ("layer4",)]
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert sizes == {"layer1": 8, "layer2": 4, "layer3": 2, "layer4": 1}
    assert DefenceConfig().nad_betas == (500.0, 1000.0, 5000.0)


def test_nad_student_lr_is_nad_s_step(monkeypatch):
    lrs = []
    real = DefenceRun.reference_optimizer

    def sgd(self, params, lr):
        opt = real(self, params, lr)
        opt.register_step_pre_hook(lambda o, a, k: lrs.append(o.param_groups[0]["lr"]))
        return opt

    monkeypatch.setattr(DefenceRun, "reference_optimizer", sgd)
    from test_defences import TinyResNet
    cfg = DefenceConfig(nad_teacher_epochs=1, defence_steps=6, defence_epoch_steps=2, nad_first_epochs=2)
    run_defence(TinyResNet(), _domain(), _cell("nad", epochs=2), cfg, CPU, Precision(CPU), lambda m: {})
    assert lrs == pytest.approx([0.01] * 2 + [0.1] * 4 + [0.01] * 2), "teacher 2 steps; student 0.1 for 2 epochs"


# ---- fst --------------------------------------------------------------------------------------------------------

def test_fst_penalty_gradient_and_norm_projection():
    w = torch.randn(4, 6, requires_grad=True)
    original = torch.randn(4, 6)
    g, = torch.autograd.grad(fst_penalty(w, original, 0.3), w)
    assert torch.allclose(g, 0.3 * original), "the penalty pushes the head along -W_orig"
    v = torch.randn(4, 6)
    direction = v / v.norm()
    project_norm(v, original.norm())
    assert float(v.norm()) == pytest.approx(float(original.norm()), rel=1e-6)
    assert torch.allclose(v / v.norm(), direction, atol=1e-6)


def test_fst_reinits_the_head_and_keeps_its_norm():
    torch.manual_seed(0)
    model = TinyNet(width=16)
    original = model.fc.weight.detach().clone()
    head = nn.Linear(16, 10)
    fst_reinit_head(head, torch.Generator().manual_seed(1))
    assert head.weight.abs().max() <= 0.25 and head.bias.abs().max() <= 0.25  # 1 / sqrt(16)
    states = []
    curve = run_defence(model, _domain(), _cell("fst", epochs=2), DefenceConfig(defence_steps=4), CPU, Precision(CPU),
                        lambda m: states.append(m.fc.weight.detach().clone()) or {})
    assert len(curve) == 3 and torch.equal(states[0], original), "epoch 0 before the new head"
    assert float(model.fc.weight.detach().norm()) == pytest.approx(float(original.norm()), rel=1e-5)
    assert not torch.allclose(model.fc.weight, original, atol=1e-3)
    assert dfn.DEFENCES["fst"].strategy == "initfc_all" and dfn.DEFENCES["fst"].budget == (10, 8)


# ---- clp --------------------------------------------------------------------------------------------------------

def test_clp_prunes_the_channel_with_the_planted_lipschitz_bound():
    """16 channels of a 1 x 1 conv over 3 inputs, every weight 1 (bound sqrt 3), but channel 5's weights are 10
    (10 sqrt 3) and channel 9's too, with BatchNorm's running variance 100 (10 sqrt 3 / 10 = sqrt 3). mean + 3 std
    = sqrt 3 (1.5625 + 3 * 2.25) = 8.31 sqrt 3: channel 5 alone is over it."""
    model = nn.Sequential(nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16), nn.ReLU())
    conv, bn = model[0], model[1]
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.weight[5] = 10.0
        conv.weight[9] = 10.0
        bn.running_var[9] = 100.0
        bn.bias.fill_(0.5)
    expected = torch.full((16,), math.sqrt(3))
    expected[5] = 10 * math.sqrt(3)
    assert torch.allclose(channel_lipschitz(conv, bn), expected, rtol=1e-5)
    assert clp_prune(model, 3.0) == (1, 16)
    assert bn.weight[5] == 0 and bn.bias[5] == 0
    assert (bn.weight[torch.arange(16) != 5] == 1).all() and (bn.bias[torch.arange(16) != 5] == 0.5).all()
    model.eval()
    out = model(torch.rand(2, 3, 4, 4))
    assert (out[:, 5] == 0).all() and (out[:, 9] > 0).all()
    assert clp_prune(model, 3.0) == (0, 16), "u large enough spares the rest"


def test_clp_runs_data_free_and_holds_its_evaluations():
    model = TinyNet()
    seen = []
    curve = run_defence(model, _domain(), _cell("clp", epochs=3), DefenceConfig(clp_u=0.0), CPU, Precision(CPU),
                        lambda m: seen.append(1) or {"test_acc": float(len(seen))})
    assert [c["test_acc"] for c in curve] == [1.0, 2.0, 2.0, 2.0] and len(seen) == 2, "evaluated once after pruning"
    assert 0 < curve.defence_info["pruned_channels"] < 4 and curve.defence_info["channels"] == 4


# ---- anp --------------------------------------------------------------------------------------------------------

class NoisyBatchNorm2d(nn.BatchNorm2d):
    """ANP's models/anp_batchnorm.py NoisyBatchNorm2d, its forward as there (running statistics tracked)."""

    def __init__(self, features):
        super().__init__(features)
        self.neuron_mask = nn.Parameter(torch.ones(features))
        self.neuron_noise = nn.Parameter(torch.zeros(features))
        self.neuron_noise_bias = nn.Parameter(torch.zeros(features))
        self.is_perturbed = False

    def forward(self, x):
        coeff_weight = self.neuron_mask + self.neuron_noise if self.is_perturbed else self.neuron_mask
        coeff_bias = 1.0 + self.neuron_noise_bias if self.is_perturbed else 1.0
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight * coeff_weight, self.bias * coeff_bias,
                            self.training, self.momentum, self.eps)


def _bn_net(bn=nn.BatchNorm2d):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), bn(5), nn.ReLU(), nn.Conv2d(5, 4, 3, padding=1), bn(4),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    return model


def _reference_of(model):
    """The same weights in ANP's noisy net (its load_state_dict: the masks 1, the noise 0)."""
    reference = _bn_net(NoisyBatchNorm2d)
    reference.load_state_dict(model.state_dict(), strict=False)
    return reference, [m for m in reference.modules() if isinstance(m, NoisyBatchNorm2d)]


def _noisy_bns(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 2)
                m.bias.uniform_(-1, 1)
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return model


@pytest.mark.parametrize("training", [True, False])
def test_anp_perturbed_batchnorm_is_anp_s_noisy_batchnorm(training):
    """BatchNorm with weight * (mask + noise_w) and bias * (1 + noise_b), the mask alone without noise, as ANP's
    NoisyBatchNorm2d with the noise included and excluded; batch statistics in train mode, running ones in eval."""
    model = _noisy_bns(_bn_net()).train(training)
    reference, noisy = _reference_of(model)
    reference.train(training)
    mask, noise = torch.rand(9), torch.rand(2, 9) - 0.5
    with torch.no_grad():
        for m, k, w, b in zip(noisy, mask.split([5, 4]), noise[0].split([5, 4]), noise[1].split([5, 4])):
            m.neuron_mask.copy_(k), m.neuron_noise.copy_(w), m.neuron_noise_bias.copy_(b)
    x, bns = torch.randn(6, 3, 4, 4), bn_neurons(model)
    for perturbed in (True, False):
        for m in noisy:
            m.is_perturbed = perturbed
        ours = torch.func.functional_call(model, perturbed_bn(model, bns, mask, noise if perturbed else None), (x,))
        assert torch.allclose(ours, reference(x), atol=1e-5)


def test_anp_step_is_anp_s_mask_train_iteration():
    """Two iterations of optimize_mask_cifar.py mask_train (two noise steps each, so the noise moves by eps / 2
    twice), the reference's noise drawn as ours (weight then bias noise of every neuron, from the same generator),
    on its noisy net: the masks after each iteration agree, stay in [0, 1] and hit both bounds at this lr."""
    cfg = DefenceConfig(anp_steps=2)
    model = _noisy_bns(_bn_net()).train()
    reference, noisy = _reference_of(model)
    reference.train()
    torch.manual_seed(1)
    x, y = torch.randn(6, 3, 4, 4), torch.randint(0, 3, (6,))
    mask = torch.ones(9, requires_grad=True)
    ours = torch.optim.SGD([mask], lr=5.0, momentum=0.9)
    masks = [m.neuron_mask for m in noisy]
    mask_opt = torch.optim.SGD(masks, lr=5.0, momentum=0.9)
    noise_params = [p for m in noisy for p in (m.neuron_noise, m.neuron_noise_bias)]
    noise_opt = torch.optim.SGD(noise_params, lr=cfg.anp_eps / cfg.anp_steps)
    gen, reference_gen = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    bns = bn_neurons(model)
    for _ in range(2):
        anp_step(model, bns, x, y, mask, ours, cfg, gen, Precision(CPU))
        draw = torch.empty(2, 9).uniform_(-cfg.anp_eps, cfg.anp_eps, generator=reference_gen)
        with torch.no_grad():  # reset(rand_init=True)
            for m, w, b in zip(noisy, draw[0].split([5, 4]), draw[1].split([5, 4])):
                m.neuron_noise.copy_(w), m.neuron_noise_bias.copy_(b)
        for _ in range(cfg.anp_steps):
            noise_opt.zero_grad()
            for m in noisy:
                m.is_perturbed = True
            (-F.cross_entropy(reference(x), y)).backward()
            for p in noise_params:  # sign_grad
                p.grad.data = torch.sign(p.grad.data)
            noise_opt.step()
        mask_opt.zero_grad()
        loss_rob = F.cross_entropy(reference(x), y)
        for m in noisy:
            m.is_perturbed = False
        loss = cfg.anp_alpha * F.cross_entropy(reference(x), y) + (1 - cfg.anp_alpha) * loss_rob
        loss.backward()
        mask_opt.step()
        with torch.no_grad():  # clip_mask
            for p in masks:
                p.clamp_(0.0, 1.0)
        assert torch.allclose(mask.detach(), torch.cat([p.detach() for p in masks]), atol=1e-5)
    assert mask.min() == 0 and mask.max() == 1
    assert all(p.grad is None for p in model.parameters()), "the model's own weights get no gradient"


def test_anp_prunes_the_neurons_at_or_below_the_threshold():
    """Planted masks: the channels at or below 0.2 lose their BatchNorm weight, keep their bias (prune_neuron_cifar.py
    `pruning`); in eval mode a pruned channel outputs its bias whatever the input."""
    model = _noisy_bns(_bn_net()).eval()
    bns = bn_neurons(model)
    weights, biases = [bn.weight.detach().clone() for _, bn in bns], [bn.bias.detach().clone() for _, bn in bns]
    mask = torch.tensor([0.9, 0.2, 0.05, 0.21, 1.0, 0.0, 0.5, 0.19, 1.0])
    assert anp_prune(bns, mask, 0.2) == {"1": 2, "4": 2}
    for (_, bn), w, b, pruned in zip(bns, weights, biases, ([1, 2], [0, 2])):
        kept = [i for i in range(len(w)) if i not in pruned]
        assert (bn.weight[pruned] == 0).all() and torch.equal(bn.weight[kept], w[kept])
        assert torch.equal(bn.bias.detach(), b)
    out = model[:2](torch.randn(4, 3, 4, 4))
    assert torch.allclose(out[:, 1], biases[0][1].expand(4, 4, 4)) and out[:, 0].std() > 0


def test_anp_run_prunes_by_its_masks_and_leaves_no_trace(monkeypatch):
    """resnet18 at 8 px, 3 steps at a large lr: only BatchNorm weights change, exactly the ones whose final mask is
    <= the threshold, zeroed; no hook, parametrisation or new parameter stays; running statistics, requires_grad
    and the train/eval mode as they were."""
    final = {}

    def spy(bns, mask, threshold):
        final["mask"] = mask.clone()
        return anp_prune(bns, mask, threshold)

    monkeypatch.setattr(pruning, "anp_prune", spy)
    torch.manual_seed(0)
    model = build_model("resnet18", 10).eval()
    before = copy.deepcopy(model.state_dict())
    cell = DefenceCell("anp", 50.0, 8, 2, 0, 1.0, "constant")
    curve = run_defence(model, _domain(), cell, DefenceConfig(defence_steps=3), CPU, Precision(CPU),
                        lambda m: {"test_acc": float(m.training)})
    bns = bn_neurons(model)
    pruned = final["mask"] <= 0.2
    zeroed = torch.cat([(bn.weight == 0) & (before[f"{n}.weight"] != 0) for n, bn in bns])
    assert torch.equal(zeroed, pruned) and 0 < int(pruned.sum()) < len(pruned)
    info = curve.defence_info
    assert info["pruned_channels"] == int(pruned.sum()) and info["channels"] == len(pruned) == 4800
    assert sum(info["pruned_layers"].values()) == info["pruned_channels"]
    weights = {f"{n}.weight" for n, _ in bns}
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items() if k not in weights)
    assert not any(m._forward_hooks or m._forward_pre_hooks or torch.nn.utils.parametrize.is_parametrized(m)
                   for m in model.modules())
    assert all(p.requires_grad and p.grad is None for p in model.parameters()) and not model.training
    assert [c["test_acc"] for c in curve] == [0.0, 0.0, 0.0], "the mode put back before the evaluations, then held"


def test_anp_defaults_are_anp_s_and_it_refuses_a_model_without_batchnorm():
    cfg = DefenceConfig()
    assert (cfg.anp_lr, cfg.anp_eps, cfg.anp_steps, cfg.anp_alpha, cfg.anp_threshold) == (0.2, 0.4, 1, 0.2, 0.2)
    run = DefenceRun(_domain(), _cell("anp"), cfg, CPU, Precision(CPU), None, None, torch.Generator())
    optimizer = run.reference_optimizer([torch.zeros(2, requires_grad=True)], 0.2)
    assert run.steps == 2000 and (optimizer.defaults["momentum"], optimizer.defaults["weight_decay"]) == (0.9, 0)
    _, args = _args(["--defences", "anp", "--anp_lr", "0.5"])
    assert [(c.lr, c.schedule) for c in dfn.DEFENCES["anp"].cells(args)] == [(0.5, "constant")]
    with pytest.raises(UsageError, match="defence anp perturbs and prunes BatchNorm2d channels"):
        run_defence(linear_model(3 * 8 * 8, 10), _domain(), _cell("anp"), DefenceConfig(defence_steps=1), CPU,
                    Precision(CPU), lambda m: {})
# ---- sau --------------------------------------------------------------------------------------------------------

def _pixels(x, pert):
    return x + pert


@pytest.mark.parametrize("init", ["zero", "random", "max", "min"])
def test_shared_pgd_stays_in_the_linf_ball_one_perturbation_per_sample(init):
    torch.manual_seed(0)
    model, reference = TinyNet().eval(), TinyNet().eval()
    x, y = torch.rand(6, 3, 5, 5), torch.arange(6) % 10
    start = init_perturbation(x, init, 0.2, torch.Generator().manual_seed(1))
    assert start.shape == x.shape and start.abs().max() <= 0.2
    low, high = {"zero": (0.0, 0.0), "random": (0.0, 0.2), "max": (0.2, 0.2), "min": (-0.2, -0.2)}[init]
    assert float(start.min()) >= low - 1e-7 and float(start.max()) <= high + 1e-7
    pert = shared_pgd(model, reference, x, y, _pixels, DefenceConfig(sau_pgd_init=init),
                      torch.Generator().manual_seed(1))
    assert pert.shape == x.shape and float(pert.abs().max()) <= 0.2 + 1e-7 and not pert.requires_grad
    assert not torch.equal(pert[0], pert[1]), "a perturbation per sample, not one shared by the batch"


def test_shared_pgd_leaves_the_pixel_range_as_backdoorbench_does():
    """BackdoorBench leaves the clip to [0, 1] out ("not necessary for backdoor defense"): a white image goes
    above 1 where the perturbation stays positive."""
    torch.manual_seed(0)
    x = torch.ones(4, 3, 5, 5)
    pert = shared_pgd(TinyNet().eval(), TinyNet().eval(), x, torch.zeros(4, dtype=torch.long), _pixels,
                      DefenceConfig())
    assert float((x + pert).max()) == pytest.approx(1.2)


def _planted(bias):
    """logits (1, 10 x_1, 10 x_2) + (0, bias)."""
    model = nn.Linear(2, 3)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]))
        model.bias.copy_(torch.tensor([1.0, *bias]))
    return model


def test_shared_pgd_finds_the_shared_adversarial_example_of_planted_linear_models():
    """At x = 0 both models say class 0. h = (1, 10 x_1, 10 x_2 - 0.5) and h_0 = (1, 10 x_1 - 0.3, 10 x_2): at
    PGD's start, the ball's corner (0.2, 0.2), both are fooled but apart (h says 1, h_0 says 2); at (0.2, -0.2)
    both say 1. The shared loss finds it; without it (beta_2 0) PGD stays at the corner, both fooled, nothing
    left for its adversarial loss to push."""
    h, h_0 = _planted((0.0, -0.5)), _planted((-0.3, 0.0))
    x, y = torch.zeros(3, 2), torch.zeros(3, dtype=torch.long)
    pert = shared_pgd(h, h_0, x, y, _pixels, DefenceConfig())
    assert h(x + pert).argmax(1).tolist() == h_0(x + pert).argmax(1).tolist() == [1, 1, 1]
    assert pert.abs().max() <= 0.2 + 1e-7
    apart = shared_pgd(h, h_0, x, y, _pixels, DefenceConfig(sau_beta_2=0.0))
    assert torch.equal(apart, torch.full_like(x, 0.2))
    assert (h(x + apart).argmax(1) != h_0(x + apart).argmax(1)).all()


def test_sau_loss_by_hand():
    """4 samples, 3 classes. y0 = h_0(x + pert)'s class: sample 0 a potential poison (y0 = 1, neither y = 0
    nor h_0's clean 0), sample 1 not (y0 = h_0's clean prediction 2), sample 2 a potential poison whose
    probability of y0 is below 0.001 (both clamps bite: log 0.999 twice), sample 3 not (y0 = y)."""
    y = torch.tensor([0, 1, 0, 2])
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    logits_adv = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 2.0], [10.0, -10.0, 0.0], [0.0, 0.0, 3.0]])
    logits_ref = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    logits_ref_adv = torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 3.0], [0.0, 1.0, 0.0], [0.0, 0.0, 2.0]])

    def ce(row, label):
        return math.log(sum(math.exp(v) for v in row)) - row[label]

    p = math.e / (2 + math.e)  # sample 0: h's probability of y0 = 1 on x + pert
    l_sar = (-(math.log(1e-6 + (1 - p)) + math.log(1 + 1e-6 - p)) / 2 - math.log(0.999 + 1e-6)) / 4
    l_cl = sum(ce(r, int(c)) for r, c in zip(logits.tolist(), y)) / 4
    l_at = sum(ce(r, int(c)) for r, c in zip(logits_adv.tolist(), y)) / 4
    cfg = DefenceConfig(sau_lmd_1=1.0, sau_lmd_2=0.5, sau_lmd_3=2.0)
    ours = sau_loss(logits, logits_adv, logits_ref, logits_ref_adv, y, cfg)
    assert float(ours) == pytest.approx(l_cl + 0.5 * l_at + 2.0 * l_sar, rel=1e-5)
    assert DefenceConfig().sau_lmd_2 == 0.0, "BackdoorBench's default: no adversarial-training term"


def test_sau_defaults_are_backdoorbench_s():
    cfg = DefenceConfig()
    assert (cfg.sau_lr, cfg.sau_trigger_norm, cfg.sau_adv_lr, cfg.sau_adv_steps, cfg.sau_pgd_init) == (
        1e-4, 0.2, 0.2, 5, "max")
    assert (cfg.sau_beta_1, cfg.sau_beta_2, cfg.sau_lmd_1, cfg.sau_lmd_3, cfg.sau_train_mode) == (
        0.01, 1.0, 1.0, 1.0, False)
    sau = dfn.DEFENCES["sau"]
    assert sau.budget == (100, 10) and (sau.optimizer, sau.decay, sau.crop) == ("adam", False, False)
    run = DefenceRun(_domain(), DefenceCell("sau", 1e-4, 8, 1, 0, 1.0, "constant"), cfg, CPU, Precision(CPU), None,
                     None, torch.Generator())
    opt = run.reference_optimizer(TinyNet().parameters(), 1e-4)
    assert isinstance(opt, torch.optim.Adam) and opt.defaults["amsgrad"] and opt.defaults["weight_decay"] == 0
    assert opt.defaults["betas"] == (0.9, 0.999) and run.steps == 1000


def test_sau_unlearns_on_a_resnet18_against_a_frozen_copy(monkeypatch):
    torch.manual_seed(0)
    model = build_model("resnet18", 10)
    start = copy.deepcopy(model.state_dict())
    seen = []

    def recording(model, reference, *args):
        assert reference is not model
        seen.append(all(torch.equal(v, start[k]) for k, v in reference.state_dict().items()))
        return shared_pgd(model, reference, *args)

    monkeypatch.setattr(unlearning, "shared_pgd", recording)
    evaluations = []
    cell = DefenceCell("sau", 1e-4, 8, 2, 0, 1.0, dfn.DEFENCE_SCHEDULES["sau"])
    curve = run_defence(model, _domain(24, size=8), cell, DefenceConfig(defence_steps=3), CPU, Precision(CPU),
                        lambda m: evaluations.append(1) or {"test_acc": 0.0})
    assert len(curve) == 3 and len(evaluations) == 3, "epoch 0, then `epochs` evaluations"
    assert seen == [True] * 3, "one PGD a step, against the model as it came"
    after = model.state_dict()
    assert not torch.equal(after["conv1.weight"], start["conv1.weight"])
    assert torch.equal(after["bn1.running_mean"], start["bn1.running_mean"]), "BatchNorm fixed, as BackdoorBench"


def test_sau_train_mode_updates_batchnorm_statistics():
    model = TinyNet()
    start = model.bn.running_mean.clone()
    run_defence(model, _domain(), DefenceCell("sau", 1e-4, 8, 1, 0, 1.0, "constant"),
                DefenceConfig(defence_steps=2, sau_train_mode=True), CPU, Precision(CPU), lambda m: {})
    assert not torch.equal(model.bn.running_mean, start)
# ---- i_bau --------------------------------------------------------------------------------------------------------

def test_fixed_point_hypergradient_is_the_implicit_derivative_of_a_quadratic_problem():
    """Inner: H(delta, t) = 0.5 delta^T A delta - t^T delta, minimised at delta* = A^-1 t, its GD map phi =
    delta - a (A delta - t): d phi/d delta = I - a A, d phi/d t = a I. Outer: E = 0.5 ||delta - b||^2 + s c^T t.
    The hypergradient: d/dt = s c + A^-1 (delta* - b), d/ds = c^T t; K iterations sum a (I - a A)^k for k < K
    in place of A^-1."""
    torch.manual_seed(0)
    n, a = 4, 0.1
    q = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))[0]
    A = q @ torch.diag(torch.tensor([1.0, 1.5, 2.0, 3.0], dtype=torch.float64)) @ q.T
    b, c = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    t = torch.randn(n, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    delta_star = torch.linalg.solve(A, t.detach())
    phi = gradient_descent_map(lambda d: 0.5 * d @ A @ d - t @ d, a)
    outer = lambda d: 0.5 * (d - b).square().sum() + s * (c @ t)

    def implicit(inverse):
        return [s.detach() * c + inverse @ (delta_star - b), c @ t.detach()]

    series = sum(torch.linalg.matrix_power(torch.eye(n, dtype=torch.float64) - a * A, k) for k in range(5))
    for K, inverse in ((5, a * series), (400, torch.linalg.inv(A))):
        grads = fixed_point_hypergradient(delta_star, [t, s], phi, outer, K)
        for got, want in zip(grads, implicit(inverse)):
            assert torch.allclose(got, want, atol=1e-10), K
    exact = torch.autograd.grad(outer(torch.linalg.solve(A, t)), [t, s])
    assert all(torch.allclose(g, e, atol=1e-10) for g, e in zip(implicit(torch.linalg.inv(A)), exact))
    assert not torch.allclose(fixed_point_hypergradient(delta_star, [t, s], phi, outer, 0)[0], exact[0]), \
        "the implicit term matters"


def test_universal_perturbation_is_sgd_ascent_on_the_model_s_own_labels_and_stays_in_the_ball():
    torch.manual_seed(0)
    model, x = TinyNet().eval(), torch.randn(6, 3, 5, 5)
    start = torch.zeros_like(x[:1])
    delta = universal_perturbation(model, [x], start, Precision(CPU))
    z = torch.zeros_like(start, requires_grad=True)
    grad, = torch.autograd.grad(F.cross_entropy(model(x + z), model(x).argmax(1)), z)
    assert delta.shape == (1, 3, 5, 5) and torch.allclose(delta, 10.0 * grad, atol=1e-6), \
        "one SGD step of lr 10 up the CE (the ridge's gradient is 0 at 0)"
    free = universal_perturbation(model, [x, x + 1, x - 1], start, Precision(CPU))
    norm = float(torch.linalg.vector_norm(free))
    assert norm > 0.01
    ball = universal_perturbation(model, [x, x + 1, x - 1], start, Precision(CPU), radius=norm / 2)
    assert float(torch.linalg.vector_norm(ball)) == pytest.approx(norm / 2, rel=1e-5)
    assert torch.allclose(ball, free / 2, atol=1e-6), "scaled onto the ball, its direction kept"
    assert torch.equal(universal_perturbation(model, [x, x + 1, x - 1], start, Precision(CPU), radius=2 * norm),
                       free), "inside the ball it stays as it is"


def test_patch_mask_gives_the_perturbation_to_the_reference_s_share_and_at_least_one_image():
    gen = torch.Generator().manual_seed(0)
    for n, patched in ((8, 1), (100, 1), (256, 2), (1000, 10)):
        mask = patch_mask(n, 0.01, gen, CPU)
        assert mask.shape == (n, 1, 1, 1) and int(mask.sum()) == patched and set(mask.flatten().tolist()) == {0, 1}


def test_i_bau_defaults_are_backdoorbench_s():
    d, cfg = dfn.DEFENCES["i_bau"], DefenceConfig()
    assert d.budget == (5, 10) and d.optimizer == "adam" and d.schedule == "constant" and d.crop
    assert (cfg.ibau_lr, cfg.ibau_k, cfg.ibau_portion, cfg.ibau_radius) == (1e-4, 5, 0.01, None)
    assert "defence_momentum" not in d.reads and "defence_weight_decay" not in d.reads and "ibau_k" in d.reads


def test_i_bau_unlearns_a_resnet18_in_eval_mode_through_the_registry():
    torch.manual_seed(0)
    model = build_model("resnet18", 10)
    before = copy.deepcopy(model.state_dict())
    seen = []
    cfg = DefenceConfig(defence_steps=3, defence_epoch_steps=2, reactivate_samples=0)
    curve = run_defence(model, _domain(size=8), _cell("i_bau", epochs=2), cfg, CPU, Precision(CPU),
                        lambda m: seen.append(1) or {"test_acc": float(len(seen))})
    assert [c["test_acc"] for c in curve] == [1.0, 2.0, 3.0] and curve.skipped_steps == 0
    params = {n for n, _ in model.named_parameters()}
    state = model.state_dict()
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert all(not torch.equal(state[n], before[n]) for n in ("conv1.weight", "layer4.1.conv2.weight", "fc.weight"))
    assert all(torch.equal(v, before[k]) for k, v in state.items() if k not in params), \
        "BatchNorm statistics kept: the reference unlearns in eval mode"
    assert len(curve.defence_info["perturbation_norms"]) == 2, "a perturbation per round of 2 steps"


# ---- backdoor re-activation ---------------------------------------------------------------------------------------

class _Recording(BackdoorEval):
    def __call__(self, model, device, precision):
        self.states = getattr(self, "states", []) + [copy.deepcopy(model.state_dict())]
        return super().__call__(model, device, precision)


def test_reactivation_fine_tunes_a_copy_and_records_its_asr():
    torch.manual_seed(0)
    model, domain = TinyNet(), _domain(32)
    evaluator = _Recording(domain, 2, 0)
    evaluate = functools.partial(evaluator, device=CPU, precision=Precision(CPU))
    cfg = DefenceConfig(defence_steps=2, reactivate_samples=5, reactivate_epochs=2, reactivate_lr=0.5)
    curve = run_defence(model, domain, _cell("ft"), cfg, CPU, Precision(CPU), evaluate)
    info = curve.defence_info
    assert (info["reactivation_samples"], info["reactivation_epochs"]) == (5, 2)
    assert 0 <= info["reactivated_asr"] <= 100 and 0 <= info["reactivated_test_acc"] <= 100
    defended, probe = evaluator.states[-2], evaluator.states[-1]
    assert all(torch.equal(v, defended[k]) for k, v in model.state_dict().items()), "the defended model untouched"
    assert not torch.equal(probe["fc.weight"], defended["fc.weight"]), "the copy was fine-tuned"
    plain = run_defence(TinyNet(), domain, _cell("ft"), DefenceConfig(defence_steps=2, reactivate_samples=0), CPU,
                        Precision(CPU), evaluate)
    assert plain.defence_info is None


def test_reactivated_asr_in_the_defence_rows_and_the_report():
    def r(start, seed, asr_after):
        return {"start": start, "strategy": "direct_all", "optimizer": "momentum", "lr": 0.01, "batch_size": 8,
                "train_fraction": 0.05, "schedule": "cosine", "seed": seed, "defence": "ft",
                "test_acc_curve": [90, 80], "asr_curve": [100, 10], "defence_info": {"reactivated_asr": asr_after}}

    rows = defence_verdicts([r("irreversible", 0, 90), r("backdoored", 0, 20), r("irreversible", 1, 70),
                             r("backdoored", 1, 40)])
    assert rows[0]["reactivated_asr_irreversible_mean"] == 80 and rows[0]["reactivated_asr_backdoored_mean"] == 30
    assert rows[0]["reactivated_asr_irreversible_std"] == pytest.approx(200 ** 0.5)
    lines = _defence_lines(rows)
    assert "re-activated ASR irreversible" in lines[4] and lines[6].endswith("| 80.00 +- 14.14 | 30.00 +- 14.14 |")


# ---- through the backdoor stage-3 script ------------------------------------------------------------------------

@pytest.mark.slow
def test_fst_clp_and_anp_run_through_the_backdoor_script(tmp_path, data_root, restore_signals, quiet_log):  # noqa: F811
    trigger = {"trigger_size": 3, "target_label": 0, "poison_percent": 0.2}
    irreversible = _checkpoint(tmp_path / "irreversible.pt", "MNIST", "irreversible_backdoor/stage2_train", **trigger)
    backdoored = _checkpoint(tmp_path / "backdoored.pt", "FashionMNIST", "irreversible_backdoor/stage1_pretrain",
                             **trigger)
    out = tmp_path / "defended"
    argv = ["--path", irreversible, "--baseline_path", backdoored, "--data_root", data_root, "--epochs", "2",
            "--bs", "16", "--defences", "fst,clp,anp", "--defences_only", "--defence_steps", "2",
            "--reactivate_epochs", "1", "--out_dir", out]
    assert load_script("bd_stage3").main([str(a) for a in argv]) == 0
    entries = [json.loads(line) for line in (out / "cells.jsonl").read_text().splitlines()]
    assert sorted((e["defence"], e["start"]) for e in entries) == [
        ("anp", "backdoored"), ("anp", "irreversible"), ("clp", "backdoored"), ("clp", "irreversible"),
        ("fst", "backdoored"), ("fst", "irreversible")]
    assert all(0 <= e["defence_info"]["reactivated_asr"] <= 100 for e in entries)
    assert all(e["key"].split("|")[1] == ("initfc_all" if e["defence"] == "fst" else "direct_all") for e in entries)
    report = (out / "report.md").read_text()
    assert "re-activated ASR irreversible" in report and "| fst | 0.01 | 16 |" in report and "| clp | 0 | 16 |" in report
    assert "| anp | 0.2 | 16 |" in report
