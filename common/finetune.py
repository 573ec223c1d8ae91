"""The fine-tuning attack, stage 3's first procedure: strategies, its axes, and one attack run on a model."""
import contextlib
import itertools
import logging
import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from common.axes import Axis, Procedure
from common.cli import UsageError, batch_size, fraction, nonneg_int, pos_float
from common.data import epoch_batches
from common.models import head_param_names, head_path, reinit_head
from common.train import OPTIMIZERS, ce_step, make_optimizer, train_epoch

log = logging.getLogger("sophon")

# strategy -> (re-initialise the head, which parameters train)
STRATEGIES = {"direct_all": (False, "all"), "initfc_all": (True, "all"),
              "direct_fc": (False, "head"), "initfc_fc": (True, "head")}
SCOPES = ("all", "head")
SCHEDULES = ("constant", "cosine", "warmup_cosine")
WARMUP_FRACTION = 0.1  # warmup_cosine: linear warmup over this share of the run's optimisation steps
ATTACK_SUBSET_SEED = 20250101  # fixed, independent of the cell seed: every start model and seed gets the same subset


def scope_params(model, scope):
    """(trainable parameters, BatchNorm modules to keep in eval) for a fine-tuning scope.

    Head-only fine-tuning freezes the body, BatchNorm statistics included.
    """
    head = head_param_names(model)
    trainable = [p for n, p in model.named_parameters() if scope == "all" or n in head]
    bn_eval = []
    if scope == "head":
        bn_eval = [m for n, m in model.named_modules()
                   if isinstance(m, nn.modules.batchnorm._BatchNorm) and not n.startswith(head_path(model))]
    return trainable, bn_eval


# The fine-tuning attack's axes, in the order of a cell key; the defences and later procedures reuse them.
STRATEGY = Axis("strategy", flag="--strategies", choices=tuple(STRATEGIES), grid=["direct_all"],
                help="direct_all, initfc_all (new head), direct_fc, initfc_fc (head only)")
OPTIMIZER = Axis("optimizer", flag="--optimizers", choices=tuple(OPTIMIZERS), grid=["momentum"],
                 help=", ".join(OPTIMIZERS) + " (sign: sign descent; normalized: steps of length lr)")
LR = Axis("lr", pos_float, key="{:g}", flag="--lrs", fallback="finetune_lr", help="default: [--finetune_lr]")
BATCH_SIZE = Axis("batch_size", batch_size, label="bs", flag="--batch_sizes", fallback="bs", help="default: [--bs]")
SEED = Axis("seed", nonneg_int, flag="--seeds", fallback="seed", help="default: [--seed]")
TRAIN_FRACTION = Axis(
    "train_fraction", fraction, 1.0, key="f{:g}", label="train fraction", flag="--train_fractions", grid=[1.0],
    help="shares in (0, 1] of the restricted training split the attacker fine-tunes on (a fixed subset, stratified "
         "per class, the same for every start model and seed); evaluation stays on the whole test split")
SCHEDULE = Axis("schedule", str, "constant", flag="--schedules", choices=SCHEDULES, grid=["constant"],
                help="attacker lr schedules, per optimisation step over the whole run: constant, cosine (to 0), "
                     f"warmup_cosine (linear warmup over the first {WARMUP_FRACTION:.0%}% of the steps, then cosine "
                     "to 0)")


@dataclass(frozen=True)
class Attack:
    """A fine-tuning attack's cell: the settings of one run_attack."""
    strategy: str
    optimizer: str
    lr: float
    batch_size: int
    epochs: int
    seed: int
    train_fraction: float = 1.0  # share of the restricted training split the attacker has (a fixed subset)
    schedule: str = "constant"  # lr schedule over the run's optimisation steps: one of SCHEDULES

    @property
    def procedure(self):
        return FINE_TUNING


def subset_indices(labels, fraction, seed=ATTACK_SUBSET_SEED):
    """Sorted indices of a fixed, stratified subset of round(fraction * N) samples.

    Each class keeps its share (largest remainders settle the rounding, ties to the smaller class id); within
    a class the samples are drawn by a generator seeded with `seed` alone (ATTACK_SUBSET_SEED: the attacker's
    subset), so every start model, cell seed and rank fine-tunes on the very same samples."""
    n = len(labels)
    if fraction >= 1:
        return torch.arange(n)
    total = round(fraction * n)
    classes, counts = torch.unique(labels, return_counts=True)
    quotas = [fraction * int(c) for c in counts]
    take = [math.floor(q) for q in quotas]
    order = sorted(range(len(quotas)), key=lambda i: (-(quotas[i] - take[i]), i))
    for i in order[:total - sum(take)]:
        take[i] += 1
    gen = torch.Generator().manual_seed(seed)
    picked = []
    for c, k in zip(classes.tolist(), take):
        members = torch.nonzero(labels == c).flatten()
        picked.append(members[torch.randperm(len(members), generator=gen)[:k]])
    return torch.cat(picked).sort().values


def attack_subset(domain, fraction):
    """The attacker's training data: `domain` itself, or its fixed stratified subset (see subset_indices)."""
    if fraction >= 1:
        return domain
    idx = subset_indices(domain.labels, fraction)
    if len(idx) < 2:
        raise UsageError(f"--train_fractions {fraction:g} leaves {len(idx)} of {len(domain)} training samples; "
                         f"BatchNorm needs two")
    images = domain.images[idx]
    if domain.images.is_pinned():
        images = images.pin_memory()
    return replace(domain, images=images, labels=domain.labels[idx], note=(domain.note + " " if domain.note else "")
                   + f"attacker subset: {len(idx)} of {len(domain)} samples ({fraction:g}, stratified)")


def holdout(domain, fraction):
    """`domain` without the fixed subset attack_subset(domain, fraction) would give stage 3's attacker."""
    keep = torch.ones(len(domain), dtype=torch.bool)
    keep[subset_indices(domain.labels, fraction)] = False
    if int(keep.sum()) < 2:
        raise UsageError(f"--restricted_holdout {fraction:g} leaves {int(keep.sum())} of {len(domain)} training samples")
    images = domain.images[keep]
    if domain.images.is_pinned():
        images = images.pin_memory()
    return replace(domain, images=images, labels=domain.labels[keep], _stats={},
                   note=(domain.note + " " if domain.note else "")
                   + f"stage 2 holds out stage 3's {fraction:g} subset: {int(keep.sum())} of {len(domain)} samples")


def schedule_factor(schedule, steps):
    """step index k (0-based) -> lr multiplier of `schedule` over a run of `steps` optimisation steps.

    constant: 1. cosine: 0.5 (1 + cos(pi k / steps)), from 1 at the first step towards 0 at the last.
    warmup_cosine: (k + 1) / W over the first W = max(1, round(WARMUP_FRACTION * steps)) steps (no step at
    lr 0), then 0.5 (1 + cos(pi (k - W) / (steps - W)))."""
    if schedule == "constant":
        return lambda k: 1.0
    if schedule == "cosine":
        return lambda k: 0.5 * (1 + math.cos(math.pi * min(k, steps) / max(steps, 1)))
    if schedule == "warmup_cosine":
        warm = max(1, round(WARMUP_FRACTION * steps))

        def factor(k):
            if k < warm:
                return (k + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * min(k - warm, steps - warm) / max(steps - warm, 1)))
        return factor
    raise ValueError(f"unknown schedule {schedule!r} (choose from {', '.join(SCHEDULES)})")


class _ScheduledSteps:
    """The optimiser train_epoch drives: each step() is the attack's optimisation step, then the lr schedule's.

    A step whose gradients are not finite (a diverging attack: the loss overflowed) is skipped, as a careful
    attacker or torch's GradScaler would skip it, and counted; the schedule moves on regardless, so the lr
    sequence depends on the step index alone."""

    def __init__(self, optimizer, schedule, steps):
        """`schedule`: a name of SCHEDULES over `steps` steps, or a function step index -> lr multiplier."""
        self.optimizer = optimizer
        factor = schedule if callable(schedule) else schedule_factor(schedule, steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.skipped = 0

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self):
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads and not bool(torch.stack(torch._foreach_norm(grads)).isfinite().all()):
            self.skipped += 1
        else:
            self.optimizer.step()
        self.scheduler.step()


class AttackCurve(list):
    """[evaluate(model)] for epochs 0..epochs, and how the run went: `skipped_steps` (steps skipped for
    non-finite gradients), `diverged_epoch` (the epoch after which weights or BatchNorm statistics were no
    longer finite, None if never; training stops there and that evaluation stands for the remaining
    epochs, so every curve has epochs + 1 points), `train_samples` (the attacker's training set size) and
    `defence_info` (what a defence decided on the way, e.g. fine-pruning's pruned channels; None for attacks)."""
    skipped_steps = 0
    diverged_epoch = None
    train_samples = None
    defence_info = None


def _finite(model):
    return all(bool(t.isfinite().all()) for t in itertools.chain(model.parameters(), model.buffers())
               if t.is_floating_point())


def steps_per_epoch(n, bs):
    """Optimisation steps of one epoch_batches pass over n samples."""
    return sum(1 for _ in epoch_batches(n, bs, torch.Generator()))


@contextlib.contextmanager
def training_only(model, params):
    """requires_grad on `params` alone while the block runs; every parameter gets its flag back afterwards."""
    keep = {id(p) for p in params}
    was_trainable = [(p, p.requires_grad) for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    try:
        yield
    finally:
        for p, flag in was_trainable:
            p.requires_grad_(flag)


def start_curve(model, train_domain, evaluate, on_epoch=None):
    """An AttackCurve holding epoch 0, evaluate(model) as it stands, already reported to on_epoch."""
    curve = AttackCurve([evaluate(model)])
    curve.train_samples = len(train_domain)
    if on_epoch:
        on_epoch(0, curve[0])
    return curve


def train_epochs(model, train_domain, optimizer, curve, epochs, bs, gen, device, precision, evaluate, on_epoch=None,
                 *, bn_eval=(), step=ce_step, name="attack", rounds=None, pixel_fn=None):
    """Epochs 1..epochs appended to `curve` (which holds epoch 0): an epoch of training, then evaluate(model).
    `rounds(epoch)`, when given, is the index batches of that epoch (a defence's share of its step budget)
    instead of one pass over the data; `pixel_fn` edits each [0, 1] image batch (train-time augmentation).

    `step` is each batch's training step (common.train.ce_step, or a defence's own with its signature).
    `optimizer` is a _ScheduledSteps; its skipped steps are added to curve.skipped_steps. A model whose
    weights or BatchNorm statistics are no longer finite stops training; its evaluation stands for the
    remaining epochs (curve.diverged_epoch)."""
    for epoch in range(1, epochs + 1):
        if curve.diverged_epoch is None:
            train_epoch(model, train_domain, optimizer, device, precision, bs, gen, bn_eval_modules=bn_eval,
                        desc=f"{name} epoch {epoch}/{epochs}", step=step,
                        batches=rounds(epoch) if rounds else None, pixel_fn=pixel_fn)
            curve.append(evaluate(model))
            if not _finite(model):
                curve.diverged_epoch = epoch
                log.warning("%s diverged in epoch %d: weights not finite; its evaluation stands for the remaining "
                            "epochs", name, epoch)
        else:
            curve.append(dict(curve[-1]))
        if on_epoch:
            on_epoch(epoch, curve[-1])
    curve.skipped_steps += optimizer.skipped
    if optimizer.skipped:
        log.warning("%s: %d optimisation steps skipped for non-finite gradients", name, optimizer.skipped)
    return curve


def run_attack(model, train_domain, attack, device, precision, evaluate, on_epoch=None):
    """Fine-tune `model` in place under `attack`; returns an AttackCurve, [evaluate(model)] for epochs
    0..attack.epochs.

    Epoch 0 is measured as fine-tuning starts, after any head re-initialisation. The attacker trains on
    attack_subset(train_domain, attack.train_fraction), one pass over it per epoch, under attack.schedule
    (stepped after every optimisation step).
    """
    if attack.batch_size < 2:
        raise UsageError(f"batch size {attack.batch_size}: BatchNorm needs two samples per batch")
    train_domain = attack_subset(train_domain, attack.train_fraction)
    gen = torch.Generator().manual_seed(attack.seed)
    reinit, scope = STRATEGIES[attack.strategy]
    if reinit:
        reinit_head(model, gen)
    trainable, bn_eval = scope_params(model, scope)
    with training_only(model, trainable):
        steps = steps_per_epoch(len(train_domain), attack.batch_size) * attack.epochs
        optimizer = _ScheduledSteps(make_optimizer(attack.optimizer, trainable, attack.lr, attack=True),
                                    attack.schedule, steps)
        curve = start_curve(model, train_domain, evaluate, on_epoch)
        return train_epochs(model, train_domain, optimizer, curve, attack.epochs, attack.batch_size, gen, device,
                            precision, evaluate, on_epoch, bn_eval=bn_eval, name=f"attack {attack}")


class FineTuning(Procedure):
    """The attacker fine-tunes the start model on the restricted domain (run_attack): the seed's attack and
    its grid. Its keys predate the registry, so they name no procedure."""
    name, role = "finetune", "attack"
    axes = (STRATEGY, OPTIMIZER, LR, BATCH_SIZE, SEED, TRAIN_FRACTION, SCHEDULE)

    def make(self, epochs, strategy, optimizer, lr, batch_size, seed, train_fraction, schedule):
        return Attack(strategy, optimizer, float(lr), int(batch_size), epochs, int(seed), float(train_fraction),
                      schedule)

    def run(self, model, domain, cell, device, precision, evaluate, on_epoch=None):
        return run_attack(model, domain, cell, device, precision, evaluate, on_epoch)


FINE_TUNING = FineTuning()
