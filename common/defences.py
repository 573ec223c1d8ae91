"""Backdoor defences as stage-3 cells: fine-tuning, FT-SAM, super-fine-tuning, fine-pruning and NAD.

A defence gets what a fine-tuning attack gets (common.finetune.run_attack): a model, the defender's clean
training data (the restricted training split, or its fixed `train_fraction` share: common.finetune.
attack_subset) and the evaluate callback; it changes the model in place and returns an AttackCurve, epoch 0
measured before the defence touches the model, then one evaluation after each of its `epochs` epochs. Each
defence is a stage-3 procedure (a Defence in DEFENCES, chosen by --defences); a cell of it is a DefenceCell
(its lr, schedule, batch size, epochs, seed and train fraction), the rest of the recipe a DefenceConfig (the
flags below). To add a defence: its function below and its line in DEFENCES.

Every defence trains all layers and keeps the head, with SGD (DEFENCE_MOMENTUM, DEFENCE_WEIGHT_DECAY).
Defaults follow BackdoorBench (https://github.com/SCLBD/BackdoorBench, commit f02e353,
config/defense/<name>/config.yaml and defense/<name>.py) where it has the defence; each constant says where
it comes from. Deviations from BackdoorBench are listed in each defence's docstring.
"""
import argparse
import copy
import itertools
import math
from dataclasses import dataclass, field, fields
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn

from common.axes import Axis, Procedure
from common.cli import UsageError, comma_list, fraction, nonneg_float, nonneg_int, pos_float, pos_int
from common.finetune import (BATCH_SIZE, LR, OPTIMIZER, SCHEDULE, SEED, STRATEGY, TRAIN_FRACTION, _ScheduledSteps,
                             attack_subset, scope_params, start_curve, steps_per_epoch, train_epochs, training_only)
from common.models import classifier_head
from common.settings import Settings, setting
from common.train import ce_step, sam_step, train_epoch

# ---- the recipe every defence shares (BackdoorBench config/defense/{ft,ft-sam,fp,nad}/config.yaml) ----------
DEFENCE_LR = 0.01  # `lr: 0.01` (ft, ft_sam, fine_pruning's fine-tuning, both NAD runs)
DEFENCE_MOMENTUM = 0.9  # `sgd_momentum: 0.9`
DEFENCE_WEIGHT_DECAY = 5e-4  # `wd: 5.0e-4`
# ---- ft_sam ----------------------------------------------------------------------------------------------------
SAM_RHO = 0.05  # Foret et al.'s SAM radius for CIFAR; BackdoorBench's ft-sam uses rho 2.0 with *adaptive* SAM
SAM_ADAPTIVE = False  # True: ASAM's perturbation, BackdoorBench's default (its --adaptive is store_false)
# ---- super_ft (Sha et al. 2022; not in BackdoorBench, see super_ft's docstring for the sources) ----------------
SUPER_FT_MAX_LR = 0.1  # peak of the triangular cycles in phase 1
SUPER_FT_MAX_LR2 = 1e-3  # peak in phase 2
SUPER_FT_BASE_LR = 3e-4  # trough of every cycle, and the lr of the first step
SUPER_FT_HALF_CYCLE = 10  # optimisation steps from trough to peak, and as many back down
SUPER_FT_PHASE1 = 0.5  # share of the run's optimisation steps in phase 1
# ---- fine_pruning (BackdoorBench config/defense/fp/config.yaml) ---------------------------------------------------
PRUNE_STEP = 0.01  # `once_prune_ratio: 0.01`: prune ceil(1% of the channels) more at a time
PRUNE_ACC_DROP = 0.1  # `acc_ratio: 0.1`: stop before clean accuracy drops by more than 10% (relative)
# ---- nad (BackdoorBench config/defense/nad/config.yaml) -----------------------------------------------------------
NAD_TEACHER_EPOCHS = 10  # `te_epochs: 10`
NAD_BETAS = (500.0, 1000.0, 1000.0)  # `beta1: 500`, `beta2: 1000`, `beta3: 1000`, one per NAD_LAYERS entry
NAD_P = 2.0  # `p: 2.0`, the power of the attention maps
NAD_LAYERS = ("layer2", "layer3", "layer4")  # torchvision ResNet stages distilled (see nad's docstring)
AT_EPS = 1e-6  # added to the attention map's norm (BackdoorBench defense/nad.py AT.attention_map)
RESNETS = ("resnet18", "resnet34", "resnet50")  # the archs with the layers fine_pruning and nad need


@dataclass(frozen=True)
class DefenceConfig:
    """The defences' hyper-parameters beyond what a DefenceCell carries; field = flag = UPPER_CASE constant."""
    defence_lr: float = DEFENCE_LR
    defence_momentum: float = DEFENCE_MOMENTUM
    defence_weight_decay: float = DEFENCE_WEIGHT_DECAY
    sam_rho: float = SAM_RHO
    sam_adaptive: bool = SAM_ADAPTIVE
    super_ft_max_lr: float = SUPER_FT_MAX_LR
    super_ft_max_lr2: float = SUPER_FT_MAX_LR2
    super_ft_base_lr: float = SUPER_FT_BASE_LR
    super_ft_half_cycle: int = SUPER_FT_HALF_CYCLE
    super_ft_phase1: float = SUPER_FT_PHASE1
    prune_step: float = PRUNE_STEP
    prune_acc_drop: float = PRUNE_ACC_DROP
    nad_teacher_epochs: int = NAD_TEACHER_EPOCHS
    nad_betas: tuple = NAD_BETAS
    nad_p: float = NAD_P

    @classmethod
    def from_args(cls, args):
        values = {f.name: getattr(args, f.name) for f in fields(cls)}
        values["nad_betas"] = tuple(values["nad_betas"])  # a list from the command line or config.json
        return cls(**values)


@dataclass(frozen=True)
class DefenceCell:
    """A defence's cell: the settings of one run_defence, and the recipe's hyper-parameters `cfg`. Every
    defence trains all layers and keeps the head with SGD momentum, which its strategy and optimizer say in
    the fine-tuning attack's terms (and so in its key and rows)."""
    defence: str
    lr: float
    batch_size: int
    epochs: int
    seed: int
    train_fraction: float = 1.0
    schedule: str = "constant"
    cfg: DefenceConfig = field(default=DefenceConfig(), compare=False, repr=False)
    strategy: ClassVar[str] = "direct_all"
    optimizer: ClassVar[str] = "momentum"

    @property
    def procedure(self):
        return DEFENCES[self.defence]


@dataclass
class DefenceRun:
    """One defence cell at work: the defender's data (already the train-fraction subset), the cell, the
    flags, where it runs, and the cell's batch-order generator (seeded by cell.seed)."""
    domain: object
    cell: DefenceCell
    cfg: DefenceConfig
    device: torch.device
    precision: object
    evaluate: object
    on_epoch: object
    gen: torch.Generator

    def steps(self, epochs):
        return steps_per_epoch(len(self.domain), self.cell.batch_size) * epochs

    def optimizer(self, params, schedule, epochs):
        """SGD under `schedule` (a SCHEDULES name or a step -> lr multiplier function) over `epochs` epochs."""
        return _ScheduledSteps(_sgd(params, self.cell.lr, self.cfg), schedule, self.steps(epochs))

    def fine_tune(self, model, curve, schedule=None, step=ce_step):
        """cell.epochs epochs of the defence recipe on every layer, head kept, appended to `curve`."""
        trainable, bn_eval = scope_params(model, "all")
        with training_only(model, trainable):
            optimizer = self.optimizer(trainable, schedule or self.cell.schedule, self.cell.epochs)
            return train_epochs(model, self.domain, optimizer, curve, self.cell.epochs, self.cell.batch_size,
                                self.gen, self.device, self.precision, self.evaluate, self.on_epoch, bn_eval=bn_eval,
                                step=step, name=f"defence {self.cell.defence}")


def _sgd(params, lr, cfg):
    return torch.optim.SGD(params, lr=lr, momentum=cfg.defence_momentum, weight_decay=cfg.defence_weight_decay)


# ---- ft ---------------------------------------------------------------------------------------------------------

def ft(model, run, curve):
    """Fine-tuning (BackdoorBench defense/ft.py): SGD-momentum at cell.lr with weight decay, cosine-annealed
    over the run's optimisation steps (BackdoorBench anneals per epoch over its 100), every layer, head kept."""
    return run.fine_tune(model, curve)


# ---- ft_sam -----------------------------------------------------------------------------------------------------

def ft_sam(model, run, curve):
    """FT-SAM (Zhu et al., ICCV 2023; BackdoorBench defense/ft-sam.py): ft's recipe, each step sharpness-aware
    (sam_step) with radius --sam_rho.

    Deviations: plain SAM with rho 0.05 by default (Foret et al.'s CIFAR value); BackdoorBench's default is
    ASAM (`--sam_adaptive`) with rho 2.0, and adds label smoothing 0.1, which is not done here (plain CE)."""
    def step(model, x, y, optimizer, precision):
        return sam_step(model, x, y, optimizer, precision, run.cfg.sam_rho, run.cfg.sam_adaptive)
    return run.fine_tune(model, curve, step=step)


# ---- super_ft ---------------------------------------------------------------------------------------------------

def super_ft_lr(k, steps, cfg, max_lr):
    """The lr of optimisation step k (0-based) of a `steps`-step super-fine-tuning run: triangular cycles
    from cfg.super_ft_base_lr up to the peak in cfg.super_ft_half_cycle steps and back down in as many; the
    peak is `max_lr` for the first round(cfg.super_ft_phase1 * steps) steps, cfg.super_ft_max_lr2 after."""
    half = cfg.super_ft_half_cycle
    pos = k % (2 * half)
    peak = max_lr if k < round(cfg.super_ft_phase1 * steps) else cfg.super_ft_max_lr2
    rise = pos / half if pos < half else (2 * half - pos) / half
    return cfg.super_ft_base_lr + (peak - cfg.super_ft_base_lr) * rise


def super_ft(model, run, curve):
    """Super-fine-tuning (Sha et al. 2022, "Fine-tuning is all you need to mitigate backdoor attacks",
    arXiv 2212.09067): SGD-momentum on every layer under a large two-phase cyclic lr (super_ft_lr), cell.lr
    being the phase-1 peak.

    Not in BackdoorBench, and the paper's code could not be read here; the defaults are chosen: the two
    phases and the triangular cycle of 10 steps up and 10 down follow backdoor-toolbox
    (github.com/vtu81/backdoor-toolbox, other_defenses_tool_box/super_finetuning.py: increasing_steps =
    decreasing_steps = 10, phase 1 = 40 of 100 epochs, plain SGD at base 3e-2, peaks 5.0 and 0.1); the lrs,
    for SGD with momentum 0.9, and the phase split follow the Landseer port of the paper's recipe
    (github.com/landseer-project/Landseer-BackdoorBench, FT_SFT_DEFENSE.md: base 3e-4, peaks 0.1 and 1e-3,
    3 of 6 epochs in phase 1)."""
    steps = run.steps(run.cell.epochs)
    schedule = lambda k: super_ft_lr(k, steps, run.cfg, run.cell.lr) / run.cell.lr
    return run.fine_tune(model, curve, schedule=schedule)


# ---- fine_pruning -------------------------------------------------------------------------------------------------

def _require(model, layers, defence):
    missing = [n for n in layers if not isinstance(getattr(model, n, None), nn.Module)]
    if missing:
        raise UsageError(f"defence {defence} needs a torchvision-layout ResNet ({', '.join(layers)}); "
                         f"{type(model).__name__} has no {', '.join(missing)}")


class Taps:
    """Forward hooks keeping the outputs of named submodules from the model's last forward pass (`out`)."""

    def __init__(self, model, names):
        self.out = {}
        self.handles = [model.get_submodule(n).register_forward_hook(self._keeper(n)) for n in names]

    def _keeper(self, name):
        def keep(module, inputs, output):
            self.out[name] = output
        return keep

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def head_inputs(model, domain, device, precision, bs=256):
    """(the classifier head's input for every sample, in order; layer4's output channels) in eval mode."""
    was_training = model.training
    model.eval()
    feats, channels = [], None
    head = classifier_head(model)
    keep = head.register_forward_pre_hook(lambda m, args: feats.append(args[0].float()))
    try:
        with Taps(model, ["layer4"]) as taps:
            for start in range(0, len(domain), bs):
                x = domain.to_input(domain.images[start:start + bs], device, None, precision.channels_last)
                with precision.autocast():
                    model(x)
                channels = taps.out["layer4"].shape[1]
    finally:
        keep.remove()
        model.train(was_training)
    return torch.cat(feats), channels


def prune_plan(feats, labels, head, step, max_drop):
    """(indices of the channels to prune, clean accuracy % before pruning, after) of fine-pruning on the
    head's inputs `feats` (N x C, the pooled layer4 channels): the channels sorted by mean activation, the
    lowest ceil(step * C) more masked at a time (never all C) while accuracy stays within a relative
    `max_drop` of the unpruned one; the last share that did is kept (BackdoorBench defense/fp.py)."""
    order = torch.argsort(feats.mean(0), stable=True)
    channels = feats.shape[1]
    labels = labels.to(feats.device)
    accuracy = lambda mask: 100.0 * (head(feats * mask).argmax(1) == labels).float().mean().item()
    ones = torch.ones(channels, device=feats.device)
    before = after = accuracy(ones)
    pruned = 0
    for n in range(max(1, math.ceil(step * channels)), channels, max(1, math.ceil(step * channels))):
        mask = ones.clone()
        mask[order[:n]] = 0
        acc = accuracy(mask)
        if before - acc > max_drop * before:
            break
        pruned, after = n, acc
    return order[:pruned], before, after


def fine_pruning(model, run, curve):
    """Fine-pruning (Liu et al., RAID 2018; BackdoorBench defense/fp.py): the output channels of layer4 (the
    last convolutional stage, before avgpool) ranked by mean activation on the defender's data, the lowest
    pruned 1% (--prune_step) at a time while clean accuracy on that data stays within 10% (relative,
    --prune_acc_drop) of the unpruned model's, then ft's recipe. Epoch 0 is before pruning.

    The mask is a forward hook on layer4 multiplying its output by 0/1 per channel: fine-tuning cannot bring
    a pruned channel back, and the hook stays on the model. BackdoorBench masks the same channels as columns
    of the head (identical outputs: avgpool is per channel). Deviations: accuracy is measured on the
    defender's training data, not on the clean test split as BackdoorBench does; it prunes exactly n
    channels at share n (BackdoorBench's seq_sort[0:n - 1] prunes n - 1); and only a drop ends pruning
    (BackdoorBench's abs() also stops at a 10% rise). defence_info records the channels pruned."""
    _require(model, ("layer4", "avgpool"), "fine_pruning")
    feats, channels = head_inputs(model, run.domain, run.device, run.precision)
    head = classifier_head(model)
    if feats.shape[1] != channels:
        raise UsageError(f"defence fine_pruning: the head of {type(model).__name__} reads {feats.shape[1]} features, "
                         f"layer4 gives {channels} channels; it needs layer4 -> avgpool -> head")
    with torch.no_grad():
        pruned, before, after = prune_plan(feats, run.domain.labels, head, run.cfg.prune_step, run.cfg.prune_acc_drop)
    del feats
    mask = torch.ones(channels, device=run.device)
    mask[pruned] = 0
    model.layer4.register_forward_hook(lambda m, inputs, out: out * mask.view(1, -1, 1, 1).to(out.dtype))
    curve.defence_info = {"pruned_channels": len(pruned), "channels": channels, "prune_clean_acc_before": before,
                          "prune_clean_acc_after": after}
    return run.fine_tune(model, curve)


# ---- nad ----------------------------------------------------------------------------------------------------------

def attention_map(fm, p=NAD_P, eps=AT_EPS):
    """N x 1 x H x W: sum over channels of |fm|^p, divided by its L2 norm over H x W (+ eps), per sample
    (BackdoorBench defense/nad.py AT.attention_map; summing or averaging channels is the same after the
    division, up to eps)."""
    am = fm.float().abs().pow(p).sum(dim=1, keepdim=True)
    return am / (torch.linalg.vector_norm(am, dim=(2, 3), keepdim=True) + eps)


def nad_loss(logits, y, student_maps, teacher_maps, betas=NAD_BETAS, p=NAD_P):
    """CE + sum_i beta_i * mean((AT(student_i) - AT(teacher_i))^2), the mean over samples and positions
    (BackdoorBench: F.mse_loss of the attention maps); the teacher's maps are constants."""
    loss = F.cross_entropy(logits.float(), y)
    for beta, s, t in zip(betas, student_maps, teacher_maps):
        loss = loss + beta * F.mse_loss(attention_map(s, p), attention_map(t.detach(), p))
    return loss


def nad(model, run, curve):
    """Neural Attention Distillation (Li et al., ICLR 2021; BackdoorBench defense/nad.py): the teacher, a copy of
    the model fine-tuned on the defender's data for --nad_teacher_epochs at cell.lr (DEFENCE_SCHEDULES:
    constant), then the model (the student) trained for cell.epochs with
    CE + sum_i beta_i AT(student_i, teacher_i) over the outputs of layer2, layer3 and layer4, the teacher in
    eval mode. Epoch 0 is before both.

    The layers follow NAD's paper (the three residual stages of its WRN): BackdoorBench, slicing its
    PreActResNet18's children, actually distils layer3 (beta1), layer4 (beta2) and the avgpool output (beta3),
    a 1 x 1 map whose normalised attention is constant. BackdoorBench trains the student for te_epochs as well;
    here its epochs are the grid's --epochs. defence_info records the teacher's skipped steps."""
    _require(model, NAD_LAYERS, "nad")
    cfg = run.cfg
    teacher = copy.deepcopy(model)
    params, bn_eval = scope_params(teacher, "all")
    with training_only(teacher, params):
        optimizer = run.optimizer(params, run.cell.schedule, cfg.nad_teacher_epochs)
        for epoch in range(1, cfg.nad_teacher_epochs + 1):
            train_epoch(teacher, run.domain, optimizer, run.device, run.precision, run.cell.batch_size, run.gen,
                        bn_eval_modules=bn_eval, desc=f"nad teacher epoch {epoch}/{cfg.nad_teacher_epochs}")
    teacher.eval().requires_grad_(False)
    curve.defence_info = {"teacher_epochs": cfg.nad_teacher_epochs, "teacher_skipped_steps": optimizer.skipped}
    with Taps(teacher, NAD_LAYERS) as teacher_taps, Taps(model, NAD_LAYERS) as student_taps:

        def step(model, x, y, optimizer, precision):
            with torch.no_grad(), precision.autocast():
                teacher(x)
            optimizer.zero_grad(set_to_none=True)
            with precision.autocast():
                logits = model(x)
            loss = nad_loss(logits, y, [student_taps.out[n] for n in NAD_LAYERS],
                            [teacher_taps.out[n] for n in NAD_LAYERS], cfg.nad_betas, cfg.nad_p)
            loss.backward()
            optimizer.step()
            return loss, logits
        return run.fine_tune(model, curve, step=step)


DEFENCE = Axis("defence", default=None)  # the defence a cell runs; fine-tuning cells have none, so their keys predate it
READ_BY_EVERY_DEFENCE = ("train_fractions", "seeds", "seed", "batch_sizes", "bs", "defence_momentum",
                         "defence_weight_decay")


class Defence(Procedure):
    """A backdoor defence as a stage-3 procedure: `recipe(model, run, curve)` (a function above) under the lr
    schedule `schedule` (a name of common.finetune.SCHEDULES, or the recipe's own) at the lr of the flag
    `lr_flag`, reading the flags `own` besides those every defence reads; `resnet`: it needs a torchvision
    ResNet's stages. One cell per (train fraction, seed); batch size the grid's first (--batch_sizes, else --bs)."""
    role = "defence"
    axes = (STRATEGY, OPTIMIZER, LR, BATCH_SIZE, SEED, TRAIN_FRACTION, SCHEDULE, DEFENCE)
    fixed = ("strategy", "optimizer")  # DefenceCell's

    def __init__(self, name, recipe, schedule, lr_flag="defence_lr", own=(), resnet=False):
        self.name, self.recipe, self.schedule = name, recipe, schedule
        self.lr_flag, self.own, self.resnet = lr_flag, tuple(own), resnet

    @property
    def reads(self):
        return ("epochs", *READ_BY_EVERY_DEFENCE, self.lr_flag, *self.own)

    def cells(self, args):
        cfg = DefenceConfig.from_args(args)
        lr, bs = float(getattr(cfg, self.lr_flag)), int(BATCH_SIZE.values(args)[0])
        return [DefenceCell(self.name, lr, bs, args.epochs, int(seed), float(f), self.schedule, cfg)
                for f, seed in itertools.product(TRAIN_FRACTION.values(args), SEED.values(args))]

    def run(self, model, domain, cell, device, precision, evaluate, on_epoch=None):
        return run_defence(model, domain, cell, cell.cfg, device, precision, evaluate, on_epoch)


def _flags(prefix):
    return tuple(f.name for f in fields(DefenceConfig) if f.name.startswith(prefix))


# One line per defence. Schedules: BackdoorBench's CosineAnnealingLR (T_max 100 = its 100 epochs) for ft, ft-sam and
# fp; NAD's student holds lr at 0.01 (defense/nad.py adjust_learning_rate: 0.01 before epoch 20) and its teacher's
# cosine (T_max 100 over te_epochs 10) stays within 2.5% of 0.01, so NAD runs at a constant lr here
DEFENCES = {d.name: d for d in (
    Defence("ft", ft, "cosine"),
    Defence("ft_sam", ft_sam, "cosine", own=_flags("sam_")),
    Defence("super_ft", super_ft, "cyclic", lr_flag="super_ft_max_lr", own=_flags("super_ft_")),
    Defence("fine_pruning", fine_pruning, "cosine", own=_flags("prune_"), resnet=True),
    Defence("nad", nad, "constant", own=_flags("nad_"), resnet=True),
)}
DEFENCE_SCHEDULES = {name: d.schedule for name, d in DEFENCES.items()}


def run_defence(model, train_domain, cell, cfg, device, precision, evaluate, on_epoch=None):
    """Run the DefenceCell `cell` on `model` in place with the DefenceConfig `cfg` (None: the defaults); returns
    an AttackCurve of cell.epochs + 1 evaluations, epoch 0 before the defence. The defender's data is
    attack_subset(train_domain, cell.train_fraction)."""
    if cell.batch_size < 2:
        raise UsageError(f"batch size {cell.batch_size}: BatchNorm needs two samples per batch")
    domain = attack_subset(train_domain, cell.train_fraction)
    run = DefenceRun(domain, cell, cfg or DefenceConfig(), device, precision, evaluate, on_epoch,
                     torch.Generator().manual_seed(cell.seed))
    curve = start_curve(model, domain, evaluate, on_epoch)
    return cell.procedure.recipe(model, run, curve)


def check_arch(names, arch):
    """fine_pruning and nad need a torchvision ResNet's layer2-4 and avgpool: refuse any other arch."""
    for name in names or ():
        if DEFENCES[name].resnet and arch not in RESNETS:
            raise UsageError(f"--defences {name} needs a torchvision ResNet ({', '.join(RESNETS)}: layer2-4, avgpool, "
                             f"fc); {arch} has none")


def _momentum(text):
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


@dataclass
class DefenceSettings(Settings):
    """The defences' settings (defaults: the UPPER_CASE constants above)."""
    defences: Optional[list] = setting(None, "backdoor defences to run on every start model, one cell per (defence, "
                                             "train fraction, seed), next to the fine-tuning grid; each trains every "
                                             "layer (head kept) for --epochs at the grid's first batch size on the "
                                             "--train_fractions share of the clean training split (BackdoorBench "
                                             "gives the defender 0.05); epoch 0 = before the defence",
                                       type=comma_list(str, DEFENCES))  # the registry itself: read when parsing
    defences_only: bool = setting(False, "run the --defences cells alone, no fine-tuning attack (without it the "
                                         "fine-tuning grid, default or as given, runs as well)", action="store_true")
    defence_lr: float = setting(DEFENCE_LR, "lr of ft, ft_sam, fine_pruning and nad (teacher and student)",
                                type=pos_float)
    defence_momentum: float = setting(DEFENCE_MOMENTUM, "SGD momentum, every defence", type=_momentum)
    defence_weight_decay: float = setting(DEFENCE_WEIGHT_DECAY, "SGD weight decay, every defence", type=nonneg_float)
    sam_rho: float = setting(SAM_RHO, "ft_sam's perturbation radius (BackdoorBench: 2.0 with --sam_adaptive)",
                             type=pos_float)
    sam_adaptive: bool = setting(False, "ft_sam: adaptive SAM (ASAM, perturbation scaled by |w|), BackdoorBench's "
                                        "default", action="store_true")
    super_ft_max_lr: float = setting(SUPER_FT_MAX_LR, "super_ft: peak lr of the cycles in phase 1", type=pos_float)
    super_ft_max_lr2: float = setting(SUPER_FT_MAX_LR2, "super_ft: peak lr of the cycles in phase 2", type=pos_float)
    super_ft_base_lr: float = setting(SUPER_FT_BASE_LR, "super_ft: lr at the trough of every cycle", type=pos_float)
    super_ft_half_cycle: int = setting(SUPER_FT_HALF_CYCLE, "super_ft: optimisation steps from trough to peak (and "
                                                            "as many back)", type=pos_int)
    super_ft_phase1: float = setting(SUPER_FT_PHASE1, "super_ft: share of the run's optimisation steps in phase 1",
                                     type=fraction)
    prune_step: float = setting(PRUNE_STEP, "fine_pruning: share of layer4's channels pruned more at a time",
                                type=fraction)
    prune_acc_drop: float = setting(PRUNE_ACC_DROP, "fine_pruning: largest relative drop of clean accuracy (on the "
                                                    "defender's data) pruning may cost", type=fraction)
    nad_teacher_epochs: int = setting(NAD_TEACHER_EPOCHS, "nad: epochs fine-tuning the teacher", type=nonneg_int)
    nad_betas: list = setting(help=f"nad: attention-transfer weights for {', '.join(NAD_LAYERS)}", type=_betas,
                              factory=lambda: list(NAD_BETAS))
    nad_p: float = setting(NAD_P, "nad: power of the attention maps", type=pos_float)