"""How to extend stage 3: a procedure (here a toy linear probe) and a defence (a toy that shrinks the weights),
each registered from this file with one extra axis and run end to end through the real stage-3 script, on
synthetic data and checkpoints in the real on-disk formats."""
import dataclasses
import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import common.defences as dfn
from common.axes import Axis, Cell, Procedure
from common.checkpoints import atomic_save, make_checkpoint
from common.cli import UsageError, nonneg_float, pos_float
from common.finetune import (BATCH_SIZE, LR, OPTIMIZER, SEED, STRATEGY, _ScheduledSteps, scope_params, start_curve,
                             steps_per_epoch, train_epochs, training_only)
from common.models import build_model, reinit_head
from common.procedures import PROCEDURES
from helpers import load_script, read_rows

# ---- a toy attack: a linear probe, whose weight decay is its own axis ------------------------------------------

PROBE_WEIGHT_DECAY = Axis("probe_weight_decay", nonneg_float, default=None, key="wd{:g}", label="probe wd",
                          flag="--probe_weight_decays", grid=[0.0], help="the linear probe's weight decays")


@dataclass(frozen=True)
class ProbeCell:
    lr: float
    batch_size: int
    epochs: int
    seed: int
    probe_weight_decay: float
    strategy: ClassVar[str] = "initfc_fc"  # a new head, trained alone
    optimizer: ClassVar[str] = "sgd"

    @property
    def procedure(self):
        return PROBE


class LinearProbe(Procedure):
    """A new head trained by plain SGD with weight decay on the frozen body."""
    name, role = "probe", "attack"
    axes = (STRATEGY, OPTIMIZER, LR, BATCH_SIZE, SEED, PROBE_WEIGHT_DECAY)
    fixed = ("strategy", "optimizer")

    def make(self, epochs, lr, batch_size, seed, probe_weight_decay):
        return ProbeCell(float(lr), int(batch_size), epochs, int(seed), float(probe_weight_decay))

    def run(self, model, domain, cell, device, precision, evaluate, on_epoch=None):
        gen = torch.Generator().manual_seed(cell.seed)
        reinit_head(model, gen)
        head, bn_eval = scope_params(model, "head")
        with training_only(model, head):
            sgd = torch.optim.SGD(head, lr=cell.lr, weight_decay=cell.probe_weight_decay)
            steps = _ScheduledSteps(sgd, "constant", steps_per_epoch(len(domain), cell.batch_size) * cell.epochs)
            curve = start_curve(model, domain, evaluate, on_epoch)
            return train_epochs(model, domain, steps, curve, cell.epochs, cell.batch_size, gen, device, precision,
                                evaluate, on_epoch, bn_eval=bn_eval, name="probe")


PROBE = LinearProbe()

# ---- a toy defence: every weight shrunk by a factor, its own axis; no training ----------------------------------

SHRINK = Axis("shrink", pos_float, default=None, key="s{:g}", flag="--shrinks", grid=[1.0],
              help="factors the toy defence multiplies every weight by")


@dataclass(frozen=True)
class ShrinkCell(dfn.DefenceCell):
    shrink: float = 1.0


def shrink(model, run, curve):
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(run.cell.shrink)
    for epoch in range(1, run.cell.epochs + 1):
        curve.append(run.evaluate(model))
        run.on_epoch(epoch, curve[-1])
    return curve


class Shrink(dfn.Defence):
    axes = dfn.Defence.axes + (SHRINK,)

    def __init__(self):
        super().__init__("shrink", shrink, "constant", own=("shrinks",))

    def cells(self, args):
        return [ShrinkCell(**{f.name: getattr(c, f.name) for f in dataclasses.fields(c)}, shrink=float(s))
                for c in super().cells(args) for s in SHRINK.values(args)]


# ---- fixtures ----------------------------------------------------------------------------------------------------


def _checkpoint(path, dataset, stage, **config):
    torch.manual_seed(0)
    model = build_model("resnet18", 10)
    config = {"orig_dataset": "FashionMNIST", "image_size": 16, **config}
    atomic_save(make_checkpoint(model, arch="resnet18", dataset=dataset, stage=stage, config=config, metrics={},
                                parent=None), path)
    return path


# ---- the tests ---------------------------------------------------------------------------------------------------

def test_a_registered_probe_runs_through_the_sophon_script(tmp_path, data_root, monkeypatch, restore_signals,
                                                           quiet_log):
    monkeypatch.setitem(PROCEDURES, PROBE.name, PROBE)
    ckpt = _checkpoint(tmp_path / "protected.pt", "MNIST", "sophon_orig/stage2_train")
    script = load_script("stage3")
    out = tmp_path / "grid"
    grid = ["--path", ckpt, "--start", "sophon,scratch", "--data_root", data_root, "--epochs", "1", "--bs", "16",
            "--attacks", "probe", "--lrs", "0.01"]
    with pytest.raises(UsageError, match="--strategies is read by finetune only, and --attacks names none"):
        script.main([str(a) for a in grid + ["--strategies", "initfc_fc", "--out_dir", out]])
    assert script.main([str(a) for a in grid + ["--probe_weight_decays", "0,0.01", "--out_dir", out]]) == 0
    keys = [json.loads(line)["key"] for line in (out / "cells.jsonl").read_text().splitlines()]
    assert keys == [f"{start}|initfc_fc|sgd|0.01|16|0|wd{wd}" for wd in ("0", "0.01") for start in ("sophon", "scratch")]
    rows = read_rows(out / "metrics.csv")
    assert len(rows) == 4 * 2 and {r["probe_weight_decay"] for r in rows} == {"0", "0.01"}
    assert list(rows[0])[:12] == ["cell", "start", "strategy", "optimizer", "lr", "batch_size", "train_fraction",
                                  "schedule", "defence", "sweep", "probe_weight_decay", "seed"]
    summary = json.loads((out / "summary.json").read_text())
    assert sorted((r["start"], r["probe_weight_decay"]) for r in summary["results"]) == [
        ("scratch", 0.0), ("scratch", 0.01), ("sophon", 0.0), ("sophon", 0.01)]
    assert all(r["strategy"] == "initfc_fc" and len(r["test_acc_curve"]) == 2 for r in summary["results"])
    # the verdicts' families come from the declarations: one per weight decay, the seeds pooled
    assert sorted(v["probe_weight_decay"] for v in summary["verdicts"]) == [0.0, 0.01]
    assert "probe wd" in (out / "report.md").read_text()
    assert Cell("sophon", PROBE.make(1, 0.01, 16, 0, 0.0)).key == keys[0]


def test_a_registered_defence_runs_through_the_backdoor_script(tmp_path, data_root, monkeypatch, restore_signals,
                                                               quiet_log):
    toy = Shrink()
    monkeypatch.setitem(dfn.DEFENCES, toy.name, toy)
    monkeypatch.setitem(PROCEDURES, toy.name, toy)
    trigger = {"trigger_size": 3, "target_label": 0, "poison_percent": 0.2}
    irreversible = _checkpoint(tmp_path / "irreversible.pt", "MNIST", "irreversible_backdoor/stage2_train", **trigger)
    backdoored = _checkpoint(tmp_path / "backdoored.pt", "FashionMNIST", "irreversible_backdoor/stage1_pretrain",
                             **trigger)
    out = tmp_path / "defended"
    argv = ["--path", irreversible, "--baseline_path", backdoored, "--data_root", data_root, "--epochs", "1",
            "--bs", "16", "--defences", "shrink", "--defences_only", "--shrinks", "1,0.5", "--out_dir", out]
    assert load_script("bd_stage3").main([str(a) for a in argv]) == 0
    keys = [json.loads(line)["key"] for line in (out / "cells.jsonl").read_text().splitlines()]
    assert keys == [f"{start}|direct_all|momentum|0.01|16|0|shrink|s{s}" for s in ("1", "0.5")
                    for start in ("irreversible", "backdoored")]
    rows = read_rows(out / "metrics.csv")
    assert {(r["defence"], r["shrink"]) for r in rows} == {("shrink", "1"), ("shrink", "0.5")}
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(r["shrink"] for r in summary["results"]) == [0.5, 0.5, 1.0, 1.0]
    unshrunk = [r for r in summary["results"] if r["shrink"] == 1.0]
    assert all(r["test_acc_curve"][0] == r["test_acc_curve"][1] for r in unshrunk), "x1 leaves the model as it is"
    assert [(v["defence"], v["shrink"]) for v in summary["defence_verdicts"]] == [("shrink", 1.0), ("shrink", 0.5)]
    assert "| shrink | 0.01 | 16 | 1 | constant | 1 |" in (out / "report.md").read_text()
