"""A stage-2 method is one class plus one registry line: a toy method registered here runs end to end through
the real stage script (sophon_orig/stage2_train/algo.py), its own metrics.csv columns and the runner's
rollback included."""
import copy
import json
import sys
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from common import dist
from common.data import BatchStream
from common.cli import UsageError
from common.methods import METHODS
from common.settings import Settings, setting
from helpers import SCRIPTS, load_script, read_rows


class PlainNTR:
    """Toy method: plain SGD cross-entropy steps on the NTR domain, no FTS. Its second loop reports a NaN
    loss, which the runner must roll back whatever the method."""
    losses = ("toy_loss",)
    labels = ("toy_label",)

    @classmethod
    def build(cls, settings, model, task, precision):
        return cls(model, task.ntr_train, settings, precision)

    def __init__(self, model, domain, settings, precision):
        self.model, self.domain, self.precision, self.world = model, domain, precision, dist.world()
        self.optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr)
        self.stream = BatchStream(len(domain), settings.bs, seed=settings.seed)
        self.calls = 0

    def step(self):
        self.calls += 1
        idx = self.stream.next()
        x = self.domain.to_input(self.domain.images[idx], self.precision.device)
        loss = F.cross_entropy(self.model(x), self.domain.labels[idx].to(self.precision.device))
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return {"toy_loss": float("nan") if self.calls == 2 else loss.item(), "toy_label": f"call{self.calls}"}

    def snapshot(self):
        return {"model": copy.deepcopy(self.model.state_dict())}

    def restore(self, snapshot):
        self.model.load_state_dict(snapshot["model"])

    def state_dict(self):
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "stream": self.stream.state_dict(), "calls": self.calls}

    def load_state_dict(self, state):
        self.restore(state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.stream.load_state_dict(state["stream"])
        self.calls = state["calls"]


@pytest.fixture
def toy_method(monkeypatch):
    monkeypatch.setitem(METHODS, "plain_ntr", PlainNTR)


def test_a_registered_method_runs_through_the_stage_script(toy_method, tmp_path, data_root, stage1_run,
                                                            monkeypatch, restore_signals):
    out = tmp_path / "run"
    argv = ["--method", "plain_ntr", "--model_path", str(stage1_run), "--dataset", "MNIST", "--bs", "20",
            "--total_loop", "3", "--eval_interval", "1", "--test_interval", "0", "--final_finetune_epochs", "0",
            "--lr", "1e-3", "--data_root", str(data_root), "--out_dir", str(out)]
    monkeypatch.setattr(sys, "argv", [str(SCRIPTS["stage2"]), *argv])
    assert load_script("stage2").main(argv) == 0
    rows = read_rows(out / "metrics.csv")
    assert list(rows[0]) == ["loop", "toy_loss", "orig_test_acc", "rolled_back", "toy_label", "seconds"]
    assert [(r["loop"], r["toy_label"], r["rolled_back"]) for r in rows] == [("1", "call1", "0"), ("2", "call2", "1"),
                                                                             ("3", "call3", "0")]
    assert rows[1]["toy_loss"] == "nan" and rows[1]["orig_test_acc"] == "", "a non-finite loop is not evaluated"
    assert float(rows[2]["toy_loss"]) > 0 and float(rows[2]["orig_test_acc"]) >= 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["loops_completed"] == 3 and summary["stopped_early"] is False
    assert json.loads((out / "config.json").read_text())["config"]["method"] == "plain_ntr"


@dataclass
class ScaledSettings(Settings):
    scaled_ntr_factor: float = setting(1.0, "toy: the lr is multiplied by this", type=float)


class ScaledNTR(PlainNTR):
    """Toy method with a flag of its own: every stage-2 script has it once the method is registered."""
    settings = ScaledSettings

    def __init__(self, model, domain, settings, precision):
        super().__init__(model, domain, settings, precision)
        self.optimizer.param_groups[0]["lr"] = settings.lr * settings.scaled_ntr_factor


@pytest.mark.parametrize("stage", ["stage2", "bd_stage2"])
def test_a_method_brings_its_own_flags(stage, monkeypatch):
    parse_args = load_script(stage).parse_args
    with pytest.raises(UsageError, match="unrecognized arguments: --scaled_ntr_factor"):  # not before registering
        parse_args(["--scaled_ntr_factor", "3"])
    monkeypatch.setitem(METHODS, "scaled_ntr", ScaledNTR)
    _, args = parse_args(["--method", "scaled_ntr", "--scaled_ntr_factor", "3", "--lr", "0.01"])
    assert args.scaled_ntr_factor == 3.0
    model = torch.nn.Linear(2, 2)
    method = ScaledNTR(model, range(10), args, None)
    assert method.optimizer.param_groups[0]["lr"] == pytest.approx(0.03)
    assert load_script(stage).parse_args([])[1].scaled_ntr_factor == 1.0


def test_an_unregistered_method_is_a_usage_error():
    with pytest.raises(UsageError, match="--method"):
        load_script("stage2").parse_args(["--method", "plain_ntr"])
