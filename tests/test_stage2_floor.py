"""The stage-2 accuracy floor and the NaN guard: roll back to the last passing evaluation, stop after
--max_strikes breaches in a row, mark the rolled-back loops in metrics.csv."""
import copy

import torch
import torch.nn.functional as F

from common.runs import Interrupts, Run
from common.sophon import Sophon
from common.stage2 import Stage2Runner, Stage2Settings, Stage2Task
from common.train import Precision

from helpers import TinyNet, read_rows, tiny_domain

CPU = torch.device("cpu")


def _schedule(**over):
    return Stage2Settings(**{**dict(total_loop=6, eval_interval=2, test_interval=0, final_finetune_epochs=0,
                              min_orig_acc=20.0, max_strikes=2, save_every=100), **over})


def _stage2(tmp_path, accuracies, schedule, query_loss=None):
    """A runner over the algorithm on a tiny model whose original-domain evaluations return `accuracies` in
    turn; each evaluation also records the model's weights, so a rollback target can be checked."""
    model = TinyNet(channels=3)
    restricted, orig = tiny_domain("MNIST", 1), tiny_domain("FashionMNIST", 2)
    seen = []

    def eval_orig(m):
        seen.append(copy.deepcopy(m.state_dict()))
        return {"orig_test_acc": accuracies[len(seen) - 1]}

    def ce(net, x, y):
        return F.cross_entropy(net(restricted.to_input(x, CPU)), y)

    query_loss = query_loss or ce
    config = Stage2Settings(lr=1e-3, bs=20, adaptation_steps=2, fts_lrs=(1e-3,))
    algo = Sophon(model, query_loss, restricted, orig, config, Precision(CPU))
    task = Stage2Task(query_loss=query_loss, restricted_train=restricted, ntr_train=orig, eval_orig=eval_orig,
                      eval_restricted=lambda m: {"test_acc": 0.0}, loss_type="kl")
    run = Run(tmp_path)
    run.ckpt_dir.mkdir(parents=True)
    meta = dict(arch="tiny", dataset="MNIST", stage="test", config={}, parent=None)
    return Stage2Runner(algo, task, schedule, run, meta), model, seen


def test_breaches_roll_back_and_stop_after_max_strikes(tmp_path, restore_signals):
    # before, loop 2 passes, loops 4 and 6 breach the floor of 20
    stage2, model, seen = _stage2(tmp_path, [50.0, 60.0, 10.0, 10.0], _schedule())
    summary = stage2.train(Interrupts())
    assert summary["stopped_early"] is True and summary["loops_completed"] == 6
    assert summary["orig_test_acc"] == 60.0, "the final figures are the snapshot's, not the breaching ones"
    rows = read_rows(tmp_path / "metrics.csv")
    assert [r["loop"] for r in rows] == ["1", "2", "3", "4", "5", "6"]
    assert [r["rolled_back"] for r in rows] == ["0", "0", "1", "1", "1", "1"]
    loop2 = seen[1]
    for k, v in model.state_dict().items():
        assert torch.equal(v, loop2[k]), f"{k} is not the state of the last passing evaluation"
    final = torch.load(tmp_path / "checkpoints" / "final.pt", weights_only=True)
    assert torch.equal(final["model"]["fc.weight"], loop2["fc.weight"])


def test_a_passing_evaluation_resets_the_strikes(tmp_path, restore_signals):
    stage2, model, seen = _stage2(tmp_path, [50.0, 60.0, 10.0, 70.0], _schedule())
    summary = stage2.train(Interrupts())
    assert summary["stopped_early"] is False and summary["orig_test_acc"] == 70.0
    assert [r["rolled_back"] for r in read_rows(tmp_path / "metrics.csv")] == ["0", "0", "1", "1", "0", "0"]
    assert not torch.equal(model.state_dict()["fc.weight"], seen[1]["fc.weight"]), "training went on after the rollback"


def test_floor_off_when_the_start_is_already_below_it(tmp_path, restore_signals):
    stage2, _, _ = _stage2(tmp_path, [10.0, 5.0, 5.0, 5.0], _schedule())
    summary = stage2.train(Interrupts())
    assert summary["stopped_early"] is False
    assert all(r["rolled_back"] == "0" for r in read_rows(tmp_path / "metrics.csv"))


def test_non_finite_loss_restores_the_last_good_state(tmp_path, restore_signals):
    calls = {"n": 0}

    def sometimes_nan(net, x, y):
        calls["n"] += 1
        loss = net(x.float().expand(-1, 3, -1, -1) / 255).logsumexp(1).mean()
        # the second loop's queries (steps 3-4) return NaN; later loops are fine again
        return loss * float("nan") if calls["n"] in (3, 4) else loss

    stage2, model, seen = _stage2(tmp_path, [50.0, 60.0, 60.0, 60.0], _schedule(), query_loss=sometimes_nan)
    summary = stage2.train(Interrupts())
    rows = read_rows(tmp_path / "metrics.csv")
    assert rows[1]["fts_loss"] == "nan" and rows[1]["rolled_back"] == "1"
    assert rows[0]["rolled_back"] == "1", "loop 1 came after the last passing evaluation (before stage 2)"
    assert summary["stopped_early"] is False
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())


def test_resume_without_last_pt_starts_over_and_drops_the_rows(tmp_path):
    runner, _, _ = _stage2(tmp_path, [50.0], _schedule())
    runner.metrics.append({"loop": 1, "fts_loss": 0.5})  # written by a run killed before its first save
    runner.tests.append({"loop": 1, "kind": "periodic", "epoch": 0, "test_acc": 10.0})
    runner.load_last()
    assert runner.loop == 0
    assert read_rows(tmp_path / "metrics.csv") == [] and read_rows(tmp_path / "finetune_tests.csv") == []
