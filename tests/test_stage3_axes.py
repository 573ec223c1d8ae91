"""Stage 3's robustness axes: the attacker's data share, lr schedules, a diverging attack, several protected
models in one grid, and the robustness summary."""
import json
import math
import shutil

import pytest
import torch

import common.finetune as ft
from common.cli import UsageError
from common.axes import Cell
from common.finetune import Attack, attack_subset, run_attack, subset_indices
from common.models import build_model, rescale_batchnorm_fed
from common.plots import grid_results, plot_grid, plot_robustness
from common.procedures import plan
from common.report import write_report
from common.stage3 import NULL_START, GridContext
from common.train import OPTIMIZERS, Precision, make_optimizer
from common.verdicts import auc, pooled_robustness, robustness_summary, scratch_verdicts
from helpers import TinyNet, load_script, read_rows, run_script
from test_finetune import _domain, _grid_args

CPU = torch.device("cpu")


# ---- the attacker's data share ---------------------------------------------------------------------------

def test_subset_is_stratified_sized_and_fixed():
    labels = torch.tensor([c for c in range(10) for _ in range(40 + c)])  # 40..49 per class, 445 in all
    idx = subset_indices(labels, 0.1)
    assert len(idx) == round(0.1 * len(labels)) == 44 and len(set(idx.tolist())) == 44
    counts = torch.bincount(labels[idx], minlength=10)
    for c in range(10):  # each class keeps its share, up to rounding
        assert math.floor(0.1 * (40 + c)) <= counts[c] <= math.ceil(0.1 * (40 + c))
    torch.manual_seed(123)  # the global RNG (and so the cell seed) does not move it
    assert torch.equal(subset_indices(labels, 0.1), idx)
    assert torch.equal(subset_indices(labels, 1.0), torch.arange(len(labels)))


def test_every_start_and_seed_fine_tunes_on_the_same_subset(monkeypatch):
    seen = []

    def spy(model, domain, *args, **kwargs):
        seen.append((domain.images.clone(), domain.labels.clone()))

    monkeypatch.setattr(ft, "train_epoch", spy)
    domain = _domain(40)
    for seed in (0, 1, 2):
        for start_seed in (0, 5):  # two different start models
            torch.manual_seed(start_seed)
            curve = run_attack(TinyNet(), domain, Attack("direct_all", "sgd", 1e-3, 8, 1, seed, 0.5), CPU,
                               Precision(CPU), lambda m: {})
            assert curve.train_samples == 20
    assert len(seen) == 6 and len(seen[0][1]) == 20
    assert all(torch.equal(x, seen[0][0]) and torch.equal(y, seen[0][1]) for x, y in seen)
    assert torch.equal(torch.bincount(seen[0][1], minlength=10), torch.full((10,), 2))  # 4 per class -> 2
    assert attack_subset(domain, 1.0) is domain


def test_a_subset_too_small_for_batchnorm_is_refused():
    with pytest.raises(UsageError, match="BatchNorm"):
        attack_subset(_domain(24), 0.01)


# ---- lr schedules -------------------------------------------------------------------------------------------

def _lrs(monkeypatch, schedule, lr=0.1, n=40, bs=8, epochs=4, fraction=1.0):
    lrs = []

    def make(name, params, lr, *, attack=False):
        opt = make_optimizer(name, params, lr, attack=attack)
        opt.register_step_pre_hook(lambda o, a, k: lrs.append(o.param_groups[0]["lr"]))
        return opt

    monkeypatch.setattr(ft, "make_optimizer", make)
    torch.manual_seed(0)
    run_attack(TinyNet(), _domain(n), Attack("direct_all", "adam", lr, bs, epochs, 0, fraction, schedule), CPU,
               Precision(CPU), lambda m: {})
    return lrs


def test_schedules_step_per_optimisation_step(monkeypatch):
    steps = 5 * 4  # 40 samples in batches of 8, 4 epochs
    assert _lrs(monkeypatch, "constant") == pytest.approx([0.1] * steps)
    assert _lrs(monkeypatch, "cosine") == pytest.approx([0.1 * 0.5 * (1 + math.cos(math.pi * k / 20))
                                                         for k in range(steps)])
    warm = 2  # WARMUP_FRACTION 0.1 of 20 steps
    assert ft.WARMUP_FRACTION == 0.1
    assert _lrs(monkeypatch, "warmup_cosine") == pytest.approx(
        [0.05, 0.1] + [0.1 * 0.5 * (1 + math.cos(math.pi * (k - warm) / 18)) for k in range(warm, steps)])
    # on a subset the run is shorter: 20 samples -> 3 steps an epoch (8, 8, 4), 12 in all
    assert _lrs(monkeypatch, "cosine", fraction=0.5) == pytest.approx(
        [0.1 * 0.5 * (1 + math.cos(math.pi * k / 12)) for k in range(12)])


# ---- large learning rates ----------------------------------------------------------------------------------

@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_lr_1e2_and_a_diverging_attack_still_give_a_curve(optimizer):
    torch.manual_seed(0)
    curve = run_attack(TinyNet(), _domain(40), Attack("direct_all", optimizer, 1e-2, 8, 2, 0), CPU, Precision(CPU),
                       lambda m: {"test_acc": 50.0})
    assert len(curve) == 3 and curve.diverged_epoch is None
    torch.manual_seed(0)
    evaluations = []
    curve = run_attack(TinyNet(), _domain(40), Attack("direct_all", optimizer, 1e30, 8, 3, 0), CPU, Precision(CPU),
                       lambda m: evaluations.append(1) or {"test_acc": float(len(evaluations))})
    assert [c["test_acc"] for c in curve] == [1.0, 2.0, 2.0, 2.0], "training stops at divergence; its figure stands"
    assert curve.diverged_epoch == 1 and curve.skipped_steps > 0


# ---- the grid -------------------------------------------------------------------------------------------------

def test_grid_expands_fractions_and_schedules_with_unique_keys():
    attacks = plan(_grid_args(["--train_fractions", "1.0,0.1,1", "--schedules", "constant,cosine",
                                      "--seeds", "0,1"]))
    assert len(attacks) == 2 * 2 * 2
    assert {(a.train_fraction, a.schedule) for a in attacks} == {(1.0, "constant"), (1.0, "cosine"),
                                                                 (0.1, "constant"), (0.1, "cosine")}
    keys = [Cell(s, a).key for a in attacks for s in ("sophon", "scratch")]
    assert len(set(keys)) == len(keys)
    # a default-valued cell keeps the key it had before these axes, so an old run folder resumes
    old = Attack("direct_all", "momentum", 1e-4, 16, 1, 2)
    assert Cell("sophon", old).key == "sophon|direct_all|momentum|0.0001|16|2"
    assert Cell("sophon", Attack("direct_all", "momentum", 1e-4, 16, 1, 2, 0.1, "warmup_cosine")).key == \
        "sophon|direct_all|momentum|0.0001|16|2|f0.1|warmup_cosine"
    default = plan(_grid_args([]))
    assert [(a.train_fraction, a.schedule) for a in default] == [(1.0, "constant")]


@pytest.mark.parametrize("argv", [["--train_fractions", "0"], ["--train_fractions", "1.5"],
                                  ["--train_fractions", "x"], ["--schedules", "linear"]])
def test_bad_axis_item(argv):
    with pytest.raises(UsageError):
        _grid_args(argv)


# ---- verdicts and the robustness summary ----------------------------------------------------------------------

def _r(start, seed, curve, optimizer="momentum", fraction=1.0, schedule="constant"):
    return {"start": start, "strategy": "direct_all", "optimizer": optimizer, "lr": 1e-4, "batch_size": 16,
            "train_fraction": fraction, "schedule": schedule, "seed": seed, "test_acc_curve": curve}


def test_verdicts_keep_the_new_axes_apart():
    results = [_r(s, 0, c, fraction=f) for f in (1.0, 0.1) for s, c in (("sophon", [1, 2]), ("scratch", [2, 4]))]
    verdicts = scratch_verdicts(results)
    assert [(v["train_fraction"], v["schedule"]) for v in verdicts] == [(1.0, "constant"), (0.1, "constant")]


def test_robustness_summary_by_hand():
    # cell A (momentum): sophon slower than scratch in every seed; normal has a head start
    # cell B (adam): sophon slower in seed 0 only; normal has no head start -> cannot show protection
    results = []
    for seed, (a_sophon, b_sophon) in enumerate([([10, 20], [10, 20]), ([10, 30], [60, 80]), ([20, 20], [50, 70])]):
        results += [_r("sophon", seed, a_sophon), _r("scratch", seed, [20, 40]), _r("normal", seed, [60, 80]),
                    _r("sophon", seed, b_sophon, "adam"), _r("scratch", seed, [40, 60], "adam"),
                    _r("normal", seed, [30, 50], "adam")]
    r = robustness_summary(results)
    assert r["cells"] == 2 and r["seeds"] == 3
    a, b = r["per_cell"]
    assert a["optimizer"] == "momentum" and a["train_fraction"] == 1.0 and a["schedule"] == "constant"
    assert a["auc_ratio_mean"] == pytest.approx((15 / 30 + 20 / 30 + 20 / 30) / 3)
    assert a["head_start"] == pytest.approx(70 / 30) and a["shows_protection"] is True
    assert b["auc_ratio_mean"] == pytest.approx((15 / 50 + 70 / 50 + 60 / 50) / 3)  # 0.967: below 1 on average
    assert b["head_start"] == pytest.approx(40 / 50) and b["shows_protection"] is False
    assert r["share_below_1"] == 1.0
    shares = [1.0, 0.5, 0.5]  # per seed: seed 0 both cells below 1, seeds 1 and 2 only cell A
    mean = sum(shares) / 3
    std = (sum((s - mean) ** 2 for s in shares) / 2) ** 0.5
    assert r["share_below_1_per_seed_mean"] == pytest.approx(mean)
    assert r["share_below_1_per_seed_std"] == pytest.approx(std)
    half = 4.302652729911275 * std / 3 ** 0.5  # t(0.975, 2 degrees of freedom)
    assert mean - half < 0 and mean + half > 1  # 3 seeds: wider than the whole range
    assert r["share_below_1_ci95"] == [0.0, 1.0]  # clipped to [0, 1]
    narrow = robustness_summary(results + [dict(x, seed=x["seed"] + 3) for x in results])  # the same 6 times
    half6 = 2.570581835636314 * (sum((s - mean) ** 2 for s in shares * 2) / 5) ** 0.5 / 6 ** 0.5
    assert narrow["share_below_1_ci95"] == pytest.approx([mean - half6, mean + half6])
    assert "3 seeds" in r["ci_note"] and "wide" in r["ci_note"]
    assert r["worst_cell"]["optimizer"] == "adam"
    assert r["cells_unable_to_show_protection"] == 1 and r["share_below_1_where_shown"] == 1.0
    assert r["auc_ratio_geomean"] == pytest.approx((a["auc_ratio_mean"] * b["auc_ratio_mean"]) ** 0.5)
    assert r["auc_ratio_geomean_where_shown"] == pytest.approx(a["auc_ratio_mean"])  # B cannot show protection
    # one seed: no interval; no normal model: the head start is unknown
    one = robustness_summary([x for x in results if x["seed"] == 0 and x["start"] != "normal"])
    assert one["share_below_1_ci95"] is None and one["per_cell"][0]["shows_protection"] is None
    assert robustness_summary([x for x in results if x["start"] != "scratch"]) is None


def test_a_cell_where_scratch_does_not_learn_cannot_show_protection():
    # momentum: scratch ends at 40, the best of the full-data cells -> learned; sgd: scratch ends at 12 < 0.5 * 40
    # -> not learned, although normal's head start is large and sophon is far below scratch (ratio 10.5 / 11 < 1);
    # adam at 10% data: scratch ends at 16, below half of 40 but the best of its own data share -> learned
    results = []
    for seed in range(2):
        results += [_r("sophon", seed, [10, 20]), _r("scratch", seed, [20, 40]), _r("normal", seed, [60, 80]),
                    _r("sophon", seed, [10, 11], "sgd"), _r("scratch", seed, [10, 12], "sgd"),
                    _r("normal", seed, [30, 60], "sgd"), _r("sophon", seed, [10, 12], "adam", fraction=0.1),
                    _r("scratch", seed, [10, 16], "adam", fraction=0.1),
                    _r("normal", seed, [20, 30], "adam", fraction=0.1)]
    r = robustness_summary(results)
    cells = {c["optimizer"]: c for c in r["per_cell"]}
    assert [cells[o]["reference_final"] for o in ("momentum", "sgd", "adam")] == [40, 12, 16]
    assert [cells[o]["reference_learned"] for o in ("momentum", "sgd", "adam")] == [True, False, True]
    assert cells["sgd"]["head_start"] > 1 and cells["sgd"]["auc_ratio_mean"] < 1
    assert [cells[o]["shows_protection"] for o in ("momentum", "sgd", "adam")] == [True, False, True]
    assert r["cells_reference_did_not_learn"] == 1 and r["cells_unable_to_show_protection"] == 1
    assert r["worst_cell"]["optimizer"] == "sgd" and r["worst_cell_where_shown"]["optimizer"] == "adam"
    assert r["share_below_1"] == 1.0 and r["share_below_1_where_shown"] == 1.0
    worse = robustness_summary([dict(x, test_acc_curve=[10, 30]) if x["start"] == "sophon" and x["optimizer"] == "sgd"
                                else x for x in results])
    assert worse["share_below_1"] == pytest.approx(2 / 3) and worse["share_below_1_where_shown"] == 1.0
    # without normal runs the head start is unknown, but a cell whose scratch did not learn is still flagged
    alone = robustness_summary([x for x in results if x["start"] != "normal"])
    assert [c["shows_protection"] for c in alone["per_cell"]] == [None, False, None]


def test_each_family_carries_the_null_models_ratio():
    # a second model from scratch (null) is 1.25 times as fast as scratch with momentum, 1.5 times with adam
    results = []
    for seed in range(2):
        for optimizer, null in (("momentum", [30, 20]), ("adam", [20, 40])):
            results += [_r("sophon", seed, [10, 20], optimizer), _r("scratch", seed, [10, 30], optimizer),
                        _r("normal", seed, [20, 40], optimizer), _r("null", seed, null, optimizer)]
    cells = {c["optimizer"]: c for c in robustness_summary(results)["per_cell"]}
    assert [cells[o]["null_ratio"] for o in ("momentum", "adam")] == [pytest.approx(1.25), pytest.approx(1.5)]
    assert [cells[o]["shows_protection"] for o in ("momentum", "adam")] == [True, True]  # head start 1.5 > 1
    assert all(c["null_ratio"] is None for c in robustness_summary([x for x in results if x["start"] != "null"])[
        "per_cell"])
    # the null model judged like a protected one: its ratio is the others' null_ratio
    as_protected = {c["optimizer"]: c for c in robustness_summary(results, protected="null")["per_cell"]}
    assert as_protected["adam"]["auc_ratio_mean"] == pytest.approx(1.5)


def test_runs_of_one_configuration_are_pooled_over_the_runs(tmp_path):
    # two runs of "m" (m#0, m#1) and one of "solo": momentum below 1 in both runs of m, adam in run 0 only
    ratios = {"m#0": {"momentum": 0.5, "adam": 0.8}, "m#1": {"momentum": 0.7, "adam": 1.4},
              "solo": {"momentum": 2.0, "adam": 2.0}}
    results = []
    for seed in range(2):
        for o in ("momentum", "adam"):
            results += [_r("scratch", seed, [20, 40], o), _r("normal", seed, [60, 80], o)]
            results += [_r(label, seed, [r[o] * 20, r[o] * 40], o) for label, r in ratios.items()]
    robustness = {label: robustness_summary(results, protected=label) for label in ratios}
    pooled = pooled_robustness(robustness)
    assert list(pooled) == ["m"] and pooled["m"]["runs"] == ["m#0", "m#1"] and pooled["m"]["cells"] == 2
    assert pooled["m"]["share_below_1_mean"] == pytest.approx(0.75)  # 1.0 and 0.5
    assert pooled["m"]["share_below_1_std"] == pytest.approx(0.5 ** 0.5 / 2)
    cells = {c["optimizer"]: c for c in pooled["m"]["per_cell"]}
    assert cells["adam"]["auc_ratio_mean"] == pytest.approx(1.1) and cells["adam"]["runs_below_1"] == 1
    assert cells["adam"]["auc_ratio_std"] == pytest.approx(0.3 * 2 ** 0.5)
    assert cells["momentum"]["runs_below_1"] == 2 and pooled["m"]["worst_cell"]["optimizer"] == "adam"
    # a cell from 0.8 to 1.4 moves the share by one cell; the geo-means (0.632 and 0.990) see how far
    geo = [(0.5 * 0.8) ** 0.5, (0.7 * 1.4) ** 0.5]
    assert [robustness[k]["auc_ratio_geomean"] for k in ("m#0", "m#1")] == pytest.approx(geo)
    assert pooled["m"]["auc_ratio_geomean_mean"] == pytest.approx(sum(geo) / 2)
    assert pooled["m"]["auc_ratio_geomean_std"] == pytest.approx(abs(geo[0] - geo[1]) / 2 ** 0.5)
    report = write_report(type("Run", (), {"path": tmp_path})(), "t", results, [], [], robustness=robustness,
                          robustness_pooled=pooled)
    text = report.read_text()
    assert "## Robustness per configuration, runs pooled" in text
    assert "| m | m#0, m#1 | 0.75 +- 0.354 |" in text and "below 1 in 1 of 2 runs" in text
    assert f"| {sum(geo) / 2:.3g} +- {abs(geo[0] - geo[1]) / 2 ** 0.5:.3g} |" in text
    assert pooled_robustness({"solo": robustness["solo"], "m#0": robustness["m#0"]}) == {}


def test_robustness_plot_reads_the_ratios_of_the_summary_from_metrics_csv(tmp_path):
    results = []
    for seed in range(2):
        for o in ("sgd", "adam"):
            results += [_r("scratch", seed, [10, 30 + seed], o), _r("normal", seed, [50, 70], o),
                        _r("A", seed, [10, 20 + 5 * seed], o), _r("B", seed, [10, 40], o)]
    header = "cell,start,strategy,optimizer,lr,batch_size,train_fraction,schedule,defence,seed,epoch,test_acc\n"
    lines = [f"{r['start']}|{r['optimizer']}|{r['seed']},{r['start']},direct_all,{r['optimizer']},0.0001,16,1,"
             f"constant,,{r['seed']},{e},{v}\n" for r in results for e, v in enumerate(r["test_acc_curve"])]
    lines.append("C|sgd|0,C,direct_all,sgd,0.0001,16,1,constant,,0,0,10\n")  # a cell cut short: left out
    (tmp_path / "metrics.csv").write_text(header + "".join(lines))
    read = grid_results(read_rows(tmp_path / "metrics.csv"))
    assert {r["start"] for r in read} == {"scratch", "normal", "A", "B"}
    for label in ("A", "B"):
        assert robustness_summary(read, protected=label) == robustness_summary(results, protected=label)
    assert [p.name for p in plot_robustness(tmp_path)] == ["robustness.png"]
    assert (tmp_path / "plots" / "robustness.png").stat().st_size > 0
    (tmp_path / "metrics.csv").write_text(header + "".join(l for l in lines if not l.startswith("scratch")))
    assert plot_robustness(tmp_path) == []  # no scratch curves: no ratios


def test_plots_group_by_the_new_axes_and_colour_several_models(tmp_path):
    header = "cell,start,strategy,optimizer,lr,batch_size,train_fraction,schedule,seed,epoch,test_acc\n"
    lines = [f"x,{s},direct_all,sgd,0.001,16,{f},{sch},0,{e},{10 * e + i}\n"
             for i, s in enumerate(("A", "B", "normal", "scratch")) for f in (1.0, 0.1)
             for sch in ("constant", "cosine") for e in (0, 1)]
    (tmp_path / "metrics.csv").write_text(header + "".join(lines))
    import matplotlib.pyplot as plt
    titles = []
    real = plt.Axes.set

    def spy(self, **kw):
        titles.append(kw.get("title"))
        return real(self, **kw)

    plt.Axes.set = spy
    try:
        pngs = plot_grid(tmp_path)
    finally:
        plt.Axes.set = real
    assert [p.name for p in pngs] == ["test_acc_direct_all.png"]
    assert sorted(t for t in titles if t) == sorted(["sgd lr=0.001 bs=16", "sgd lr=0.001 bs=16 cosine",
                                                     "sgd lr=0.001 bs=16 data=0.1",
                                                     "sgd lr=0.001 bs=16 data=0.1 cosine"])
    from common.plots import start_styles
    styles = start_styles({"A", "B", "normal", "scratch"})
    assert len({styles[s][0] for s in styles}) == 4


# ---- through the stage-3 script --------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_labelled_models_in_one_grid_then_resumed(tmp_path, data_root, stage2_runs):
    out = tmp_path / "grid"
    args = ["--path", f"kl={stage2_runs('kl')},inv={stage2_runs('inverse')}", "--data_root", data_root,
            "--train_fractions", "1.0,0.5", "--schedules", "warmup_cosine", "--seeds", "0,1", "--epochs", "1",
            "--bs", "16"]
    proc = run_script("stage3", *args, "--out_dir", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    results = s["results"]
    assert len(results) == 4 * 2 * 2  # (kl, inv, normal, scratch) x 2 fractions x 2 seeds
    assert {r["start"] for r in results} == {"kl", "inv", "normal", "scratch"}
    assert {(r["train_fraction"], r["schedule"]) for r in results} == {(1.0, "warmup_cosine"), (0.5, "warmup_cosine")}
    full = {r["train_samples"] for r in results if r["train_fraction"] == 1.0}
    half = {r["train_samples"] for r in results if r["train_fraction"] == 0.5}
    assert len(full) == len(half) == 1 and half == {round(full.pop() / 2)}
    assert {(v["protected"], v["train_fraction"]) for v in s["verdicts"]} == {
        ("kl", 1.0), ("kl", 0.5), ("inv", 1.0), ("inv", 0.5)}
    assert set(s["robustness"]) == {"kl", "inv", "normal"}  # normal: the positive control
    for label, rob in s["robustness"].items():
        assert rob["protected"] == label and rob["cells"] == 2 and rob["seeds"] == 2
        assert all(isinstance(c["shows_protection"], bool) for c in rob["per_cell"])
        for c in rob["per_cell"]:  # the head start and ratios come from the same curves as the results
            curve = lambda start, seed: next(r["test_acc_curve"] for r in results if r["start"] == start and r[
                "seed"] == seed and r["train_fraction"] == c["train_fraction"])
            ratios = [auc(curve(label, sd)) / auc(curve("scratch", sd)) for sd in (0, 1)]
            assert c["auc_ratio_mean"] == pytest.approx(sum(ratios) / 2)
    report = (out / "report.md").read_text()
    assert "Robustness per protected model" in report and "| kl |" in report and "| inv |" in report
    rows = read_rows(out / "metrics.csv")
    assert {r["train_fraction"] for r in rows} == {"1", "0.5"} and {r["schedule"] for r in rows} == {"warmup_cosine"}
    # cut the last two cells and resume with the run folder alone: the labelled paths come from config.json
    cut = tmp_path / "cut"
    shutil.copytree(out, cut)
    lines = (cut / "cells.jsonl").read_text().splitlines()
    (cut / "cells.jsonl").write_text("\n".join(lines[:-2]) + "\n")
    (cut / "summary.json").unlink()
    proc = run_script("stage3", "--resume", cut)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "14 of 16 cells already done; running 2" in proc.stdout
    resumed = json.loads((cut / "summary.json").read_text())
    assert resumed["results"] == results and resumed["robustness"] == s["robustness"]


@pytest.mark.slow
def test_duplicate_labels_are_one_line(tmp_path, data_root, stage2_runs):
    proc = run_script("stage3", "--path", f"a={stage2_runs('kl')},a={stage2_runs('inverse')}", "--data_root",
                      data_root, "--out_dir", tmp_path / "x")
    assert proc.returncode == 2 and "label 'a' names two models" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def test_start_sources_name_the_checkpoint_of_each_start_model_run():
    sophon, backdoor = load_script("stage3").start_sources, load_script("bd_stage3").start_sources
    config = {"path": "a=/r/a.pt,b=/r/b.pt", "normal_path": "/r/n.pt", "start": ["sophon", "normal", "scratch"]}
    assert sophon(config) == {"a": "/r/a.pt", "b": "/r/b.pt", "normal": "/r/n.pt", "scratch": None}
    assert sophon(dict(config, path="/r/s.pt", start=["sophon"])) == {"sophon": "/r/s.pt"}
    assert sophon(dict(config, start=["scratch"])) == {"scratch": None}
    assert sophon(dict(config, start=["scratch", "null"])) == {"scratch": None, "null": "fresh init, seed + 1000003"}
    renormalized = sophon(dict(config, renormalize=True))  # another start for the protected models alone
    assert renormalized == {"a": "/r/a.pt renormalized", "b": "/r/b.pt renormalized", "normal": "/r/n.pt",
                            "scratch": None}
    config = {"path": "/r/i.pt", "baseline_path": "/r/b.pt", "start": ["backdoored"]}
    assert backdoor(config) == {"backdoored": "/r/b.pt"}


@pytest.mark.slow
def test_reused_baseline_cells_stand_in_for_running_them(tmp_path, data_root, stage2_runs):
    grid = ["--data_root", data_root, "--seeds", "0,1", "--epochs", "1", "--bs", "16", "--train_fractions", "0.5"]
    first, second = tmp_path / "first", tmp_path / "second"
    proc = run_script("stage3", "--path", f"kl={stage2_runs('kl')}", *grid, "--out_dir", first)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_script("stage3", "--path", f"inv={stage2_runs('inverse')}", *grid, "--reuse_cells", first,
                      "--out_dir", second)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 cells of normal, scratch reused" in proc.stdout and "4 of 6 cells already done; running 2" in proc.stdout
    assert "cell scratch|" not in proc.stdout and "cell normal|" not in proc.stdout
    before = json.loads((first / "summary.json").read_text())["results"]
    after = json.loads((second / "summary.json").read_text())
    for start in ("normal", "scratch"):
        assert [r for r in after["results"] if r["start"] == start] == [r for r in before if r["start"] == start]
    assert {r["start"] for r in after["results"]} == {"inv", "normal", "scratch"}
    assert set(after["robustness"]) == {"inv", "normal"} and after["robustness"]["inv"]["cells"] == 1
    copied = [r for r in read_rows(second / "metrics.csv") if r["start"] == "scratch"]
    assert copied == [r for r in read_rows(first / "metrics.csv") if r["start"] == "scratch"] and len(copied) == 4


@pytest.mark.slow
def test_cells_of_other_numerics_run_again_instead_of_being_reused(tmp_path, data_root, stage2_runs):
    grid = ["--data_root", data_root, "--seeds", "0,1", "--epochs", "1", "--bs", "16", "--starts", "scratch"]
    first, second = tmp_path / "first", tmp_path / "second"
    assert run_script("stage3", "--path", stage2_runs("kl"), *grid, "--out_dir", first).returncode == 0
    entries = [json.loads(line) for line in (first / "cells.jsonl").read_text().splitlines()]
    assert [e["numerics"] for e in entries] == ["cpu fp32", "cpu fp32"]
    entries[1]["numerics"] = "cuda bf16"  # as a GPU grid would have written it
    (first / "cells.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    proc = run_script("stage3", "--path", stage2_runs("kl"), *grid, "--reuse_cells", first, "--out_dir", second)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 cells of scratch reused" in proc.stdout and "1 of 2 cells already done; running 1" in proc.stdout
    assert "ran with cuda bf16 there, cpu fp32 here: running them here" in proc.stdout
    assert f"cell {entries[1]['key']}" in proc.stdout and f"cell {entries[0]['key']}" not in proc.stdout
    assert [json.loads(line)["numerics"] for line in (second / "cells.jsonl").read_text().splitlines()] == \
        ["cpu fp32", "cpu fp32"]
    (first / "cells.jsonl").write_text(json.dumps(entries[1]) + "\n")  # a grid cut short on a GPU, resumed here
    (first / "summary.json").unlink()
    proc = run_script("stage3", "--resume", first)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cells done before ran with cuda bf16, the rest run with cpu fp32" in proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("change, needle", [(["--epochs", "2"], "epochs 1 there, 2 here"),
                                            (["--test_subset", "10"], "test_subset None there, 10 here")])
def test_cells_of_other_settings_are_not_reused(tmp_path, data_root, stage2_runs, change, needle):
    grid = ["--data_root", data_root, "--epochs", "1", "--bs", "16", "--starts", "scratch"]
    first = tmp_path / "first"
    assert run_script("stage3", "--path", stage2_runs("kl"), *grid, "--out_dir", first).returncode == 0
    proc = run_script("stage3", "--path", stage2_runs("kl"), *grid, *change, "--reuse_cells", first,
                      "--out_dir", tmp_path / "second")
    assert proc.returncode == 2 and needle in proc.stderr and "ran other settings" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "second").exists()


@pytest.mark.slow
def test_a_renormalising_attacker_reruns_the_protected_cells_alone(tmp_path, data_root, stage2_runs):
    grid = ["--path", f"kl={stage2_runs('kl')}", "--data_root", data_root, "--epochs", "1", "--bs", "16"]
    first, second = tmp_path / "first", tmp_path / "second"
    assert run_script("stage3", *grid, "--out_dir", first).returncode == 0
    proc = run_script("stage3", *grid, "--renormalize", "--reuse_cells", first, "--out_dir", second)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 cells of normal, scratch reused" in proc.stdout and "cell kl|" in proc.stdout
    assert json.loads((second / "config.json").read_text())["config"]["renormalize"] is True
    start = [[r for r in read_rows(run / "metrics.csv") if r["start"] == "kl" and r["epoch"] == "0"]
             for run in (first, second)]
    assert start[0][0]["test_acc"] == start[1][0]["test_acc"]  # the same function before fine-tuning


@pytest.mark.slow
def test_renormalising_undoes_a_rescale_before_the_attack(tmp_path, data_root, stage2_runs):
    """A x1000 copy of a model fine-tunes differently from the model itself (Adam's relative step is 1000 times
    smaller), and the same once both are renormalised: the attack starts from the renormalised weights."""
    ckpt = torch.load(stage2_runs("kl") / "checkpoints" / "final.pt", map_location="cpu", weights_only=False)
    model = build_model(ckpt["arch"], ckpt["num_classes"])
    model.load_state_dict(ckpt["model"])
    rescale_batchnorm_fed(model, 16, factor=1000)
    torch.save({**ckpt, "model": model.state_dict()}, tmp_path / "x1000.pt")
    grid = ["--path", f"plain={stage2_runs('kl')},x1000={tmp_path / 'x1000.pt'}", "--starts", "sophon",
            "--data_root", data_root, "--epochs", "2", "--bs", "16", "--optimizers", "adam", "--lrs", "1e-2"]
    curves = {}
    for flags in ([], ["--renormalize"]):
        out = tmp_path / ("renormalized" if flags else "as_given")
        proc = run_script("stage3", *grid, *flags, "--out_dir", out)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = read_rows(out / "metrics.csv")
        curves[bool(flags)] = {label: [r["test_acc"] for r in rows if r["start"] == label] for label in ("plain", "x1000")}
    assert curves[False]["plain"][0] == curves[False]["x1000"][0]  # the same function
    assert curves[False]["plain"] != curves[False]["x1000"]  # but not the same attack
    assert curves[True]["plain"] == curves[True]["x1000"]


# ---- the null start: a second scratch model, the noise floor of the auc ratios ---------------------------------

def test_the_null_start_is_scratch_with_another_init():
    context = GridContext("resnet18", 10, {"scratch": None, NULL_START: None}, None, None, False, False)
    stem = lambda start, seed: context.start_model(start, seed).conv1.weight
    torch.manual_seed(3)
    expected = build_model("resnet18", 10).conv1.weight
    assert torch.equal(stem("scratch", 3), expected)  # scratch's init is drawn from the cell's seed, as before
    assert torch.equal(stem(NULL_START, 3), stem(NULL_START, 3))
    assert not torch.allclose(stem(NULL_START, 3), stem("scratch", 3))
    assert not torch.allclose(stem(NULL_START, 3), stem(NULL_START, 4))


def test_null_is_a_reserved_label():
    with pytest.raises(UsageError, match="reserved"):
        load_script("stage3").protected_items(f"{NULL_START}=/r/a.pt,b=/r/b.pt")


@pytest.mark.slow
def test_a_grid_with_the_null_start_judges_it_like_a_protected_model(tmp_path, data_root, stage2_runs):
    grid = ["--path", stage2_runs("kl"), "--data_root", data_root, "--start", "sophon,scratch,null", "--seeds", "0,1",
            "--epochs", "1", "--bs", "16"]
    proc = run_script("stage3", *grid, "--out_dir", tmp_path / "a")
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert set(s["robustness"]) == {"sophon", NULL_START}
    curve = {(r["start"], r["seed"]): r["test_acc_curve"] for r in s["results"]}
    (cell,) = s["robustness"][NULL_START]["per_cell"]
    ratios = [auc(curve[NULL_START, seed]) / auc(curve["scratch", seed]) for seed in (0, 1)]
    assert cell["auc_ratio_mean"] == pytest.approx(sum(ratios) / 2)
    assert s["robustness"]["sophon"]["per_cell"][0]["null_ratio"] == pytest.approx(cell["auc_ratio_mean"])
    report = (tmp_path / "a" / "report.md").read_text()
    assert "| null |" in report and "a second model from scratch" in report
    # a grid of null and scratch alone (the noise floor by itself) takes both over from a grid of the same settings
    proc = run_script("stage3", *grid, "--start", "scratch,null", "--out_dir", tmp_path / "b", "--reuse_cells",
                      tmp_path / "a")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 cells of null, scratch reused" in (tmp_path / "b" / "log.txt").read_text()
    again = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert set(again["robustness"]) == {NULL_START} and again["robustness"][NULL_START] == s["robustness"][NULL_START]
