"""Stage 3: run the attack grid over the start models, resumably, in one process or several.

A cell is one (start model, attack). Its per-epoch rows stream to metrics.csv; when it completes, its
curves are appended to cells.jsonl, which is what `--resume` trusts: a killed grid re-runs only the cells
missing there (their partial rows are dropped first). With `--jobs N`, N spawned workers run cells in
parallel, each on the next device of `--devices`; the parent alone writes the run folder.
"""
import concurrent.futures as cf
import ctypes
import ctypes.util
import functools
import json
import logging
import multiprocessing as mp
import os
import signal
from dataclasses import dataclass

import torch

from common.finetune import Attack, expand_grid, run_attack
from common.models import build_model
from common.runs import Interrupted, close_run, guarded, open_run, write_text_atomically
from common.train import Precision, progress, resolve_device, seed_everything
from common.verdicts import LEGEND

log = logging.getLogger("sophon")


@dataclass(frozen=True)
class Cell:
    """One (start model, attack) of the grid; `key` names it in cells.jsonl and in metrics.csv's `cell` column."""
    start: str
    attack: Attack

    @property
    def key(self):
        a = self.attack
        return f"{self.start}|{a.strategy}|{a.optimizer}|{a.lr:g}|{a.batch_size}|{a.seed}"


class GridContext:
    """Everything a cell needs, picklable so spawned workers can hold a copy."""

    def __init__(self, arch, num_classes, starts, train_domain, evaluator, amp, channels_last):
        self.arch, self.num_classes, self.starts = arch, num_classes, starts  # starts: name -> state_dict | None
        self.train_domain, self.evaluator = train_domain, evaluator
        self.amp, self.channels_last = amp, channels_last

    def start_model(self, start, seed):
        torch.manual_seed(seed)  # the scratch model is a fresh arch seeded by the cell's seed
        model = build_model(self.arch, self.num_classes, init="scratch")
        if self.starts[start] is not None:
            model.load_state_dict(self.starts[start], strict=True)
        return model

    def run_cell(self, cell, device, on_epoch=None):
        precision = Precision(device, self.amp, self.channels_last)
        model = precision.prepare(self.start_model(cell.start, cell.attack.seed))
        evaluate = functools.partial(self.evaluator, device=device, precision=precision)
        return run_attack(model, self.train_domain, cell.attack, device, precision, evaluate, on_epoch)


_WORKER = {}


def _die_with_parent():
    """A worker whose parent is killed outright (SIGKILL, the OOM killer) would run on as an orphan,
    holding CPU or GPU: on Linux, ask the kernel to kill it too."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the request
        os._exit(1)


def _init_worker(context, devices, counter):
    _die_with_parent()
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    _WORKER["context"] = context
    _WORKER["device"] = resolve_device(devices[index % len(devices)]) if ":" not in devices[index % len(devices)] \
        else torch.device(devices[index % len(devices)])
    torch.set_num_threads(max(1, torch.get_num_threads() // max(1, len(devices))))


def _worker_cell(cell):
    return cell, _WORKER["context"].run_cell(cell, _WORKER["device"])


class Grid:
    def __init__(self, run, context, cells, metric_keys, device):
        self.run, self.context, self.cells = run, context, cells
        self.metric_keys = metric_keys
        self.device = device
        self.metrics = run.csv("metrics.csv", ["cell", "start", "strategy", "optimizer", "lr", "batch_size", "seed",
                                               "epoch"] + metric_keys)
        self.done_path = run.path / "cells.jsonl"

    def completed(self):
        """{cell key: entry} of the finished cells. A line cut short (the grid killed while appending it)
        does not count: that cell simply runs again."""
        if not self.done_path.exists():
            return {}
        done = {}
        for line in self.done_path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[entry["key"]] = entry
        return done

    def _row(self, cell, epoch, figures):
        a = cell.attack
        return {"cell": cell.key, "start": cell.start, "strategy": a.strategy, "optimizer": a.optimizer, "lr": a.lr,
                "batch_size": a.batch_size, "seed": a.seed, "epoch": epoch, **figures}

    def _complete(self, cell, curve):
        entry = {"key": cell.key, "start": cell.start, **cell.attack.as_dict(),
                 **{f"{k}_curve": [c[k] for c in curve] for k in self.metric_keys}}
        with open(self.done_path, "a") as f:
            f.write(json.dumps(entry) + "\n")
        return entry

    def execute(self, jobs=1, devices=None, interrupts=None):
        """Run the cells missing from cells.jsonl; raises Interrupted at a cell boundary after a signal."""
        done = self.completed()
        # whole lines only, so that the next append starts on a line of its own
        write_text_atomically(self.done_path, "".join(json.dumps(e) + "\n" for e in done.values()))
        self.metrics.keep(lambda r: r["cell"] in done)
        todo = [c for c in self.cells if c.key not in done]
        if done:
            log.info("%d of %d cells already done; running %d", len(self.cells) - len(todo), len(self.cells), len(todo))
        bar = progress(total=len(todo), desc="attack grid")
        if jobs == 1:
            for cell in todo:
                if interrupts is not None and interrupts.requested:
                    raise Interrupted(f"cell {len(self.completed()) + 1} of {len(self.cells)}")
                log.info("cell %s", cell.key)
                curve = self.context.run_cell(cell, self.device,
                                              lambda e, f, cell=cell: self.metrics.append(self._row(cell, e, f)))
                self._complete(cell, curve)
                bar.update(1)
        else:
            devices = devices or [str(self.device)]
            ctx = mp.get_context("spawn")
            counter = ctx.Value("i", 0)
            with cf.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker,
                                        initargs=(self.context, devices, counter)) as pool:
                futures = [pool.submit(_worker_cell, cell) for cell in todo]
                for fut in cf.as_completed(futures):
                    cell, curve = fut.result()
                    for epoch, figures in enumerate(curve):
                        self.metrics.append(self._row(cell, epoch, figures))
                    self._complete(cell, curve)
                    bar.update(1)
                    if interrupts is not None and interrupts.requested:
                        for f in futures:
                            f.cancel()
                        raise Interrupted(f"cell {len(self.completed()) + 1} of {len(self.cells)}")
        bar.close()

    def results(self):
        done = self.completed()
        out = []
        for cell in self.cells:
            e = done[cell.key]
            entry = {"start": e["start"], "strategy": e["strategy"], "optimizer": e["optimizer"], "lr": e["lr"],
                     "batch_size": e["batch_size"], "epochs": e["epochs"], "seed": e["seed"]}
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


def write_report(run, title, results, verdicts, plots, metric_keys=("test_acc",), notes=()):
    """report.md: the verdict table and the final figures, readable without opening the CSVs."""
    lines = [f"# {title}", ""]
    lines += list(notes) + ([""] if notes else [])
    if verdicts:
        columns = list(verdicts[0])
        lines += ["## Verdict per attack", "", LEGEND, "",
                  "| " + " | ".join(c.replace("_", " ") for c in columns) + " |",
                  "| " + " | ".join("---" for _ in columns) + " |"]
        lines += ["| " + " | ".join(_fmt(v.get(c), "never" if "epoch" in c else "n/a") for c in columns) + " |"
                  for v in verdicts]
        lines.append("")
    for key in metric_keys:
        lines += [f"## {key}: epoch 0 -> final, mean over seeds", "",
                  "| strategy | optimizer | lr | bs | start | epoch 0 | final | seeds |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        groups = {}
        for r in results:
            groups.setdefault((r["strategy"], r["optimizer"], r["lr"], r["batch_size"], r["start"]), []).append(r[f"{key}_curve"])
        for (s, o, lr, bs, start), curves in groups.items():
            first = sum(c[0] for c in curves) / len(curves)
            last = sum(c[-1] for c in curves) / len(curves)
            lines.append(f"| {s} | {o} | {lr:g} | {bs} | {start} | {first:.2f} | {last:.2f} | {len(curves)} |")
        lines.append("")
    if plots:
        lines += ["## Figures", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots] + [""]
    (run.path / "report.md").write_text("\n".join(lines))
    return run.path / "report.md"


def run_stage3_script(args, interrupts, project, stage, *, starts, num_classes, train, evaluator, config,
                      metric_keys, verdict_fn, title, notes=(), extra_summary=None):
    """Open the run folder, run every (start, attack) cell, write summary.json, plots and report.md."""
    device = resolve_device(args.device)
    if args.jobs == 1:
        train.pin_for(device)
    seed_everything(args.seed)
    cells = [Cell(start, attack) for attack in expand_grid(args) for start in starts]
    run = open_run(args, project, "stage3_eval", args.dataset, config)
    if train.note:
        run.log_note(train.note)
    context = GridContext(args.arch, num_classes, starts, train, evaluator, args.amp, args.channels_last)
    grid = Grid(run, context, cells, list(metric_keys), device)

    def body():
        grid.execute(args.jobs, args.devices, interrupts)
        results = grid.results()
        verdicts = verdict_fn(results)
        summary = {"dataset": args.dataset, "results": results, "verdicts": verdicts, **(extra_summary or {})}
        close_run(run, stage, summary, len(evaluator.domain))
        report = write_report(run, title, results, verdicts, sorted(run.plots_dir.glob("*.png")), metric_keys, notes)
        print(report.read_text())
        return 0

    return guarded(run, stage, body)
