"""Plots derived from a run's CSVs (Agg backend), so a running or crashed job can be plotted too.

    python -m common.plots RUN_DIR     # regenerate RUN_DIR/plots/*.png
"""
import csv
import json
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from common import procedures  # noqa: E402
from common.verdicts import attack_family, robustness_summary  # noqa: E402

START_STYLE = {"sophon": ("tab:red", "-"), "normal": ("tab:blue", "--"), "scratch": ("tab:gray", ":"),
               "null": ("0.6", "-."), "irreversible": ("tab:red", "-"), "backdoored": ("tab:blue", "--")}
EXTRA_COLOURS = ("tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")


def start_styles(starts):
    """(colour, line style) per start; protected models beyond the known names get distinct colours, in order."""
    extra = iter(EXTRA_COLOURS * (1 + len(starts) // len(EXTRA_COLOURS)))
    return {s: START_STYLE[s] if s in START_STYLE else (next(extra), "-") for s in sorted(starts)}


def read_csv(path):
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _num(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _save(fig, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_stage1(run_dir):
    rows = read_csv(Path(run_dir) / "metrics.csv")
    if not rows:
        return []
    keys = [k for k in rows[0] if k not in ("epoch", "seconds", "train_loss")]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [int(r["epoch"]) for r in rows]
    ax1.plot(epochs, [_num(r["train_loss"]) for r in rows], marker="o")
    ax1.set(xlabel="epoch", ylabel="train loss", title="stage 1 training loss")
    for k in keys:
        ax2.plot(epochs, [_num(r[k]) for r in rows], marker="o", label=k)
    ax2.set(xlabel="epoch", ylabel="%", title="stage 1 accuracy")
    ax2.legend()
    return [_save(fig, Path(run_dir) / "plots" / "stage1.png")]


def plot_stage2(run_dir):
    run_dir = Path(run_dir)
    rows = read_csv(run_dir / "metrics.csv")
    out = []
    if rows:
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        loops = [int(r["loop"]) for r in rows]
        kept = [r.get("rolled_back") in ("0", "", None) for r in rows]
        panels = ((axes[0], "FTS loss (query, adapted weights)", [("fts_loss", None)]),
                  (axes[1], "NTR and clean losses", [("ntr_loss", "NTR (original domain)"),
                                                     ("clean_loss", "clean (restricted domain)")]))
        for ax, title, keys in panels:
            for key, label in keys:
                values = [_num(r.get(key, "")) for r in rows]
                if all(v is None for v in values):
                    continue
                ax.plot(loops, [float("nan") if v is None else v for v in values], lw=0.8, label=label)
                rb = [(l, v) for l, v, k in zip(loops, values, kept) if not k and v is not None]
                if rb:
                    ax.scatter(*zip(*rb), color="tab:orange", s=8, label=f"{label or key}: rolled back")
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
            ax.set(xlabel="outer loop", title=title)
        evals = [(l, _num(r["orig_test_acc"])) for l, r in zip(loops, rows) if _num(r["orig_test_acc"]) is not None]
        if evals:
            axes[2].plot(*zip(*evals), marker="o")
        axes[2].set(xlabel="outer loop", ylabel="%", title="original-domain test accuracy")
        out.append(_save(fig, run_dir / "plots" / "stage2_training.png"))
    tests = read_csv(run_dir / "finetune_tests.csv")
    if tests:
        fig, ax = plt.subplots(figsize=(6, 4))
        by_loop = defaultdict(list)
        for r in tests:
            by_loop[(int(r["loop"]), r.get("kind", "periodic"))].append((int(r["epoch"]), _num(r["test_acc"])))
        cmap = plt.get_cmap("viridis")
        for i, ((loop, kind), pts) in enumerate(sorted(by_loop.items())):
            ax.plot(*zip(*pts), marker=".", color="black" if kind == "final" else cmap(i / max(1, len(by_loop) - 1)),
                    label=f"loop {loop}" + (" (final)" if kind == "final" else ""))
        ax.set(xlabel="fine-tuning epoch", ylabel="restricted test accuracy (%)",
               title="periodic fine-tune tests")
        ax.legend(fontsize=7)
        out.append(_save(fig, run_dir / "plots" / "stage2_finetune_tests.png"))
    return out


PANEL = ("optimizer", "lr", "batch_size", "train_fraction", "schedule")
FIGURE = ("cell", "start", "strategy", "defence", "seed", "epoch")


def plot_grid(run_dir, metric_keys=("test_acc",)):
    """One figure per strategy (attack family), and one per defence (`<key>_defence_<name>.png`); a panel per
    (optimizer, lr, batch size, train fraction, schedule) and the values of any other axis; mean over seeds.
    Rows written before the fraction, schedule and defence axes read as 1, constant and no defence."""
    others = [a.name for a in procedures.axes() if a.name not in PANEL + FIGURE]
    run_dir = Path(run_dir)
    rows = read_csv(run_dir / "metrics.csv")
    if not rows:
        return []
    out = []
    for key in metric_keys:
        # figure (strategy or defence_<name>) -> (opt, lr, bs, fraction, schedule, others, start, seed) -> points
        curves = defaultdict(lambda: defaultdict(list))
        for r in rows:
            v = _num(r.get(key))
            if v is not None:
                panel = (r["optimizer"], r["lr"], r["batch_size"], r.get("train_fraction") or "1",
                         r.get("schedule") or "constant", tuple((k, r[k]) for k in others if r.get(k)))
                group = f"defence_{r['defence']}" if r.get("defence") else r["strategy"]
                curves[group][(*panel, r["start"], r["seed"])].append((int(r["epoch"]), v))
        styles = start_styles({k[6] for cells in curves.values() for k in cells})
        for figure, cells in curves.items():
            panels = sorted({k[:6] for k in cells},
                            key=lambda p: (p[0], float(p[1]), int(p[2]), -float(p[3]), p[4], p[5]))
            cols = min(3, len(panels))
            nrows = (len(panels) + cols - 1) // cols
            fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.6 * nrows), squeeze=False)
            for ax, panel in zip(axes.flat, panels):
                starts = sorted({k[6] for k in cells if k[:6] == panel})
                for start in starts:
                    series = [dict(pts) for k, pts in cells.items() if k[:6] == panel and k[6] == start]
                    epochs = sorted(set().union(*series))
                    mean = [sum(s[e] for s in series if e in s) / sum(e in s for s in series) for e in epochs]
                    color, style = styles[start]
                    ax.plot(epochs, mean, style, color=color, marker=".", label=f"{start} (n={len(series)})")
                    if len(series) > 1:
                        lo = [min(s[e] for s in series if e in s) for e in epochs]
                        hi = [max(s[e] for s in series if e in s) for e in epochs]
                        ax.fill_between(epochs, lo, hi, color=color, alpha=0.15)
                extra = (f" data={float(panel[3]):g}" if float(panel[3]) != 1 else "") + \
                    (f" {panel[4]}" if panel[4] != "constant" else "") + "".join(f" {k}={v}" for k, v in panel[5])
                ax.set(title=f"{panel[0]} lr={float(panel[1]):g} bs={panel[2]}{extra}", xlabel="epoch",
                       ylabel=f"{key} (%)")
                ax.legend(fontsize=8)
            for ax in list(axes.flat)[len(panels):]:
                ax.axis("off")
            fig.suptitle(f"defence: {figure[len('defence_'):]}" if figure.startswith("defence_")
                         else f"fine-tuning attack: {figure}")
            out.append(_save(fig, run_dir / "plots" / f"{key}_{figure}.png"))
    return out


def grid_results(rows, key="test_acc"):
    """metrics.csv rows of an attack grid -> results as summary.json has them (a `<key>_curve` per cell),
    of the cells with every epoch written (as many as the longest: a grid's cells all run --epochs);
    defence cells left out."""
    cells = defaultdict(dict)
    for r in rows:
        v = _num(r.get(key))
        if v is not None and not r.get("defence"):
            cells[r["cell"]][int(r["epoch"])] = (r, v)
    out, epochs = [], max((len(points) for points in cells.values()), default=0)
    for points in cells.values():
        if sorted(points) != list(range(epochs)):
            continue
        r = points[0][0]
        out.append({"start": r["start"], "strategy": r["strategy"], "optimizer": r["optimizer"], "lr": float(r["lr"]),
                    "batch_size": int(r["batch_size"]), "train_fraction": float(r.get("train_fraction") or 1),
                    "schedule": r.get("schedule") or "constant", "seed": int(r["seed"]),
                    f"{key}_curve": [points[e][1] for e in sorted(points)]})
    return out


def plot_robustness(run_dir, baselines=("normal", "scratch")):
    """robustness.png: each protected model's AUC ratio vs scratch per attack family (common.verdicts.
    robustness_summary, on the curves of metrics.csv), blue below 1 (slower than scratch), red above; hatched
    where the family cannot show protection. Nothing where scratch did not run."""
    run_dir = Path(run_dir)
    results = grid_results(read_csv(run_dir / "metrics.csv"))
    labels = sorted({r["start"] for r in results} - set(baselines))
    summaries = {label: robustness_summary(results, protected=label) for label in labels}
    summaries = {label: s for label, s in summaries.items() if s}
    if not summaries:
        return []
    names = attack_family()
    at = names.index  # the data share first (largest first), then the schedule, then the rest
    families = sorted({tuple(c[k] for k in names) for s in summaries.values() for c in s["per_cell"]},
                      key=lambda f: (-f[at("train_fraction")], f[at("schedule")], *map(str, f)))
    ratio = {(label, tuple(c[k] for k in names)): c for label, s in summaries.items() for c in s["per_cell"]}
    grid = np.full((len(families), len(summaries)), np.nan)
    for j, label in enumerate(summaries):
        for i, family in enumerate(families):
            if (label, family) in ratio:
                grid[i, j] = np.log2(ratio[(label, family)]["auc_ratio_mean"])
    fig, ax = plt.subplots(figsize=(5 + 0.9 * len(summaries), 1.2 + 0.28 * len(families)))
    image = ax.imshow(grid, cmap="RdBu_r", norm=TwoSlopeNorm(0, -2, 2), aspect="auto")
    for (i, j), v in np.ndenumerate(grid):
        if not np.isnan(v):
            cell = ratio[(list(summaries)[j], families[i])]
            ax.text(j, i, f"{cell['auc_ratio_mean']:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if abs(v) > 1 else "black")
            if cell["shows_protection"] is False:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", color="0.5", lw=0))
    ax.set_xticks(range(len(summaries)), list(summaries), rotation=30, ha="right")
    ax.set_yticks(range(len(families)), [" ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in f)
                                         for f in families], fontsize=7)
    fig.colorbar(image, ax=ax, label="auc ratio vs scratch", ticks=[-2, -1, 0, 1, 2],
                 format=FuncFormatter(lambda v, _: f"{2.0 ** v:g}"))
    ax.set_title("hatched: cannot show protection", fontsize=8)
    return [_save(fig, run_dir / "plots" / "robustness.png")]


def _tuned(run_dir):
    """summary.json's `tuned` (common.tuned.tuned_summary), None where the run is no tuned suite or unfinished."""
    path = Path(run_dir) / "summary.json"
    return json.loads(path.read_text()).get("tuned") if path.exists() else None


def plot_forest(panels, names, path, reference="scratch", what="attack"):
    """A forest plot of paired verdicts, a panel per model: `panels` {label: {family: verdict}}, a family a tuple
    of the values of `names`, a verdict common.stats' paired fields (ratio, ci, ci_simultaneous, faster) or None.
    Per family its ratio (geometric mean over seeds), the 95% interval (thick) and the simultaneous one (thin), on a
    log axis with a line at 1; red where the family learns faster (Holm), blue where it is slower family-wise
    (simultaneous upper end <= 1), grey otherwise; families without a ratio are left blank. Returns `path`."""
    families = list(dict.fromkeys(f for verdicts in panels.values() for f in verdicts))
    varying = [i for i in range(len(names)) if len({f[i] for f in families}) > 1] or [0]
    ticks = [" ".join(f"{f[i]:g}" if isinstance(f[i], float) else str(f[i]) for i in varying) for f in families]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 1.5 + 0.3 * len(families)), squeeze=False,
                             sharex=True, sharey=True)  # one scale, so the panels compare at a glance
    for ax, (label, verdicts) in zip(axes[0], panels.items()):
        tested = faster = 0
        for y, family in enumerate(families):
            v = verdicts.get(family)
            if not v:
                continue
            slower = v["ci_simultaneous"] is not None and v["ci_simultaneous"][1] <= 1
            color = "tab:red" if v["faster"] else "tab:blue" if slower else "0.4"
            tested += v["ci"] is not None
            faster += bool(v["faster"])
            for ci, width in ((v["ci_simultaneous"], 1), (v["ci"], 3.5)):
                if ci:
                    ax.plot(ci, [y, y], color=color, lw=width, solid_capstyle="butt")
            ax.plot([v["ratio"]], [y], "o", color=color, ms=4)
        ax.axvline(1, color="black", lw=0.8)
        ax.set_xscale("log")
        ax.set(title=f"{label}: {faster} of {tested} faster (Holm)", xlabel=f"auc ratio vs {reference}")
        ax.title.set_fontsize(9)
    axes[0][0].set_yticks(range(len(families)), ticks, fontsize=7)
    axes[0][0].set_ylim(len(families) - 0.5, -0.5)  # the first family on top
    fig.suptitle(f"{what}: {' '.join(names[i] for i in varying)}; thick 95% CI, thin simultaneous", fontsize=9)
    return _save(fig, Path(path))


def plot_tuned(run_dir):
    """tuned.png: plot_forest of the tuned suite's verdict (summary.json's `tuned`), a panel per judged model,
    each family against tuned scratch."""
    tuned = _tuned(run_dir)
    if not tuned or not tuned["models"]:
        return []
    names = tuned["families"]
    panels = {label: {tuple(r[k] for k in names): r["vs_reference"] for r in m["per_family"]}
              for label, m in tuned["models"].items()}
    return [plot_forest(panels, names, Path(run_dir) / "plots" / "tuned.png", f"tuned {tuned['reference']}",
                        "tuned attacker")]


def plot_run(run_dir):
    """Every plot of a run folder, chosen by its metrics.csv header; a tuned suite's forest plot in place of the
    robustness map, which compares starts at one lr."""
    run_dir = Path(run_dir)
    header = read_csv(run_dir / "metrics.csv")[:1]
    if not header:
        return []
    if "loop" in header[0]:
        return plot_stage2(run_dir)
    if "start" in header[0]:
        keys = [k for k in ("test_acc", "asr", "untargeted_asr", "ra") if k in header[0]]
        return plot_grid(run_dir, keys) + (plot_tuned(run_dir) if _tuned(run_dir) else plot_robustness(run_dir))
    return plot_stage1(run_dir)


if __name__ == "__main__":
    for p in plot_run(sys.argv[1]):
        print(p)
