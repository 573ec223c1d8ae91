"""The tuned attacker (finetune_test.py --suite tuned): the lr an attacker picks, the held-out split it picks it on,
and the whole suite through the real stage-3 script on synthetic data and checkpoints in the real formats."""
import json
import math

import pytest
import torch

from common.axes import Cell
from common.checkpoints import atomic_save, make_checkpoint
from common.cli import UsageError
from common.data import Domain
from common.finetune import FINE_TUNING, attack_subset
from common.models import build_model
from common.sweep import HOLDOUT_SHARE, SWEEP, holdout_split
from common.tuned import (FAMILY, choose_lrs, describe_grid_edges, early_stop_check, grid_edges, halving_choice,
                          select_lr, tuned_summary)
from common.verdicts import auc
from helpers import load_script, read_rows


# ---- the lr an attacker picks ------------------------------------------------------------------------------------

def test_the_best_held_out_auc_wins():
    assert select_lr({1e-4: 40.0, 1e-3: 71.5, 1e-2: 60.0}) == 1e-3


def test_a_diverged_point_is_never_chosen():
    assert select_lr({1e-4: 40.0, 1e-3: None, 1e-2: 39.0}) == 1e-4
    assert select_lr({1e-3: None, 1e-2: None}) is None
    assert select_lr({1e-3: float("nan"), 1e-2: 12.0}) == 1e-2


def test_a_tie_goes_to_the_smaller_lr():
    assert select_lr({3e-2: 50.0, 1e-2: 50.0, 1e-3: 20.0}) == 1e-2
    assert select_lr({1e-2: 50.0, 1e-5: 50.0 + 1e-12}) == 1e-5  # within the tie tolerance


def _entry(start, optimizer, lr, heldout, diverged_epoch=None):
    return {"start": start, "strategy": "initfc_all", "optimizer": optimizer, "lr": lr, "batch_size": 8,
            "train_fraction": 0.1, "schedule": "constant", "seed": 0, "sweep": HOLDOUT_SHARE,
            "heldout_acc_curve": heldout, "test_acc_curve": [None] * len(heldout), "diverged_epoch": diverged_epoch}


def test_choose_lrs_per_start_and_family_on_hand_made_sweeps():
    entries = [_entry("scratch", "adam", 1e-3, [10, 50, 60]),   # auc 42.5
               _entry("scratch", "adam", 1e-2, [10, 80, 90], diverged_epoch=1),   # auc 65, but diverged
               _entry("scratch", "adam", 1e-4, [10, 30, 40]),
               _entry("sophon", "adam", 1e-3, [10, 20, 30]),    # auc 20
               _entry("sophon", "adam", 1e-2, [10, 20, 30]),    # a tie: the smaller lr
               _entry("sophon", "adam", 1e-4, [10, 10, 10]),
               _entry("scratch", "momentum", 1e-3, [10, 50, 60], diverged_epoch=2),
               _entry("scratch", "momentum", 1e-2, [10, 50, 60], diverged_epoch=1)]
    chosen = {(r["start"], r["optimizer"]): r for r in choose_lrs(entries)}
    assert chosen["scratch", "adam"]["lr"] == 1e-3
    assert chosen["sophon", "adam"]["lr"] == 1e-3
    assert chosen["scratch", "momentum"]["lr"] is None  # every point diverged
    points = chosen["scratch", "adam"]["points"]
    assert [p["lr"] for p in points] == [1e-4, 1e-3, 1e-2]  # sorted by lr
    assert points[1]["heldout_auc"] == pytest.approx(auc([10, 50, 60])) and points[2] == {
        "lr": 1e-2, "heldout_auc": None, "diverged": True}


def test_choices_at_the_grid_edges_are_counted_per_start():
    entries = [_entry("sophon", "adam", 1e-2, [10, 80, 90]), _entry("sophon", "adam", 1e-3, [10, 50, 60]),
               _entry("sophon", "momentum", 1e-2, [10, 80, 90]), _entry("sophon", "momentum", 1e-3, [10, 50, 60]),
               _entry("scratch", "adam", 1e-2, [10, 20, 30]), _entry("scratch", "adam", 1e-3, [10, 50, 60]),
               _entry("scratch", "adam", 1e-4, [10, 40, 50]),  # chosen: 1e-3, inside the grid
               _entry("scratch", "momentum", 1e-3, [10, 20, 30]), _entry("scratch", "momentum", 1e-4, [10, 40, 50]),
               _entry("null", "adam", 1e-3, [10, 20, 30], diverged_epoch=1)]  # nothing chosen: not a pair
    sweep = choose_lrs(entries)
    assert grid_edges(sweep) == {"pairs": 4, "top": {"sophon": 2}, "bottom": {"scratch": 1}}
    assert describe_grid_edges(sweep)[0] == ("Chosen lrs at the sweep grid's edges, of 4 (start, family) pairs: its "
                                             "largest lr (0.01) in 2 (sophon 2); its smallest lr (0.0001) in 1 "
                                             "(scratch 1).")
    inside = choose_lrs(entries[4:7])
    assert grid_edges(inside)["top"] == grid_edges(inside)["bottom"] == {} and len(describe_grid_edges(inside)) == 1


# ---- what an early stop would have done ------------------------------------------------------------------------

def _curves(**by_lr):
    """{lr: (held-out curve, None)} from lr_<name>=curve keywords, e.g. a=[...] for the lr 1e-a."""
    return {10.0 ** -int(k[1:]): (v, None) for k, v in by_lr.items()}


def test_halving_keeps_a_leader_and_counts_the_epochs_it_trains():
    # 8 lrs over 5 epochs, lr 1e-3 ahead from epoch 1 on: 8 -> 4 after epoch 1 -> 2 after epoch 2 -> its end
    curves = {10.0 ** -k: ([10, 10 + k, 12 + k, 13 + k, 14 + k, 15 + k] if k != 3 else [10, 40, 60, 70, 80, 90], None)
              for k in range(1, 9)}
    lr, trained = halving_choice(curves, (1, 2))
    assert lr == 1e-3 == select_lr({lr: auc(c) for lr, (c, _) in curves.items()})
    assert trained == 4 * 1 + 2 * 2 + 2 * 5  # stopped after epoch 1, after epoch 2, run to the end


def test_halving_loses_a_late_bloomer_and_the_check_says_so():
    # lr 1e-1 is last after epoch 1 and first by epoch 3 (AUC over epochs 0..3: 33.3 against 32.5), then best: rungs
    # at epochs 1, 2 stop it after epoch 1; the full sweep, and a rung at epoch 3 alone, pick it
    curves = _curves(e1=[10, 10, 40, 90, 95, 99], e2=[10, 30, 40, 45, 50, 52], e3=[10, 25, 35, 40, 42, 44],
                     e4=[10, 20, 22, 24, 26, 28])
    assert halving_choice(curves, (1, 2))[0] == 1e-2
    entries = [_entry("sophon", "adam", lr, curve) for lr, (curve, _) in curves.items()]
    entries += [_entry("scratch", "adam", lr, [10, 20 + 10 * i, 30 + 10 * i]) for i, lr in enumerate((1e-4, 1e-3))]
    check = early_stop_check(entries, [(1, 2), (3,)])
    (halved, late) = check["rules"]
    assert check["pairs"] == 2 and halved["rungs"] == [1, 2] and halved["changed"] == [
        {"start": "sophon", **{k: entries[0][k] for k in FAMILY}, "lr": 1e-1, "lr_halving": 1e-2}]
    # a rung at epoch 3 keeps lr 1e-1 and 1e-2 to the end and stops the other two; scratch's 2 epochs have no rung
    # before their end
    assert late["changed"] == [] and late["epochs_halving"] == 2 * 3 + 2 * 5 + 2 * 2
    # sophon: 4 points x 5 epochs in full; halving: 2 stopped after epoch 1, 1 after epoch 2, 1 to the end.
    # scratch (2 epochs): rung 2 is not before the end, so rung 1 alone halves it: 1 + 2
    assert check["epochs"] == 4 * 5 + 2 * 2 and halved["epochs_halving"] == 2 + 2 + 5 + 1 + 2


def test_halving_drops_a_diverged_point_and_counts_its_epochs_to_the_divergence():
    curves = _curves(e1=[10, 90, 95, 99], e2=[10, 30, 40, 50], e3=[10, 20, 30, 40])
    curves[1e-1] = (curves[1e-1][0], 2)  # best throughout, but diverged after epoch 2
    lr, trained = halving_choice(curves, (1,))
    # rung 1: e1 (not yet diverged) and e2 go on, e3 stops; e1 trains to its divergence; e2 to the end
    assert lr == 1e-2 and trained == 1 + 2 + 3
    assert select_lr({lr: None if d else auc(c) for lr, (c, d) in curves.items()}) == 1e-2


# ---- the held-out split ------------------------------------------------------------------------------------------

def _domain(n=400, classes=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=gen)
    images = torch.arange(n, dtype=torch.int64).view(n, 1, 1, 1).expand(n, 1, 2, 2).clone()  # image i holds i
    return Domain("MNIST", True, images, labels, n)


def test_held_out_split_is_disjoint_stratified_and_the_same_for_every_cell():
    domain = _domain(1000)
    cells = [SWEEP.make(1, strategy, optimizer, lr, 8, seed, 0.4, "constant", HOLDOUT_SHARE)
             for strategy, optimizer, lr, seed in (("initfc_all", "adam", 1e-3, 0), ("direct_all", "sgd", 3e-2, 7))]
    splits = [SWEEP.split(domain, cell) for cell in cells]
    mine = attack_subset(domain, 0.4)
    fit, held = splits[0]
    ids = lambda d: set(d.images[:, 0, 0, 0].tolist())  # noqa: E731
    assert ids(fit).isdisjoint(ids(held)) and ids(fit) | ids(held) == ids(mine)
    assert len(held) == round(HOLDOUT_SHARE * len(mine))
    for c in range(10):  # each class keeps its share, to rounding
        share = HOLDOUT_SHARE * int((mine.labels == c).sum())
        assert abs(int((held.labels == c).sum()) - share) < 1
    # the split depends on the attacker's data alone: the same for every lr, seed, strategy (and start model)
    for other_fit, other_held in splits[1:]:
        assert torch.equal(other_fit.images, fit.images) and torch.equal(other_held.images, held.images)
    # the split is of the attacker's subset at the cell's train fraction
    assert torch.equal(holdout_split(mine, HOLDOUT_SHARE)[1].images, held.images)


def test_held_out_split_refuses_too_little_data():
    with pytest.raises(UsageError, match="held-out share"):
        holdout_split(_domain(2), HOLDOUT_SHARE)


# ---- the verdict on hand-made curves -----------------------------------------------------------------------------

def _result(start, seed, lr, curve, diverged_epoch=None, optimizer="adam"):
    return {"start": start, "strategy": "initfc_all", "optimizer": optimizer, "lr": lr, "batch_size": 8,
            "train_fraction": 0.1, "schedule": "constant", "seed": seed, "sweep": None, "test_acc_curve": curve,
            "diverged_epoch": diverged_epoch}


def test_tuned_summary_pairs_each_start_at_its_own_lr():
    """sophon is judged at its own lr (1e-2) against scratch at scratch's (1e-3); the other lrs' results, were
    there any, do not count; a seed where scratch diverged is left out and reported."""
    sweep = [_entry("scratch", "adam", 1e-3, [10, 60]), _entry("scratch", "adam", 1e-2, [10, 30]),
             _entry("sophon", "adam", 1e-3, [10, 20]), _entry("sophon", "adam", 1e-2, [10, 40])]
    results = sweep + [_result("sophon", s, 1e-2, [10, 10 + s]) for s in range(4)] + \
        [_result("scratch", s, 1e-3, [10, 90 + s], diverged_epoch=1 if s == 3 else None) for s in range(4)] + \
        [_result("scratch", s, 1e-2, [10, 11]) for s in range(4)]  # not scratch's lr: ignored
    tuned = tuned_summary(results, ["sophon"])
    m = tuned["models"]["sophon"]
    row = m["per_family"][0]
    assert (row["lr"], row["lr_reference"]) == (1e-2, 1e-3)
    assert row["vs_reference"]["seeds"] == [0, 1, 2] and row["seeds_excluded"] == 1
    assert row["diverged_seeds"] == {"scratch": [3]}
    want = [math.log(auc([10, 10 + s]) / auc([10, 90 + s])) for s in range(3)]
    assert row["vs_reference"]["ratio"] == pytest.approx(math.exp(sum(want) / 3))
    assert m["headline"].startswith("no family learns faster than tuned scratch (Holm-corrected over 1 family")
    assert m["vs_null"] is None and tuned["families"] == list(FAMILY)


# ---- the suite through the stage-3 script ------------------------------------------------------------------------

def _checkpoint(path, dataset, stage, seed):
    torch.manual_seed(seed)
    model = build_model("resnet18", 10)
    config = {"orig_dataset": "FashionMNIST", "image_size": 8}
    atomic_save(make_checkpoint(model, arch="resnet18", dataset=dataset, stage=stage, config=config, metrics={},
                                parent=None), path)
    return path


SUITE = ["--optimizers", "adam,momentum", "--strategies", "initfc_all", "--schedules", "constant", "--lrs",
         "1e-3,3e-2", "--seeds", "0,1", "--epochs", "1", "--bs", "8", "--train_fractions", "0.5", "--test_subset", "20"]


@pytest.fixture(scope="module")
def suite_run(tmp_path_factory, data_root):
    """A finished tiny suite: a protected model, normal, scratch and null; 2 families x (2 lrs + 2 seeds)."""
    base = tmp_path_factory.mktemp("tuned")
    protected = _checkpoint(base / "protected.pt", "MNIST", "sophon_orig/stage2_train", 0)
    normal = _checkpoint(base / "normal.pt", "FashionMNIST", "sophon_orig/stage1_pretrain", 1)
    out = base / "suite"
    argv = ["--suite", "tuned", "--path", protected, "--normal_path", normal, "--data_root", data_root, *SUITE,
            "--out_dir", out]
    return load_script("stage3"), [str(a) for a in argv], out


def _entries(out):
    return [json.loads(line) for line in (out / "cells.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_the_suite_end_to_end_then_resumed(suite_run, restore_signals, quiet_log):
    script, argv, out = suite_run
    assert script.main(argv) == 0
    entries = _entries(out)
    starts = ("sophon", "normal", "scratch", "null")
    sweep = [e for e in entries if e["sweep"] is not None]
    phase2 = [e for e in entries if e["sweep"] is None]
    assert len(sweep) == 4 * 2 * 2 and all(e["key"].endswith("|sweep0.2") and e["seed"] == 0 for e in sweep)
    assert all(e["test_acc_curve"] == [None, None] and None not in e["heldout_acc_curve"] for e in sweep)
    # phase 2: each start at the lr its own sweep chose (select_lr on the held-out AUCs), every seed, ordinary keys
    chosen = {(r["start"], r["optimizer"]): r["lr"] for r in choose_lrs(sweep)}
    assert sorted((e["start"], e["optimizer"], e["lr"], e["seed"]) for e in phase2) == sorted(
        (start, opt, lr, seed) for (start, opt), lr in chosen.items() if lr is not None for seed in (0, 1))
    for e in phase2:
        settings = FINE_TUNING.make(1, e["strategy"], e["optimizer"], e["lr"], 8, e["seed"], 0.5, "constant")
        assert e["key"] == Cell(e["start"], settings).key and "sweep" not in e["key"]
        assert e["heldout_acc_curve"] == [None, None] and None not in e["test_acc_curve"]
    summary = json.loads((out / "summary.json").read_text())
    tuned = summary["tuned"]
    assert list(tuned["models"]) == ["sophon", "normal", "null"] and len(tuned["sweep"]) == 4 * 2
    for label, m in tuned["models"].items():
        assert {"headline", "vs_reference", "worst_family", "headline_vs_null", "vs_null", "per_family"} <= set(m)
        assert len(m["per_family"]) == 2
        for row in m["per_family"]:
            assert row["lr"] == chosen[label, row["optimizer"]]
            assert row["lr_reference"] == chosen["scratch", row["optimizer"]]
        assert (m["vs_null"] is None) == (label == "null")
    assert summary["verdicts"] == [] and "robustness" not in summary  # those compare starts at one lr
    assert tuned["early_stop"] == early_stop_check(sweep)
    report = (out / "report.md").read_text().splitlines()
    assert report[2].startswith("- **sophon**: ") and "tuned scratch (Holm-corrected over" in report[2]
    assert report[3].startswith("- **normal**: ") and report[4].startswith("- **null**: ")
    assert "## Tuned attacker" in report and (out / "plots" / "tuned.png").is_file()
    assert not (out / "plots" / "robustness.png").exists()
    rows = read_rows(out / "metrics.csv")
    assert {r["sweep"] for r in rows} == {"0.2", ""} and all((r["sweep"] == "") == (r["heldout_acc"] == "")
                                                             for r in rows)

    # resume after the last three cells.jsonl lines are lost: those three cells, and no other, run again
    lines = (out / "cells.jsonl").read_text().splitlines(True)
    lost = [json.loads(line)["key"] for line in lines[-3:]]
    (out / "cells.jsonl").write_text("".join(lines[:-3]))
    (out / "summary.json").unlink()
    logged = len((out / "log.txt").read_text())
    assert script.main(["--resume", str(out)]) == 0
    tail = (out / "log.txt").read_text()[logged:]
    ran = [line.split("cell ", 1)[1].strip() for line in tail.splitlines() if " cell " in line and "|" in line]
    assert sorted(ran) == sorted(lost)
    assert sorted(e["key"] for e in _entries(out)) == sorted(e["key"] for e in entries)
    assert json.loads((out / "summary.json").read_text())["tuned"]["sweep"] == tuned["sweep"]


def test_suite_flags_fill_only_what_is_not_given(suite_run):
    script, _, _ = suite_run
    _, args = script.parse_args(["--suite", "tuned", "--optimizers", "adam", "--path", "x.pt"])
    assert args.optimizers == ["adam"] and args.strategies == ["direct_all", "initfc_all"]
    assert args.lrs == [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2] and args.seeds == list(range(10))
    assert args.schedules == ["constant", "cosine", "warmup_cosine"] and args.train_fractions == [0.1]
    assert args.start == ["sophon", "normal", "scratch", "null"]
    with pytest.raises(UsageError, match="needs scratch"):
        script.parse_args(["--suite", "tuned", "--start", "sophon,normal"])
    with pytest.raises(UsageError, match="drop --attacks"):
        script.parse_args(["--suite", "tuned", "--attacks", "finetune"])
    _, plain = script.parse_args(["--path", "x.pt"])
    assert plain.suite is None and plain.optimizers == ["momentum"] and plain.start == ["sophon", "normal", "scratch"]


@pytest.mark.slow
def test_the_suite_scores_a_foreign_safetensors_model(tmp_path, data_root, restore_signals, quiet_log):
    """A protection made elsewhere: a plain .safetensors file of a torchvision-layout resnet18."""
    from safetensors.torch import save_file
    torch.manual_seed(3)
    mine = tmp_path / "my_model.safetensors"
    save_file({k: v.contiguous() for k, v in build_model("resnet18", 10).state_dict().items()}, str(mine))
    out = tmp_path / "foreign"
    flags = ["--optimizers", "adam", "--strategies", "initfc_all", "--schedules", "constant", "--lrs", "1e-3,1e-2",
             "--seeds", "0,1", "--epochs", "1", "--bs", "8", "--train_fractions", "0.5", "--test_subset", "20"]
    argv = ["--suite", "tuned", "--path", mine, "--arch", "resnet18", "--orig_dataset", "FashionMNIST", "--dataset",
            "MNIST", "--image_size", "8", "--start", "sophon,scratch", "--data_root", data_root, *flags,
            "--out_dir", out]
    assert load_script("stage3").main([str(a) for a in argv]) == 0
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["parent_format"] == "safetensors" and config["suite"] == "tuned"
    tuned = json.loads((out / "summary.json").read_text())["tuned"]
    assert list(tuned["models"]) == ["sophon"] and tuned["models"]["sophon"]["vs_null"] is None
    assert {r["start"] for r in tuned["sweep"]} == {"sophon", "scratch"}
    assert (out / "plots" / "tuned.png").is_file()
