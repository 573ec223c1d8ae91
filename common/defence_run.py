"""What every backdoor defence runs on: its hyper-parameters (DefenceConfig, one field per flag), its budget in
optimisation steps, its lr schedules as its reference steps them, the train-time augmentation, and the training
loop (DefenceRun). The defences themselves: common.defences_tuning, common.defences_pruning,
common.defences_unlearning; the registry: common.defences.DEFENCES.

Budgets are optimisation steps, so that a defence does as much work as its reference whatever the defender's
data size: a reference's budget is its epochs times the steps of one of its epochs on its own data (BackdoorBench,
CIFAR-10: 5% = 2,500 images at batch size 256, 10 steps an epoch, 100 epochs: 1,000 steps). The defender loops
over its data as many times as the budget needs; its lr schedule is stepped per reference epoch (that many
steps) or per step, as the reference steps it. A cell's `epochs` evaluations are spread evenly over the steps.
"""
import argparse
import itertools
import math
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from common.cli import UsageError, fraction, nonneg_float, nonneg_int, pos_float, pos_int
from common.data import epoch_batches
from common.finetune import _ScheduledSteps, scope_params, train_epochs, training_only
from common.settings import setting
from common.train import ce_step

# ---- the recipe every defence shares (BackdoorBench f02e353 config/defense/{ft,ft-sam,fp,nad}/config.yaml) -------
DEFENCE_LR = 0.01  # `lr: 0.01` (ft, ft_sam, fine_pruning's fine-tuning, NAD's teacher and late student; FST)
DEFENCE_MOMENTUM = 0.9  # `sgd_momentum: 0.9`
DEFENCE_WEIGHT_DECAY = 5e-4  # `wd: 5.0e-4`
DEFENCE_CROP = 4  # utils/aggregate_block/dataset_and_transform_generate.py get_transform: RandomCrop(padding=4)
BB_EPOCHS = 100  # `epochs: 100`
BB_EPOCH_STEPS = math.ceil(2500 / 256)  # `ratio: 0.05` of CIFAR-10's 50,000 at `batch_size: 256`
BB_T_MAX = 100  # train_settings_generate.py: CosineAnnealingLR(T_max=100) whatever the epochs
DEFENCE_STEPS = None  # None: each defence's reference budget (its Defence.budget: epochs x steps an epoch)
DEFENCE_EPOCH_STEPS = None  # None: the reference's steps an epoch
# ---- ft_sam (BackdoorBench defense/ft-sam.py argparse and config/defense/ft-sam/config.yaml) -----------------------
SAM_RHO = 2.0  # `--rho 2.0` (rho_max = rho_min = 2.0: constant)
SAM_ADAPTIVE = True  # `--adaptive` is store_false: ASAM unless asked otherwise
SAM_LABEL_SMOOTHING = 0.1  # `label_smoothing: 0.1` (utils/defense_utils/sam/util.py smooth_crossentropy)
# ---- super_ft (backdoor-toolbox 9d4d909, other_defense.py for cifar10 and other_defenses_tool_box/super_finetuning.py)
SUPER_FT_MAX_LR = 2.5  # `lr_max1=2.5`, the phase-1 peak (an earlier commit had 5.0)
SUPER_FT_MAX_LR2 = 0.05  # `lr_max2=0.05`, the phase-2 peak (earlier: 0.1)
SUPER_FT_BASE_LR = 3e-2  # `lr_base=3e-2`: every cycle's trough, and the first step's lr
SUPER_FT_HALF_CYCLE = 10  # `increasing_steps=10`, `decreasing_steps=10`
SUPER_FT_PHASE1 = 0.4  # `init_phase_epochs=40` of `epochs=100`
SUPER_FT_EPOCH_STEPS = math.ceil(2000 / 128)  # its clean split (`clean_budget` 2000) at `batch_size=128`
# ---- fine_pruning (BackdoorBench config/defense/fp/config.yaml) ---------------------------------------------------
PRUNE_STEP = 0.01  # `once_prune_ratio: 0.01`: prune ceil(1% of the channels) more at a time
PRUNE_ACC_DROP = 0.1  # `acc_ratio: 0.1`: pruning ends at the share that costs 10% (relative) of clean accuracy
# ---- nad (NAD's code, github.com/bboylyg/NAD: config.py, main.py, utils/util.py) ---------------------------------
NAD_TEACHER_EPOCHS = 10  # BackdoorBench `te_epochs: 10` (NAD's README: the teacher is fine-tuned 5 to 10 epochs)
NAD_BETAS = (500.0, 1000.0, 5000.0)  # config.py beta1 500, beta2 1000; beta3 5000 as issue 39 reads NAD's paper
NAD_P = 2.0  # `--p 2.0`, the power of the attention maps
NAD_FIRST_LR = 0.1  # `--lr 0.1`, adjust_learning_rate: lr for epochs 0 and 1 ...
NAD_FIRST_EPOCHS = 2  # ... then 0.01 (DEFENCE_LR) up to epoch 20
NAD_EPOCHS = 20  # `--epochs 20`
NAD_EPOCH_STEPS = math.ceil(2500 / 64)  # `--ratio 0.05` of CIFAR-10 at `--batch_size 64`
AT_EPS = 1e-6  # added to the attention map's norm (NAD at.py AT.attention_map)
NAD_LAYERS = ("layer1", "layer2", "layer3")  # torchvision ResNet stages distilled (see nad's docstring)
# ---- fst (github.com/AISafety-HKUST/stable_backdoor_purification, README's command for fine_tune/ft.py) ---------
FST_ALPHA = 0.1  # `--alpha 0.1` (argparse default 0.2)
FST_EPOCHS = 10  # `--epochs 10`, CosineAnnealingLR(T_max=epochs) stepped per epoch
FST_EPOCH_STEPS = math.ceil(1000 / 128)  # `--split_ratio 0.02` of CIFAR-10 at `--batch_size 128`
# ---- clp (BackdoorBench defense/clp.py CLP_prune, config/defense/clp/config.yaml) -------------------------------
CLP_U = 3.0  # `u: 3`: prune the channels whose bound exceeds mean + u * std
# ---- anp (github.com/csdongxian/ANP_backdoor ec7b179 optimize_mask_cifar.py; BackdoorBench defense/anp.py the same) --
ANP_LR = 0.2  # `--lr 0.2`, the masks' SGD(momentum=0.9) (BackdoorBench: its config's `lr: 0.01`)
ANP_NB_ITER = 2000  # `--nb-iter 2000` batches, drawn with replacement from its clean split (`--val-frac 0.01`)
ANP_EPS = 0.4  # `--anp-eps 0.4`: the noise's bound at its random start, and its signed-gradient step
ANP_STEPS = 1  # `--anp-steps 1`, each at lr anp_eps / anp_steps
ANP_ALPHA = 0.2  # `--anp-alpha 0.2`, the clean loss's weight
ANP_THRESHOLD = 0.2  # prune_neuron_cifar.py `--pruning-by threshold`: the paper's 0.2 (its code sweeps 0 to 0.9)
# ---- sau (BackdoorBench defense/sau.py, config/defense/sau/config.yaml) --------------------------------------------
SAU_LR = 1e-4  # `lr: 0.0001`, Adam (`client_optimizer: 'adam'`, `wd: 0`; amsgrad in argparser_opt_scheduler)
SAU_ROUNDS = 100  # `n_rounds: 100` passes over its `ratio: 0.05` of CIFAR-10 at `batch_size: 256`
SAU_TRIGGER_NORM = 0.2  # `trigger_norm: 0.2`, the L_inf radius (`norm_type: L_inf`) of the perturbation, in pixels
SAU_ADV_LR = 0.2  # `adv_lr: 0.2`, PGD's step
SAU_ADV_STEPS = 5  # `adv_steps: 5`
SAU_PGD_INIT = "max"  # `pgd_init: max`: PGD starts at +trigger_norm everywhere
SAU_PGD_INITS = ("zero", "random", "max", "min")  # Shared_PGD.init_pert's init types
SAU_BETA_1 = 0.01  # `beta_1: 0.01`, weight of L_adv in PGD's loss
SAU_BETA_2 = 1.0  # `beta_2: 1`, weight of L_share
SAU_LMD_1 = 1.0  # `lmd_1: 1`, weight of the clean cross-entropy in the unlearning loss
SAU_LMD_2 = 0.0  # `lmd_2: 0.0`, of the adversarial examples' cross-entropy (adversarial training; off)
SAU_LMD_3 = 1.0  # `lmd_3: 1`, of the shared adversarial risk L_sar
SAU_TRAIN_MODE = False  # `--train_mode` store_true: BatchNorm fixed (eval mode) unless asked
# ---- i_bau (BackdoorBench defense/i-bau.py, config/defense/i-bau/config.yaml; I-BAU d4bfa52 defense.py, hypergrad.py)
IBAU_LR = 1e-4  # `lr: 0.0001`, constant: its CosineAnnealingLR is made but never stepped (I-BAU's defense.py: 0.001)
IBAU_ROUNDS = 5  # `n_rounds: 5`
IBAU_ROUND_STEPS = math.ceil(2500 / 256)  # a round: one unlearning step per batch of `ratio: 0.05` at `batch_size: 256`
IBAU_K = 5  # `K: 5`: fixed-point iterations of the hypergradient (hg.fixed_point)
IBAU_INNER_STEP = 0.1  # `GradientDescent(loss_inner, 0.1)`: the inner problem's fixed-point map is a GD step of 0.1
IBAU_PERTURB_LR = 10.0  # `torch.optim.SGD(params=[batch_pert], lr=10)`: the perturbation's search, a step per batch
IBAU_REG = 1e-3  # `0.001*torch.pow(torch.norm(perturb), 2)` in the search and in loss_inner
IBAU_PORTION = 0.01  # loss_outer's `portion = 0.01`: the share of an unlearning batch given the perturbation
IBAU_RADIUS = None  # `# pert = batch_pert * min(1, 10 / torch.norm(batch_pert))` is commented out: no projection
# ---- backdoor re-activation (Min et al. NeurIPS'24; the same repo's fine_tune/ft_poison.py) ------------------------
REACTIVATE_SAMPLES = 5  # `--poison_num 5` of the defender's samples replaced by triggered ones; 0: no re-activation
REACTIVATE_EPOCHS = 5  # `--epochs 5`
REACTIVATE_LR = 0.01  # `--lr 0.01`, constant, no weight decay ...
REACTIVATE_MOMENTUM = 0.9  # ... `optim.SGD(net.parameters(), lr=args.lr, momentum=0.9)`


def _below_one(text):
    value = nonneg_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _betas(text):
    values = tuple(nonneg_float(t) for t in text.split(","))
    if len(values) != len(NAD_LAYERS):
        raise argparse.ArgumentTypeError(f"needs {len(NAD_LAYERS)} values, one per layer of {', '.join(NAD_LAYERS)}; "
                                         f"got {text!r}")
    return values


@dataclass(frozen=True)
class DefenceConfig:
    """The defences' hyper-parameters beyond what a DefenceCell carries: a field each, which is its flag too
    (common.defences.DefenceSettings is made from these fields); defaults: the UPPER_CASE constants above."""
    defence_lr: float = setting(DEFENCE_LR, "lr of ft, ft_sam, fine_pruning, fst and nad (its teacher, and its "
                                            "student after --nad_first_epochs)", type=pos_float)
    defence_momentum: float = setting(DEFENCE_MOMENTUM, "SGD momentum of every defence but super_ft (plain SGD), "
                                                        "sau and i_bau (Adam)", type=_below_one)
    defence_weight_decay: float = setting(DEFENCE_WEIGHT_DECAY, "SGD weight decay of ft, ft_sam, fine_pruning and nad "
                                                                "(the others have none)", type=nonneg_float)
    defence_steps: Optional[int] = setting(DEFENCE_STEPS, "optimisation steps of every defence (default: each "
                                           "reference's, its epochs x --defence_epoch_steps: 1000 for BackdoorBench's "
                                           "ft, ft_sam, fine_pruning and sau, 800 for nad's student, 1600 for "
                                           "super_ft, 80 for fst, 2000 for anp, 50 for i_bau); the defender loops over "
                                           "its data as often as needed", type=pos_int)
    defence_epoch_steps: Optional[int] = setting(
        DEFENCE_EPOCH_STEPS, "optimisation steps of one reference epoch, the unit the schedules step in (default: "
        f"each reference's: {BB_EPOCH_STEPS} for BackdoorBench's, {NAD_EPOCH_STEPS} nad, {SUPER_FT_EPOCH_STEPS} "
        f"super_ft, {FST_EPOCH_STEPS} fst, {ANP_NB_ITER} anp, {IBAU_ROUND_STEPS} i_bau's round)", type=pos_int)
    defence_crop: int = setting(DEFENCE_CROP, "RandomCrop padding (px) of the defender's images, every defence but "
                                              "super_ft, clp and sau; 0: none", type=nonneg_int)
    sam_rho: float = setting(SAM_RHO, "ft_sam's perturbation radius", type=pos_float)
    sam_adaptive: bool = setting(SAM_ADAPTIVE, "ft_sam: adaptive SAM (ASAM, perturbation scaled by |w|), "
                                               "BackdoorBench's default; --no-sam_adaptive: plain SAM",
                                 action=argparse.BooleanOptionalAction)
    sam_label_smoothing: float = setting(SAM_LABEL_SMOOTHING, "ft_sam: label smoothing of its loss", type=_below_one)
    super_ft_max_lr: float = setting(SUPER_FT_MAX_LR, "super_ft: peak lr of the cycles in phase 1", type=pos_float)
    super_ft_max_lr2: float = setting(SUPER_FT_MAX_LR2, "super_ft: peak lr of the cycles in phase 2", type=pos_float)
    super_ft_base_lr: float = setting(SUPER_FT_BASE_LR, "super_ft: lr at the trough of every cycle", type=pos_float)
    super_ft_half_cycle: int = setting(SUPER_FT_HALF_CYCLE, "super_ft: optimisation steps from trough to peak (and "
                                                            "as many back)", type=pos_int)
    super_ft_phase1: float = setting(SUPER_FT_PHASE1, "super_ft: share of the run's optimisation steps in phase 1",
                                     type=fraction)
    prune_step: float = setting(PRUNE_STEP, "fine_pruning: share of layer4's channels pruned more at a time",
                                type=fraction)
    prune_acc_drop: float = setting(PRUNE_ACC_DROP, "fine_pruning: the relative drop of clean accuracy (on the "
                                                    "defender's data) that ends pruning, at the share that costs it",
                                    type=fraction)
    nad_teacher_epochs: int = setting(NAD_TEACHER_EPOCHS, "nad: reference epochs (--defence_epoch_steps steps each) "
                                                          "fine-tuning the teacher", type=nonneg_int)
    nad_betas: tuple = setting(NAD_BETAS, f"nad: attention-transfer weights for {', '.join(NAD_LAYERS)}", type=_betas)
    nad_p: float = setting(NAD_P, "nad: power of the attention maps", type=pos_float)
    nad_first_lr: float = setting(NAD_FIRST_LR, "nad: the student's lr over its first --nad_first_epochs, "
                                                "--defence_lr after", type=pos_float)
    nad_first_epochs: int = setting(NAD_FIRST_EPOCHS, "nad: reference epochs the student trains at --nad_first_lr",
                                    type=nonneg_int)
    fst_alpha: float = setting(FST_ALPHA, "fst: weight of the penalty on the new head's alignment with the original "
                                          "head", type=nonneg_float)
    clp_u: float = setting(CLP_U, "clp: prune the channels whose Lipschitz bound exceeds their layer's mean + u std",
                           type=nonneg_float)
    anp_lr: float = setting(ANP_LR, "anp: lr of the masks' SGD (momentum --defence_momentum, constant)", type=pos_float)
    anp_eps: float = setting(ANP_EPS, "anp: bound of the neurons' multiplicative noise at its random start, and the "
                                      "size of its signed-gradient steps together; 0: no noise", type=nonneg_float)
    anp_steps: int = setting(ANP_STEPS, "anp: signed-gradient steps of the noise before each step of the masks",
                             type=pos_int)
    anp_alpha: float = setting(ANP_ALPHA, "anp: weight of the clean loss (1 - alpha: the loss under the noise)",
                               type=fraction)
    anp_threshold: float = setting(ANP_THRESHOLD, "anp: prune the neurons whose mask ends at or below this (their "
                                                  "BatchNorm weight zeroed)", type=_below_one)
    sau_lr: float = setting(SAU_LR, "sau: Adam's lr (constant)", type=pos_float)
    sau_trigger_norm: float = setting(SAU_TRIGGER_NORM, "sau: L_inf radius of the shared adversarial perturbation, "
                                                        "in [0, 1] pixel units", type=pos_float)
    sau_adv_lr: float = setting(SAU_ADV_LR, "sau: PGD's step (signed gradient)", type=pos_float)
    sau_adv_steps: int = setting(SAU_ADV_STEPS, "sau: PGD steps a batch", type=pos_int)
    sau_pgd_init: str = setting(SAU_PGD_INIT, "sau: PGD's start: zero, random (uniform [0, 1), projected), max "
                                              "(+radius) or min (-radius)", choices=SAU_PGD_INITS)
    sau_beta_1: float = setting(SAU_BETA_1, "sau: weight of PGD's adversarial loss", type=nonneg_float)
    sau_beta_2: float = setting(SAU_BETA_2, "sau: weight of PGD's shared loss (the two models' JS divergence)",
                                type=nonneg_float)
    sau_lmd_1: float = setting(SAU_LMD_1, "sau: weight of the clean cross-entropy", type=nonneg_float)
    sau_lmd_2: float = setting(SAU_LMD_2, "sau: weight of the perturbed samples' cross-entropy", type=nonneg_float)
    sau_lmd_3: float = setting(SAU_LMD_3, "sau: weight of the shared adversarial risk", type=nonneg_float)
    sau_train_mode: bool = setting(SAU_TRAIN_MODE, "sau: BatchNorm in train mode for the update (default: fixed, "
                                                   "as BackdoorBench)", action=argparse.BooleanOptionalAction)
    ibau_lr: float = setting(IBAU_LR, "i_bau: Adam's lr (AMSGrad, constant) for the unlearning steps", type=pos_float)
    ibau_k: int = setting(IBAU_K, "i_bau: fixed-point iterations of the implicit hypergradient; 0: the outer loss's "
                                  "own gradient", type=nonneg_int)
    ibau_portion: float = setting(IBAU_PORTION, "i_bau: share of each unlearning batch given the perturbation (at "
                                                "least one image)", type=fraction)
    ibau_radius: Optional[float] = setting(IBAU_RADIUS, "i_bau: project each round's perturbation onto the L2 ball "
                                           "of this radius (in model-input units; the paper's constraint, commented "
                                           "out in both codes); default: none", type=pos_float)
    reactivate_samples: int = setting(REACTIVATE_SAMPLES, "after every defence, fine-tune a copy on the defender's "
                                      "data with this many of its samples triggered and relabelled to the target, and "
                                      "record its ASR (backdoor re-activation); 0: not", type=nonneg_int)
    reactivate_epochs: int = setting(REACTIVATE_EPOCHS, "epochs of the re-activation fine-tuning", type=pos_int)
    reactivate_lr: float = setting(REACTIVATE_LR, "lr of the re-activation fine-tuning (SGD momentum 0.9, constant)",
                                   type=pos_float)

    @classmethod
    def from_args(cls, args):
        values = {f.name: getattr(args, f.name) for f in fields(cls)}
        values["nad_betas"] = tuple(values["nad_betas"])  # a list from config.json
        return cls(**values)


# ---- lr schedules: step index k (0-based) -> multiplier of the cell's lr ------------------------------------------

def epoch_cosine(epoch_steps, t_max):
    """torch's CosineAnnealingLR(T_max=t_max) stepped once an epoch of `epoch_steps` steps: 0.5 (1 + cos(pi e /
    t_max)) in epoch e = k // epoch_steps; past t_max it rises again (the closed form torch's recursion follows)."""
    return lambda k: 0.5 * (1 + math.cos(math.pi * (k // epoch_steps) / t_max))


def step_cosine(t_max):
    """CosineAnnealingLR(T_max=t_max) stepped after every batch: a cosine of period 2 t_max steps."""
    return lambda k: 0.5 * (1 + math.cos(math.pi * k / t_max))


def random_crop(x, padding, gen):
    """torchvision's RandomCrop(size, padding) on each image of an N x C x H x W batch: zero-padded by `padding`
    on every side, then the H x W window at an offset drawn per image (from `gen`, on the CPU) in [0, 2 padding]."""
    n, _, h, w = x.shape
    dy, dx = (torch.randint(0, 2 * padding + 1, (n,), generator=gen).to(x.device) for _ in range(2))
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]
    padded = F.pad(x, (padding,) * 4).permute(0, 2, 3, 1)
    return padded[torch.arange(n, device=x.device)[:, None, None], rows, cols].permute(0, 3, 1, 2)


@dataclass
class DefenceRun:
    """One defence cell at work: the defender's data (already the train-fraction subset), the cell, the flags,
    where it runs, and the cell's generator (batch order and augmentation, seeded by cell.seed). `epoch_steps`
    and `steps`: a reference epoch and the budget, in optimisation steps."""
    domain: object
    cell: object
    cfg: DefenceConfig
    device: torch.device
    precision: object
    evaluate: object
    on_epoch: object
    gen: torch.Generator

    def __post_init__(self):
        procedure = self.cell.procedure
        epochs, epoch_steps = procedure.budget
        self.epoch_steps = self.cfg.defence_epoch_steps or epoch_steps
        self.steps = self.cfg.defence_steps or epochs * self.epoch_steps
        self._stream = self._batches()

    def _batches(self):
        while True:
            yield from epoch_batches(len(self.domain), self.cell.batch_size, self.gen)

    def take(self, steps):
        """The next `steps` index batches of the defender's data, epoch after epoch in the cell's order."""
        return list(itertools.islice(self._stream, steps))

    def pixel_fn(self):
        """The train-time augmentation: RandomCrop(padding --defence_crop) where the defence's reference has it."""
        pad = self.cfg.defence_crop if self.cell.procedure.crop else 0
        return (lambda x: random_crop(x, pad, self.gen)) if pad else None

    def reference_optimizer(self, params, lr):
        """The optimizer of the defence's reference: SGD with momentum and weight decay from the flags where it has
        them; "adam" (sau, i_bau): BackdoorBench's Adam (argparser_opt_scheduler: amsgrad, torch's betas 0.9/0.999),
        no weight decay where the reference has none."""
        procedure = self.cell.procedure
        decay = self.cfg.defence_weight_decay if procedure.decay else 0.0
        if procedure.optimizer == "adam":
            return torch.optim.Adam(params, lr=lr, weight_decay=decay, amsgrad=True)
        momentum = self.cfg.defence_momentum if procedure.optimizer == "momentum" else 0.0
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=decay)

    def optimizer(self, params, schedule, steps=None):
        """reference_optimizer at cell.lr under `schedule` (step -> lr multiplier) over `steps` (default the
        budget) steps."""
        return _ScheduledSteps(self.reference_optimizer(params, self.cell.lr), schedule, steps or self.steps)

    def fine_tune(self, model, curve, schedule, step=ce_step):
        """The budget's steps of `step` on every layer (head kept), cell.epochs evaluations spread evenly over
        them, appended to `curve`."""
        trainable, bn_eval = scope_params(model, "all")
        epochs = self.cell.epochs
        bounds = [round(self.steps * e / epochs) for e in range(epochs + 1)]
        with training_only(model, trainable):
            optimizer = self.optimizer(trainable, schedule)
            return train_epochs(model, self.domain, optimizer, curve, epochs, self.cell.batch_size, self.gen,
                                self.device, self.precision, self.evaluate, self.on_epoch, bn_eval=bn_eval, step=step,
                                name=f"defence {self.cell.defence}", pixel_fn=self.pixel_fn(),
                                rounds=lambda e: self.take(bounds[e] - bounds[e - 1]))

    def hold(self, model, curve):
        """cell.epochs evaluations of a model the defence no longer changes (a data-free defence), one measured."""
        measured = self.evaluate(model)
        for epoch in range(1, self.cell.epochs + 1):
            curve.append(dict(measured))
            if self.on_epoch:
                self.on_epoch(epoch, curve[-1])
        return curve


def require_layers(model, layers, defence):
    missing = [n for n in layers if not isinstance(getattr(model, n, None), nn.Module)]
    if missing:
        raise UsageError(f"defence {defence} needs a torchvision-layout ResNet ({', '.join(layers)}); "
                         f"{type(model).__name__} has no {', '.join(missing)}")


class Taps:
    """Forward hooks keeping the outputs of named submodules from the model's last forward pass (`out`), and the
    (first) inputs of those named in `inputs` (`out` too, by name)."""

    def __init__(self, model, names, inputs=()):
        self.out = {}
        self.handles = [model.get_submodule(n).register_forward_hook(self._keeper(n)) for n in names] + [
            model.get_submodule(n).register_forward_pre_hook(self._input_keeper(n)) for n in inputs]

    def _keeper(self, name):
        def keep(module, inputs, output):
            self.out[name] = output
        return keep

    def _input_keeper(self, name):
        def keep(module, inputs):
            self.out[name] = inputs[0]
        return keep

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
