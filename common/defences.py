"""Backdoor defences as stage-3 cells: ft, ft_sam, super_ft, fine_pruning, nad, fst and clp, and the backdoor
re-activation measured after each.

A defence gets what a fine-tuning attack gets (common.finetune.run_attack): a model, the defender's clean
training data (the restricted training split, or its fixed `train_fraction` share: common.finetune.
attack_subset) and the evaluate callback; it changes the model in place and returns an AttackCurve, epoch 0
measured before the defence touches the model, then `epochs` evaluations spread over its budget of optimisation
steps (common.defence_run). Each defence is a stage-3 procedure (a Defence in DEFENCES, chosen by --defences); a
cell of it is a DefenceCell (its lr, schedule, batch size, epochs, seed and train fraction), the rest of the
recipe a DefenceConfig (the flags below). To add a defence: its function (common.defences_tuning,
common.defences_pruning, or a module of its own) and its line in DEFENCES.

Every defence follows its reference by default (BackdoorBench, https://github.com/SCLBD/BackdoorBench, commit
f02e353, where it has the defence; else the defence's own code): each constant in common.defence_run says where
it comes from, each defence's docstring where it deviates.

Backdoor re-activation (Min et al., NeurIPS 2024, "Uncovering, explaining, and mitigating the superficial
safety of backdoor defense"): after the defence, a copy of the purified model is fine-tuned on the defender's
data with --reactivate_samples (5) of its samples replaced by triggered ones relabelled to the target, for
--reactivate_epochs (5) at --reactivate_lr (0.01; SGD momentum 0.9, no weight decay, constant lr, no
augmentation), as their retuning attack (fine_tune/ft_poison.py); defence_info records its clean accuracy and
ASR (reactivated_test_acc, reactivated_asr). Where the grid measures no backdoor it is not run.
"""
import argparse
import copy
import itertools
from dataclasses import dataclass, field, fields

import torch

from common.axes import Axis, Procedure
from common.backdoor import BackdoorEval, poison
from common.cli import UsageError, comma_list, fraction, nonneg_float, nonneg_int, pos_float, pos_int
from common.defence_run import (BB_EPOCH_STEPS, BB_EPOCHS, CLP_U, DEFENCE_CROP, DEFENCE_LR, DEFENCE_MOMENTUM,
                                DEFENCE_WEIGHT_DECAY, FST_ALPHA, FST_EPOCH_STEPS, FST_EPOCHS, NAD_BETAS,
                                NAD_EPOCH_STEPS, NAD_EPOCHS, NAD_FIRST_EPOCHS, NAD_FIRST_LR, NAD_P, NAD_TEACHER_EPOCHS,
                                PRUNE_ACC_DROP, PRUNE_STEP, REACTIVATE_EPOCHS, REACTIVATE_LR, REACTIVATE_SAMPLES,
                                REACTIVATE_MOMENTUM, SAM_ADAPTIVE, SAM_LABEL_SMOOTHING, SAM_RHO, SUPER_FT_BASE_LR, SUPER_FT_EPOCH_STEPS,
                                SUPER_FT_HALF_CYCLE, SUPER_FT_MAX_LR, SUPER_FT_MAX_LR2, SUPER_FT_PHASE1,
                                DefenceConfig, DefenceRun)
from common.defences_pruning import clp, fine_pruning, prune_plan
from common.defences_tuning import NAD_LAYERS, attention_map, fst, ft, ft_sam, nad, nad_loss, super_ft
from common.finetune import (BATCH_SIZE, LR, OPTIMIZER, SCHEDULE, SEED, STRATEGY, TRAIN_FRACTION, attack_subset,
                             start_curve, training_only)
from common.train import train_epoch

RESNETS = ("resnet18", "resnet34", "resnet50")  # the archs with the layers fine_pruning and nad need
__all__ = ["DefenceConfig", "DefenceRun", "prune_plan", "attention_map", "nad_loss"]


@dataclass(frozen=True)
class DefenceCell:
    """A defence's cell: the settings of one run_defence, and the recipe's hyper-parameters `cfg`. Its strategy
    and optimizer say what the defence does in the fine-tuning attack's terms (and so in its key and rows)."""
    defence: str
    lr: float
    batch_size: int
    epochs: int
    seed: int
    train_fraction: float = 1.0
    schedule: str = "constant"
    cfg: DefenceConfig = field(default=DefenceConfig(), compare=False, repr=False)

    @property
    def procedure(self):
        return DEFENCES[self.defence]

    @property
    def strategy(self):
        return self.procedure.strategy

    @property
    def optimizer(self):
        return self.procedure.optimizer


DEFENCE = Axis("defence", default=None)  # the defence a cell runs; fine-tuning cells have none, so their keys predate it
READ_BY_EVERY_DEFENCE = ("train_fractions", "seeds", "seed", "batch_sizes", "bs", "reactivate_samples",
                         "reactivate_epochs", "reactivate_lr")


class Defence(Procedure):
    """A backdoor defence as a stage-3 procedure: `recipe(model, run, curve)` (common.defences_tuning,
    common.defences_pruning) at the lr of the flag `lr_flag` (None: it trains nothing), its schedule named
    `schedule` in keys and rows, reading the flags `own` besides those every defence reads. As its reference:
    `budget` (epochs, optimisation steps an epoch), `optimizer` ("momentum" or "sgd") and `decay` (weight decay
    or none), `crop` (RandomCrop augmentation), `strategy` (direct_all: the head kept; initfc_all: a new one);
    `resnet`: it needs a torchvision ResNet's stages. One cell per (train fraction, seed); batch size the
    grid's first (--batch_sizes, else --bs)."""
    role = "defence"
    axes = (STRATEGY, OPTIMIZER, LR, BATCH_SIZE, SEED, TRAIN_FRACTION, SCHEDULE, DEFENCE)
    fixed = ("strategy", "optimizer")  # the Defence's

    def __init__(self, name, recipe, schedule, lr_flag="defence_lr", own=(), resnet=False,
                 budget=(BB_EPOCHS, BB_EPOCH_STEPS), optimizer="momentum", decay=True, crop=True, strategy="direct_all"):
        self.name, self.recipe, self.schedule = name, recipe, schedule
        self.lr_flag, self.own, self.resnet = lr_flag, tuple(own), resnet
        self.budget, self.optimizer, self.decay, self.crop, self.strategy = budget, optimizer, decay, crop, strategy

    @property
    def reads(self):
        if not self.lr_flag:
            return ("epochs", *READ_BY_EVERY_DEFENCE, *self.own)
        sgd = ("defence_momentum",) * (self.optimizer == "momentum") + ("defence_weight_decay",) * self.decay
        return ("epochs", *READ_BY_EVERY_DEFENCE, "defence_steps", "defence_epoch_steps", self.lr_flag, *self.own,
                *sgd, *("defence_crop",) * self.crop)

    def cells(self, args):
        cfg = DefenceConfig.from_args(args)
        lr = float(getattr(cfg, self.lr_flag)) if self.lr_flag else 0.0
        bs = int(BATCH_SIZE.values(args)[0])
        return [DefenceCell(self.name, lr, bs, args.epochs, int(seed), float(f), self.schedule, cfg)
                for f, seed in itertools.product(TRAIN_FRACTION.values(args), SEED.values(args))]

    def run(self, model, domain, cell, device, precision, evaluate, on_epoch=None):
        return run_defence(model, domain, cell, cell.cfg, device, precision, evaluate, on_epoch)


def _flags(prefix):
    return tuple(f.name for f in fields(DefenceConfig) if f.name.startswith(prefix))


# One line per defence; the schedule names label keys and rows (each recipe steps its reference's schedule):
# cosine: CosineAnnealingLR per reference epoch (ft, fine_pruning, fst) or per step (ft_sam); cyclic: super_ft's
# triangular cycles; step: NAD's 0.1 then 0.01; none: no training
DEFENCES = {d.name: d for d in (
    Defence("ft", ft, "cosine"),
    Defence("ft_sam", ft_sam, "cosine", own=_flags("sam_")),
    Defence("super_ft", super_ft, "cyclic", lr_flag="super_ft_max_lr", own=_flags("super_ft_"),
            budget=(BB_EPOCHS, SUPER_FT_EPOCH_STEPS), optimizer="sgd", decay=False, crop=False),
    Defence("fine_pruning", fine_pruning, "cosine", own=_flags("prune_"), resnet=True),
    Defence("nad", nad, "step", own=_flags("nad_"), resnet=True, budget=(NAD_EPOCHS, NAD_EPOCH_STEPS)),
    Defence("fst", fst, "cosine", own=_flags("fst_"), budget=(FST_EPOCHS, FST_EPOCH_STEPS), decay=False,
            strategy="initfc_all"),
    Defence("clp", clp, "none", lr_flag=None, own=_flags("clp_"), crop=False),
)}
DEFENCE_SCHEDULES = {name: d.schedule for name, d in DEFENCES.items()}


def run_defence(model, train_domain, cell, cfg, device, precision, evaluate, on_epoch=None):
    """Run the DefenceCell `cell` on `model` in place with the DefenceConfig `cfg` (None: the defaults); returns
    an AttackCurve of cell.epochs + 1 evaluations, epoch 0 before the defence, then the backdoor re-activation
    (reactivate) on a copy. The defender's data is attack_subset(train_domain, cell.train_fraction)."""
    if cell.batch_size < 2:
        raise UsageError(f"batch size {cell.batch_size}: BatchNorm needs two samples per batch")
    domain = attack_subset(train_domain, cell.train_fraction)
    run = DefenceRun(domain, cell, cfg or DefenceConfig(), device, precision, evaluate, on_epoch,
                     torch.Generator().manual_seed(cell.seed))
    curve = start_curve(model, domain, evaluate, on_epoch)
    curve = cell.procedure.recipe(model, run, curve)
    reactivate(model, run, curve)
    return curve


def reactivate(model, run, curve):
    """Backdoor re-activation (see the module docstring) on a copy of the purified `model`: its clean accuracy
    and ASR added to curve.defence_info. Not run without --reactivate_samples, where run.evaluate measures no
    backdoor (a common.backdoor.BackdoorEval, or a functools.partial of one), or after a diverged defence."""
    backdoor = getattr(run.evaluate, "func", run.evaluate)
    n, epochs = run.cfg.reactivate_samples, run.cfg.reactivate_epochs
    if not n or not isinstance(backdoor, BackdoorEval) or curve.diverged_epoch is not None:
        return
    data, _ = poison(run.domain, n / len(run.domain), backdoor.target, backdoor.size)
    probe = copy.deepcopy(model)
    params = list(probe.parameters())
    gen = torch.Generator().manual_seed(run.cell.seed)
    with training_only(probe, params):
        optimizer = torch.optim.SGD(params, lr=run.cfg.reactivate_lr, momentum=REACTIVATE_MOMENTUM)
        for epoch in range(1, epochs + 1):
            train_epoch(probe, data, optimizer, run.device, run.precision, run.cell.batch_size, gen,
                        desc=f"re-activation epoch {epoch}/{epochs}")
    after = run.evaluate(probe)
    curve.defence_info = {**(curve.defence_info or {}), "reactivation_samples": n, "reactivation_epochs": epochs,
                          "reactivated_test_acc": after["test_acc"], "reactivated_asr": after["asr"]}


def check_arch(names, arch):
    """fine_pruning and nad need a torchvision ResNet's layer1-4 and avgpool: refuse any other arch."""
    for name in names or ():
        if DEFENCES[name].resnet and arch not in RESNETS:
            raise UsageError(f"--defences {name} needs a torchvision ResNet ({', '.join(RESNETS)}: layer1-4, avgpool, "
                             f"fc); {arch} has none")


def _below_one(text):
    value = nonneg_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _betas(text):
    values = [nonneg_float(t) for t in text.split(",")]
    if len(values) != len(NAD_LAYERS):
        raise argparse.ArgumentTypeError(f"needs {len(NAD_LAYERS)} values, one per layer of {', '.join(NAD_LAYERS)}; "
                                         f"got {text!r}")
    return values


def defence_flags():
    """The defences' flags (defaults: the UPPER_CASE constants of common.defence_run)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("defences (cells next to the fine-tuning grid; common/defences.py)")
    g.add_argument("--defences", type=comma_list(str, tuple(DEFENCES)), default=None,
                   help="backdoor defences to run on every start model, one cell per (defence, train fraction, seed), "
                        f"next to the fine-tuning grid: {', '.join(DEFENCES)}; each runs its reference's budget of "
                        "optimisation steps (--defence_steps) at the grid's first batch size on the --train_fractions "
                        "share of the clean training split (BackdoorBench gives the defender 0.05), evaluated --epochs "
                        "times along the way; epoch 0 = before the defence")
    g.add_argument("--defences_only", action="store_true",
                   help="run the --defences cells alone, no fine-tuning attack (without it the fine-tuning grid, "
                        "default or as given, runs as well)")
    g.add_argument("--defence_lr", type=pos_float, default=DEFENCE_LR,
                   help="lr of ft, ft_sam, fine_pruning, fst and nad (its teacher, and its student after "
                        "--nad_first_epochs)")
    g.add_argument("--defence_momentum", type=_below_one, default=DEFENCE_MOMENTUM,
                   help="SGD momentum of every defence but super_ft (plain SGD)")
    g.add_argument("--defence_weight_decay", type=nonneg_float, default=DEFENCE_WEIGHT_DECAY,
                   help="SGD weight decay of ft, ft_sam, fine_pruning and nad (super_ft and fst have none)")
    g.add_argument("--defence_steps", type=pos_int, default=None,
                   help="optimisation steps of every defence (default: each reference's, its epochs x "
                        "--defence_epoch_steps: 1000 for BackdoorBench's ft, ft_sam, fine_pruning, 800 for nad's "
                        "student, 1600 for super_ft, 80 for fst); the defender loops over its data as often as needed")
    g.add_argument("--defence_epoch_steps", type=pos_int, default=None,
                   help="optimisation steps of one reference epoch, the unit the schedules step in (default: each "
                        f"reference's: {BB_EPOCH_STEPS} for BackdoorBench's, {NAD_EPOCH_STEPS} nad, "
                        f"{SUPER_FT_EPOCH_STEPS} super_ft, {FST_EPOCH_STEPS} fst)")
    g.add_argument("--defence_crop", type=nonneg_int, default=DEFENCE_CROP,
                   help="RandomCrop padding (px) of the defender's images, every defence but super_ft and clp; "
                        "0: none")
    g.add_argument("--sam_rho", type=pos_float, default=SAM_RHO, help="ft_sam's perturbation radius")
    g.add_argument("--sam_adaptive", action=argparse.BooleanOptionalAction, default=SAM_ADAPTIVE,
                   help="ft_sam: adaptive SAM (ASAM, perturbation scaled by |w|), BackdoorBench's default; "
                        "--no-sam_adaptive: plain SAM")
    g.add_argument("--sam_label_smoothing", type=_below_one, default=SAM_LABEL_SMOOTHING,
                   help="ft_sam: label smoothing of its loss")
    g.add_argument("--super_ft_max_lr", type=pos_float, default=SUPER_FT_MAX_LR,
                   help="super_ft: peak lr of the cycles in phase 1")
    g.add_argument("--super_ft_max_lr2", type=pos_float, default=SUPER_FT_MAX_LR2,
                   help="super_ft: peak lr of the cycles in phase 2")
    g.add_argument("--super_ft_base_lr", type=pos_float, default=SUPER_FT_BASE_LR,
                   help="super_ft: lr at the trough of every cycle")
    g.add_argument("--super_ft_half_cycle", type=pos_int, default=SUPER_FT_HALF_CYCLE,
                   help="super_ft: optimisation steps from trough to peak (and as many back)")
    g.add_argument("--super_ft_phase1", type=fraction, default=SUPER_FT_PHASE1,
                   help="super_ft: share of the run's optimisation steps in phase 1")
    g.add_argument("--prune_step", type=fraction, default=PRUNE_STEP,
                   help="fine_pruning: share of layer4's channels pruned more at a time")
    g.add_argument("--prune_acc_drop", type=fraction, default=PRUNE_ACC_DROP,
                   help="fine_pruning: the relative drop of clean accuracy (on the defender's data) that ends "
                        "pruning, at the share that costs it")
    g.add_argument("--nad_teacher_epochs", type=nonneg_int, default=NAD_TEACHER_EPOCHS,
                   help="nad: reference epochs (--defence_epoch_steps steps each) fine-tuning the teacher")
    g.add_argument("--nad_betas", type=_betas, default=list(NAD_BETAS),
                   help=f"nad: attention-transfer weights for {', '.join(NAD_LAYERS)}")
    g.add_argument("--nad_p", type=pos_float, default=NAD_P, help="nad: power of the attention maps")
    g.add_argument("--nad_first_lr", type=pos_float, default=NAD_FIRST_LR,
                   help="nad: the student's lr over its first --nad_first_epochs, --defence_lr after")
    g.add_argument("--nad_first_epochs", type=nonneg_int, default=NAD_FIRST_EPOCHS,
                   help="nad: reference epochs the student trains at --nad_first_lr")
    g.add_argument("--fst_alpha", type=nonneg_float, default=FST_ALPHA,
                   help="fst: weight of the penalty on the new head's alignment with the original head")
    g.add_argument("--clp_u", type=nonneg_float, default=CLP_U,
                   help="clp: prune the channels whose Lipschitz bound exceeds their layer's mean + u std")
    g.add_argument("--reactivate_samples", type=nonneg_int, default=REACTIVATE_SAMPLES,
                   help="after every defence, fine-tune a copy on the defender's data with this many of its samples "
                        "triggered and relabelled to the target, and record its ASR (backdoor re-activation); 0: not")
    g.add_argument("--reactivate_epochs", type=pos_int, default=REACTIVATE_EPOCHS,
                   help="epochs of the re-activation fine-tuning")
    g.add_argument("--reactivate_lr", type=pos_float, default=REACTIVATE_LR,
                   help="lr of the re-activation fine-tuning (SGD momentum 0.9, constant)")
    return p
