"""The stage-2 runner shared by SOPHON and the irreversible backdoor: everything around the algorithm.

The maths is `common.sophon.Sophon` (one outer loop per `step()`). This module owns the run: flags, the
run folder, metrics.csv, the evaluation schedule, the accuracy floor and its rollback, the periodic
fine-tune probes, checkpoints, interrupts and summary.json. What differs between the projects (query
loss, NTR data, evaluations, extra columns and summary keys) comes from their `Stage2Task`.
"""
import argparse
import copy
import logging
import math
import time
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from common.checkpoints import (foreign_record, inherit, is_foreign, load_parent, make_checkpoint,
                                model_from_checkpoint, require_given, resolve_checkpoint)
from common import dist
from common.cli import UsageError, comma_list, fraction, nonneg_float, nonneg_int, pos_float, pos_int, value_range
from common.data import DATA_ON_DEVICE, DEVICE_DATA_SHARE, check_name, check_subset_caps, load_domain
from common.finetune import SCHEDULES, SCOPES, Attack, holdout, run_attack
from common.fts import EXP_STEP_RATE, FTS_OPTIMIZERS, HEAD_POLICIES, STEP_WEIGHTS
from common.models import batchnorm_fed_layers, rescale_batchnorm_fed
from common.runs import Interrupted, close_run, config_of, guarded, open_run, read_last
from common.sophon import Sophon, SophonConfig
from common.train import Precision, progress, seed_everything

log = logging.getLogger("sophon")

HEADER = ["loop", "fts_loss", "ntr_loss", "clean_loss", "orig_test_acc", "rolled_back",
          "fts_optimizer", "fts_lr", "fts_head", "fts_scope", "fts_schedule", "seconds"]
COMPAT = "the seed's spelling, kept for compatibility"


def mask_share_value(text):
    value = nonneg_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), the share of coordinates frozen (1: all), got {text}")
    return value


def learned_share_value(text):
    value = pos_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], a share of the episodes, got {text}")
    return value


# A flag typed on the command line drops a preset's value for the flags it takes the place of
# (common.cli.parse_with_presets): --preset robust --fts_lrs 1e-2 simulates lr 1e-2, not the preset's range.
SUPERSEDES = {"fts_lrs": ("fts_lr_range",), "fast_lr": ("fts_lr_range",)}


def stage2_flags(*, model_path, alpha, beta, lr, fast_lr, fts_loop, ntr_loop, total_loop, adaptation_steps,
                 test_interval, finetune_epochs, final_finetune_epochs, finetune_lr, min_orig_acc, max_strikes,
                 eval_interval, save_every, fts_optimizers, fts_lrs, fts_head, fts_scope, fts_envs, fts_clip,
                 fts_schedules="constant", fts_lr_range=None, fts_lr_adapt=0.0, fts_lr_learned_share=1.0,
                 fts_query_every=1, fts_step_weights="uniform",
                 clean_loop=0, sam_rho=0.0, mask_share=0.0, mask_every=25, restricted_holdout=None,
                 data_on_device="auto", rescale=None, rescale_outer_lr=False):
    """Stage-2 flags; each default is the script's constant of the same (upper-case) name. Comma-list
    constants are written as on the command line ("sgd,adam"): argparse parses a string default too."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--model_path", type=Path, default=model_path, help="stage-1 checkpoint or run folder (None: newest)")
    p.add_argument("--alpha", type=pos_float, default=alpha, help="FTS step = alpha * lr")
    p.add_argument("--beta", type=pos_float, default=beta, help="NTR step = beta * lr")
    p.add_argument("--lr", type=pos_float, default=lr)
    p.add_argument("--fast_lr", type=pos_float, default=fast_lr, help="simulated fine-tuner's lr when --fts_lrs is not given")
    p.add_argument("--fts_loop", type=nonneg_int, default=fts_loop, help="FTS steps per outer loop (0: none)")
    p.add_argument("--ntr_loop", type=nonneg_int, default=ntr_loop)
    p.add_argument("--total_loop", type=pos_int, default=total_loop,
                   help="outer loops; with --resume it may be raised, to train a run (finished or not) on")
    p.add_argument("--adaptation_steps", type=pos_int, default=adaptation_steps, help="inner steps per episode")
    p.add_argument("--test_interval", "--test_iterval", dest="test_interval", type=nonneg_int, default=test_interval,
                   help=f"fine-tune test every N loops (0: off); --test_iterval is {COMPAT}")
    p.add_argument("--finetune_epochs", type=pos_int, default=finetune_epochs)
    p.add_argument("--final_finetune_epochs", "--truly_finetune_epochs", dest="final_finetune_epochs",
                   type=nonneg_int, default=final_finetune_epochs,
                   help=f"final fine-tune test (0: skip); --truly_finetune_epochs is {COMPAT}")
    p.add_argument("--finetune_lr", type=pos_float, default=finetune_lr)
    p.add_argument("--min_orig_acc", type=float, default=min_orig_acc, help="original-accuracy floor (%%)")
    p.add_argument("--max_strikes", type=pos_int, default=max_strikes, help="floor breaches in a row before stopping")
    p.add_argument("--eval_interval", type=nonneg_int, default=eval_interval,
                   help="original-domain evaluation every N loops (0: only before and after)")
    p.add_argument("--save_every", type=pos_int, default=save_every, help="write last.pt every N loops")
    p.add_argument("--fts_optimizers", default=fts_optimizers, type=comma_list(str, FTS_OPTIMIZERS),
                   help=f"simulated fine-tuners' optimisers, sampled per episode ({', '.join(FTS_OPTIMIZERS)})")
    p.add_argument("--fts_lrs", default=fts_lrs, type=comma_list(pos_float),
                   help="simulated fine-tuners' learning rates, sampled per episode (None: [--fast_lr])")
    p.add_argument("--fts_head", default=fts_head, type=comma_list(str, HEAD_POLICIES),
                   help="reinit: the simulated fine-tuner starts from a new head; keep: from the model's")
    p.add_argument("--fts_scope", default=fts_scope, type=comma_list(str, SCOPES),
                   help="all layers, or the head only (body frozen)")
    p.add_argument("--fts_schedules", default=fts_schedules, type=comma_list(str, SCHEDULES),
                   help="lr schedules inside an episode, over its inner steps, sampled per episode "
                        f"({', '.join(SCHEDULES)}; as the stage-3 attacker's)")
    p.add_argument("--fts_lr_range", default=fts_lr_range, type=value_range, metavar="LO,HI",
                   help="draw each episode's lr log-uniformly from [LO, HI] instead of from --fts_lrs")
    p.add_argument("--fts_lr_adapt", default=fts_lr_adapt, type=nonneg_float, metavar="ETA",
                   help="> 0: the simulated attacker learns its lr, one per optimiser, inside --fts_lr_range "
                        "(MLAC): after each episode log(lr) moves by ETA the way that lowers its cross-entropy on "
                        "a held-out restricted batch; 0: drawn per episode")
    p.add_argument("--fts_lr_learned_share", default=fts_lr_learned_share, type=learned_share_value, metavar="P",
                   help="with --fts_lr_adapt: the share of episodes at the learned lr; the others draw theirs from "
                        "--fts_lr_range, so attackers at other lrs stay simulated")
    p.add_argument("--fts_query_every", default=fts_query_every, type=pos_int, metavar="N",
                   help="query loss after every N-th inner step and the last; the others skip the query pass, so "
                        "longer horizons cost less (TAR queries every 4th of 64 steps)")
    p.add_argument("--fts_step_weights", default=fts_step_weights, choices=STEP_WEIGHTS,
                   help="weights of the queried steps: uniform, or exp (proportional to exp(%g k/K) at step k: "
                        "late steps dominate, as in TAR)" % EXP_STEP_RATE)
    p.add_argument("--fts_envs", default=fts_envs, type=pos_int, help="fine-tuners per FTS step, gradients averaged")
    p.add_argument("--fts_clip", default=fts_clip, type=pos_float, help="max norm of the FTS gradient")
    p.add_argument("--clean_loop", type=nonneg_int, default=clean_loop,
                   help="clean restricted-domain steps per outer loop, through the model's head (SBL's continual "
                        "learning on clean data, ECCV'24; NTR is its replay); 0: none")
    p.add_argument("--sam_rho", type=nonneg_float, default=sam_rho,
                   help="> 0: NTR and clean steps are sharpness-aware (SAM) with this radius")
    p.add_argument("--mask_share", type=mask_share_value, default=mask_share,
                   help="Neurotoxin: freeze this share of the coordinates, those with the largest clean "
                        "restricted-domain gradient, for the FTS and NTR updates (0: off)")
    p.add_argument("--mask_every", type=pos_int, default=mask_every, help="outer loops between mask recomputations")
    p.add_argument("--restricted_holdout", type=fraction, default=restricted_holdout, metavar="F",
                   help="leave out of stage 2 the fixed share F of the restricted training split that stage 3's "
                        "--train_fractions F gives its attacker or defender (same --subset), so that data is unseen")
    p.add_argument("--rescale", type=pos_float, default=rescale, metavar="F",
                   help="before stage 2, multiply every layer that feeds a BatchNorm by F (its running statistics to "
                        "match: the model computes the same function); an optimiser's step then moves those weights F "
                        "times less, relatively, in the simulated fine-tuners and in a real attacker alike. None: as "
                        "the parent")
    p.add_argument("--rescale_outer_lr", action=argparse.BooleanOptionalAction, default=rescale_outer_lr,
                   help="with --rescale F: stage 2's own optimisers (FTS, NTR, clean; Adam, whose step does not grow "
                        "with the weights) step the rescaled layers at F times their lr, so those layers move as much, "
                        "relatively, as at scale 1 while the simulated fine-tuners see the rescaled model; without it "
                        "stage 2 moves them F times less, relatively")
    p.add_argument("--data_on_device", choices=DATA_ON_DEVICE, default=data_on_device,
                   help="keep the training domains' uint8 images on the GPU and gather each batch there (the same "
                        f"batches either way); auto: on CUDA when they take at most {DEVICE_DATA_SHARE * 100:.0f}%% of the "
                        "free GPU memory. On CPU the data is where the model is already: auto means off")
    return p


@dataclass
class Stage2Task:
    """What differs between the projects; the runner asks the task, never the loss name."""
    query_loss: Callable  # (net, x_uint8, y) -> FTE loss at the adapted weights
    restricted_train: object  # Domain the simulated fine-tuner trains on
    ntr_train: object  # Domain of the NTR steps (clean or poisoned original domain)
    eval_orig: Callable  # model -> {"orig_test_acc": ..., ...}
    eval_restricted: Callable  # model -> {"test_acc": ..., ...} after fine-tuning
    loss_type: str
    metric_columns: tuple = ()  # eval_orig figures written to metrics.csv besides orig_test_acc
    probe_columns: tuple = ()  # eval_restricted figures written to finetune_tests.csv besides test_acc
    summary_keys: Callable = lambda final_orig, final_finetune: {}  # project-specific summary.json keys


@dataclass(frozen=True)
class Schedule:
    """When the runner evaluates, probes, saves and gives up."""
    total_loop: int
    eval_interval: int = 25
    test_interval: int = 25
    save_every: int = 50
    finetune_epochs: int = 5
    final_finetune_epochs: int = 20
    finetune_lr: float = 1e-4
    bs: int = 150  # the probes' fine-tuning batch size
    min_orig_acc: float = 80.0
    max_strikes: int = 5
    seed: int = 0

    @classmethod
    def from_args(cls, args):
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


class Stage2Runner:
    """Drives a `Sophon` through a run folder: evaluation, floor and rollback, probes, checkpoints."""

    def __init__(self, algo, task, schedule, run, checkpoint_meta):
        self.algo, self.task, self.schedule, self.run, self.meta = algo, task, schedule, run, checkpoint_meta
        self.metrics = run.csv("metrics.csv", HEADER[:5] + list(task.metric_columns) + HEADER[5:])
        self.tests = run.csv("finetune_tests.csv", ["loop", "kind", "epoch", "test_acc", *task.probe_columns])
        self.loop, self.strikes, self.snapshot = 0, 0, None
        self.orig_before, self.floor_active, self.last_eval = None, True, None

    # ---- state -----------------------------------------------------------------------------------

    def _snapshot(self):
        return {**self.algo.snapshot(), "loop": self.loop, "eval": self.last_eval}

    def save_last(self):
        state = {**self.algo.state_dict(), "loop": self.loop, "snapshot": self.snapshot, "strikes": self.strikes,
                 "orig_before": self.orig_before, "floor_active": self.floor_active, "last_eval": self.last_eval,
                 "torch_rng": torch.get_rng_state()}
        self.run.save(_to_cpu(state), "last.pt")

    def load_last(self):
        """Continue from last.pt; rows written after it (a run killed between saves) are dropped first."""
        if not (self.run.ckpt_dir / "last.pt").exists():  # killed before its first save
            log.info("no checkpoints/last.pt yet: the run starts over")
            self.metrics.keep(lambda r: False)
            self.tests.keep(lambda r: False)
            return
        state = read_last(self.run)
        self.algo.load_state_dict(state)
        self.loop, self.strikes = int(state["loop"]), int(state["strikes"])
        self.snapshot = _to_device(state["snapshot"], self.algo.precision.device)
        self.orig_before, self.floor_active, self.last_eval = state["orig_before"], state["floor_active"], state["last_eval"]
        torch.set_rng_state(state["torch_rng"])
        self.metrics.keep(lambda r: int(r["loop"]) <= self.loop)
        self.tests.keep(lambda r: int(r["loop"]) <= self.loop)
        log.info("resumed at loop %d of %d", self.loop, self.schedule.total_loop)

    # ---- the run ---------------------------------------------------------------------------------

    def train(self, interrupts):
        """Run the remaining loops; returns the summary, or raises Interrupted after writing last.pt."""
        s = self.schedule
        if self.orig_before is None:
            self.orig_before = self._evaluate_orig()
            log.info("before stage 2: %s", _fmt(self.orig_before))
            if self.orig_before["orig_test_acc"] <= s.min_orig_acc:
                self.floor_active = False
                log.warning("original accuracy %.2f is already at or below --min_orig_acc %.2f: the floor rule is "
                            "off for this run", self.orig_before["orig_test_acc"], s.min_orig_acc)
            self.snapshot = self._snapshot()
        bar = progress(total=s.total_loop, initial=self.loop, desc="stage 2", disable=not self.run.writes)
        stopped_early = False
        while self.loop < s.total_loop:
            if interrupts.due():
                self.save_last()
                raise Interrupted(f"loop {self.loop}")
            start = time.perf_counter()
            self.loop += 1
            result = self.algo.step()
            tuners = result.finetuners
            losses = {"fts_loss": result.fts_loss, "ntr_loss": result.ntr_loss, "clean_loss": result.clean_loss}
            row = {"loop": self.loop, **losses, "rolled_back": 0,
                   "fts_optimizer": ";".join(t.optimizer for t in tuners), "fts_lr": ";".join(f"{t.lr:g}" for t in tuners),
                   "fts_head": ";".join(t.head for t in tuners), "fts_scope": ";".join(t.scope for t in tuners),
                   "fts_schedule": ";".join(t.schedule for t in tuners)}
            finite = all(v is None or math.isfinite(v) for v in losses.values())
            due = (s.eval_interval and self.loop % s.eval_interval == 0) or self.loop == s.total_loop
            if finite and due:
                figures = self._evaluate_orig()
                row.update({k: v for k, v in figures.items() if k in self.metrics.header})
            row["seconds"] = time.perf_counter() - start
            self.metrics.append(row)
            if not finite:
                self._rollback("non-finite loss (%s)" % ", ".join(f"{k} {v}" for k, v in losses.items() if v is not None))
            elif due:
                if self.floor_active and figures["orig_test_acc"] <= s.min_orig_acc:
                    self._rollback(f"original accuracy {figures['orig_test_acc']:.2f} <= floor {s.min_orig_acc}")
                else:
                    self.strikes = 0
                    self.snapshot = self._snapshot()
            if self.strikes >= s.max_strikes:
                log.warning("%d strikes in a row: stopping early at loop %d", self.strikes, self.loop)
                stopped_early = True
                self.algo.restore(self.snapshot)
                self.last_eval = self.snapshot["eval"]
                break
            bar.update(1)
            bar.set_postfix({k.split("_")[0]: f"{v:.3f}" for k, v in losses.items() if v is not None})
            if s.test_interval and self.loop % s.test_interval == 0 and self.algo.world.main:
                curve = self.finetune_test(s.finetune_epochs, self.loop)
                log.info("loop %d fine-tune test: restricted acc %s", self.loop, [round(c["test_acc"], 2) for c in curve])
                self.run.save(self.checkpoint(), f"loop{self.loop:06d}.pt")
            if self.loop % s.save_every == 0:
                self.save_last()
        bar.close()
        return self.finish(stopped_early)

    def _evaluate_orig(self):
        """On rank 0 alone; every rank gets its figures, so that all take the same floor decision."""
        world = self.algo.world
        self.last_eval = world.share(self.task.eval_orig(self.algo.model) if world.main else None)
        return self.last_eval

    def _rollback(self, reason):
        """Back to the snapshot of the last passing evaluation; the loops since are marked rolled back."""
        since = self.snapshot["loop"]
        self.algo.restore(self.snapshot)
        self.last_eval = self.snapshot["eval"]
        rows = self.metrics.rows()
        for r in rows:
            if int(r["loop"]) > since:
                r["rolled_back"] = 1
        self.metrics.rewrite(rows)
        self.strikes += 1
        log.warning("%s at loop %d: rolled back to loop %d (strike %d of %d)", reason, self.loop, since,
                    self.strikes, self.schedule.max_strikes)

    def finetune_test(self, epochs, loop, kind="periodic"):
        """The default attack (SPEC §9) on a copy of the model, on rank 0 alone (the others get None); rows
        go to finetune_tests.csv."""
        if not self.algo.world.main:
            return None
        s, precision = self.schedule, self.algo.precision
        probe = copy.deepcopy(self.algo.model)
        attack = Attack("direct_all", "momentum", s.finetune_lr, s.bs, epochs, s.seed)

        def record(epoch, figures):
            self.tests.append({"loop": loop, "kind": kind, "epoch": epoch, **figures})

        return run_attack(probe, self.task.restricted_train, attack, precision.device, precision,
                          self.task.eval_restricted, on_epoch=record)

    def checkpoint(self, metrics=None):
        return make_checkpoint(self.algo.model, metrics=metrics or {"loop": self.loop, **(self.last_eval or {})},
                               **self.meta)

    def finish(self, stopped_early):
        s = self.schedule
        final_orig, final_test = self.last_eval, None
        if s.final_finetune_epochs and self.algo.world.main:
            curve = self.finetune_test(s.final_finetune_epochs, self.loop, "final")
            final_test = curve[-1]
            log.info("final fine-tune test (%d epochs): %s", s.final_finetune_epochs,
                     [round(c["test_acc"], 2) for c in curve])
        summary = {"loss_type": self.task.loss_type,
                   "orig_test_acc_before": self.orig_before["orig_test_acc"],
                   "orig_test_acc": final_orig["orig_test_acc"],
                   "finetune_restrict_test_acc": None if final_test is None else final_test["test_acc"],
                   "loops_completed": self.loop, "stopped_early": stopped_early,
                   "final_orig": final_orig, "final_finetune": final_test,
                   **self.task.summary_keys(final_orig, final_test)}
        self.run.save(self.checkpoint(summary), "final.pt")
        self.save_last()
        return summary


def _fmt(figures):
    return ", ".join(f"{k} {v:.2f}" for k, v in figures.items())


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_device(v, device) for v in obj]
    return obj


# ---- the stage scripts' wiring --------------------------------------------------------------------

@dataclass
class Stage2Setup:
    parent: object
    ckpt: dict
    orig_train: object
    orig_test: object
    restr_train: object
    restr_test: object
    device: object
    precision: object
    model: object
    config: dict


def setup_stage2(args, project, stage, inherited=("arch", "orig_dataset", "image_size")):
    """Every check of a stage-2 run, before its folder exists: parent checkpoint, inherited flags, data.
    The parent may be a foreign state_dict / .safetensors file; then every inherited flag but --image_size
    must be given."""
    if args.bs < 4:
        raise UsageError(f"--bs {args.bs} is too small for stage 2: each batch is split into support and query, "
                         f"two samples each at least (BatchNorm); use --bs 4 or more")
    if args.fts_lrs and args.fts_lr_range:
        raise UsageError("--fts_lrs and --fts_lr_range both choose the simulated fine-tuners' lr; give one")
    if args.fts_lr_range:
        args.fast_lr = None  # unused, so config.json does not show an lr that was never simulated
    if args.fts_lr_adapt and args.fts_lr_range is None:
        raise UsageError("--fts_lr_adapt learns the lr inside --fts_lr_range LO,HI; give that range too")
    if args.rescale_outer_lr and not args.rescale:
        raise UsageError("--rescale_outer_lr scales the outer lr of the layers --rescale F rescales; give --rescale too")
    if args.fts_lr_learned_share != 1 and not args.fts_lr_adapt:
        raise UsageError("--fts_lr_learned_share is the share of episodes at the learned lr; give --fts_lr_adapt too")
    parent = resolve_checkpoint(args.model_path, project, "stage1_pretrain")
    ckpt = load_parent(parent, args)
    if is_foreign(ckpt):
        require_given(args, [n for n in inherited if n != "image_size"], parent)
    inherit(args, ckpt, parent, inherited)
    check_name(args.dataset)
    if args.dataset == args.orig_dataset:
        raise UsageError(f"restricted --dataset {args.dataset} equals the original domain; choose another")
    load = partial(load_domain, root=args.data_root, image_size=args.image_size, download=args.download,
                   cache_dir=args.cache_dir, num_workers=args.num_workers)
    domains = [load(name, train=train, cap=args.subset if train else args.test_subset)
               for name in (args.orig_dataset, args.dataset) for train in (True, False)]
    check_subset_caps(args, domains)
    if args.fts_loop + args.ntr_loop + args.clean_loop == 0:
        raise UsageError("--fts_loop, --ntr_loop and --clean_loop are all 0: an outer loop would do nothing")
    if args.restricted_holdout:
        domains[2] = holdout(domains[2], args.restricted_holdout)
    device = dist.world().device(args.device)
    for d in domains:
        d.pin_for(device)
    precision = Precision(device, args.amp, args.channels_last, args.compile)
    seed_everything(args.seed)
    model = model_from_checkpoint(ckpt, parent)
    if args.rescale:
        rescale_batchnorm_fed(model, args.image_size or 224, factor=args.rescale)
    model = precision.prepare(model)
    config = config_of(args, stage=stage, parent=str(parent), model_path=str(parent), **foreign_record(ckpt))
    return Stage2Setup(parent, ckpt, *domains, device, precision, model, config)


def outer_lr_scale(model, args):
    """{parameter name: F} for the layers `--rescale F` rescaled, when `--rescale_outer_lr`; else None."""
    if not args.rescale_outer_lr:
        return None
    rescaled = {id(p) for layer, _ in batchnorm_fed_layers(model, args.image_size or 224)
                for p in layer.parameters(recurse=False)}
    return {name: args.rescale for name, p in model.named_parameters() if id(p) in rescaled}


def run_stage2_script(args, interrupts, project, stage, s, task):
    """Open the run folder, train, close; returns the exit code."""
    run = open_run(args, project, "stage2_train", args.dataset, s.config)
    for note in {d.note for d in (s.orig_train, s.restr_train) if d.note}:
        run.log_note(note)
    algo = Sophon(s.model, task.query_loss, task.restricted_train, task.ntr_train, SophonConfig.from_args(args),
                  s.precision, data_on_device=args.data_on_device, lr_scale=outer_lr_scale(s.model, args))
    log.info("stage 2 on %s: %s, training data on the %s", s.device, s.precision.describe(),
             "device" if algo.data_on_device else "host")
    meta = dict(arch=args.arch, dataset=args.dataset, stage=stage, parent=s.parent, config=s.config)
    runner = Stage2Runner(algo, task, Schedule.from_args(args), run, meta)

    def body():
        if args.resume is not None:
            runner.load_last()
        summary = runner.train(interrupts)
        if run.writes:
            close_run(run, stage, summary, len(s.restr_test), run.ckpt_dir / "final.pt")
        return 0

    return guarded(run, stage, body)
