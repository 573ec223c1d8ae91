"""Stage 3: run the attack grid over the start models, resumably, in one process or under torchrun.

A cell is one (start model, attack), the attack a fine-tuning attack or a backdoor defence
(common.defences: an Attack whose `defence` is set, run by run_defence). Its per-epoch rows stream to
metrics.csv; when it completes, its curves are appended to cells.jsonl, which is what `--resume` trusts: a
killed grid re-runs only the cells missing there (their partial rows are dropped first), whatever the world
size of either run. Under `torchrun --nproc_per_node N` the cells are dealt to the N ranks, each on its own
device; rank 0 alone writes the run folder. `--reuse_cells RUN` copies in another grid's finished cells of
the same start models and settings (say scratch and normal, when a new protected model joins a grid), so
only the rest run.
"""
import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from common import dist
from common.cli import UsageError
from common.defences import DefenceConfig, defence_attacks, run_defence
from common.finetune import Attack, expand_grid, run_attack
from common.models import build_model
from common.runs import CSVLog, Interrupted, close_run, guarded, open_run, write_text_atomically
from common.train import Precision, progress, seed_everything
from common.verdicts import DEFENCE_LEGEND, FAMILY, LEGEND, ROBUSTNESS_LEGEND, pooled_robustness

log = logging.getLogger("sophon")

NULL_START = "null"
# The null start is a second model from scratch: its init is drawn with seed + NULL_SEED_OFFSET (never a seed a
# grid uses), and everything else in its cell (subset, data order, new head) is scratch's. Its ratio vs scratch is
# what a model with no protection and no head start scores, so it calibrates the others.
NULL_SEED_OFFSET = 1_000_003

# Config keys that do not decide a cell's outcome: the grid's axes (a cell's key names its values), which start
# models run and how they are prepared (compared model by model, by the script's `sources_of`), where things are
# written, and how fast. Every other key must agree for another run's cell to stand in for this run's.
REUSE_FREE = frozenset({
    "start", "strategies", "optimizers", "lrs", "batch_sizes", "seeds", "train_fractions", "schedules", "bs",
    "finetune_lr", "defences", "defences_only", "path", "parent", "normal_path", "baseline_path", "parent_format",
    "parent_sha256", "normal_format", "normal_sha256", "baseline_format", "baseline_sha256", "out_dir", "resume",
    "reuse_cells", "num_workers", "cache_dir", "download", "device", "renormalize"})


def shared_starts(source, config, sources_of):
    """The start models whose cells the stage-3 run folder `source` can lend a run of `config`: those both
    runs fine-tune from the same checkpoint (`sources_of(config)`: {start: checkpoint, None for a fresh
    model}), where the two configs agree on every key outside REUSE_FREE. UsageError otherwise."""
    source = Path(source)
    try:
        theirs = json.loads((source / "config.json").read_text())["config"]
    except (OSError, ValueError, KeyError):
        raise UsageError(f"--reuse_cells {source}: no readable config.json, so it is not a run folder") from None
    if theirs.get("stage") != config.get("stage"):
        raise UsageError(f"--reuse_cells {source} is a {theirs.get('stage')} run, not {config.get('stage')}")
    differ = sorted(k for k in set(theirs) | set(config) if k not in REUSE_FREE and theirs.get(k) != config.get(k))
    if differ:
        raise UsageError(f"--reuse_cells {source} ran other settings, so its cells are not this grid's: "
                         + "; ".join(f"{k} {theirs.get(k)} there, {config.get(k)} here" for k in differ[:4]))
    mine, lent = sources_of(config), sources_of(theirs)
    shared = sorted(start for start, checkpoint in mine.items() if start in lent and lent[start] == checkpoint)
    if not shared:
        raise UsageError(f"--reuse_cells {source} fine-tuned none of this grid's start models "
                         f"({', '.join(sorted(mine))}) from the same checkpoint")
    return shared


@dataclass(frozen=True)
class Cell:
    """One (start model, attack) of the grid; `key` names it in cells.jsonl and in metrics.csv's `cell` column."""
    start: str
    attack: Attack

    @property
    def key(self):
        """start|strategy|optimizer|lr|bs|seed, then |f<fraction> and |<schedule> where they are not the
        defaults (1.0, constant), so the keys of a run folder from before those axes still name its cells, and
        |<defence> for a defence cell."""
        a = self.attack
        key = f"{self.start}|{a.strategy}|{a.optimizer}|{a.lr:g}|{a.batch_size}|{a.seed}"
        if a.train_fraction != 1.0:
            key += f"|f{a.train_fraction:g}"
        if a.schedule != "constant":
            key += f"|{a.schedule}"
        if a.defence is not None:
            key += f"|{a.defence}"
        return key


def read_cells(path):
    """{cell key: entry} of a cells.jsonl. A line cut short (the grid killed while appending it) does not
    count: that cell simply runs again."""
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[entry["key"]] = entry
    return done


class GridContext:
    """Everything a cell needs: the start models' weights, the training data, the evaluator, and the
    defences' DefenceConfig (None: their defaults)."""

    def __init__(self, arch, num_classes, starts, train_domain, evaluator, amp, channels_last, defence_cfg=None):
        self.arch, self.num_classes, self.starts = arch, num_classes, starts  # starts: name -> state_dict | None
        self.train_domain, self.evaluator = train_domain, evaluator
        self.amp, self.channels_last = amp, channels_last
        self.defence_cfg = defence_cfg

    def start_model(self, start, seed):
        # only the init comes from the global generator (the attack draws from its own), so a null cell differs
        # from its scratch cell in the init alone
        torch.manual_seed(seed + NULL_SEED_OFFSET if start == NULL_START else seed)
        model = build_model(self.arch, self.num_classes, init="scratch")
        if self.starts[start] is not None:
            model.load_state_dict(self.starts[start], strict=True)
        return model

    def run_cell(self, cell, device, on_epoch=None):
        precision = Precision(device, self.amp, self.channels_last)
        model = precision.prepare(self.start_model(cell.start, cell.attack.seed))
        evaluate = functools.partial(self.evaluator, device=device, precision=precision)
        if cell.attack.defence is not None:
            return run_defence(model, self.train_domain, cell.attack, self.defence_cfg, device, precision, evaluate,
                               on_epoch)
        return run_attack(model, self.train_domain, cell.attack, device, precision, evaluate, on_epoch)


class Grid:
    """The cells of a run and their bookkeeping. Under torchrun the cells are dealt to the ranks a round at
    a time (cell i of a round on rank i), each rank on its own device; rank 0 writes every row and entry."""

    def __init__(self, run, context, cells, metric_keys, device, world):
        self.run, self.context, self.cells = run, context, cells
        self.metric_keys = metric_keys
        self.device, self.world = device, world
        self.metrics = run.csv("metrics.csv", ["cell", "start", "strategy", "optimizer", "lr", "batch_size",
                                               "train_fraction", "schedule", "defence", "seed", "epoch"]
                               + metric_keys)
        self.done_path = run.path / "cells.jsonl"
        self.numerics = Precision(device, context.amp, context.channels_last).numerics

    def completed(self):
        """{cell key: entry} of the finished cells (read on rank 0)."""
        return read_cells(self.done_path)

    def _row(self, cell, epoch, figures):
        a = cell.attack
        return {"cell": cell.key, "start": cell.start, "strategy": a.strategy, "optimizer": a.optimizer, "lr": a.lr,
                "batch_size": a.batch_size, "train_fraction": a.train_fraction, "schedule": a.schedule,
                "defence": a.defence, "seed": a.seed, "epoch": epoch, **figures}

    def _complete(self, cell, curve):
        entry = {"key": cell.key, "start": cell.start, **cell.attack.as_dict(),
                 **{f"{k}_curve": [c[k] for c in curve] for k in self.metric_keys},
                 "train_samples": getattr(curve, "train_samples", None),
                 "skipped_steps": getattr(curve, "skipped_steps", 0),
                 "diverged_epoch": getattr(curve, "diverged_epoch", None), "numerics": self.numerics}
        if getattr(curve, "defence_info", None) is not None:
            entry["defence_info"] = curve.defence_info
        with open(self.done_path, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def adopt(self, source, starts):
        """Copy the cells of `starts` that the run folder `source` finished and this grid has (cells.jsonl
        entries and their metrics.csv rows) and have not run here yet; returns how many. A cell that ran
        with other numerics (a GPU's bf16 against this CPU's fp32, say) is run here instead, so that the
        start models of one grid are compared under one arithmetic; entries written before cells recorded
        their numerics are taken as they are."""
        source = Path(source)
        lent, done = read_cells(source / "cells.jsonl"), self.completed()
        wanted = {c.key for c in self.cells if c.start in starts} - set(done)
        offered = [e for key, e in lent.items() if key in wanted]
        taken = [e for e in offered if e.get("numerics", self.numerics) == self.numerics]
        if len(taken) < len(offered):
            other = sorted({e["numerics"] for e in offered} - {self.numerics})
            log.info("%d cells of %s ran with %s there, %s here: running them here", len(offered) - len(taken),
                     source, " / ".join(other), self.numerics)
        keys = {e["key"] for e in taken}
        rows = CSVLog(source / "metrics.csv", self.metrics.header).rows() if (source / "metrics.csv").exists() else []
        for row in rows:
            if row["cell"] in keys:
                self.metrics.append(row)
        with open(self.done_path, "a") as f:
            f.writelines(json.dumps(e) + "\n" for e in taken)
        return len(taken)

    def execute(self, interrupts):
        """Run the cells missing from cells.jsonl; raises Interrupted at a round's boundary after a signal."""
        world = self.world
        done = world.share(self.completed() if world.main else None)
        if world.main:  # whole lines only, so that the next append starts on a line of its own
            write_text_atomically(self.done_path, "".join(json.dumps(e) + "\n" for e in done.values()))
        self.metrics.keep(lambda r: r["cell"] in done)
        todo = [c for c in self.cells if c.key not in done]
        if done:
            log.info("%d of %d cells already done; running %d", len(done), len(self.cells), len(todo))
            other = sorted({e.get("numerics") for e in done.values()} - {None, self.numerics})
            if other and world.main:
                log.warning("cells done before ran with %s, the rest run with %s: the grid mixes the two "
                            "(start a new run folder to keep one)", " / ".join(other), self.numerics)
        bar = progress(total=len(todo), desc="attack grid", disable=not world.main)
        for first in range(0, len(todo), world.size):
            if interrupts.due():
                raise Interrupted(f"cell {len(done) + first + 1} of {len(self.cells)}")
            cells = todo[first:first + world.size]
            for rank, cell in enumerate(cells):
                log.info("cell %s%s", cell.key, f" on rank {rank}" if world.distributed else "")
            mine = cells[world.rank] if world.rank < len(cells) else None
            stream = (lambda e, f, cell=mine: self.metrics.append(self._row(cell, e, f))) if world.main else None
            curve = self.context.run_cell(mine, self.device, stream) if mine is not None else None
            curves = world.gather(curve)
            if world.main:
                for rank, (cell, curve) in enumerate(zip(cells, curves)):
                    if rank > 0:  # rank 0's own rows were streamed as its epochs ended
                        for epoch, figures in enumerate(curve):
                            self.metrics.append(self._row(cell, epoch, figures))
                    self._complete(cell, curve)
            bar.update(len(cells))
        bar.close()

    def results(self):
        done = self.completed()
        out = []
        for cell in self.cells:
            e = done[cell.key]
            entry = {"start": e["start"], "strategy": e["strategy"], "optimizer": e["optimizer"], "lr": e["lr"],
                     "batch_size": e["batch_size"], "train_fraction": e.get("train_fraction", 1.0),
                     "schedule": e.get("schedule", "constant"), "epochs": e["epochs"], "seed": e["seed"],
                     "train_samples": e.get("train_samples"), "skipped_steps": e.get("skipped_steps", 0),
                     "diverged_epoch": e.get("diverged_epoch"), "defence": e.get("defence")}
            if "defence_info" in e:
                entry["defence_info"] = e["defence_info"]
            entry.update({f"{k}_curve": e[f"{k}_curve"] for k in self.metric_keys})
            entry["final_test_acc"] = e["test_acc_curve"][-1]
            out.append(entry)
        return out


def _fmt(value, none="n/a"):
    if value is None:
        return none
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.2f}"
    if isinstance(value, list):
        return ", ".join(_fmt(v, none) for v in value)
    return str(value)


def _robustness_lines(robustness):
    """report.md's robustness section: one row per protected model, then the head start of every cell."""
    lines = ["## Robustness per protected model", "", ROBUSTNESS_LEGEND, "",
             "| protected | attack families | share auc ratio < 1 | per seed: mean +- std | 95% CI over seeds | "
             "families unable to show protection (scratch did not learn) | share < 1 where shown | "
             "geo-mean auc ratio (where shown) | worst (auc ratio) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label, r in robustness.items():
        w = r["worst_cell"]
        worst = (f"{w['strategy']} {w['optimizer']} lr {w['lr']:g} bs {w['batch_size']} f {w['train_fraction']:g} "
                 f"{w['schedule']} ({_fmt(w['auc_ratio_mean'])})")
        ci = r["share_below_1_ci95"]
        lines.append(f"| {label} | {r['cells']} | {_fmt(r['share_below_1'])} | "
                     f"{_fmt(r['share_below_1_per_seed_mean'])} +- {_fmt(r['share_below_1_per_seed_std'])} | "
                     f"{'n/a' if ci is None else f'{ci[0]:.2f} - {ci[1]:.2f}'} ({r['ci_note']}) | "
                     f"{r['cells_unable_to_show_protection']} ({r['cells_reference_did_not_learn']}) | "
                     f"{_fmt(r['share_below_1_where_shown'])} | {_fmt(r['auc_ratio_geomean'])} "
                     f"({_fmt(r['auc_ratio_geomean_where_shown'])}) | {worst} |")
    lines += ["", "Per attack family: scratch's final accuracy (mean over seeds), the head start of normal over "
              "scratch (auc(normal) / auc(scratch), mean over seeds) and each protected model's auc ratio vs "
              "scratch:", ""]
    labels = list(robustness)
    lines += ["| strategy | optimizer | lr | bs | train fraction | schedule | scratch final | head start | "
              "shows protection | " + " | ".join(labels) + " |",
              "| " + " | ".join("---" for _ in range(9 + len(labels))) + " |"]
    rows = {}
    for label, r in robustness.items():
        for c in r["per_cell"]:
            axes = tuple(c[k] for k in FAMILY)
            rows.setdefault(axes, {"final": c["reference_final"], "head": c["head_start"],
                                   "shows": c["shows_protection"]})[label] = c["auc_ratio_mean"]
    for (s, o, lr, bs, f, sch), row in rows.items():
        lines.append(f"| {s} | {o} | {lr:g} | {bs} | {f:g} | {sch} | {_fmt(row['final'])} | {_fmt(row['head'])} | "
                     f"{_fmt(row['shows'], 'n/a').lower()} | " + " | ".join(_fmt(row.get(l)) for l in labels) + " |")
    return lines + [""]


def _pooled_lines(pooled):
    """report.md's section on the configurations run several times (labels NAME#K), runs pooled."""
    lines = ["## Robustness per configuration, runs pooled", "",
             "Protected models labelled NAME#K are runs of one configuration NAME (stage-2 seeds, say); mean +- "
             "std over the runs.", "",
             "| configuration | runs | share auc ratio < 1 | share < 1 where shown | geo-mean auc ratio | "
             "geo-mean where shown | worst (auc ratio) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, p in pooled.items():
        w = p["worst_cell"]
        lines.append(f"| {name} | {', '.join(p['runs'])} | {_pm(p, 'share_below_1')} | "
                     f"{_pm(p, 'share_below_1_where_shown')} | {_pm(p, 'auc_ratio_geomean')} | "
                     f"{_pm(p, 'auc_ratio_geomean_where_shown')} | {w['strategy']} {w['optimizer']} lr {w['lr']:g} "
                     f"bs {w['batch_size']} f {w['train_fraction']:g} {w['schedule']} ({_pm(w, 'auc_ratio')}, "
                     f"below 1 in {w['runs_below_1']} of {w['runs']} runs) |")
    return lines + [""]


def _pm(row, key):
    return f"{_fmt(row.get(key + '_mean'))} +- {_fmt(row.get(key + '_std'))}"


def _defence_lines(rows):
    """report.md's defence section: a row per defence (and train fraction), protected vs reference."""
    p, r = rows[0]["protected"], rows[0]["reference"]
    pruned = any(f"pruned_channels_{p}" in row for row in rows)
    lines = ["## Defences", "", DEFENCE_LEGEND, "",
             f"| defence | lr | bs | train fraction | seeds | clean acc {p} | clean acc {r} | ASR {p} | ASR {r} | "
             f"ASR auc ratio |" + (f" pruned channels {p} | pruned channels {r} |" if pruned else ""),
             "| " + " | ".join("---" for _ in range(10 + 2 * pruned)) + " |"]
    for row in rows:
        lines.append(f"| {row['defence']} | {row['lr']:g} | {row['batch_size']} | {row['train_fraction']:g} | "
                     f"{row['seeds']} | {_pm(row, f'final_test_acc_{p}')} | {_pm(row, f'final_test_acc_{r}')} | "
                     f"{_pm(row, f'final_asr_{p}')} | {_pm(row, f'final_asr_{r}')} | {_pm(row, 'asr_auc_ratio')} |"
                     + (f" {_fmt(row.get(f'pruned_channels_{p}'))} | {_fmt(row.get(f'pruned_channels_{r}'))} |"
                        if pruned else ""))
    return lines + [""]


def write_report(run, title, results, verdicts, plots, metric_keys=("test_acc",), notes=(), robustness=None,
                 robustness_pooled=None, defence_verdicts=None):
    """report.md: the verdict tables and the final figures, readable without opening the CSVs."""
    lines = [f"# {title}", ""]
    lines += list(notes) + ([""] if notes else [])
    if robustness:
        lines += _robustness_lines(robustness)
    if robustness_pooled:
        lines += _pooled_lines(robustness_pooled)
    if defence_verdicts:
        lines += _defence_lines(defence_verdicts)
    if verdicts:
        columns = list(verdicts[0])
        lines += ["## Verdict per attack", "", LEGEND, "",
                  "| " + " | ".join(c.replace("_", " ") for c in columns) + " |",
                  "| " + " | ".join("---" for _ in columns) + " |"]
        lines += ["| " + " | ".join(_fmt(v.get(c), "never" if "epoch" in c else "n/a") for c in columns) + " |"
                  for v in verdicts]
        lines.append("")
    defences = any(r.get("defence") for r in results)  # a defence column only where there are defence cells
    for key in metric_keys:
        lines += [f"## {key}: epoch 0 -> final, mean over seeds", "",
                  "| " + ("defence | " if defences else "") + "strategy | optimizer | lr | bs | train fraction | "
                  "schedule | start | epoch 0 | final | seeds | diverged seeds |",
                  "| " + " | ".join("---" for _ in range(11 + defences)) + " |"]
        groups = {}
        for r in results:
            groups.setdefault((r.get("defence"), r["strategy"], r["optimizer"], r["lr"], r["batch_size"],
                               r.get("train_fraction", 1.0), r.get("schedule", "constant"), r["start"]), []).append(r)
        for (d, s, o, lr, bs, f, sch, start), rows in groups.items():
            curves = [r[f"{key}_curve"] for r in rows]
            first = sum(c[0] for c in curves) / len(curves)
            last = sum(c[-1] for c in curves) / len(curves)
            diverged = sum(r.get("diverged_epoch") is not None for r in rows)
            lines.append("| " + (f"{d or '-'} | " if defences else "") + f"{s} | {o} | {lr:g} | {bs} | {f:g} | {sch} | "
                         f"{start} | {first:.2f} | {last:.2f} | {len(curves)} | {diverged} |")
        lines.append("")
    if plots:
        lines += ["## Figures", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots] + [""]
    (run.path / "report.md").write_text("\n".join(lines))
    return run.path / "report.md"


def run_stage3_script(args, interrupts, project, stage, *, starts, num_classes, train, evaluator, config,
                      metric_keys, verdict_fn, title, sources_of, notes=(), extra_summary=None,
                      robustness_fn=None, defence_fn=None):
    """Open the run folder, run every (start, attack) cell, write summary.json, plots and report.md.

    The cells: the fine-tuning grid (common.finetune.expand_grid) and, where args has --defences, the
    defence cells (common.defences.defence_attacks), each for every start. `defence_fn(results)` gives the
    defence rows of summary.json ("defence_verdicts") and of the report. `sources_of(config)`: {start:
    checkpoint it loads, None for a fresh model} of a run's config, which --reuse_cells compares."""
    lend = shared_starts(args.reuse_cells, config, sources_of) if args.reuse_cells else []
    world = dist.world()
    device = world.device(args.device)
    train.pin_for(device)
    seed_everything(args.seed)
    cells = [Cell(start, attack) for attack in expand_grid(args) + defence_attacks(args) for start in starts]
    defence_cfg = DefenceConfig.from_args(args) if getattr(args, "defences", None) else None
    run = open_run(args, project, "stage3_eval", args.dataset, config)
    if train.note:
        run.log_note(train.note)
    context = GridContext(args.arch, num_classes, starts, train, evaluator, args.amp, args.channels_last, defence_cfg)
    grid = Grid(run, context, cells, list(metric_keys), device, world)

    def body():
        if lend and world.main:
            log.info("%d cells of %s reused from %s", grid.adopt(args.reuse_cells, lend), ", ".join(lend),
                     args.reuse_cells)
        grid.execute(interrupts)
        if not world.main:
            return 0
        results = grid.results()
        verdicts = verdict_fn(results)
        summary = {"dataset": args.dataset, "results": results, "verdicts": verdicts, **(extra_summary or {})}
        robustness = robustness_fn(results) if robustness_fn else None
        pooled = pooled_robustness(robustness) if robustness_fn else None
        if robustness_fn:
            summary["robustness"] = robustness
        if pooled:
            summary["robustness_pooled"] = pooled
        defence_rows = defence_fn(results) if defence_fn and defence_cfg is not None else None
        if defence_rows is not None:
            summary["defence_verdicts"] = defence_rows
        close_run(run, stage, summary, len(evaluator.domain))
        report = write_report(run, title, results, verdicts, sorted(run.plots_dir.glob("*.png")), metric_keys, notes,
                              robustness, pooled, defence_rows)
        print(report.read_text())
        return 0

    return guarded(run, stage, body)
