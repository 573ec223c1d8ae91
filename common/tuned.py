"""The tuned attacker (`finetune_test.py --suite tuned`): every start model fine-tuned at the lr an attacker would
pick for it, and the verdict on statistics a reviewer cannot fault.

A family is (strategy, optimizer, batch size, train fraction, schedule): the fine-tuning attack's axes but the lr,
which each start model has its own of, and the seed. Two phases:
1. the sweep: for every start model and family, one cell per lr of the grid at one seed (--seed), each
   fine-tuning on the attacker's fit part and scored on its held-out part (common.sweep: a fixed stratified 20% of
   the attacker's own training data, never the test split). select_lr picks each (start, family)'s lr.
2. that lr at every seed of --seeds, as ordinary fine-tuning cells (common.finetune.FINE_TUNING) on the whole
   attacker subset, evaluated on the test split: plain grid cells with ordinary keys, reusable and resumable.
The grid runs phase 1, plans phase 2 from its cells.jsonl entries (so a resumed suite plans the same cells), and
runs phase 2; under torchrun each phase's cells are dealt to the ranks. No sweep point is stopped early: every lr
runs its epochs, so no early-stopping rule can change a chosen lr; early_stop_check replays successive halving
(HALVING_RULES) on the finished sweep and records what each rule would have saved and which chosen lrs it would
have changed.

The verdict (tuned_summary): per protected model (and the null start) and family, the model at its tuned lr
against scratch at scratch's tuned lr, seed by seed, on log AUC ratios (common.stats, through common.verdicts'
seed_log_ratios: a seed where either diverged is left out and reported), Holm-corrected over the families.
"""
import copy
import math
from dataclasses import dataclass
from typing import Optional

from common.axes import Cell
from common.cli import UsageError
from common.settings import Settings, setting
from common.finetune import FINE_TUNING, SCHEDULES
from common.stats import LEVEL, compare_families, headline
from common.sweep import HELDOUT_KEY, HOLDOUT_SHARE, SWEEP
from common.verdicts import auc, describe_family, diverged, diverged_seeds, named_families, seed_log_ratios

SWEEP_LRS = [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]  # the sweep's log grid
# early_stop_check's rules, each a tuple of rung epochs: (1, 2) takes 8 points to 4 after epoch 1, to 2 after epoch 2
HALVING_RULES = ((1, 2), (2,), (3,))
TIE = 1e-9  # held-out AUCs (in %) closer than this are a tie, which goes to the smaller lr
METRIC = "test_acc_curve"  # what the verdict compares: phase 2's test accuracy per epoch
# name -> the grid flags' values the suite sets (each one given on the command line replaces its list)
SUITES = {"tuned": {"optimizers": ["adam", "adamw", "momentum", "rmsprop"],
                    "strategies": ["direct_all", "initfc_all"],  # head kept, new head
                    "schedules": list(SCHEDULES), "train_fractions": [0.1], "lrs": SWEEP_LRS,
                    "seeds": list(range(10))}}
SELECTION = (f"per (start, family), the lr of the sweep whose held-out accuracy AUC (trapezoid over epochs 0..E, "
             f"over E) is largest; a diverged sweep cell is never chosen; AUCs within {TIE:g} tie and the tie goes "
             f"to the smaller lr; where every lr diverged, none is chosen and the family runs no phase-2 cell for "
             f"that start")


# ---- the suite's flag, the one place it enters a script's command line ----------------------------------------

@dataclass
class SuiteSettings(Settings):
    """--suite NAME: a named attacker set; its help says what the suite runs."""
    suite: Optional[str] = setting(None, (
        "tuned: per family (optimizers {optimizers}; strategies {strategies}; schedules {schedules}; train fractions "
        "{train_fractions}; --bs), a one-seed (--seed) sweep of lr over {lrs} for every start model (null included "
        "by default), each cell fine-tuning on the attacker's data less a fixed stratified {share:.0%} held out "
        "and scored on that held-out part; the lr with the best held-out accuracy AUC (never a diverged one, ties "
        "to the smaller) then fine-tunes at --seeds {seeds} as ordinary cells, judged against tuned scratch "
        "(summary.json's `tuned`, report.md's first lines, plots/tuned.png). Grid flags given with it replace its "
        "lists (--start, --optimizers, --lrs, ...)").format(
            share=HOLDOUT_SHARE, **{k: ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)
                                    for k, values in SUITES["tuned"].items()}).replace("%", "%%"),
        choices=tuple(SUITES))


def apply_suite(args, given, starts):
    """Under --suite, the grid flags not `given` (dest names) take the suite's lists, and --start `starts`."""
    if not args.suite:
        return
    if "attacks" in given:
        raise UsageError(f"--suite {args.suite} runs the fine-tuning attack alone; drop --attacks")
    for dest, values in SUITES[args.suite].items():
        if dest not in given:
            setattr(args, dest, list(values))
    if "start" not in given:
        args.start = list(starts)
    if "scratch" not in args.start:
        raise UsageError(f"--suite {args.suite} judges every model against tuned scratch: --start needs scratch")


# ---- families and the lr an attacker picks ----------------------------------------------------------------------

FAMILY = tuple(a.name for a in FINE_TUNING.spanned() if a.name not in ("lr", "seed"))


def family_of(entry):
    """An entry's (a result's, a sweep record's) family: its values of FAMILY."""
    return tuple(entry[name] for name in FAMILY)


def describe(family):
    """A family of the suite in words, as the headline names it."""
    return describe_family(family, FAMILY)


def select_lr(points):
    """The lr an attacker picks from a sweep, {lr: held-out AUC, None where the cell diverged}: the largest AUC,
    never a diverged point, a tie (within TIE) to the smaller lr; None where every point diverged."""
    usable = {lr: a for lr, a in points.items() if a is not None and math.isfinite(a)}
    if not usable:
        return None
    best = max(usable.values())
    return min(lr for lr, a in usable.items() if a >= best - TIE)


def choose_lrs(entries):
    """Sweep records of phase-1 entries (cells.jsonl entries or results): per (start, family), in first-seen
    order, {start, FAMILY..., lr: the chosen one (select_lr), points: [{lr, heldout_auc, diverged}] by lr}."""
    grouped = {}
    for e in entries:
        went = diverged(e)
        grouped.setdefault((e["start"], family_of(e)), []).append(
            {"lr": e["lr"], "heldout_auc": None if went else auc(e[f"{HELDOUT_KEY}_curve"]), "diverged": went})
    return [{"start": start, **dict(zip(FAMILY, family)),
             "lr": select_lr({p["lr"]: p["heldout_auc"] for p in points}),
             "points": sorted(points, key=lambda p: p["lr"])} for (start, family), points in grouped.items()]


def _heldout_aucs(curves):
    """{lr: held-out AUC, None where diverged} of {lr: (held-out curve, diverged epoch or None)}: select_lr's input."""
    return {lr: None if went is not None else auc(curve) for lr, (curve, went) in curves.items()}


def halving_choice(curves, rungs):
    """(lr, epochs trained) successive halving picks from one sweep, {lr: (held-out curve, diverged epoch or None)}:
    at each rung epoch r the live points, ranked by held-out AUC over epochs 0..r, keep their better half (rounded
    up; a point diverged by r is out), and the last ones run to the end, where select_lr picks among them as the
    full sweep does. A stopped run's curve is the full run's prefix (the lr schedule spans the planned epochs), so
    replaying it on full curves is exact. A point trains until it is stopped, diverges or ends. With no rung it is
    the full sweep: select_lr over every point."""
    epochs = len(next(iter(curves.values()))[0]) - 1
    live, stopped_at = list(curves), {}
    for rung in (r for r in rungs if r < epochs):
        live = [lr for lr in live if curves[lr][1] is None or curves[lr][1] > rung]
        ranked = sorted(live, key=lambda lr: (-auc(curves[lr][0][:rung + 1]), lr))
        stopped_at.update(dict.fromkeys(ranked[(len(ranked) + 1) // 2:], rung))
        live = ranked[:(len(ranked) + 1) // 2]
    lr = select_lr({lr: a for lr, a in _heldout_aucs(curves).items() if lr in live})
    trained = sum(min(stopped_at.get(lr, epochs), curves[lr][1] or epochs) for lr in curves)
    return lr, trained


def early_stop_check(entries, rules=HALVING_RULES):
    """What successive halving (halving_choice, once per rule of rung epochs) would have done to the sweep of
    phase-1 entries: rule (in words), pairs ((start, family) sweeps), epochs (trained by the full sweep), and per
    rule {rungs, epochs_halving, changed: the pairs whose chosen lr it changes, each {start, FAMILY..., lr (the
    sweep's), lr_halving}}."""
    grouped = {}
    for e in entries:
        curve = (e[f"{HELDOUT_KEY}_curve"], e.get("diverged_epoch"))
        grouped.setdefault((e["start"], family_of(e)), {})[e["lr"]] = curve
    epochs = 0
    replays = [{"rungs": list(rungs), "epochs_halving": 0, "changed": []} for rungs in rules]
    for (start, family), curves in grouped.items():
        chosen, trained = halving_choice(curves, ())  # no rung: the full sweep
        epochs += trained
        for replay in replays:
            lr, trained = halving_choice(curves, replay["rungs"])
            replay["epochs_halving"] += trained
            if lr != chosen:
                replay["changed"].append({"start": start, **dict(zip(FAMILY, family)), "lr": chosen,
                                          "lr_halving": lr})
    return {"rule": "successive halving, not applied: at each rung epoch the better half of the live sweep points "
                    "by held-out AUC so far goes on", "pairs": len(grouped), "epochs": epochs, "rules": replays}


def describe_early_stop(check):
    """early_stop_check's record in words, a sentence per rule, for the report and the study page."""
    lines = [f"Early stop, replayed on the finished sweep of {check['pairs']} (start, family) pairs and "
             f"{check['epochs']} epochs ({check['rule']}):"]
    for replay in check["rules"]:
        changed = "; ".join(f"{c['start']} {describe(family_of(c))}: lr {c['lr']:g} -> "
                            + ("none" if c["lr_halving"] is None else f"{c['lr_halving']:g}")
                            for c in replay["changed"])
        share = replay["epochs_halving"] / check["epochs"] if check["epochs"] else 0
        lines.append(f"- rungs at epochs {', '.join(map(str, replay['rungs']))}: {share:.0%} of the epochs, "
                     f"{len(replay['changed'])} chosen lrs changed" + (f" ({changed})" if changed else ""))
    return lines


def grid_edges(sweep):
    """Where the chosen lrs of choose_lrs' records `sweep` sit on their grid: pairs (records with a chosen lr), and
    top / bottom, {start: how many chosen the grid's largest / smallest lr}. A choice at an edge means the best lr
    may lie outside the grid, where this attacker did not look."""
    edges = {"pairs": 0, "top": {}, "bottom": {}}
    for r in sweep:
        if r["lr"] is None:
            continue
        edges["pairs"] += 1
        grid = [p["lr"] for p in r["points"]]
        for edge, lr in (("top", max(grid)), ("bottom", min(grid))):
            if r["lr"] == lr:
                edges[edge][r["start"]] = edges[edge].get(r["start"], 0) + 1
    return edges


def describe_grid_edges(sweep):
    """grid_edges of `sweep` in words, for the report and the study page."""
    edges, grid = grid_edges(sweep), sorted({p["lr"] for r in sweep for p in r["points"]})
    if not grid:
        return []

    def where(edge, lr):
        counts = edges[edge]
        by_start = ", ".join(f"{start} {n}" for start, n in counts.items())
        return f"its {'largest' if edge == 'top' else 'smallest'} lr ({lr:g}) in {sum(counts.values())}" + (
            f" ({by_start})" if counts else "")

    lines = [f"Chosen lrs at the sweep grid's edges, of {edges['pairs']} (start, family) pairs: "
             f"{where('top', grid[-1])}; {where('bottom', grid[0])}."]
    if edges["top"] or edges["bottom"]:
        lines.append("Where a start's chosen lr is at an edge, its best lr may lie beyond the grid: the attack on it "
                     "is as strong as this grid allows, no stronger.")
    return lines


class TunedSuite:
    """The suite's phases, as common.stage3.run_stage3_script runs them, and its summary.json entry."""

    def __init__(self, args, judged, reference="scratch", null="null"):
        self.args, self.judged, self.reference, self.null = args, list(judged), reference, null

    def sweep_cells(self, starts):
        """Phase 1: every (start, sweep cell) at the one seed --seed, the start varying fastest."""
        one_seed = copy.copy(self.args)
        one_seed.seeds = [self.args.seed]
        return [Cell(start, settings) for settings in SWEEP.cells(one_seed) for start in starts]

    def choose(self, done, starts):
        """choose_lrs of phase 1's entries in `done` ({cell key: entry}, every sweep cell finished)."""
        return choose_lrs([done[cell.key] for cell in self.sweep_cells(starts)])

    def seed_cells(self, sweep):
        """Phase 2: each sweep record's chosen lr at every seed of --seeds, as fine-tuning cells."""
        return [Cell(r["start"], FINE_TUNING.make(self.args.epochs, lr=r["lr"], seed=seed,
                                                  **{k: r[k] for k in FAMILY}))
                for r in sweep if r["lr"] is not None for seed in self.args.seeds]

    def summary(self, results):
        return tuned_summary(results, self.judged, self.reference, self.null)


# ---- the verdict ------------------------------------------------------------------------------------------------

def _against(runs, model, other, level):
    """({family: {seed: log ratio}}, verdicts, summary) of `model` against `other` over the families of `runs`."""
    ratios = {family: seed_log_ratios(seeds, model, other, METRIC, sorted(seeds)) for family, seeds in runs.items()}
    verdicts, summary = compare_families({f: list(v.values()) for f, v in ratios.items()}, level)
    return ratios, verdicts, summary


def _judge(label, runs, lrs, reference, null, level):
    ratios, verdicts, summary = _against(runs, label, reference, level)
    null_ran = label != null and any(null in by_start for seeds in runs.values() for by_start in seeds.values())
    nulls, null_verdicts, null_summary = _against(runs, label, null, level) if null_ran else ({}, {}, None)
    rows = []
    for family, seeds in runs.items():
        paired = [s for s, by_start in seeds.items() if label in by_start and reference in by_start]
        rows.append({**dict(zip(FAMILY, family)), "lr": lrs.get((label, family)),
                     "lr_reference": lrs.get((reference, family)), "lr_null": lrs.get((null, family)),
                     "vs_reference": {"seeds": sorted(ratios[family]), **verdicts[family]}
                     if family in verdicts else None,
                     "vs_null": {"seeds": sorted(nulls[family]), **null_verdicts[family]}
                     if family in null_verdicts else None,
                     "diverged_seeds": diverged_seeds(seeds, dict.fromkeys((label, reference, null))),
                     "seeds_excluded": len(paired) - len(ratios[family])})
    named = named_families(verdicts, summary, FAMILY)
    return {"headline": headline(verdicts, summary, f"tuned {reference}", describe), "vs_reference": named,
            "worst_family": named["worst_family"],
            "headline_vs_null": headline(null_verdicts, null_summary, f"tuned {null}", describe) if null_ran else None,
            "vs_null": named_families(null_verdicts, null_summary, FAMILY) if null_ran else None,
            "seeds_excluded": sum(r["seeds_excluded"] for r in rows), "per_family": rows}


def tuned_summary(results, judged, reference="scratch", null="null", level=LEVEL):
    """summary.json's `tuned`: the sweep, each start's chosen lrs and each judged model's verdict.

    families: FAMILY, the fields naming a family. holdout_share, selection (select_lr's rule in words), reference,
    null, level. sweep: choose_lrs' records, one per (start, family): its FAMILY values, `lr` (chosen; None where
    every point diverged) and `points` (per lr: heldout_auc, None where diverged; diverged). models: per judged
    label (each protected model and the null start):
      headline: 'no family learns faster than tuned scratch (Holm-corrected over N families, ...)', or the
        families that do with their ratios, simultaneous intervals and Holm p (common.stats.headline).
      vs_reference: common.stats.compare_families' summary of the per-seed log ratios auc(model at its lr) /
        auc(scratch at scratch's lr), same seed (families, families_tested, share_below_1, ratio_geomean,
        faster_holm, faster_bh, slower_simultaneous, worst_family, alpha, level), each named family given by its
        FAMILY values, ratio, ci, ci_simultaneous, p_faster, p_faster_holm, p_faster_bh.
      worst_family: vs_reference's (the largest ratio). headline_vs_null, vs_null: the same against the null start
        at its own lr (None where null did not run, or is the model).
      seeds_excluded: the seeds left out of the ratios for a divergence, over the families.
      per_family: per family, its FAMILY values, lr (the model's), lr_reference, lr_null, vs_reference and vs_null
        (common.stats.paired_log_ratio's fields, Holm- and BH-adjusted p and `faster`, and the seeds used; None
        where no seed is left), diverged_seeds ({start: seeds}) and seeds_excluded.
    early_stop: early_stop_check of the sweep (what successive halving would have saved and changed; None
    without a sweep).
    The phase-2 results are those at each start's chosen lr; results of other lrs (none, in a suite run) are
    ignored."""
    swept = [r for r in results if r.get("sweep") is not None]
    sweep = choose_lrs(swept)
    lrs = {(r["start"], family_of(r)): r["lr"] for r in sweep}
    runs = {}
    for r in results:
        if r.get("sweep") is None and not r.get("defence") and lrs.get((r["start"], family_of(r))) == r["lr"]:
            runs.setdefault(family_of(r), {}).setdefault(r["seed"], {})[r["start"]] = r
    return {"families": list(FAMILY), "holdout_share": HOLDOUT_SHARE, "selection": SELECTION, "reference": reference,
            "null": null, "level": level, "sweep": sweep, "early_stop": early_stop_check(swept) if swept else None,
            "models": {label: _judge(label, runs, lrs, reference, null, level) for label in judged}}
