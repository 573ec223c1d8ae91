"""The stage-2 outer loop shared by SOPHON and the irreversible backdoor: FTS, NTR, the accuracy floor.

One outer loop = `fts_loop` FTS steps (simulated fine-tuning on the restricted domain, penalised by the
task's query loss; clipped, Adam at alpha*lr) + `ntr_loop` NTR steps (CE on the original domain, a
separate Adam at beta*lr). The projects differ only in their `Stage2Task` (query loss, NTR data, what
is evaluated), so the loop itself exists once.
"""
import argparse
import copy
import logging
import math
import time
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F

from common.checkpoints import (atomic_save, inherit, load_checkpoint, load_file, make_checkpoint,
                                model_from_checkpoint, resolve_checkpoint)
from common.cli import UsageError, nonneg_int, pos_float, pos_int
from common.data import BatchStream, check_name, check_subset_caps, load_domain
from common.finetune import Attack, run_attack
from common.fts import FTS, FineTunerSampler, fts_flags
from common.runs import Interrupts, close_run, config_of, guarded, open_run
from common.train import Precision, progress, resolve_device, seed_everything

log = logging.getLogger("sophon")

HEADER = ["loop", "fts_loss", "ntr_loss", "orig_test_acc", "rolled_back",
          "fts_optimizer", "fts_lr", "fts_head", "fts_scope", "seconds"]


def stage2_flags(c, head_default):
    """Stage-2 flags with the script's constants `c` (a dict of the seed's names) as defaults."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--model_path", type=str, default=c["MODEL_PATH"], help="stage-1 checkpoint or run folder (None: newest)")
    p.add_argument("--alpha", type=pos_float, default=c["ALPHA"], help="FTS step = alpha * lr")
    p.add_argument("--beta", type=pos_float, default=c["BETA"], help="NTR step = beta * lr")
    p.add_argument("--lr", type=pos_float, default=c["LR"])
    p.add_argument("--fast_lr", type=pos_float, default=c["FAST_LR"], help="simulated fine-tuner's lr")
    p.add_argument("--fts_loop", type=pos_int, default=c["FTS_LOOP"])
    p.add_argument("--ntr_loop", type=nonneg_int, default=c["NTR_LOOP"])
    p.add_argument("--total_loop", type=pos_int, default=c["TOTAL_LOOP"])
    p.add_argument("--adaptation_steps", type=pos_int, default=c["ADAPTATION_STEPS"], help="inner steps per episode")
    p.add_argument("--test_interval", "--test_iterval", dest="test_interval", type=nonneg_int, default=c["TEST_INTERVAL"],
                   help="fine-tune test every N loops (0: off)")
    p.add_argument("--finetune_epochs", type=pos_int, default=c["FINETUNE_EPOCHS"])
    p.add_argument("--final_finetune_epochs", "--truly_finetune_epochs", dest="final_finetune_epochs",
                   type=nonneg_int, default=c["FINAL_FINETUNE_EPOCHS"], help="final fine-tune test (0: skip)")
    p.add_argument("--finetune_lr", type=pos_float, default=c["FINETUNE_LR"])
    p.add_argument("--min_orig_acc", type=float, default=c["MIN_ORIG_ACC"], help="original-accuracy floor (%%)")
    p.add_argument("--max_strikes", type=pos_int, default=c["MAX_STRIKES"], help="floor breaches in a row before stopping")
    p.add_argument("--eval_interval", type=nonneg_int, default=c["EVAL_INTERVAL"],
                   help="original-domain evaluation every N loops (0: only before and after)")
    p.add_argument("--save_every", type=pos_int, default=c["SAVE_EVERY"], help="write last.pt every N loops")
    fts_flags(p, head_default)
    return p


@dataclass
class Stage2Task:
    """What differs between the projects."""
    query_loss: callable  # (net, x_uint8, y) -> loss at the adapted weights
    restricted_train: object  # Domain the simulated fine-tuner trains on
    ntr_train: object  # Domain of the NTR steps (clean or poisoned original domain)
    eval_orig: callable  # model -> {"orig_test_acc": ..., ...}
    eval_restricted: callable  # model -> {"test_acc": ..., ...} after fine-tuning
    loss_type: str
    extra_columns: list = field(default_factory=list)


class Stage2:
    def __init__(self, args, run, model, task, device, precision, ckpt_meta):
        self.args, self.run, self.model, self.task = args, run, model, task
        self.device, self.precision, self.meta = device, precision, ckpt_meta
        params = list(model.parameters())
        self.fts_opt = torch.optim.Adam(params, lr=args.alpha * args.lr)
        self.ntr_opt = torch.optim.Adam(params, lr=args.beta * args.lr)
        to_input = lambda x: task.restricted_train.to_input(x, device, None, precision.channels_last)
        self.fts = FTS(model, task.query_loss, to_input, precision, seed=args.seed + 1)
        self.sampler = FineTunerSampler(args.fts_optimizers, args.fts_lrs or [args.fast_lr], args.fts_head,
                                        args.fts_scope, seed=args.seed + 2)
        self.restricted_stream = BatchStream(len(task.restricted_train), args.bs, seed=args.seed + 3)
        self.ntr_stream = BatchStream(len(task.ntr_train), args.bs, seed=args.seed + 4)
        self.model_fwd = precision.maybe_compile(model)
        self.metrics = run.csv("metrics.csv", HEADER[:4] + task.extra_columns + HEADER[4:])
        self.tests = run.csv("finetune_tests.csv", ["loop", "kind", "epoch", "test_acc"] + [
            k for k in ("asr", "untargeted_asr", "ra") if task.loss_type == "target_ce"])
        self.loop, self.strikes, self.snapshot = 0, 0, None
        self.orig_before, self.floor_active, self.last_eval = None, True, None

    # ---- state ---------------------------------------------------------------------------------

    def _state(self):
        return {"model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
                "fts_opt": copy.deepcopy(self.fts_opt.state_dict()),
                "ntr_opt": copy.deepcopy(self.ntr_opt.state_dict()), "loop": self.loop, "eval": self.last_eval}

    def _restore(self, state):
        self.model.load_state_dict(state["model"])
        self.fts_opt.load_state_dict(state["fts_opt"])
        self.ntr_opt.load_state_dict(state["ntr_opt"])

    def save_last(self):
        state = {"loop": self.loop, "model": self.model.state_dict(), "fts_opt": self.fts_opt.state_dict(),
                 "ntr_opt": self.ntr_opt.state_dict(), "snapshot": self.snapshot, "strikes": self.strikes,
                 "orig_before": self.orig_before, "floor_active": self.floor_active, "last_eval": self.last_eval,
                 "fts_gen": self.fts.gen.get_state(), "sampler": self.sampler.state_dict(),
                 "restricted_stream": self.restricted_stream.state_dict(), "ntr_stream": self.ntr_stream.state_dict(),
                 "torch_rng": torch.get_rng_state()}
        atomic_save(_to_cpu(state), self.run.ckpt_dir / "last.pt")

    def load_last(self):
        state = load_file(self.run.ckpt_dir / "last.pt")
        self.loop, self.strikes = int(state["loop"]), int(state["strikes"])
        self.model.load_state_dict(state["model"])
        self.fts_opt.load_state_dict(state["fts_opt"])
        self.ntr_opt.load_state_dict(state["ntr_opt"])
        self.snapshot = _to_device(state["snapshot"], self.device)
        self.orig_before, self.floor_active, self.last_eval = state["orig_before"], state["floor_active"], state["last_eval"]
        self.fts.gen.set_state(state["fts_gen"])
        self.sampler.load_state_dict(state["sampler"])
        self.restricted_stream.load_state_dict(state["restricted_stream"])
        self.ntr_stream.load_state_dict(state["ntr_stream"])
        torch.set_rng_state(state["torch_rng"])
        self.metrics.keep(lambda r: int(r["loop"]) <= self.loop)
        self.tests.keep(lambda r: int(r["loop"]) <= self.loop)
        log.info("resumed at loop %d of %d", self.loop, self.args.total_loop)

    # ---- one outer loop --------------------------------------------------------------------------

    def _batches(self, domain, stream, n):
        """Lazily, so host memory holds one batch at a time whatever `adaptation_steps` is."""
        return ((domain.images[idx], domain.labels[idx]) for idx in (stream.next() for _ in range(n)))

    def outer_loop(self):
        args, model = self.args, self.model
        model.train()
        fts_losses, tuners = [], []
        for _ in range(args.fts_loop):
            for p in model.parameters():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                else:
                    p.grad.zero_()
            weight = 1.0 / (args.adaptation_steps * args.fts_envs)
            loss = torch.zeros((), device=self.device)
            for _ in range(args.fts_envs):
                tuner = self.sampler.sample()
                tuners.append(tuner)
                batches = self._batches(self.task.restricted_train, self.restricted_stream, args.adaptation_steps)
                loss = loss + self.fts.episode(model, batches, tuner, weight) * weight
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            self.fts_opt.step()
            fts_losses.append(loss)
        ntr_losses = []
        for _ in range(args.ntr_loop):
            idx = self.ntr_stream.next()
            domain = self.task.ntr_train
            x = domain.to_input(domain.images[idx], self.device, None, self.precision.channels_last)
            y = domain.labels[idx].to(self.device, non_blocking=True)
            with self.precision.autocast():
                loss = F.cross_entropy(self.model_fwd(x).float(), y)
            self.ntr_opt.zero_grad(set_to_none=False)
            loss.backward()
            self.ntr_opt.step()
            ntr_losses.append(loss.detach())
        # one host sync per outer loop
        fts_loss = torch.stack(fts_losses).mean().item()
        ntr_loss = torch.stack(ntr_losses).mean().item() if ntr_losses else None
        return fts_loss, ntr_loss, tuners

    # ---- the run ---------------------------------------------------------------------------------

    def _evaluate_orig(self):
        figures = self.task.eval_orig(self.model)
        self.last_eval = figures
        return figures

    def _rollback(self, reason):
        """Back to the snapshot of the last passing evaluation; the loops since are marked rolled back."""
        since = self.snapshot["loop"]
        self._restore(self.snapshot)
        self.last_eval = self.snapshot["eval"]
        rows = self.metrics.rows()
        for r in rows:
            if int(r["loop"]) > since:
                r["rolled_back"] = 1
        self.metrics.rewrite(rows)
        self.strikes += 1
        log.warning("%s at loop %d: rolled back to loop %d (strike %d of %d)", reason, self.loop, since,
                    self.strikes, self.args.max_strikes)

    def finetune_test(self, epochs, loop, kind="periodic"):
        probe = copy.deepcopy(self.model)
        attack = Attack("direct_all", "momentum", self.args.finetune_lr, self.args.bs, epochs, self.args.seed)

        def record(epoch, figures):
            self.tests.append({"loop": loop, "kind": kind, "epoch": epoch, **figures})

        curve = run_attack(probe, self.task.restricted_train, attack, self.device, self.precision,
                           self.task.eval_restricted, on_epoch=record)
        del probe
        return curve

    def train(self, interrupts: Interrupts):
        args = self.args
        if self.orig_before is None:
            self.orig_before = self._evaluate_orig()
            log.info("before stage 2: %s", _fmt(self.orig_before))
            if self.orig_before["orig_test_acc"] <= args.min_orig_acc:
                self.floor_active = False
                log.warning("original accuracy %.2f is already at or below --min_orig_acc %.2f: the floor rule is "
                            "off for this run", self.orig_before["orig_test_acc"], args.min_orig_acc)
            self.snapshot = self._state()
        bar = progress(total=args.total_loop, initial=self.loop, desc="stage 2")
        stopped_early = False
        while self.loop < args.total_loop:
            if interrupts.requested:
                self.save_last()
                log.info("interrupted at loop %d; continue with --resume %s", self.loop, self.run.path)
                return 130
            start = time.perf_counter()
            self.loop += 1
            fts_loss, ntr_loss, tuners = self.outer_loop()
            row = {"loop": self.loop, "fts_loss": fts_loss, "ntr_loss": ntr_loss, "rolled_back": 0,
                   "fts_optimizer": ";".join(t.optimizer for t in tuners), "fts_lr": ";".join(f"{t.lr:g}" for t in tuners),
                   "fts_head": ";".join(t.head for t in tuners), "fts_scope": ";".join(t.scope for t in tuners)}
            finite = math.isfinite(fts_loss) and (ntr_loss is None or math.isfinite(ntr_loss))
            due = (args.eval_interval and self.loop % args.eval_interval == 0) or self.loop == args.total_loop
            if finite and due:
                figures = self._evaluate_orig()
                row.update({k: v for k, v in figures.items() if k in self.metrics.header})
            row["seconds"] = time.perf_counter() - start
            self.metrics.append(row)
            if not finite:
                self._rollback("non-finite loss (FTS %s, NTR %s)" % (fts_loss, ntr_loss))
            elif due:
                if self.floor_active and figures["orig_test_acc"] <= args.min_orig_acc:
                    self._rollback(f"original accuracy {figures['orig_test_acc']:.2f} <= floor {args.min_orig_acc}")
                else:
                    self.strikes = 0
                    self.snapshot = self._state()
            if self.strikes >= args.max_strikes:
                log.warning("%d strikes in a row: stopping early at loop %d", self.strikes, self.loop)
                stopped_early = True
                self._restore(self.snapshot)
                self.last_eval = self.snapshot["eval"]
                break
            bar.update(1)
            bar.set_postfix(fts=f"{fts_loss:.3f}", ntr=f"{ntr_loss:.3f}" if ntr_loss is not None else "-")
            if args.test_interval and self.loop % args.test_interval == 0:
                curve = self.finetune_test(args.finetune_epochs, self.loop)
                log.info("loop %d fine-tune test: restricted acc %s", self.loop, [round(c["test_acc"], 2) for c in curve])
                atomic_save(self.checkpoint(), self.run.ckpt_dir / f"loop{self.loop:06d}.pt")
            if self.loop % args.save_every == 0:
                self.save_last()
        bar.close()
        return self.finish(stopped_early)

    def checkpoint(self, metrics=None):
        return make_checkpoint(self.model, metrics=metrics or {"loop": self.loop, **(self.last_eval or {})}, **self.meta)

    def finish(self, stopped_early):
        args = self.args
        final_orig = self.last_eval
        final_test = None
        if args.final_finetune_epochs:
            curve = self.finetune_test(args.final_finetune_epochs, self.loop, "final")
            final_test = curve[-1]
            log.info("final fine-tune test (%d epochs): %s", args.final_finetune_epochs,
                     [round(c["test_acc"], 2) for c in curve])
        summary = {"loss_type": self.task.loss_type,
                   "orig_test_acc_before": self.orig_before["orig_test_acc"],
                   "orig_test_acc": final_orig["orig_test_acc"],
                   "finetune_restrict_test_acc": None if final_test is None else final_test["test_acc"],
                   "loops_completed": self.loop, "stopped_early": stopped_early,
                   "final_orig": final_orig, "final_finetune": final_test}
        if "orig_asr" in final_orig:
            summary.update(orig_asr=final_orig["orig_asr"],
                           restrict_asr_after_finetune=None if final_test is None else final_test["asr"],
                           restrict_clean_acc_after_finetune=None if final_test is None else final_test["test_acc"])
        atomic_save(self.checkpoint(summary), self.run.ckpt_dir / "final.pt")
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
    """Every check of a stage-2 run, before its folder exists: parent checkpoint, inherited flags, data."""
    if args.bs < 4:
        raise UsageError(f"--bs {args.bs} is too small for stage 2: each batch is split into support and query, "
                         f"two samples each at least (BatchNorm); use --bs 4 or more")
    parent = resolve_checkpoint(args.model_path, project, "stage1_pretrain")
    ckpt = load_checkpoint(parent)
    inherit(args, ckpt, parent, inherited)
    check_name(args.dataset)
    if args.dataset == args.orig_dataset:
        raise UsageError(f"restricted --dataset {args.dataset} equals the original domain; choose another")
    load = partial(load_domain, root=args.data_root, image_size=args.image_size, download=args.download,
                   cache_dir=args.cache_dir, num_workers=args.num_workers)
    domains = [load(name, train=train, cap=args.subset if train else args.test_subset)
               for name in (args.orig_dataset, args.dataset) for train in (True, False)]
    check_subset_caps(args, domains)
    device = resolve_device(args.device)
    for d in domains:
        d.pin_for(device)
    precision = Precision(device, args.amp, args.channels_last, args.compile)
    seed_everything(args.seed)
    model = precision.prepare(model_from_checkpoint(ckpt, parent))
    config = config_of(args, stage=stage, parent=str(parent), model_path=str(parent))
    return Stage2Setup(parent, ckpt, *domains, device, precision, model, config)


def run_stage2_script(args, interrupts, project, stage, s, task):
    """Open the run folder, train, close; returns the exit code."""
    run = open_run(args, project, "stage2_train", args.dataset, s.config)
    for note in {d.note for d in (s.orig_train, s.restr_train) if d.note}:
        run.log_note(note)
    meta = dict(arch=args.arch, dataset=args.dataset, stage=stage, parent=s.parent, config=s.config)
    stage2 = Stage2(args, run, s.model, task, s.device, s.precision, meta)

    def body():
        if args.resume is not None and (run.ckpt_dir / "last.pt").exists():
            stage2.load_last()
        summary = stage2.train(interrupts)
        if summary == 130:
            return 130
        close_run(run, stage, summary, len(s.restr_test), run.ckpt_dir / "final.pt")
        return 0

    return guarded(run, stage, body)
