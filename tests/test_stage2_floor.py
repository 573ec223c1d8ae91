"""The stage-2 accuracy floor and the NaN guard: roll back to the last passing evaluation, stop after
--max_strikes breaches in a row, mark the rolled-back loops in metrics.csv."""
import argparse
import copy
import csv

import torch
import torch.nn.functional as F

from common.data import Domain
from common.runs import Interrupts, Run
from common.stage2 import Stage2, Stage2Task
from common.train import Precision

from helpers import TinyNet

CPU = torch.device("cpu")


def _domain(name, seed):
    gen = torch.Generator().manual_seed(seed)
    return Domain(name, True, torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8, generator=gen),
                  torch.randint(0, 10, (40,), generator=gen), 40)


def _args(**over):
    args = dict(alpha=3.0, beta=5.0, lr=1e-3, fast_lr=1e-3, bs=20, fts_loop=1, ntr_loop=1, adaptation_steps=2,
                fts_envs=1, seed=0, total_loop=6, fts_optimizers=["sgd"], fts_lrs=None, fts_head=["reinit"],
                fts_scope=["all"], finetune_lr=1e-3, finetune_epochs=1, final_finetune_epochs=0, test_interval=0,
                eval_interval=2, min_orig_acc=20.0, max_strikes=2, save_every=100)
    args.update(over)
    return argparse.Namespace(**args)


def _stage2(tmp_path, accuracies, args, query_loss=None):
    """A Stage2 on a tiny model whose original-domain evaluations return `accuracies` in turn; each
    evaluation also records the model's weights, so a rollback target can be checked."""
    model = TinyNet(channels=3)
    restricted, orig = _domain("MNIST", 1), _domain("FashionMNIST", 2)
    seen = []

    def eval_orig(m):
        seen.append(copy.deepcopy(m.state_dict()))
        return {"orig_test_acc": accuracies[len(seen) - 1]}

    def ce(net, x, y):
        return F.cross_entropy(net(restricted.to_input(x, CPU)), y)

    task = Stage2Task(query_loss=query_loss or ce, restricted_train=restricted, ntr_train=orig, eval_orig=eval_orig,
                      eval_restricted=lambda m: {"test_acc": 0.0}, loss_type="kl")
    run = Run(tmp_path)
    run.ckpt_dir.mkdir(parents=True)
    meta = dict(arch="tiny", dataset="MNIST", stage="test", config={}, parent=None)
    return Stage2(args, run, model, task, CPU, Precision(CPU), meta), model, seen


def _rows(tmp_path):
    with open(tmp_path / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_breaches_roll_back_and_stop_after_max_strikes(tmp_path, restore_signals):
    # before, loop 2 passes, loops 4 and 6 breach the floor of 20
    stage2, model, seen = _stage2(tmp_path, [50.0, 60.0, 10.0, 10.0], _args())
    summary = stage2.train(Interrupts())
    assert summary["stopped_early"] is True and summary["loops_completed"] == 6
    assert summary["orig_test_acc"] == 60.0, "the final figures are the snapshot's, not the breaching ones"
    rows = _rows(tmp_path)
    assert [r["loop"] for r in rows] == ["1", "2", "3", "4", "5", "6"]
    assert [r["rolled_back"] for r in rows] == ["0", "0", "1", "1", "1", "1"]
    loop2 = seen[1]
    for k, v in model.state_dict().items():
        assert torch.equal(v, loop2[k]), f"{k} is not the state of the last passing evaluation"
    final = torch.load(tmp_path / "checkpoints" / "final.pt", weights_only=True)
    assert torch.equal(final["model"]["fc.weight"], loop2["fc.weight"])


def test_a_passing_evaluation_resets_the_strikes(tmp_path, restore_signals):
    stage2, model, seen = _stage2(tmp_path, [50.0, 60.0, 10.0, 70.0], _args())
    summary = stage2.train(Interrupts())
    assert summary["stopped_early"] is False and summary["orig_test_acc"] == 70.0
    assert [r["rolled_back"] for r in _rows(tmp_path)] == ["0", "0", "1", "1", "0", "0"]
    assert not torch.equal(model.state_dict()["fc.weight"], seen[1]["fc.weight"]), "training went on after the rollback"


def test_floor_off_when_the_start_is_already_below_it(tmp_path, restore_signals):
    stage2, _, _ = _stage2(tmp_path, [10.0, 5.0, 5.0, 5.0], _args())
    summary = stage2.train(Interrupts())
    assert summary["stopped_early"] is False
    assert all(r["rolled_back"] == "0" for r in _rows(tmp_path))


def test_non_finite_loss_restores_the_last_good_state(tmp_path, restore_signals):
    calls = {"n": 0}

    def sometimes_nan(net, x, y):
        calls["n"] += 1
        loss = net(x.float().expand(-1, 3, -1, -1) / 255).logsumexp(1).mean()
        # the second loop's queries (steps 3-4) return NaN; later loops are fine again
        return loss * float("nan") if calls["n"] in (3, 4) else loss

    stage2, model, seen = _stage2(tmp_path, [50.0, 60.0, 60.0, 60.0], _args(), query_loss=sometimes_nan)
    summary = stage2.train(Interrupts())
    rows = _rows(tmp_path)
    assert rows[1]["fts_loss"] == "nan" and rows[1]["rolled_back"] == "1"
    assert rows[0]["rolled_back"] == "1", "loop 1 came after the last passing evaluation (before stage 2)"
    assert summary["stopped_early"] is False
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())
