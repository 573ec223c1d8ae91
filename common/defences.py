"""Backdoor defences as stage-3 cells: ft, ft_sam, super_ft, fine_pruning, nad, fst, clp, anp, sau and i_bau, and
the backdoor re-activation measured after each.

A defence gets what a fine-tuning attack gets (common.finetune.run_attack): a model, the defender's clean
training data (the restricted training split, or its fixed `train_fraction` share: common.finetune.
attack_subset) and the evaluate callback; it changes the model in place and returns an AttackCurve, epoch 0
measured before the defence touches the model, then `epochs` evaluations spread over its budget of optimisation
steps (common.defence_run). Each defence is a stage-3 procedure (a Defence in DEFENCES, chosen by --defences); a
cell of it is a DefenceCell (its lr, schedule, batch size, epochs, seed and train fraction), the rest of the
recipe a DefenceConfig (the flags below). To add a defence: its function (common.defences_tuning,
common.defences_pruning, common.defences_unlearning, or a module of its own) and its line in DEFENCES.

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
import copy
import itertools
from dataclasses import dataclass, field, fields
from typing import Optional

import torch

from common.axes import Axis, Procedure
from common.backdoor import BackdoorEval, poison
from common.cli import UsageError, comma_list
from common.defence_run import (ANP_NB_ITER, BB_EPOCH_STEPS, BB_EPOCHS, FST_EPOCH_STEPS, FST_EPOCHS, IBAU_ROUND_STEPS,
                                IBAU_ROUNDS, NAD_EPOCH_STEPS, NAD_EPOCHS, REACTIVATE_MOMENTUM, SAU_ROUNDS,
                                SUPER_FT_EPOCH_STEPS, DefenceConfig, DefenceRun)
from common.defences_pruning import anp, clp, fine_pruning, prune_plan
from common.defences_tuning import attention_map, fst, ft, ft_sam, nad, nad_loss, super_ft
from common.defences_unlearning import i_bau, sau
from common.finetune import (BATCH_SIZE, LR, OPTIMIZER, SCHEDULE, SEED, STRATEGY, TRAIN_FRACTION, attack_subset,
                             start_curve, training_only)
from common.settings import Settings, compose, setting, settings_group
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
    common.defences_pruning, common.defences_unlearning) at the lr of the flag `lr_flag` (None: it trains nothing),
    its schedule named `schedule` in keys and rows, reading the flags `own` besides those every defence reads. As
    its reference: `budget` (epochs, optimisation steps an epoch), `optimizer` ("momentum", "sgd" or "adam":
    DefenceRun.optimizer) and `decay` (weight decay or none), `crop` (RandomCrop augmentation), `strategy`
    (direct_all: the head kept; initfc_all: a new one); `resnet`: it needs a torchvision ResNet's stages. One cell
    per (train fraction, seed); batch size the grid's first (--batch_sizes, else --bs)."""
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
# triangular cycles; step: NAD's 0.1 then 0.01; constant: anp's masks, sau's and i_bau's Adam; none: no training
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
    Defence("anp", anp, "constant", lr_flag="anp_lr", own=_flags("anp_"), budget=(1, ANP_NB_ITER), decay=False),
    Defence("sau", sau, "constant", lr_flag="sau_lr", own=_flags("sau_"), budget=(SAU_ROUNDS, BB_EPOCH_STEPS),
            optimizer="adam", decay=False, crop=False),
    Defence("i_bau", i_bau, "constant", lr_flag="ibau_lr", own=_flags("ibau_"), optimizer="adam", decay=False,
            budget=(IBAU_ROUNDS, IBAU_ROUND_STEPS)),
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


@dataclass
class DefenceChoice(Settings):
    defences: Optional[list] = setting(None, "backdoor defences to run on every start model, one cell per (defence, "
                                             "train fraction, seed), next to the fine-tuning grid; each runs its "
                                             "reference's budget of optimisation steps (--defence_steps) at the grid's "
                                             "first batch size on the --train_fractions share of the clean training "
                                             "split (BackdoorBench gives the defender 0.05), evaluated --epochs times "
                                             "along the way; epoch 0 = before the defence",
                                       type=comma_list(str, DEFENCES))  # the registry itself: read when parsing
    defences_only: bool = setting(False, "run the --defences cells alone, no fine-tuning attack (without it the "
                                         "fine-tuning grid, default or as given, runs as well)", action="store_true")


# The defences' settings: which to run, and every DefenceConfig field as a flag of its own.
DefenceSettings = compose("DefenceSettings", DefenceChoice, settings_group(DefenceConfig))
