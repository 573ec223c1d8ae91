"""Verdicts of stage 3, for both projects: how a protected model's curves compare with a reference's.

SOPHON asks whether the sophon model learns the restricted task slower than a model trained from scratch
(`scratch_verdicts`); the backdoor asks whether the irreversible backdoor outlives the plain one under
clean fine-tuning (`persistence_verdicts`), and how each backdoor defence leaves both backdoors
(`defence_verdicts`). Curves are per-epoch values, epoch 0 = before fine-tuning (or the defence). Defence
cells (results with a `defence`) are grouped by `defence_verdicts` alone, never with the attacks.
"""
import math

from common import procedures
from common.stats import (LEVEL, MIN_ELIGIBILITY_SEEDS, compare_families, head_start_shown, headline, log_ratio,
                          paired_log_ratio, split_seeds)

LEGEND = (
    "epochs to scratch final: first epoch (0 = before fine-tuning) at which the protected curve reaches the "
    "scratch model's final accuracy, fastest seed; never = not within the epochs run. auc ratio: area under "
    "the protected curve over the reference's, mean and std over seeds (SOPHON: < 1 = learns slower than "
    "scratch; backdoor ASR: > 1 = the backdoor outlives the plain one). first epoch asr below 50: per seed "
    "(never = it never drops).")

ROBUSTNESS_LEGEND = (
    "An attack family is strategy x optimizer x lr x bs x train fraction x schedule, seeds pooled. share auc "
    "ratio < 1: share of the families where the protected model learns slower than scratch (auc ratio mean "
    "over seeds); per seed: the same share computed seed by seed, mean +- std and its t-interval over seeds. "
    "head start: auc(normal) / auc(scratch); a family whose normal model has no head start (<= 1) cannot "
    "show protection, since from scratch the task is learned as fast as from a pretrained model; nor can a "
    "family where scratch did not learn (final accuracy below half the best family's with the same train "
    "fraction): 'slower than scratch' then compares curves near chance. worst: the family with the largest "
    "auc ratio. null (where run): a second model from scratch, another init with scratch's data order and head; "
    "its ratios are what a model with no protection scores, the noise floor of the others'. These are the old "
    "fields, kept as they were: a mean of per-seed ratios leans above 1 (Jensen), 'where shown' is decided on the "
    "scratch runs it divides by, a diverged seed counts, and the worst of many noisy families is not corrected for. "
    "The paired fields (vs_reference, vs_null, eligibility; common.stats) fix these: per seed the log of "
    "auc(model) / auc(scratch), same seed, same data order and head; a family's ratio is their geometric mean, "
    "with a paired t 95% interval; a seed where either model diverged is left out and reported; the one-sided "
    "tests of 'learns faster than scratch' (alpha 0.025, as for 95% intervals) are Holm- and "
    "Benjamini-Hochberg-corrected over the families, and the simultaneous interval is Bonferroni's (upper end "
    "<= 1: slower, family-wise). Eligible: on the first half of a family's seeds (sorted), normal's head start "
    "has a 95% lower end above 1 and scratch learned; an eligible family is judged on the other half alone.")


def epochs_to_reach(curve, target):
    """First epoch whose value reaches `target`; None if never."""
    for epoch, value in enumerate(curve):
        if value >= target - 1e-9:
            return epoch
    return None


def first_epoch_below(curve, level=50.0):
    """First epoch whose value is below `level`; None if it never drops."""
    for epoch, value in enumerate(curve):
        if value < level:
            return epoch
    return None


def auc(curve):
    """Trapezoidal area under a per-epoch curve, normalised by the number of epochs."""
    if len(curve) < 2:
        return float(curve[0]) if curve else 0.0
    return sum((a + b) / 2 for a, b in zip(curve[:-1], curve[1:])) / (len(curve) - 1)


def mean_std(values):
    """Mean and sample std of the finite values (None, None when there are none)."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return mean, std


DEFENCE_LEGEND = (
    "After the last epoch of each defence, mean +- std over seeds: clean accuracy and ASR of the protected "
    "(irreversible) and the reference (plain backdoored) model; ASR auc ratio: area under the protected ASR curve "
    "over the reference's (> 1: the protected backdoor survives the defence better). pruned channels (fine_pruning, "
    "clp, anp): per seed. re-activated ASR: after the defence, a copy fine-tuned on the defender's data with a few "
    "triggered samples (--reactivate_samples, --reactivate_epochs; Min et al. NeurIPS'24).")


def attack_family():
    """The fields of an attack family, seeds pooled: the attack axes the registered procedures declare."""
    return procedures.family("attack")


def defence_family():
    """The fields of a defence row, seeds pooled: the defences' naming axis, then their other axes."""
    return procedures.family("defence")


def _value(r, name):
    """A result's value of an axis; the axis' default where the result was written before the axis existed."""
    return r.get(name, next((a.blank for a in procedures.axes() if a.name == name), None))
HEAD_START_MIN = 1.0  # a cell shows protection only where normal's AUC over scratch's exceeds this
# ... and only where scratch learned: its final accuracy at least this share of the best cell's (same data share)
REFERENCE_LEARNED_MIN = 0.5
RUN_SEPARATOR = "#"  # protected models labelled NAME#K are runs (stage-2 seeds, say) of one configuration NAME


def _family(r):
    return tuple(_value(r, k) for k in attack_family())


def _by_attack(results, metric):
    """{(strategy, optimizer, lr, batch_size, train_fraction, schedule): {seed: {start: curve}}} of the
    fine-tuning attacks (defence cells left out)"""
    grouped = {}
    for r in results:
        if r.get("defence"):
            continue
        grouped.setdefault(_family(r), {}).setdefault(r["seed"], {})[r["start"]] = r[metric]
    return grouped


def t_interval(values, level=0.95):
    """(low, high, t) of the t-distribution interval for the mean of `values`; None with fewer than two."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if len(values) < 2:
        return None
    from scipy.stats import t as student_t
    mean, std = mean_std(values)
    t = float(student_t.ppf(0.5 + level / 2, len(values) - 1))
    half = t * std / len(values) ** 0.5
    return mean - half, mean + half, t


def scratch_verdicts(results, protected="sophon", reference="scratch", metric="test_acc_curve"):
    """Per attack: how much slower the protected model learns than a model trained from scratch.

    epochs_to_scratch_final: over seeds, the fastest epoch at which the protected curve reaches the
    reference's final accuracy (the attacker's best seed; None = no seed ever does). auc_ratio: area
    under the protected curve over the reference's (< 1: learns slower than scratch), mean +- std over seeds.
    """
    verdicts = []
    for family, seeds in _by_attack(results, metric).items():
        reach, ratios = [], []
        for curves in seeds.values():
            if protected not in curves or reference not in curves:
                continue
            mine, ref = curves[protected], curves[reference]
            reach.append(epochs_to_reach(mine, ref[-1]))
            ratios.append(auc(mine) / auc(ref) if auc(ref) > 0 else None)
        if not reach:
            continue
        reached = [e for e in reach if e is not None]
        mean, std = mean_std(ratios)
        verdicts.append({**dict(zip(attack_family(), family)), "protected": protected, "reference": reference,
                         "epochs_to_scratch_final": min(reached) if reached else None,
                         "epochs_to_scratch_final_per_seed": reach,
                         "auc_ratio_mean": mean, "auc_ratio_std": std, "seeds": len(reach)})
    return verdicts


def persistence_verdicts(results, protected="irreversible", reference="backdoored"):
    """Per attack: does the protected backdoor outlive the reference under clean fine-tuning?

    final_asr_*: ASR after the last epoch, mean over seeds; auc_ratio: area under the protected ASR curve
    over the reference's (> 1: the protected backdoor lives longer); first_epoch_asr_below_50: per seed,
    the first epoch whose ASR is below 50% (None = it never drops).
    """
    verdicts = []
    for family, seeds in _by_attack(results, "asr_curve").items():
        pairs = [c for c in seeds.values() if protected in c and reference in c]
        if not pairs:
            continue
        ratios = [auc(c[protected]) / auc(c[reference]) if auc(c[reference]) > 0 else None for c in pairs]
        mean, std = mean_std(ratios)
        verdicts.append({
            **dict(zip(attack_family(), family)), "protected": protected, "reference": reference, "seeds": len(pairs),
            f"final_asr_{protected}": mean_std([c[protected][-1] for c in pairs])[0],
            f"final_asr_{reference}": mean_std([c[reference][-1] for c in pairs])[0],
            "auc_ratio_mean": mean, "auc_ratio_std": std,
            f"first_epoch_asr_below_50_{protected}": [first_epoch_below(c[protected]) for c in pairs],
            f"first_epoch_asr_below_50_{reference}": [first_epoch_below(c[reference]) for c in pairs]})
    return verdicts



def defence_verdicts(results, protected="irreversible", reference="backdoored"):
    """A row per defence (and lr, batch size, train fraction, schedule), for each of the two models that ran it:
    before the defence (epoch 0) and after its last epoch, mean and std over seeds of the clean accuracy
    (before_test_acc_<start>_mean/_std, final_test_acc_<start>_mean/_std) and ASR (before_asr_..., final_asr_...);
    pruned_channels_<start>: per seed, where the defence pruned; reactivated_asr_<start>_mean/_std: the ASR after
    the backdoor re-activation, where every seed measured it. asr_auc_ratio_mean/_std: area under the protected
    ASR curve over the reference's, per seed where both ran (> 1: the protected backdoor survives the defence
    better; None where no seed has both). `seeds`: the most seeds either model ran. A run may defend one model
    alone (--start), so that a reference defended elsewhere is not defended again."""
    grouped = {}
    for r in results:
        if r.get("defence"):
            key = tuple(_value(r, k) for k in defence_family())
            grouped.setdefault(key, {}).setdefault(r["seed"], {})[r["start"]] = r
    rows = []
    for key, seeds in grouped.items():
        ran = {start: [c[start] for c in seeds.values() if start in c] for start in (protected, reference)}
        if not any(ran.values()):
            continue
        row = {**dict(zip(defence_family(), key)), "protected": protected, "reference": reference,
               "seeds": max(len(cells) for cells in ran.values())}
        for start, cells in ran.items():
            if not cells:
                continue
            for metric in ("test_acc", "asr"):
                for when, at in (("before", 0), ("final", -1)):
                    mean, std = mean_std([c[f"{metric}_curve"][at] for c in cells])
                    row[f"{when}_{metric}_{start}_mean"], row[f"{when}_{metric}_{start}_std"] = mean, std
            pruned = [(c.get("defence_info") or {}).get("pruned_channels") for c in cells]
            if any(n is not None for n in pruned):
                row[f"pruned_channels_{start}"] = pruned
            reactivated = [(c.get("defence_info") or {}).get("reactivated_asr") for c in cells]
            if all(v is not None for v in reactivated):
                row[f"reactivated_asr_{start}_mean"], row[f"reactivated_asr_{start}_std"] = mean_std(reactivated)
        pairs = [c for c in seeds.values() if protected in c and reference in c]
        ratios = [auc(c[protected]["asr_curve"]) / auc(c[reference]["asr_curve"])
                  if auc(c[reference]["asr_curve"]) > 0 else None for c in pairs]
        row["asr_auc_ratio_mean"], row["asr_auc_ratio_std"] = mean_std(ratios)
        rows.append(row)
    return rows


def robustness_summary(results, protected="sophon", reference="scratch", baseline="normal", null="null",
                       metric="test_acc_curve", level=0.95):
    """How robust one protected model is over the whole grid, a cell being one attack family (strategy x
    optimizer x lr x batch size x train fraction x schedule, seeds pooled).

    share_below_1: share of cells whose auc_ratio_mean (protected over reference) is below 1.
    share_below_1_per_seed_mean/_std/_ci95: the same share computed per seed, its mean, sample std and the
    `level` t-interval over seeds (clipped to [0, 1]; None with one seed; wide with few seeds).
    worst_cell: the cell with the largest auc_ratio_mean (the attacker's best; worst_cell_where_shown: among
    the cells that can show protection). per_cell: each cell's auc ratio and the baseline's head start,
    auc(baseline) / auc(reference) mean over seeds; a cell where that is not above HEAD_START_MIN cannot
    show protection (`shows_protection: false`): the task is learned from scratch as fast as from the
    pretrained model. None where the baseline did not run. `null_ratio`: where the grid ran a `null` start (a
    second model from scratch), its auc over the reference's, mean over seeds, what the protected model's
    ratio would be without protection (None otherwise). It does not enter `shows_protection`: with three
    seeds it is as noisy as the head start it would correct. Nor can a cell where
    the reference did not learn (`reference_learned: false`): its final value, mean over seeds
    (`reference_final`), is below REFERENCE_LEARNED_MIN times the best cell's with the same train fraction,
    as where an lr is too small to move in the epochs run or too large to converge; a ratio there compares
    two curves near chance.
    auc_ratio_geomean (_where_shown): the geometric mean of the cells' auc_ratio_mean, a ratio's natural
    average (x2 and x0.5 cancel). The share counts cells across 1, so it moves in steps of one cell and not
    at all for a cell going from 1.5 to 1.1; the geometric mean moves with every cell, which makes it the
    steadier number for comparing two protections on one grid.

    The fields above are the old ones, kept unchanged: auc_ratio_mean is a mean of per-seed ratios, which leans
    above 1 for a model drawn like the reference (Jensen); shows_protection is decided on the reference runs it
    divides by, so "where shown" favours families where the reference was unlucky; a diverged seed counts (its
    last evaluation stands for the remaining epochs); and nothing corrects for the number of families.

    The paired fields (common.stats), where a seed whose protected model or reference diverged (`diverged_epoch` not
    None) is left out of every ratio:
    per cell: vs_reference: seed by seed, log(auc(protected) / auc(reference)) with the same seed; `seeds` used,
    ratio = exp(mean log ratio) (the geometric mean over seeds), ci: the paired t `level` interval, as ratios,
    ci_simultaneous: Bonferroni's, the two-sided 1 - (1 - level) / N interval over the N families tested, p_faster:
    one-sided paired t test of H1 "learns faster" (mean log ratio > 0), p_faster_holm, p_faster_bh, faster
    (Holm-adjusted p below alpha = (1 - level) / 2, as for the intervals); None where no seed is left. vs_null: the
    same against the null start, where it ran (None otherwise). diverged_seeds: {start: seeds that diverged};
    seeds_excluded: the seeds where both ran but left out of vs_reference. eligibility: decided on seeds the verdict
    does not use (common.stats.split_seeds: the family's seeds where protected and reference ran, sorted, the first
    half rounded down; its verdict_seeds are the rest). eligible is False where the reference did not learn on them
    (reference_final, its mean final value over non-diverged eligibility seeds, below REFERENCE_LEARNED_MIN times
    the best family's with the same train fraction), else head_start_shown: the lower end of the `level` t interval
    of log(auc(baseline) / auc(reference)) over the eligibility seeds is above 0 (head_start, head_start_ci: as
    ratios); None (undetermined) with fewer than MIN_ELIGIBILITY_SEEDS usable seeds or no baseline. ratio: the
    geometric mean over the verdict seeds alone.
    summary: headline, one line: "no family learns faster than <reference> (Holm-corrected over N families...)" or
    the families that do with their simultaneous intervals. vs_reference: families, families_tested (two seeds or
    more), share_below_1 (of the families' ratios), ratio_geomean (exp of the mean over families of their mean log
    ratio), faster_holm, faster_bh, slower_simultaneous (families, by their axes with ratio and intervals),
    worst_family (the largest ratio), alpha, level. headline_vs_null, vs_null: the same against the null start (None
    where it did not run, or where it is the protected model). eligibility: families_eligible, families_ineligible,
    families_undetermined, share_below_1 and ratio_geomean of the eligible families' ratios on their verdict seeds,
    a note where some are undetermined. diverged: seeds_excluded, families (with a diverged seed), by_start
    (diverged seeds per start).
    """
    cells, per_seed = [], {}
    for family, seeds in _by_attack(results, metric).items():
        ratios, heads, nulls = {}, [], []
        for seed, curves in seeds.items():
            ref = curves.get(reference)
            if ref is None or auc(ref) <= 0:
                continue
            if protected in curves:
                ratios[seed] = auc(curves[protected]) / auc(ref)
            if baseline in curves:
                heads.append(auc(curves[baseline]) / auc(ref))
            if null in curves:
                nulls.append(auc(curves[null]) / auc(ref))
        if not ratios:
            continue
        mean, std = mean_std(list(ratios.values()))
        head = mean_std(heads)[0]
        cells.append({**dict(zip(attack_family(), family)), "auc_ratio_mean": mean, "auc_ratio_std": std,
                      "seeds": len(ratios), "head_start": head, "null_ratio": mean_std(nulls)[0],
                      "reference_final": mean_std([seeds[s][reference][-1] for s in ratios])[0]})
        for seed, ratio in ratios.items():
            per_seed.setdefault(seed, []).append(ratio < 1)
    if not cells:
        return None
    best = {}
    for c in cells:
        best[c["train_fraction"]] = max(best.get(c["train_fraction"], c["reference_final"]), c["reference_final"])
    for c in cells:
        c["reference_learned"] = c["reference_final"] >= REFERENCE_LEARNED_MIN * best[c["train_fraction"]]
        head_start = None if c["head_start"] is None else c["head_start"] > HEAD_START_MIN
        c["shows_protection"] = head_start if c["reference_learned"] else False
    shares = [sum(flags) / len(flags) for flags in per_seed.values()]
    seed_mean, seed_std = mean_std(shares)
    interval = t_interval(shares, level)
    shown = [c for c in cells if c["shows_protection"]]
    if interval is None:
        note = "one seed: no interval over seeds"
    else:
        note = (f"{level:.0%} t-interval over {len(shares)} seeds (t = {interval[2]:.2f})"
                + ("; wide with so few seeds" if len(shares) < 5 else ""))
    summary = {
        "protected": protected, "reference": reference, "baseline": baseline, "cells": len(cells),
        "seeds": len(shares),
        "share_below_1": sum(c["auc_ratio_mean"] < 1 for c in cells) / len(cells),
        "share_below_1_per_seed_mean": seed_mean, "share_below_1_per_seed_std": seed_std,
        "share_below_1_ci95": None if interval is None else [max(0.0, interval[0]), min(1.0, interval[1])],
        "ci_note": note,
        "cells_unable_to_show_protection": sum(c["shows_protection"] is False for c in cells),
        "cells_reference_did_not_learn": sum(not c["reference_learned"] for c in cells),
        "share_below_1_where_shown": sum(c["auc_ratio_mean"] < 1 for c in shown) / len(shown) if shown else None,
        "auc_ratio_geomean": geometric_mean([c["auc_ratio_mean"] for c in cells]),
        "auc_ratio_geomean_where_shown": geometric_mean([c["auc_ratio_mean"] for c in shown]) if shown else None,
        "worst_cell": max(cells, key=lambda c: c["auc_ratio_mean"]),
        "worst_cell_where_shown": max(shown, key=lambda c: c["auc_ratio_mean"]) if shown else None,
        "per_cell": cells}
    summary.update(_paired_fields(results, cells, protected, reference, baseline, null, metric, level))
    return summary


def _records_by_family(results):
    """{family: {seed: {start: result}}} of the fine-tuning attacks (defence cells left out)."""
    grouped = {}
    for r in results:
        if not r.get("defence"):
            grouped.setdefault(_family(r), {}).setdefault(r["seed"], {})[r["start"]] = r
    return grouped


def diverged(result):
    return result.get("diverged_epoch") is not None


def diverged_seeds(runs, starts):
    """{start: the seeds where it diverged} of `runs` ({seed: {start: result}}), the starts with any."""
    found = {start: [s for s in sorted(runs) if start in runs[s] and diverged(runs[s][start])] for start in starts}
    return {start: seeds for start, seeds in found.items() if seeds}


def seed_log_ratios(runs, model, reference, metric, seeds):
    """{seed: log(auc(model) / auc(reference))} over `seeds` where both ran and neither diverged."""
    out = {}
    for seed in seeds:
        mine, ref = runs[seed].get(model), runs[seed].get(reference)
        if mine is None or ref is None or diverged(mine) or diverged(ref):
            continue
        value = log_ratio(auc(mine[metric]), auc(ref[metric]))
        if value is not None:
            out[seed] = value
    return out


def describe_family(family, names=None):
    """An attack family (its values of the axes `names`, default attack_family()) in words, as a headline names it."""
    titles = {a.name: a.title for a in procedures.axes("attack")}
    return " ".join(str(value) if isinstance(value, str) else f"{titles[name]} {value:g}"
                    for name, value in zip(names or attack_family(), family))


def named_families(verdicts, summary, names=None):
    """common.stats.compare_families' summary with each family it names given by its axes (`names`, default
    attack_family()), ratio and intervals."""
    names = names or attack_family()

    def entry(family):
        v = verdicts[family]
        return {**dict(zip(names, family)), **{k: v[k] for k in (
            "ratio", "ci", "ci_simultaneous", "p_faster", "p_faster_holm", "p_faster_bh")}}
    named = {**summary, "worst_family": entry(summary["worst_family"]) if summary["worst_family"] else None}
    for key in ("faster_holm", "faster_bh", "slower_simultaneous"):
        named[key] = [entry(f) for f in summary[key]]
    return named


def _eligibility(records, ran, ratios, reference, baseline, metric, level):
    """({family: eligibility}, summary over the eligible families), decided on each family's eligibility seeds
    (common.stats.split_seeds) and judged on its verdict seeds; robustness_summary's docstring has the rule."""
    found = {}
    for key, seeds in ran.items():
        runs = records[key]
        held, used = split_seeds(seeds)
        heads = list(seed_log_ratios(runs, baseline, reference, metric, held).values())
        head = paired_log_ratio(heads, level)
        finals = [runs[s][reference][metric][-1] for s in held if not diverged(runs[s][reference])]
        mine = [ratios[key][s] for s in used if s in ratios[key]]
        found[key] = {"seeds": held, "verdict_seeds": used, "head_start": head and head["ratio"],
                      "head_start_ci": head and head["ci"], "head_start_shown": head_start_shown(heads, level),
                      "reference_final": sum(finals) / len(finals) if finals else None,
                      "ratio": math.exp(sum(mine) / len(mine)) if mine else None}
    fraction = attack_family().index("train_fraction")
    best = {}
    for key, e in found.items():
        if e["reference_final"] is not None:
            best[key[fraction]] = max(best.get(key[fraction], e["reference_final"]), e["reference_final"])
    for key, e in found.items():
        learned = None if e["reference_final"] is None else \
            e["reference_final"] >= REFERENCE_LEARNED_MIN * best[key[fraction]]
        e["reference_learned"] = learned
        e["eligible"] = e["head_start_shown"] if learned else learned
    judged = [e["ratio"] for e in found.values() if e["eligible"] and e["ratio"] is not None]
    count = {state: sum(e["eligible"] is state for e in found.values()) for state in (True, False, None)}
    summary = {"families_eligible": count[True], "families_ineligible": count[False],
               "families_undetermined": count[None],
               "share_below_1": sum(r < 1 for r in judged) / len(judged) if judged else None,
               "ratio_geomean": geometric_mean(judged) if judged else None}
    if count[None]:
        summary["note"] = (f"{count[None]} of {len(found)} families undetermined: eligibility needs "
                           f"{MIN_ELIGIBILITY_SEEDS} usable eligibility seeds (the first half of a family's seeds, "
                           f"so {2 * MIN_ELIGIBILITY_SEEDS} seeds or more) and a baseline run; an undetermined "
                           "family is left out of share_below_1 and ratio_geomean here")
    return found, summary


def _paired_fields(results, cells, protected, reference, baseline, null, metric, level):
    """robustness_summary's paired fields (its docstring says what they hold): vs_reference, vs_null, eligibility,
    diverged_seeds and seeds_excluded added to each of `cells`; the summary's returned."""
    records = _records_by_family(results)
    keys = [tuple(c[k] for k in attack_family()) for c in cells]
    ran = {key: sorted(s for s, r in records[key].items() if protected in r and reference in r) for key in keys}
    ratios = {key: seed_log_ratios(records[key], protected, reference, metric, ran[key]) for key in keys}
    nulls = {key: seed_log_ratios(records[key], protected, null, metric, sorted(records[key])) for key in keys}
    verdicts, summary = compare_families({k: list(v.values()) for k, v in ratios.items()}, level)
    null_ran = protected != null and any(nulls.values())
    null_verdicts, null_summary = compare_families({k: list(v.values()) for k, v in nulls.items()}, level) \
        if null_ran else ({}, None)
    eligibility, eligible = _eligibility(records, ran, ratios, reference, baseline, metric, level)
    starts = list(dict.fromkeys((protected, reference, baseline, null)))
    for c, key in zip(cells, keys):
        runs = records[key]
        c["vs_reference"] = {"seeds": sorted(ratios[key]), **verdicts[key]} if key in verdicts else None
        c["vs_null"] = {"seeds": sorted(nulls[key]), **null_verdicts[key]} if key in null_verdicts else None
        c["eligibility"] = eligibility[key]
        c["diverged_seeds"] = diverged_seeds(runs, starts)
        c["seeds_excluded"] = len(ran[key]) - len(ratios[key])
    return {
        "headline": headline(verdicts, summary, reference, describe_family),
        "vs_reference": named_families(verdicts, summary),
        "headline_vs_null": headline(null_verdicts, null_summary, null, describe_family) if null_ran else None,
        "vs_null": named_families(null_verdicts, null_summary) if null_ran else None,
        "eligibility": eligible,
        "diverged": {"seeds_excluded": sum(c["seeds_excluded"] for c in cells),
                     "families": sum(bool(c["diverged_seeds"]) for c in cells),
                     "by_start": {start: sum(len(c["diverged_seeds"].get(start, ())) for c in cells)
                                  for start in starts}}}


def geometric_mean(values):
    """exp(mean log); 0 when a value is 0 (a protected curve at 0 throughout)."""
    if min(values) <= 0:
        return 0.0
    return math.exp(sum(math.log(v) for v in values) / len(values))


def pooled_robustness(robustness):
    """{NAME: summary} of the configurations run several times: the robustness summaries of the protected
    models labelled NAME#K (K: a stage-2 seed, say), pooled by NAME where there are two runs or more, as a
    method is judged over its training runs and not by its luckiest one. share_below_1_mean/_std,
    share_below_1_where_shown_mean/_std and auc_ratio_geomean(_where_shown)_mean/_std: over the runs.
    per_cell: each cell's auc ratio (a run's being its mean over attack seeds), mean and std over the runs,
    and runs_below_1; worst_cell: the largest mean. These are the old fields; the paired ones: per_cell's
    vs_reference and runs_faster_holm (_pooled_cell), the configuration's vs_reference (_pooled_paired)."""
    groups = {}
    for label, r in robustness.items():
        if r is not None and RUN_SEPARATOR in label:
            groups.setdefault(label.split(RUN_SEPARATOR)[0], []).append((label, r))
    pooled = {}
    for name, runs in groups.items():
        if len(runs) < 2:
            continue
        cells = {}
        for _, r in runs:
            for c in r["per_cell"]:
                cells.setdefault(tuple(c[k] for k in attack_family()), []).append(c)
        per_cell = []
        for axes, same in cells.items():
            mean, std = mean_std([c["auc_ratio_mean"] for c in same])
            per_cell.append({**dict(zip(attack_family(), axes)), "auc_ratio_mean": mean, "auc_ratio_std": std,
                             "runs": len(same), "runs_below_1": sum(c["auc_ratio_mean"] < 1 for c in same),
                             "shows_protection": same[0]["shows_protection"], **_pooled_cell(same)})
        over_runs = {}
        for key in ("share_below_1", "share_below_1_where_shown", "auc_ratio_geomean", "auc_ratio_geomean_where_shown"):
            over_runs[f"{key}_mean"], over_runs[f"{key}_std"] = mean_std([r[key] for _, r in runs])
        pooled[name] = {"runs": [label for label, _ in runs], "cells": len(per_cell), **over_runs,
                        "worst_cell": max(per_cell, key=lambda c: c["auc_ratio_mean"]), "per_cell": per_cell,
                        "vs_reference": _pooled_paired(runs, per_cell)}
    return pooled


def _pooled_cell(same):
    """A family's paired fields over the runs: vs_reference, common.stats.paired_log_ratio of the runs' mean log
    ratios (a run, not a seed, is the unit: the runs share the reference's seeds), and runs_faster_holm."""
    judged = [c["vs_reference"] for c in same if c.get("vs_reference")]
    return {"vs_reference": paired_log_ratio([v["mean_log"] for v in judged], LEVEL),
            "runs_faster_holm": sum(v["faster"] for v in judged)}


def _pooled_paired(runs, per_cell):
    """A configuration's paired summary over its runs: headlines (each run's), share_below_1_mean/_std and
    ratio_geomean (the geometric mean of the runs' ratio_geomean), worst_family: the family with the largest
    ratio over the runs."""
    judged = [(label, r) for label, r in runs if r.get("vs_reference") and r["vs_reference"]["families"]]
    if not judged:
        return None
    share_mean, share_std = mean_std([r["vs_reference"]["share_below_1"] for _, r in judged])
    cells = [c for c in per_cell if c["vs_reference"]]
    return {"headlines": {label: r["headline"] for label, r in judged},
            "share_below_1_mean": share_mean, "share_below_1_std": share_std,
            "ratio_geomean": geometric_mean([r["vs_reference"]["ratio_geomean"] for _, r in judged]),
            "worst_family": max(cells, key=lambda c: c["vs_reference"]["ratio"]) if cells else None}
