"""Fine-tuning attacks: what each strategy trains, the optimiser table, verdict maths, the grid."""
import copy

import pytest
import torch

import common.finetune as ft
from common.cli import CommonSettings, UsageError
from common.data import Domain
from common.finetune import Attack, run_attack
from common.procedures import grid_settings, plan
from common.settings import compose, parse
from common.train import OPTIMIZERS, Precision, make_optimizer
from common.verdicts import auc, epochs_to_reach, mean_std, scratch_verdicts
from helpers import TinyNet

CPU = torch.device("cpu")


def _domain(n=24, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    images = (labels.view(-1, 1, 1, 1) * 20 + torch.randint(0, 30, (n, 3, size, size), generator=g)).to(torch.uint8)
    return Domain("CIFAR10", True, images, labels, n)


# ---- strategies -------------------------------------------------------------------------------------

# SPEC §9: direct_* keeps the head, initfc_* re-initialises it; *_all trains every layer, *_fc the head only
@pytest.mark.parametrize("strategy,reinit,scope", [("direct_all", False, "all"), ("initfc_all", True, "all"),
                                                   ("direct_fc", False, "head"), ("initfc_fc", True, "head")])
def test_run_attack_trains_what_the_strategy_says(strategy, reinit, scope):
    torch.manual_seed(0)
    model = TinyNet()
    before = copy.deepcopy(model.state_dict())
    heads_at_epoch0 = []

    def evaluate(m):
        if not heads_at_epoch0:
            heads_at_epoch0.append((m.fc.weight.detach().clone(), m.fc.bias.detach().clone()))
        return {"test_acc": 0.0}

    attack = Attack(strategy, "adam", 1e-2, 8, 1, seed=3)
    curve = run_attack(model, _domain(), attack, CPU, Precision(CPU), evaluate)
    assert len(curve) == 2  # epoch 0 and epoch 1

    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    params = {k for k, _ in model.named_parameters()}
    if scope == "all":
        assert params <= changed
        assert "bn.running_mean" in changed
    else:
        assert changed & params == {"fc.weight", "fc.bias"}
        assert not any(k.startswith("bn.") for k in changed)  # body BatchNorm frozen, statistics included
    w0, b0 = heads_at_epoch0[0]
    assert (not torch.equal(w0, before["fc.weight"])) == reinit  # epoch 0 measured after any re-init
    if reinit:
        assert torch.count_nonzero(b0) == 0  # Xavier-uniform weights, zero bias
        bound = (6 / (4 + 10)) ** 0.5
        assert float(w0.abs().max()) <= bound
    assert all(p.requires_grad for p in model.parameters())  # restored for the caller


def test_reinit_is_seeded_by_the_attack_seed():
    heads = []
    for seed in (1, 1, 2):
        torch.manual_seed(0)
        model = TinyNet()
        run_attack(model, _domain(), Attack("initfc_fc", "sgd", 1e-9, 8, 0, seed), CPU, Precision(CPU),
                   lambda m: heads.append(m.fc.weight.detach().clone()) or {})
    assert torch.equal(heads[0], heads[1]) and not torch.equal(heads[0], heads[2])


# ---- optimisers ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,cls,extra", [
    ("sgd", torch.optim.SGD, {"momentum": 0}), ("momentum", torch.optim.SGD, {"momentum": 0.9}),
    ("adam", torch.optim.Adam, {}), ("adamw", torch.optim.AdamW, {}), ("rmsprop", torch.optim.RMSprop, {}),
    ("adagrad", torch.optim.Adagrad, {}), ("adadelta", torch.optim.Adadelta, {})])
def test_optimizer_table(name, cls, extra):
    p = [torch.nn.Parameter(torch.zeros(2))]
    for attack in (False, True):
        opt = make_optimizer(name, p, 0.123, attack=attack)
        assert type(opt) is cls
        group = opt.param_groups[0]
        assert group["lr"] == 0.123
        for k, v in extra.items():
            assert group[k] == v
        default_wd = cls(p, lr=0.123).param_groups[0]["weight_decay"]
        expected_wd = 1e-4 if attack and name in ("sgd", "momentum") else default_wd
        assert group["weight_decay"] == expected_wd, (name, attack)


def test_run_attack_uses_the_attack_optimizer(monkeypatch):
    made = []

    def spy(name, params, lr, *, attack=False):
        made.append((name, lr, attack))
        return make_optimizer(name, params, lr, attack=attack)

    monkeypatch.setattr(ft, "make_optimizer", spy)
    run_attack(TinyNet(), _domain(), Attack("direct_all", "momentum", 1e-3, 8, 1, 0), CPU, Precision(CPU),
               lambda m: {})
    assert made == [("momentum", 1e-3, True)]
    assert set(OPTIMIZERS) == {"sgd", "momentum", "adam", "adamw", "rmsprop", "adagrad", "adadelta", "sign", "normalized"}


# ---- verdict maths ----------------------------------------------------------------------------------------

def test_epochs_to_reach():
    assert epochs_to_reach([10, 20, 30, 25], 20) == 1
    assert epochs_to_reach([30, 10], 20) == 0
    assert epochs_to_reach([10, 19.99], 20) is None
    assert epochs_to_reach([], 1) is None


def test_auc():
    assert auc([0, 10, 20]) == pytest.approx(10.0)  # ((0+10)/2 + (10+20)/2) / 2
    assert auc([10, 10, 10, 10]) == pytest.approx(10.0)
    assert auc([0, 30]) == pytest.approx(15.0)
    assert auc([7]) == 7.0


def test_mean_std_sample_std_ignores_missing():
    mean, std = mean_std([1.0, 3.0, None])
    assert mean == pytest.approx(2.0) and std == pytest.approx(2 ** 0.5)
    assert mean_std([None]) == (None, None)
    assert mean_std([4.0]) == (4.0, 0.0)


def _r(start, seed, curve, strategy="direct_all", optimizer="momentum"):
    return {"start": start, "strategy": strategy, "optimizer": optimizer, "lr": 1e-4, "batch_size": 16,
            "seed": seed, "test_acc_curve": curve}


def test_scratch_verdicts_two_seeds():
    results = [
        _r("sophon", 0, [10, 10, 30]), _r("scratch", 0, [10, 20, 40]),  # never reaches 40
        _r("sophon", 1, [10, 20, 50]), _r("scratch", 1, [10, 30, 40]),  # reaches 40 at epoch 2
        _r("normal", 0, [90, 90, 90]),
        _r("sophon", 0, [5, 5, 5], strategy="initfc_fc"), _r("scratch", 0, [10, 20, 30], strategy="initfc_fc"),
    ]
    verdicts = {v["strategy"]: v for v in scratch_verdicts(results)}
    assert set(verdicts) == {"direct_all", "initfc_fc"}
    v = verdicts["direct_all"]
    assert v["epochs_to_scratch_final_per_seed"] == [None, 2]
    assert v["epochs_to_scratch_final"] == 2  # the attacker's best seed
    r0 = auc([10, 10, 30]) / auc([10, 20, 40])  # 15 / 22.5
    r1 = auc([10, 20, 50]) / auc([10, 30, 40])  # 25 / 27.5
    assert v["auc_ratio_mean"] == pytest.approx((r0 + r1) / 2)
    assert v["auc_ratio_std"] == pytest.approx(abs(r0 - r1) / 2 ** 0.5)
    assert v["seeds"] == 2 and v["lr"] == 1e-4 and v["batch_size"] == 16
    never = verdicts["initfc_fc"]
    assert never["epochs_to_scratch_final"] is None
    assert never["auc_ratio_mean"] == pytest.approx(5 / 20) and never["auc_ratio_std"] == 0.0


def test_no_verdict_without_scratch():
    assert scratch_verdicts([_r("sophon", 0, [1, 2]), _r("normal", 0, [1, 2])]) == []


# ---- the grid -----------------------------------------------------------------------------------------------

def _grid_args(argv):
    return parse(compose("T", CommonSettings, grid_settings(("sophon", "scratch"))), argv, "test", {"BS": 200})[1]


def test_expand_grid_defaults_to_single_values():
    attacks = plan(_grid_args(["--finetune_lr", "0.5", "--bs", "32", "--seed", "7", "--epochs", "3"]))
    assert attacks == [Attack("direct_all", "momentum", 0.5, 32, 3, 7)]


def test_expand_grid_lists_win_and_duplicates_drop():
    args = _grid_args(["--finetune_lr", "0.5", "--lrs", "1e-3,0.001,1e-2", "--bs", "32", "--batch_sizes", "8,8,16",
                       "--seed", "7", "--seeds", "0,1,0", "--strategies", "direct_all,initfc_fc,direct_all",
                       "--optimizers", "sgd,adam"])
    attacks = plan(args)
    assert len(attacks) == 2 * 2 * 2 * 2 * 2
    assert len(set(attacks)) == len(attacks)
    assert {a.lr for a in attacks} == {1e-3, 1e-2}
    assert {a.batch_size for a in attacks} == {8, 16}
    assert {a.seed for a in attacks} == {0, 1}
    assert all(isinstance(a.lr, float) for a in attacks)
    # seed 0 given as a list is honoured (0 is falsy)
    assert {a.seed for a in plan(_grid_args(["--seed", "5", "--seeds", "0"]))} == {0}


@pytest.mark.parametrize("argv", [["--lrs", "1e-3,abc"], ["--batch_sizes", "8,0"], ["--optimizers", "sgd,nesterov"],
                                  ["--strategies", "all"], ["--seeds", "0,,1"]])
def test_bad_grid_item(argv):
    with pytest.raises(UsageError):
        _grid_args(argv)


def test_batch_size_one_attack_is_refused():
    torch.manual_seed(0)
    model = TinyNet()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(UsageError, match="batch size 1"):
        run_attack(model, _domain(), Attack("direct_all", "adam", 1e-2, 1, 1, 0), CPU, Precision(CPU), lambda m: {})
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_run_attack_gives_back_the_callers_frozen_parameters():
    torch.manual_seed(0)
    model = TinyNet()
    model.conv.weight.requires_grad_(False)
    run_attack(model, _domain(), Attack("direct_fc", "adam", 1e-2, 8, 1, 0), CPU, Precision(CPU), lambda m: {})
    assert not model.conv.weight.requires_grad, "a parameter frozen before the attack stays frozen"
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "conv.weight")
