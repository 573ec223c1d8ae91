"""Stage 3: run the grid of cells over the start models, resumably, in one process or under torchrun.

A cell is one (start model, cell of a stage-3 procedure): the fine-tuning attack, a backdoor defence, or any
procedure of common.procedures.PROCEDURES, whose declared axes name the cell and give its columns. Its
per-epoch rows stream to metrics.csv; when it completes, its curves are appended to cells.jsonl, which is what
`--resume` trusts: a killed grid re-runs only the cells missing there (their partial rows are dropped first),
whatever the world size of either run. Under `torchrun --nproc_per_node N` the cells are dealt to the N ranks,
each on its own device; rank 0 alone writes the run folder. `--reuse_cells RUN` copies in another grid's
finished cells of the same start models and settings (say scratch and normal, when a new protected model joins
a grid), so only the rest run. setup_starts and restricted_data are the stage-3 scripts' shared checks.
"""
import functools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from common import dist
from common.axes import Cell
from common.checkpoints import inherit, is_foreign, load_parent, resolve_checkpoint
from common.cli import UsageError
from common.data import check_name, check_subset_caps, load_domain
from common.models import build_model
from common.procedures import chosen, columns, grid_keys, plan
from common.report import write_report
from common.files import write_text_atomically
from common.runs import CSVLog, Interrupted, close_run, guarded, open_run
from common.train import Precision, progress, seed_everything
from common.verdicts import pooled_robustness

log = logging.getLogger("sophon")

NULL_START = "null"
# The null start is a second model from scratch: its init is drawn with seed + NULL_SEED_OFFSET (never a seed a
# grid uses), and everything else in its cell (subset, data order, new head) is scratch's. Its ratio vs scratch is
# what a model with no protection and no head start scores, so it calibrates the others.
NULL_SEED_OFFSET = 1_000_003

# Config keys that do not decide a cell's outcome besides the grid's own (common.procedures.grid_keys): how the
# start models are prepared (compared model by model, by the script's `sources_of`), where things are written, and
# how fast. Every other key must agree for another run's cell to stand in for this run's.
RUN_ONLY = frozenset({
    "path", "parent", "normal_path", "baseline_path", "parent_format", "parent_sha256", "normal_format",
    "normal_sha256", "baseline_format", "baseline_sha256", "out_dir", "resume", "reuse_cells", "num_workers",
    "cache_dir", "download", "device", "renormalize", "tensorboard"})


def shared_starts(source, config, sources_of):
    """The start models whose cells the stage-3 run folder `source` can lend a run of `config`: those both
    runs fine-tune from the same checkpoint (`sources_of(config)`: {start: checkpoint, None for a fresh
    model}), where the two configs agree on every key but the grid's and RUN_ONLY. UsageError otherwise."""
    source = Path(source)
    try:
        theirs = json.loads((source / "config.json").read_text())["config"]
    except (OSError, ValueError, KeyError):
        raise UsageError(f"--reuse_cells {source}: no readable config.json, so it is not a run folder") from None
    if theirs.get("stage") != config.get("stage"):
        raise UsageError(f"--reuse_cells {source} is a {theirs.get('stage')} run, not {config.get('stage')}")
    free = RUN_ONLY | grid_keys()
    differ = sorted(k for k in set(theirs) | set(config) if k not in free and theirs.get(k) != config.get(k))
    if differ:
        raise UsageError(f"--reuse_cells {source} ran other settings, so its cells are not this grid's: "
                         + "; ".join(f"{k} {theirs.get(k)} there, {config.get(k)} here" for k in differ[:4]))
    mine, lent = sources_of(config), sources_of(theirs)
    shared = sorted(start for start, checkpoint in mine.items() if start in lent and lent[start] == checkpoint)
    if not shared:
        raise UsageError(f"--reuse_cells {source} fine-tuned none of this grid's start models "
                         f"({', '.join(sorted(mine))}) from the same checkpoint")
    return shared


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
    """Everything a cell needs: the start models' weights, the training data and the evaluator."""

    def __init__(self, arch, num_classes, starts, train_domain, evaluator, amp, channels_last):
        self.arch, self.num_classes, self.starts = arch, num_classes, starts  # starts: name -> state_dict | None
        self.train_domain, self.evaluator = train_domain, evaluator
        self.amp, self.channels_last = amp, channels_last

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
        settings = cell.settings
        model = precision.prepare(self.start_model(cell.start, settings.seed))
        evaluate = functools.partial(self.evaluator, device=device, precision=precision)
        return settings.procedure.run(model, self.train_domain, settings, device, precision, evaluate, on_epoch)


class Grid:
    """The cells of a run and their bookkeeping. Under torchrun the cells are dealt to the ranks a round at
    a time (cell i of a round on rank i), each rank on its own device; rank 0 writes every row and entry.
    A cell's row, entry and result hold every registered axis (common.procedures.columns)."""

    def __init__(self, run, context, cells, metric_keys, device, world):
        self.run, self.context, self.cells = run, context, cells
        self.metric_keys = metric_keys
        self.device, self.world = device, world
        self.axes = columns()
        self.metrics = run.csv("metrics.csv", ["cell", "start", *(a.name for a in self.axes), "epoch"] + metric_keys)
        self.metrics.keep(lambda row: True)  # a folder from before an axis was registered gets its (empty) column
        self.done_path = run.path / "cells.jsonl"
        self.numerics = Precision(device, context.amp, context.channels_last).numerics

    def completed(self):
        """{cell key: entry} of the finished cells (read on rank 0)."""
        return read_cells(self.done_path)

    def _row(self, cell, epoch, figures):
        return {"cell": cell.key, "start": cell.start, **cell.values(self.axes), "epoch": epoch, **figures}

    def _complete(self, cell, curve, seconds):
        entry = {"key": cell.key, "start": cell.start, **cell.values(self.axes), "epochs": cell.settings.epochs,
                 **{f"{k}_curve": [c.get(k) for c in curve] for k in self.metric_keys},
                 "train_samples": getattr(curve, "train_samples", None),
                 "skipped_steps": getattr(curve, "skipped_steps", 0),
                 "diverged_epoch": getattr(curve, "diverged_epoch", None), "numerics": self.numerics,
                 "seconds": round(seconds, 3)}
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
            started = time.perf_counter()
            curve = self.context.run_cell(mine, self.device, stream) if mine is not None else None
            timed = world.gather((curve, time.perf_counter() - started))
            if world.main:
                for rank, (cell, (curve, seconds)) in enumerate(zip(cells, timed)):
                    if rank > 0:  # rank 0's own rows were streamed as its epochs ended
                        for epoch, figures in enumerate(curve):
                            self.metrics.append(self._row(cell, epoch, figures))
                    self._complete(cell, curve, seconds)
            bar.update(len(cells))
        bar.close()

    def cost(self):
        """What the grid's cells cost: their count, how many carry a time (a cell finished before cells were
        timed has none), the seconds they took in all (each cell on its own rank: under torchrun the wall
        time is about the total over the world size), and the numerics they ran with."""
        done = self.completed().values()
        seconds = [e["seconds"] for e in done if e.get("seconds") is not None]
        return {"cells": len(done), "cells_timed": len(seconds), "cell_seconds": round(sum(seconds), 3),
                "numerics": sorted({e["numerics"] for e in done if e.get("numerics")})}

    def results(self):
        done = self.completed()
        out = []
        for cell in self.cells:
            e = done[cell.key]  # an entry from before an axis existed has the axis' default
            entry = {"start": e["start"], **{a.name: e.get(a.name, a.blank) for a in self.axes}, "epochs": e["epochs"],
                     "train_samples": e.get("train_samples"), "skipped_steps": e.get("skipped_steps", 0),
                     "diverged_epoch": e.get("diverged_epoch")}
            if "defence_info" in e:
                entry["defence_info"] = e["defence_info"]
            entry.update({f"{k}_curve": e[f"{k}_curve"] for k in self.metric_keys})
            entry["final_test_acc"] = e["test_acc_curve"][-1]
            out.append(entry)
        return out


@dataclass
class Start:
    """A start model's checkpoint: the file, the flag that named it, and what load_parent read."""
    path: Path
    flag: str
    ckpt: dict


def _field(ckpt, key):
    """What a checkpoint records of `key`: its arch and class count, else its config's (a foreign file: none)."""
    if key in ("arch", "num_classes"):
        return ckpt[key]
    if key == "dataset":
        return None if is_foreign(ckpt) else ckpt.get("dataset")
    return ckpt.get("config", {}).get(key)


def load_starts(args, project, stage_dir, items, flag, inherited=(), shared=(), like=None):
    """{label: Start} of `items`, [(label, checkpoint or run folder; None: the newest `project`/`stage_dir` run)]
    given by `flag`. The first fills the flags `inherited` left unset (a given one must agree with it); every one
    must agree with `like` (a Start; default the first) on the fields `shared` that both record."""
    starts = {}
    for label, path in items:
        path = resolve_checkpoint(path, project, stage_dir, flag)
        starts[label] = Start(path, flag, load_parent(path, args, flag))
        if len(starts) == 1:
            inherit(args, starts[label].ckpt, path, inherited)
    like = like or next(iter(starts.values()))
    for label, start in starts.items():
        for key in shared:
            mine, theirs = _field(start.ckpt, key), _field(like.ckpt, key)
            if mine is not None and theirs is not None and mine != theirs:
                raise UsageError(f"{flag}: {label} ({start.path}) has {key} {mine}, {like.path} has {theirs}; the "
                                 f"start models of one grid must share {', '.join(shared)}")
    return starts


def _label_of(path):
    path = Path(path).expanduser()
    if path.is_dir():
        return path.resolve().name
    return path.parent.parent.name if path.parent.name == "checkpoints" else path.stem


def labelled_paths(path, single, reserved):
    """A comma list of start checkpoints -> [(label, path)]: items `label=path` or `path` (labelled by its run
    folder's name); one unlabelled path (or none: the newest run) is `single`. Labels are unique and none of
    `reserved`."""
    if path is None:
        return [(single, None)]
    items = []
    for raw in str(path).split(","):
        raw = raw.strip()
        if not raw:
            raise UsageError(f"--path {path}: empty item")
        head, sep, tail = raw.partition("=")
        items.append((head, Path(tail)) if sep and head and "/" not in head else (None, Path(raw)))
    if len(items) == 1 and items[0][0] is None:
        return [(single, items[0][1])]
    items = [(label or _label_of(p), p) for label, p in items]
    seen = {}
    for label, p in items:
        if label in reserved or any(c in label for c in "|,="):
            raise UsageError(f"--path: label {label!r} is reserved or holds one of | , = ; give label=path")
        if label in seen:
            raise UsageError(f"--path: label {label!r} names two models ({seen[label]} and {p}); give "
                             f"unique labels as label=path")
        seen[label] = p
    return items


def choose_dataset(args, protected):
    """--dataset, else the restricted domain the first protected checkpoint of ours records ({label: Start})."""
    recorded = next((_field(s.ckpt, "dataset") for s in protected.values() if _field(s.ckpt, "dataset")), None)
    args.dataset = args.dataset or recorded
    if args.dataset is None:
        raise UsageError("--dataset is needed: no protected checkpoint given names the restricted domain (a plain "
                         "weights file or a stage-1 checkpoint does not)")
    check_name(args.dataset)


def restricted_data(args, *others):
    """The restricted domain's training and test splits, then the test splits of the datasets `others`, each
    within --subset / --test_subset, which they must not undercut (common.data.check_subset_caps)."""
    load = functools.partial(load_domain, root=args.data_root, image_size=args.image_size, download=args.download,
                             cache_dir=args.cache_dir, num_workers=args.num_workers)
    domains = [load(args.dataset, train=True, cap=args.subset)] + [
        load(name, train=False, cap=args.test_subset) for name in (args.dataset, *others)]
    check_subset_caps(args, domains)
    return domains


def run_stage3_script(args, interrupts, project, stage, *, starts, num_classes, train, evaluator, config,
                      metric_keys, verdict_fn, title, sources_of, notes=(), extra_summary=None,
                      robustness_fn=None, defence_fn=None, suite=None):
    """Open the run folder, run every (start, procedure cell) cell, write summary.json, plots and report.md.

    The cells: those of the chosen procedures (common.procedures.plan: --attacks, then --defences), each for
    every start; or, with a `suite` (common.tuned.TunedSuite), its sweep cells, then the cells it plans from
    their entries (metric_keys then name the sweep's metric too; a cell's curve may lack a key: its values are
    None), and its summary under "tuned". `defence_fn(results)` gives the defence rows of summary.json
    ("defence_verdicts") and of the report where defences ran. `sources_of(config)`: {start: checkpoint it
    loads, None for a fresh model} of a run's config, which --reuse_cells compares."""
    lend = shared_starts(args.reuse_cells, config, sources_of) if args.reuse_cells else []
    world = dist.world()
    device = world.device(args.device)
    train.pin_for(device)
    seed_everything(args.seed)
    cells = suite.sweep_cells(list(starts)) if suite else [Cell(start, settings) for settings in plan(args)
                                                           for start in starts]
    defended = any(p.role == "defence" for p in chosen(args))
    run = open_run(args, project, "stage3_eval", args.dataset, config)
    if train.note:
        run.log_note(train.note)
    context = GridContext(args.arch, num_classes, starts, train, evaluator, args.amp, args.channels_last)
    grid = Grid(run, context, cells, list(metric_keys), device, world)

    def reuse():
        if lend and world.main:
            log.info("%d cells of %s reused from %s", grid.adopt(args.reuse_cells, lend), ", ".join(lend),
                     args.reuse_cells)

    def body():
        reuse()
        grid.execute(interrupts)
        if suite:  # phase 2 is planned on rank 0 from phase 1's entries, the same on every rank
            grid.cells += suite.seed_cells(world.share(suite.choose(grid.completed(), list(starts))
                                                       if world.main else None))
            reuse()
            grid.execute(interrupts)
        if not world.main:
            return 0
        results = grid.results()
        verdicts = verdict_fn(results)
        summary = {"dataset": args.dataset, "results": results, "verdicts": verdicts, "cost": grid.cost(),
                   **(extra_summary or {})}
        if suite:
            summary["tuned"] = suite.summary(results)
        robustness = robustness_fn(results) if robustness_fn else None
        pooled = pooled_robustness(robustness) if robustness_fn else None
        if robustness_fn:
            summary["robustness"] = robustness
        if pooled:
            summary["robustness_pooled"] = pooled
        defence_rows = defence_fn(results) if defence_fn and defended else None
        if defence_rows is not None:
            summary["defence_verdicts"] = defence_rows
        close_run(run, stage, summary, len(evaluator.domain))
        report = write_report(run, title, results, verdicts, sorted(run.plots_dir.glob("*.png")), metric_keys, notes,
                              robustness, pooled, defence_rows, summary.get("tuned"))
        print(report.read_text())
        return 0

    return guarded(run, stage, body)
