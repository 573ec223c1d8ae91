"""report.md of a stage-3 run: the verdict tables and the final figures, readable without opening the CSVs.

Its columns come from the axes the procedures declare (common.procedures): a family is described by the
verdicts' attack_family(), a defence row by their defence_family(), a per-metric row by every axis."""
from common.procedures import ROLES, axes
from common.tuned import describe_early_stop, describe_grid_edges
from common.verdicts import DEFENCE_LEGEND, LEGEND, ROBUSTNESS_LEGEND, attack_family, defence_family


def _fmt(value, none="n/a"):
    if value is None:
        return none
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.2f}"
    if isinstance(value, list):
        return ", ".join(_fmt(v, none) for v in value)
    return str(value)


def _value(value):
    """An axis value as the tables show it: floats as %g, a missing one as -."""
    if value is None:
        return "-"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _pm(row, key):
    return f"{_fmt(row.get(key + '_mean'))} +- {_fmt(row.get(key + '_std'))}"


def _described(cell):
    """An attack family in words: its axis values, the numeric ones after their column's name."""
    by_name = {a.name: a for a in axes("attack")}
    return " ".join(f"{by_name[k].title} {_value(cell[k])}" if isinstance(cell[k], (int, float)) else _value(cell[k])
                    for k in attack_family())


def _header(titles):
    return ["| " + " | ".join(titles) + " |", "| " + " | ".join("---" for _ in titles) + " |"]


def _robustness_lines(robustness):
    """report.md's robustness section: one row per protected model, then the head start of every cell."""
    lines = ["## Robustness per protected model", "", ROBUSTNESS_LEGEND, ""] + _header(
        ["protected", "attack families", "share auc ratio < 1", "per seed: mean +- std", "95% CI over seeds",
         "families unable to show protection (scratch did not learn)", "share < 1 where shown",
         "geo-mean auc ratio (where shown)", "worst (auc ratio)"])
    for label, r in robustness.items():
        w = r["worst_cell"]
        ci = r["share_below_1_ci95"]
        lines.append(f"| {label} | {r['cells']} | {_fmt(r['share_below_1'])} | "
                     f"{_fmt(r['share_below_1_per_seed_mean'])} +- {_fmt(r['share_below_1_per_seed_std'])} | "
                     f"{'n/a' if ci is None else f'{ci[0]:.2f} - {ci[1]:.2f}'} ({r['ci_note']}) | "
                     f"{r['cells_unable_to_show_protection']} ({r['cells_reference_did_not_learn']}) | "
                     f"{_fmt(r['share_below_1_where_shown'])} | {_fmt(r['auc_ratio_geomean'])} "
                     f"({_fmt(r['auc_ratio_geomean_where_shown'])}) | {_described(w)} ({_fmt(w['auc_ratio_mean'])}) |")
    lines += ["", "Per attack family: scratch's final accuracy (mean over seeds), the head start of normal over "
              "scratch (auc(normal) / auc(scratch), mean over seeds) and each protected model's auc ratio vs "
              "scratch:", ""]
    labels, names = list(robustness), attack_family()
    titles = {a.name: a.title for a in axes("attack")}
    lines += _header([titles[k] for k in names] + ["scratch final", "head start", "shows protection"] + labels)
    rows = {}
    for label, r in robustness.items():
        for c in r["per_cell"]:
            rows.setdefault(tuple(c[k] for k in names), {"final": c["reference_final"], "head": c["head_start"],
                                                         "shows": c["shows_protection"]})[label] = c["auc_ratio_mean"]
    for values, row in rows.items():
        lines.append("| " + " | ".join(_value(v) for v in values) + f" | {_fmt(row['final'])} | "
                     f"{_fmt(row['head'])} | {_fmt(row['shows'], 'n/a').lower()} | "
                     + " | ".join(_fmt(row.get(l)) for l in labels) + " |")
    return lines + [""]


def _pooled_lines(pooled):
    """report.md's section on the configurations run several times (labels NAME#K), runs pooled."""
    lines = ["## Robustness per configuration, runs pooled", "",
             "Protected models labelled NAME#K are runs of one configuration NAME (stage-2 seeds, say); mean +- "
             "std over the runs.", ""] + _header(
        ["configuration", "runs", "share auc ratio < 1", "share < 1 where shown", "geo-mean auc ratio",
         "geo-mean where shown", "worst (auc ratio)"])
    for name, p in pooled.items():
        w = p["worst_cell"]
        lines.append(f"| {name} | {', '.join(p['runs'])} | {_pm(p, 'share_below_1')} | "
                     f"{_pm(p, 'share_below_1_where_shown')} | {_pm(p, 'auc_ratio_geomean')} | "
                     f"{_pm(p, 'auc_ratio_geomean_where_shown')} | {_described(w)} ({_pm(w, 'auc_ratio')}, "
                     f"below 1 in {w['runs_below_1']} of {w['runs']} runs) |")
    return lines + [""]


def _defence_lines(rows):
    """report.md's defence section: a row per defence family (defence_family()), protected vs reference."""
    p, r = rows[0]["protected"], rows[0]["reference"]
    pruned = any(f"pruned_channels_{p}" in row for row in rows)
    reactivated = any(f"reactivated_asr_{p}_mean" in row for row in rows)
    titles = {a.name: a.title for a in axes("defence")}
    names = defence_family()
    lines = ["## Defences", "", DEFENCE_LEGEND, ""] + _header(
        [titles[k] for k in names] + ["seeds", f"clean acc {p}", f"clean acc {r}", f"ASR {p}", f"ASR {r}",
                                      "ASR auc ratio"] + ([f"pruned channels {p}", f"pruned channels {r}"] * pruned)
        + ([f"re-activated ASR {p}", f"re-activated ASR {r}"] * reactivated))
    for row in rows:
        lines.append("| " + " | ".join(_value(row[k]) for k in names) + f" | {row['seeds']} | "
                     f"{_pm(row, f'final_test_acc_{p}')} | {_pm(row, f'final_test_acc_{r}')} | "
                     f"{_pm(row, f'final_asr_{p}')} | {_pm(row, f'final_asr_{r}')} | {_pm(row, 'asr_auc_ratio')} |"
                     + (f" {_fmt(row.get(f'pruned_channels_{p}'))} | {_fmt(row.get(f'pruned_channels_{r}'))} |"
                        if pruned else "")
                     + (f" {_pm(row, f'reactivated_asr_{p}')} | {_pm(row, f'reactivated_asr_{r}')} |"
                        if reactivated else ""))
    return lines + [""]


TUNED_LEGEND = (
    "The tuned attacker (common.tuned): a family is strategy x optimizer x bs x train fraction x schedule; each start "
    "model has its own lr, the one an attacker picks from a one-seed sweep scored on a held-out share of its own "
    "training data (selection: below). Per seed, log(auc(model at its lr) / auc(scratch at its lr)), same seed; ratio: "
    "their geometric mean; 95% CI: paired t; simultaneous: Bonferroni over the families tested, so all hold together; "
    "Holm p: one-sided test of 'learns faster than tuned scratch', Holm-adjusted over the families (faster: below "
    "0.025, as for 95% intervals). A seed where either model diverged is left out (excluded). summary.json's `tuned` "
    "holds every number (common.tuned.tuned_summary says what each key is).")


def _ci(ci):
    return "n/a" if ci is None else f"[{_fmt(ci)}]"


def _tuned_headlines(tuned):
    """The report's opening: one line per judged model, its tuned verdict (summary.json tuned.models.*.headline)."""
    return [f"- **{label}**: {m['headline']}" for label, m in tuned["models"].items()] + [""]


def _tuned_lines(tuned):
    """report.md's tuned section, from summary.json's `tuned` (keys: common.tuned.tuned_summary): the rule that
    chose the lrs, then per judged model a row per family: lrs (model / scratch), ratio, its 95% and simultaneous
    intervals, Holm p, seeds used (excluded), and the same ratio against tuned null where it ran."""
    titles = {a.name: a.title for a in axes("attack")}
    names, reference = tuned["families"], tuned["reference"]
    lines = ["## Tuned attacker", "", TUNED_LEGEND, "", f"lr selection: {tuned['selection']}.", ""]
    lines += describe_early_stop(tuned["early_stop"]) + [""] if tuned.get("early_stop") else []
    lines += describe_grid_edges(tuned["sweep"]) + [""] if tuned["sweep"] else []
    for label, m in tuned["models"].items():
        lines += [f"### {label}", "", m["headline"], ""]
        if m["headline_vs_null"]:
            lines += [f"Against the null start: {m['headline_vs_null']}", ""]
        lines += _header([titles[k] for k in names] + [f"lr {label} / {reference}", "ratio", "95% CI",
                                                       "simultaneous CI", "Holm p", "seeds (excluded)",
                                                       "vs null: ratio 95% CI"])
        for row in m["per_family"]:
            v, n = row["vs_reference"] or {}, row["vs_null"]
            lines.append("| " + " | ".join(_value(row[k]) for k in names) + f" | {_value(row['lr'])} / "
                         f"{_value(row['lr_reference'])} | {_fmt(v.get('ratio'))} | {_ci(v.get('ci'))} | "
                         f"{_ci(v.get('ci_simultaneous'))} | {_fmt(v.get('p_faster_holm'))} | "
                         f"{len(v.get('seeds', []))} ({row['seeds_excluded']}) | "
                         + ("-" if n is None else f"{_fmt(n['ratio'])} {_ci(n['ci'])}") + " |")
        lines.append("")
    return lines


def _verdict_lines(verdicts):
    columns = list(verdicts[0])
    lines = ["## Verdict per attack", "", LEGEND, ""] + _header([c.replace("_", " ") for c in columns])
    lines += ["| " + " | ".join(_fmt(v.get(c), "never" if "epoch" in c else "n/a") for c in columns) + " |"
              for v in verdicts]
    return lines + [""]


def _metric_lines(results, key):
    """Epoch 0 and the final value of `key` per cell family and start, mean over seeds: a column per axis some
    result has a value of (no defence column without defence cells), the seeds pooled."""
    results = [r for r in results if r[f"{key}_curve"][0] is not None]  # a sweep cell has no test_acc, say
    naming = [name for _, name in ROLES.values() if name]  # the procedure's name first (a defence's, say)
    shown = sorted((a for a in axes() if a.name != "seed" and any(r.get(a.name) is not None for r in results)),
                   key=lambda a: a.name not in naming)
    lines = [f"## {key}: epoch 0 -> final, mean over seeds", ""] + _header(
        [a.title for a in shown] + ["start", "epoch 0", "final", "seeds", "diverged seeds"])
    groups = {}
    for r in results:
        groups.setdefault((*(r.get(a.name) for a in shown), r["start"]), []).append(r)
    for values, rows in groups.items():
        curves = [r[f"{key}_curve"] for r in rows]
        first = sum(c[0] for c in curves) / len(curves)
        last = sum(c[-1] for c in curves) / len(curves)
        diverged = sum(r.get("diverged_epoch") is not None for r in rows)
        lines.append("| " + " | ".join(_value(v) for v in values) +
                     f" | {first:.2f} | {last:.2f} | {len(curves)} | {diverged} |")
    return lines + [""]


def write_report(run, title, results, verdicts, plots, metric_keys=("test_acc",), notes=(), robustness=None,
                 robustness_pooled=None, defence_verdicts=None, tuned=None):
    """report.md in the run folder; returns its path. With `tuned` (summary.json's), it opens with each judged
    model's tuned verdict in one line."""
    lines = [f"# {title}", ""]
    lines += _tuned_headlines(tuned) if tuned else []
    lines += list(notes) + ([""] if notes else [])
    if tuned:
        lines += _tuned_lines(tuned)
    if robustness:
        lines += _robustness_lines(robustness)
    if robustness_pooled:
        lines += _pooled_lines(robustness_pooled)
    if defence_verdicts:
        lines += _defence_lines(defence_verdicts)
    if verdicts:
        lines += _verdict_lines(verdicts)
    for key in metric_keys:
        lines += _metric_lines(results, key)
    if plots:
        lines += ["## Figures", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots] + [""]
    (run.path / "report.md").write_text("\n".join(lines))
    return run.path / "report.md"
