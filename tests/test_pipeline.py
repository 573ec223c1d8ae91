"""The three SOPHON stages chained through their command lines, at toy scale."""
import json
import math
from pathlib import Path

import pytest
import torch

from common.checkpoints import load_checkpoint
from helpers import read_rows, run_script, run_scripts

pytestmark = pytest.mark.slow  # stage scripts in subprocesses

STAGE1_KEYS = {"stage", "arch", "orig_dataset", "epochs", "train_acc", "test_acc", "checkpoint", "test_samples"}
STAGE2_KEYS = {"stage", "loss_type", "orig_test_acc_before", "orig_test_acc", "finetune_restrict_test_acc",
               "loops_completed", "stopped_early", "checkpoint", "test_samples"}
STAGE3_KEYS = {"stage", "dataset", "results", "verdicts", "test_samples"}
RESULT_KEYS = {"start", "strategy", "optimizer", "lr", "batch_size", "epochs", "test_acc_curve", "final_test_acc",
               "seed"}
STAGE2_HEADER = ["loop", "fts_loss", "ntr_loss", "clean_loss", "orig_test_acc", "rolled_back", "fts_optimizer", "fts_lr", "fts_head",
                 "fts_scope", "fts_schedule", "seconds"]


def _summary(run):
    return json.loads((Path(run) / "summary.json").read_text())


def _is_pct(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and 0 <= x <= 100


def _plots(run):
    pngs = sorted((Path(run) / "plots").glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    return pngs


def test_stage1(stage1_run):
    s = _summary(stage1_run)
    assert STAGE1_KEYS <= set(s)
    assert s["stage"] == "sophon_orig/stage1_pretrain" and s["arch"] == "resnet18"
    assert s["orig_dataset"] == "FashionMNIST" and s["epochs"] == 1 and s["test_samples"] == 20
    assert _is_pct(s["train_acc"]) and _is_pct(s["test_acc"])
    final = stage1_run / "checkpoints" / "final.pt"
    assert Path(s["checkpoint"]).is_absolute() and Path(s["checkpoint"]) == final.resolve()
    ckpt = load_checkpoint(final)
    assert ckpt["arch"] == "resnet18" and ckpt["num_classes"] == 10 and ckpt["dataset"] == "FashionMNIST"
    assert ckpt["config"]["orig_dataset"] == "FashionMNIST" and ckpt["config"]["image_size"] == 16
    assert "dataset" in ckpt["config"] and ckpt["config"]["dataset"] is None
    rows = read_rows(stage1_run / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1"]
    assert float(rows[0]["test_acc"]) == pytest.approx(s["test_acc"], abs=1e-3)
    config = json.loads((stage1_run / "config.json").read_text())
    assert {"config", "argv", "git_commit", "versions"} <= set(config)
    assert config["config"]["seed"] == 0
    assert (stage1_run / "log.txt").read_text().strip()
    _plots(stage1_run)


@pytest.mark.parametrize("loss_type", ["kl", "inverse"])
def test_stage2(stage2_runs, stage1_run, loss_type):
    run = stage2_runs(loss_type)
    s = _summary(run)
    assert STAGE2_KEYS <= set(s)
    assert s["stage"] == "sophon_orig/stage2_train" and s["loss_type"] == loss_type
    assert s["loops_completed"] == 3 and s["stopped_early"] is False
    assert _is_pct(s["orig_test_acc_before"]) and _is_pct(s["orig_test_acc"])
    assert _is_pct(s["finetune_restrict_test_acc"]) and s["test_samples"] == 20
    rows = read_rows(run / "metrics.csv")
    assert list(rows[0]) == STAGE2_HEADER
    assert [int(r["loop"]) for r in rows] == [1, 2, 3]
    assert all(math.isfinite(float(r["fts_loss"])) and math.isfinite(float(r["ntr_loss"])) for r in rows)
    assert rows[-1]["orig_test_acc"] != "" and rows[0]["orig_test_acc"] == ""  # evaluated after the last loop
    assert float(rows[-1]["orig_test_acc"]) == pytest.approx(s["orig_test_acc"], abs=1e-3)
    assert {r["fts_head"] for r in rows} == {"reinit"} and {r["fts_optimizer"] for r in rows} == {"sgd"}
    assert {r["fts_schedule"] for r in rows} == {"constant"}
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("loop*.pt"))
    assert ckpts == ["loop000002.pt"]
    tests = read_rows(run / "finetune_tests.csv")
    assert [(r["loop"], r["kind"], r["epoch"]) for r in tests] == [
        ("2", "periodic", "0"), ("2", "periodic", "1"), ("3", "final", "0"), ("3", "final", "1")]
    assert float(tests[-1]["test_acc"]) == pytest.approx(s["finetune_restrict_test_acc"], abs=1e-3)
    final = load_checkpoint(run / "checkpoints" / "final.pt")
    assert Path(s["checkpoint"]) == (run / "checkpoints" / "final.pt").resolve()
    assert final["dataset"] == "MNIST" and final["stage"] == "sophon_orig/stage2_train"
    assert final["config"]["orig_dataset"] == "FashionMNIST" and final["config"]["dataset"] == "MNIST"
    assert final["config"]["image_size"] == 16 and final["arch"] == "resnet18"
    assert Path(final["parent"]) == (stage1_run / "checkpoints" / "final.pt").resolve()
    config = json.loads((run / "config.json").read_text())
    assert Path(config["config"]["parent"]) == Path(final["parent"]) and config["config"]["seed"] == 0
    assert config["config"]["arch"] == "resnet18" and config["config"]["image_size"] == 16  # inherited
    # stage 2 changed the weights
    parent = load_checkpoint(stage1_run / "checkpoints" / "final.pt")
    assert not torch.equal(parent["model"]["conv1.weight"], final["model"]["conv1.weight"])
    loop_ckpt = load_checkpoint(run / "checkpoints" / "loop000002.pt")
    assert loop_ckpt["metrics"]["loop"] == 2
    # the accuracy floor (default 80 %) is switched off, with a warning, when stage 1 is already below it
    assert ("floor rule is off" in (run / "log.txt").read_text()) == (s["orig_test_acc_before"] <= 80)
    names = {p.name for p in _plots(run)}
    assert names == {"stage2_training.png", "stage2_finetune_tests.png"}


def _check_stage3(run, starts, epochs, sophon_run):
    s = _summary(run)
    assert STAGE3_KEYS <= set(s)
    assert s["stage"] == "sophon_orig/stage3_eval" and s["dataset"] == "MNIST" and s["test_samples"] == 20
    for r in s["results"]:
        assert RESULT_KEYS <= set(r)
        assert r["start"] in starts and r["epochs"] == epochs
        assert len(r["test_acc_curve"]) == epochs + 1 and all(_is_pct(v) for v in r["test_acc_curve"])
        assert r["final_test_acc"] == r["test_acc_curve"][-1]
        assert isinstance(r["lr"], float)
    assert (run / "report.md").is_file() and "sophon" in (run / "report.md").read_text()
    config = json.loads((run / "config.json").read_text())["config"]
    assert Path(config["path"]) == (sophon_run / "checkpoints" / "final.pt").resolve()
    _plots(run)
    return s


def test_stage3_default_starts(tmp_path, data_root, stage1_run, stage2_runs):
    sophon = stage2_runs("kl")
    out = tmp_path / "s3"
    proc = run_script("stage3", "--path", sophon, "--epochs", "1", "--bs", "16", "--data_root", data_root,
                      "--out_dir", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = _check_stage3(out, {"sophon", "normal", "scratch"}, 1, sophon)
    assert sorted(r["start"] for r in s["results"]) == ["normal", "scratch", "sophon"]
    r = {x["start"]: x for x in s["results"]}
    assert (r["sophon"]["strategy"], r["sophon"]["optimizer"], r["sophon"]["lr"], r["sophon"]["batch_size"]) == \
        ("direct_all", "momentum", 1e-4, 16)
    # the normal model is stage 2's parent, found through the checkpoint
    config = json.loads((out / "config.json").read_text())["config"]
    assert Path(config["normal_path"]) == (stage1_run / "checkpoints" / "final.pt").resolve()
    # dataset inherited from the stage-2 checkpoint; one verdict for the one attack
    assert len(s["verdicts"]) == 1
    v = s["verdicts"][0]
    assert {"epochs_to_scratch_final", "auc_ratio_mean", "auc_ratio_std"} <= set(v)
    rows = read_rows(out / "metrics.csv")
    assert len(rows) == 3 * 2 and {r["epoch"] for r in rows} == {"0", "1"}
    # epoch 0 is each start model before fine-tuning: the right weights went to the right start
    assert r["sophon"]["test_acc_curve"][0] == pytest.approx(_plain_accuracy(sophon, data_root), abs=1e-6)
    assert r["normal"]["test_acc_curve"][0] == pytest.approx(_plain_accuracy(stage1_run, data_root), abs=1e-6)


def _plain_accuracy(run, data_root):
    """Restricted-domain (MNIST) test accuracy of a run's final model, computed with plain torch."""
    from common.data import load_domain
    from common.models import build_model
    ckpt = torch.load(run / "checkpoints" / "final.pt", weights_only=True)
    model = build_model("resnet18", 10)
    model.load_state_dict(ckpt["model"])
    model.eval()
    test = load_domain("MNIST", data_root, train=False, image_size=16)
    x = test.images.float().div(255).expand(-1, 3, -1, -1)
    x = (x - 0.1307) / 0.3081
    with torch.no_grad():
        preds = model(x).argmax(1)
    return 100.0 * (preds == test.labels).sum().item() / len(test)


GRID = ["--strategies", "direct_all,initfc_fc", "--optimizers", "sgd,adam", "--seeds", "0,1",
        "--start", "sophon,scratch", "--epochs", "1", "--bs", "16"]


def test_stage3_grid_serial_and_parallel(tmp_path, data_root, stage2_runs):
    sophon = stage2_runs("kl")
    outs = {ranks: tmp_path / f"grid{ranks}" for ranks in ("1", "2")}
    # torchrun's own parser takes --start for an abbreviation of its --start-method: --starts is the alias
    grid = [("--starts" if a == "--start" else a) for a in GRID]
    procs = run_scripts([("stage3", ["--path", sophon, *grid, "--data_root", data_root, "--out_dir", out],
                          None if ranks == "1" else 2) for ranks, out in outs.items()])  # 2: under torchrun
    for proc in procs:
        assert proc.returncode == 0, proc.stderr[-3000:]
    serial = _check_stage3(outs["1"], {"sophon", "scratch"}, 1, sophon)
    parallel = _check_stage3(outs["2"], {"sophon", "scratch"}, 1, sophon)
    # 2 strategies x 2 optimizers x 2 seeds = 8 attacks, each fine-tuning 2 start models
    for s in (serial, parallel):
        assert len(s["results"]) == 16
        keys = {(r["start"], r["strategy"], r["optimizer"], r["seed"]) for r in s["results"]}
        assert len(keys) == 16
        assert len(s["verdicts"]) == 4  # one per (strategy, optimizer, lr, bs), seeds pooled
        assert {(v["strategy"], v["optimizer"]) for v in s["verdicts"]} == {
            ("direct_all", "sgd"), ("direct_all", "adam"), ("initfc_fc", "sgd"), ("initfc_fc", "adam")}
        assert all(v["seeds"] == 2 for v in s["verdicts"])
    # the cells are seeded: the worker processes reproduce the serial curves
    curves = lambda s: {(r["start"], r["strategy"], r["optimizer"], r["seed"]): r["test_acc_curve"] for r in s["results"]}
    assert curves(serial) == curves(parallel)
    for out in outs.values():
        assert len(read_rows(out / "metrics.csv")) == 16 * 2
    # without a head re-init, epoch 0 depends only on the start model and the cell's seed (scratch init)
    c = curves(serial)
    for seed in (0, 1):
        for start in ("sophon", "scratch"):
            assert c[(start, "direct_all", "sgd", seed)][0] == c[(start, "direct_all", "adam", seed)][0]
        assert c[("sophon", "direct_all", "sgd", seed)][0] == c[("sophon", "direct_all", "sgd", 0)][0]
