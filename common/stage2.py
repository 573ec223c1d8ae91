"""The stage-2 runner shared by SOPHON and the irreversible backdoor: everything around the algorithm.

The maths is the method's (`--method`, common.methods; SOPHON's is common.sophon.Sophon), one outer loop per
`step()`. This module owns the run: the settings (`stage2_settings`), the run folder, metrics.csv, the
evaluation schedule, the accuracy floor and its rollback, the periodic fine-tune probes, checkpoints,
interrupts and summary.json. What differs between the projects (query loss, NTR data, evaluations, extra
columns and summary keys) comes from their `Stage2Task`.
"""
import argparse
import copy
import logging
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch

from common.checkpoints import (foreign_record, inherit, is_foreign, load_parent, make_checkpoint,
                                model_from_checkpoint, require_given, resolve_checkpoint)
from common import dist
from common.cli import (CommonSettings, PresetSettings, RestrictedSettings, SpeedSettings, UsageError, comma_list,
                        fraction, nonneg_float, nonneg_int, pos_float, pos_int, value_range)
from common.data import DATA_ON_DEVICE, DEVICE_DATA_SHARE, check_name, check_subset_caps, load_domain
from common.finetune import SCHEDULES, SCOPES, Attack, holdout, run_attack
from common.fts import EXP_STEP_RATE, FTS_OPTIMIZERS, HEAD_POLICIES, STEP_WEIGHTS, check_lr_options
from common.methods import METHODS
from common.models import rescale_batchnorm_fed
from common.runs import Interrupted, close_run, config_of, guarded, open_run, read_last
from common.settings import Settings, compose, setting
from common.train import Precision, progress, seed_everything

log = logging.getLogger("sophon")

COMPAT = "the seed's spelling, kept for compatibility"


def mask_share_value(text):
    value = nonneg_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), the share of coordinates frozen (1: all), got {text}")
    return value


# A flag typed on the command line drops a preset's value for the flags it takes the place of
# (common.settings.parse_with_presets): --preset robust --fts_lrs 1e-2 simulates lr 1e-2, not the preset's range.
SUPERSEDES = {"fts_lrs": ("fts_lr_range",), "fast_lr": ("fts_lr_range",)}
CLEAN_HEADS = ("model", "separate")  # --clean_head: common.persistence.SeparateHead for separate


@dataclass
class Stage2Flags(Settings):
    """Stage 2's own settings: the run (schedule, floor, probes) and the method's (SOPHON's FTS and NTR, and
    the irreversible backdoor's persistence parts)."""
    model_path: Optional[Path] = setting(None, "stage-1 checkpoint or run folder (None: newest)", type=Path)
    alpha: float = setting(3.0, "FTS step = alpha * lr", type=pos_float)
    beta: float = setting(5.0, "NTR step = beta * lr", type=pos_float)
    lr: float = setting(1e-4, type=pos_float)
    fast_lr: Optional[float] = setting(1e-4, "simulated fine-tuner's lr when --fts_lrs is not given", type=pos_float)
    fts_loop: int = setting(1, "FTS steps per outer loop (0: none)", type=nonneg_int)
    ntr_loop: int = setting(1, type=nonneg_int)
    total_loop: int = setting(1000, "outer loops; with --resume it may be raised, to train a run (finished or not) on",
                              type=pos_int)
    adaptation_steps: int = setting(50, "inner steps per episode", type=pos_int)
    test_interval: int = setting(25, f"fine-tune test every N loops (0: off); --test_iterval is {COMPAT}",
                                 type=nonneg_int, aliases=("test_iterval",))
    finetune_epochs: int = setting(5, type=pos_int)
    final_finetune_epochs: int = setting(20, f"final fine-tune test (0: skip); --truly_finetune_epochs is {COMPAT}",
                                         type=nonneg_int, aliases=("truly_finetune_epochs",))
    finetune_lr: float = setting(1e-4, type=pos_float)
    min_orig_acc: float = setting(80.0, "original-accuracy floor (%%)", type=float)
    max_strikes: int = setting(5, "floor breaches in a row before stopping", type=pos_int)
    eval_interval: int = setting(25, "original-domain evaluation every N loops (0: only before and after)",
                                 type=nonneg_int)
    save_every: int = setting(50, "write last.pt every N loops", type=pos_int)
    fts_optimizers: list = setting("sgd", "simulated fine-tuners' optimisers, sampled per episode",
                                   type=comma_list(str, FTS_OPTIMIZERS))
    fts_lrs: Optional[list] = setting(None, "simulated fine-tuners' learning rates, sampled per episode (None: "
                                            "[--fast_lr])", type=comma_list(pos_float))
    fts_head: list = setting("reinit", "reinit: the simulated fine-tuner starts from a new head; keep: from the "
                                       "model's", type=comma_list(str, HEAD_POLICIES))
    fts_scope: list = setting("all", "all layers, or the head only (body frozen)", type=comma_list(str, SCOPES))
    fts_schedules: list = setting("constant", "lr schedules inside an episode, over its inner steps, sampled per "
                                              "episode, as the stage-3 attacker's", type=comma_list(str, SCHEDULES))
    fts_lr_range: Optional[list] = setting(None, "draw each episode's lr log-uniformly from [LO, HI] instead of "
                                                 "from --fts_lrs", type=value_range, metavar="LO,HI")
    fts_lr_adapt: float = setting(0.0, "> 0: the simulated attacker learns its lr, one per optimiser, inside "
                                       "--fts_lr_range (MLAC): after each episode log(lr) moves by ETA the way that "
                                       "lowers its cross-entropy on a held-out restricted batch; 0: drawn per episode",
                                  type=nonneg_float, metavar="ETA")
    fts_lr_learned_share: float = setting(1.0, "with --fts_lr_adapt: the share of episodes at the learned lr; the "
                                               "others draw theirs from --fts_lr_range, so attackers at other lrs "
                                               "stay simulated", type=pos_float, metavar="P")
    fts_query_every: int = setting(1, "query loss after every N-th inner step and the last; the others skip the "
                                      "query pass, so longer horizons cost less (TAR queries every 4th of 64 steps)",
                                   type=pos_int, metavar="N")
    fts_step_weights: str = setting("uniform", "weights of the queried steps: uniform, or exp (proportional to "
                                               "exp(%g k/K) at step k: late steps dominate, as in TAR)"
                                    % EXP_STEP_RATE, choices=STEP_WEIGHTS)
    fts_exp_rate: float = setting(EXP_STEP_RATE, "with --fts_step_weights exp: the rate R of exp(R k/K) (TAR's "
                                                 "schedule over its 64 steps: 4)", type=pos_float, metavar="R")
    fts_retain_steps: Optional[list] = setting(
        None, "retain-then-forget episodes (TAR's adversary): the first N of their --adaptation_steps inner steps "
              "train on the original domain, one N drawn per episode from this list; only the restricted steps after "
              "them are queried (with --fts_retain_share)", type=comma_list(pos_int), metavar="N,...")
    fts_retain_share: float = setting(0.0, "the share of episodes that are retain-then-forget (--fts_retain_steps); "
                                           "0: none", type=nonneg_float, metavar="P")
    fts_envs: int = setting(1, "fine-tuners per FTS step, gradients averaged", type=pos_int)
    fts_clip: float = setting(0.5, "max norm of the FTS gradient (the official code's value)", type=pos_float)
    ntr_rep_weight: float = setting(0.0, "> 0: NTR adds this times the L2 distance between the model's features (the "
                                         "head's input) and the frozen stage-1 model's on its batch (TAR's retain "
                                         "loss)", type=nonneg_float, metavar="W")
    clean_loop: int = setting(0, "clean restricted-domain steps per outer loop, through the model's head (SBL's "
                                 "continual learning on clean data, ECCV'24; NTR is its replay); 0: none",
                              type=nonneg_int)
    clean_head: str = setting("model", "the head of the clean steps: the model's own (SBL's: the delivered model then "
                                       "solves the restricted task), or separate: a fresh head of the restricted "
                                       "classes, never delivered, so only the body learns from them",
                              choices=CLEAN_HEADS)
    clean_head_reset: int = setting(0, "with --clean_head separate: draw that head afresh every N outer loops, so the "
                                       "body learns features any new head reads (0: never)", type=nonneg_int,
                                    metavar="N")
    sam_rho: float = setting(0.0, "> 0: NTR and clean steps are sharpness-aware (SAM) with this radius",
                             type=nonneg_float)
    mask_share: float = setting(0.0, "Neurotoxin: freeze this share of the coordinates, those with the largest clean "
                                     "restricted-domain gradient, for the FTS and NTR updates (0: off)",
                                type=mask_share_value)
    mask_every: int = setting(25, "outer loops between mask recomputations", type=pos_int)
    restricted_holdout: Optional[float] = setting(
        None, "leave out of stage 2 the fixed share F of the restricted training split that stage 3's "
              "--train_fractions F gives its attacker or defender (same --subset), so that data is unseen",
        type=fraction, metavar="F")
    rescale: Optional[float] = setting(
        None, "before stage 2, multiply every layer that feeds a BatchNorm by F (its running statistics to match: "
              "the model computes the same function); an optimiser's step then moves those weights F times less, "
              "relatively, in the simulated fine-tuners and in a real attacker alike. None: as the parent",
        type=pos_float, metavar="F")
    rescale_outer_lr: bool = setting(
        False, "with --rescale F: stage 2's own optimisers (FTS, NTR, clean; Adam, whose step does not grow with the "
               "weights) step the rescaled layers at F times their lr, so those layers move as much, relatively, as "
               "at scale 1 while the simulated fine-tuners see the rescaled model; without it stage 2 moves them F "
               "times less, relatively", action=argparse.BooleanOptionalAction)
    data_on_device: str = setting(
        "auto", "keep the training domains' uint8 images on the GPU and gather each batch there (the same batches "
                f"either way); auto: on CUDA when they take at most {DEVICE_DATA_SHARE * 100:.0f}%% of the free GPU "
                "memory. On CPU the data is where the model is already: auto means off", choices=DATA_ON_DEVICE)
    method: str = setting("sophon", "the stage-2 method (common/methods.py)", choices=METHODS)

    def __post_init__(self):
        super().__post_init__()
        if self.bs < 4:
            raise UsageError(f"--bs {self.bs} is too small for stage 2: each batch is split into support and query, "
                             f"two samples each at least (BatchNorm); use --bs 4 or more")
        if self.fts_lrs and self.fts_lr_range:
            raise UsageError("--fts_lrs and --fts_lr_range both choose the simulated fine-tuners' lr; give one")
        if self.fts_lr_range:
            self.fast_lr = None  # unused, so config.json does not show an lr that was never simulated
        try:
            check_lr_options(self.fts_lr_range, self.fts_lr_adapt, self.fts_lr_learned_share)
        except ValueError as err:
            raise UsageError(str(err)) from None
        if self.fts_retain_share > 1:
            raise UsageError(f"--fts_retain_share is a share of the episodes, in [0, 1]; got {self.fts_retain_share}")
        if self.fts_retain_share and not self.fts_retain_steps:
            raise UsageError("--fts_retain_share is the share of retain-then-forget episodes; give their "
                             "--fts_retain_steps too")
        if self.fts_retain_share and max(self.fts_retain_steps) >= self.adaptation_steps:
            raise UsageError(f"--fts_retain_steps {max(self.fts_retain_steps)} leaves no restricted step of "
                             f"--adaptation_steps {self.adaptation_steps}; each N must be below it")
        if self.rescale_outer_lr and not self.rescale:
            raise UsageError("--rescale_outer_lr scales the outer lr of the layers --rescale F rescales; give --rescale "
                             "too")
        if self.fts_loop + self.ntr_loop + self.clean_loop == 0:
            raise UsageError("--fts_loop, --ntr_loop and --clean_loop are all 0: an outer loop would do nothing")
        if self.clean_head == "separate" and not self.clean_loop:
            raise UsageError("--clean_head separate is the head of the clean steps; with --clean_loop 0 there are none")
        if self.clean_head_reset and self.clean_head != "separate":
            raise UsageError("--clean_head_reset draws the separate clean head afresh; give --clean_head separate too")

    @property
    def simulated_lrs(self):
        """The simulated fine-tuners' lrs to sample from: --fts_lrs, or the seed's single --fast_lr."""
        return tuple(self.fts_lrs or [self.fast_lr])


def method_settings():
    """The settings groups of the registered methods that have flags of their own (a method's `settings`), once
    each, in METHODS' order."""
    return tuple(dict.fromkeys(m.settings for m in METHODS.values() if getattr(m, "settings", None)))


def stage2_settings(*groups):
    """A stage-2 script's settings: the preset, the common flags, the restricted domain, stage 2's, the methods'
    own (method_settings), `groups` (e.g. the trigger), the speed flags."""
    return compose("Settings", PresetSettings, CommonSettings, RestrictedSettings, Stage2Flags, *method_settings(),
                   *groups, SpeedSettings, bs=150, dataset="CIFAR10")


Stage2Settings = stage2_settings()  # with the methods registered at import: for code that builds a method itself


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


class Stage2Runner:
    """Drives a stage-2 method (common.methods) through a run folder: evaluation, floor and rollback, probes,
    checkpoints. `settings`: the run's (total_loop, eval_interval, test_interval, save_every, min_orig_acc,
    max_strikes, and the probes' finetune_epochs, final_finetune_epochs, finetune_lr, bs, seed).

    metrics.csv: loop, the method's losses, the original-domain figures, rolled_back, the method's labels
    (what its step drew), seconds. A loop with a non-finite loss is rolled back like a floor breach."""

    def __init__(self, algo, task, settings, run, checkpoint_meta):
        self.algo, self.task, self.settings, self.run, self.meta = algo, task, settings, run, checkpoint_meta
        self.metrics = run.csv("metrics.csv", ["loop", *algo.losses, "orig_test_acc", *task.metric_columns,
                                               "rolled_back", *algo.labels, "seconds"])
        self.probes = Probes(algo, task, settings, run)
        self.tests = self.probes.tests
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
            for log_file in (self.metrics, self.tests):
                log_file.keep(lambda r: False)
            return
        state = read_last(self.run)
        self.algo.load_state_dict(state)
        self.loop, self.strikes = int(state["loop"]), int(state["strikes"])
        self.snapshot = _to_device(state["snapshot"], self.algo.precision.device)
        self.orig_before, self.floor_active, self.last_eval = state["orig_before"], state["floor_active"], state["last_eval"]
        torch.set_rng_state(state["torch_rng"])
        for log_file in (self.metrics, self.tests):
            log_file.keep(lambda r: int(r["loop"]) <= self.loop)
        log.info("resumed at loop %d of %d", self.loop, self.settings.total_loop)

    # ---- the run ---------------------------------------------------------------------------------

    def train(self, interrupts):
        """Run the remaining loops; returns the summary, or raises Interrupted after writing last.pt."""
        s = self.settings
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
            losses = self._loop()
            if self.strikes >= s.max_strikes:
                log.warning("%d strikes in a row: stopping early at loop %d", self.strikes, self.loop)
                stopped_early = True
                self.algo.restore(self.snapshot)
                self.last_eval = self.snapshot["eval"]
                break
            bar.update(1)
            bar.set_postfix({k.split("_")[0]: f"{v:.3f}" for k, v in losses.items()})
            if s.test_interval and self.loop % s.test_interval == 0 and self.algo.world.main:
                curve = self.probes.finetune_test(s.finetune_epochs, self.loop)
                log.info("loop %d fine-tune test: restricted acc %s", self.loop, [round(c["test_acc"], 2) for c in curve])
                self.run.save(self.checkpoint(), f"loop{self.loop:06d}.pt")
            if self.loop % s.save_every == 0:
                self.save_last()
        bar.close()
        return self.finish(stopped_early)

    def _loop(self):
        """One outer loop of the method, its metrics row, and the floor (or NaN) rule; returns its losses."""
        s, start = self.settings, time.perf_counter()
        self.loop += 1
        values = self.algo.step()
        losses = {k: v for k, v in values.items() if isinstance(v, float)}
        row = {"loop": self.loop, **values, "rolled_back": 0}
        finite = all(math.isfinite(v) for v in losses.values())
        due = (s.eval_interval and self.loop % s.eval_interval == 0) or self.loop == s.total_loop
        if finite and due:
            figures = self._evaluate_orig()
            row.update({k: v for k, v in figures.items() if k in self.metrics.header})
        row["seconds"] = time.perf_counter() - start
        self.metrics.append(row)
        if not finite:
            self._rollback("non-finite loss (%s)" % ", ".join(f"{k} {v}" for k, v in losses.items()))
        elif due:
            if self.floor_active and figures["orig_test_acc"] <= s.min_orig_acc:
                self._rollback(f"original accuracy {figures['orig_test_acc']:.2f} <= floor {s.min_orig_acc}")
            else:
                self.strikes = 0
                self.snapshot = self._snapshot()
        return losses

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
                    self.strikes, self.settings.max_strikes)

    def checkpoint(self, metrics=None):
        return make_checkpoint(self.algo.model, metrics=metrics or {"loop": self.loop, **(self.last_eval or {})},
                               **self.meta)

    def finish(self, stopped_early):
        s = self.settings
        final_orig, final_test = self.last_eval, None
        if s.final_finetune_epochs and self.algo.world.main:
            curve = self.probes.finetune_test(s.final_finetune_epochs, self.loop, "final")
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


class Probes:
    """The fine-tune probes: the default attack (SPEC §9) on a copy of the model, rows to finetune_tests.csv."""

    def __init__(self, algo, task, settings, run):
        self.algo, self.task, self.settings = algo, task, settings
        self.tests = run.csv("finetune_tests.csv", ["loop", "kind", "epoch", "test_acc", *task.probe_columns])

    def finetune_test(self, epochs, loop, kind="periodic"):
        """On rank 0 alone (the others get None); returns the figures after each epoch."""
        if not self.algo.world.main:
            return None
        s, precision = self.settings, self.algo.precision
        probe = copy.deepcopy(self.algo.model)
        attack = Attack("direct_all", "momentum", s.finetune_lr, s.bs, epochs, s.seed)

        def record(epoch, figures):
            self.tests.append({"loop": loop, "kind": kind, "epoch": epoch, **figures})

        return run_attack(probe, self.task.restricted_train, attack, precision.device, precision,
                          self.task.eval_restricted, on_epoch=record)


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
    args.check()  # again: --resume has filled values in since parsing
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


def run_stage2_script(args, interrupts, project, stage, s, task):
    """Build the method, open the run folder, train, close; returns the exit code. The method is built first, so
    that settings only it can check (a layer the model lacks) stop the script before a run folder exists."""
    algo = METHODS[args.method].build(args, s.model, task, s.precision)
    run = open_run(args, project, "stage2_train", args.dataset, s.config)
    for note in {d.note for d in (s.orig_train, s.restr_train) if d.note}:
        run.log_note(note)
    log.info("stage 2 on %s: %s, method %s", s.device, s.precision.describe(), args.method)
    meta = dict(arch=args.arch, dataset=args.dataset, stage=stage, parent=s.parent, config=s.config)
    runner = Stage2Runner(algo, task, args, run, meta)

    def body():
        if args.resume is not None:
            runner.load_last()
        summary = runner.train(interrupts)
        if run.writes:
            close_run(run, stage, summary, len(s.restr_test), run.ckpt_dir / "final.pt")
        return 0

    return guarded(run, stage, body)
