"""The defences that fine-tune: ft, ft_sam, super_ft, nad and FST. Each is `recipe(model, run, curve)` on a
common.defence_run.DefenceRun; each docstring says which reference it follows and where it does not."""
import copy
import math

import torch
import torch.nn.functional as F

from common.defence_run import (AT_EPS, BB_T_MAX, NAD_BETAS, NAD_LAYERS, NAD_P, Taps, epoch_cosine, require_layers,
                                step_cosine)
from common.finetune import scope_params, training_only
from common.models import classifier_head
from common.train import sam_step, train_epoch

# ---- ft ---------------------------------------------------------------------------------------------------------

def ft(model, run, curve):
    """Fine-tuning (BackdoorBench defense/ft.py): SGD-momentum at cell.lr with weight decay on every layer (head
    kept), RandomCrop augmentation, under CosineAnnealingLR(T_max=100) stepped once per reference epoch
    (run.epoch_steps steps), for the reference's 100 epochs. Deviation: no horizontal flip (BackdoorBench flips
    CIFAR-10 alone; a flip does not keep a digit's label)."""
    return run.fine_tune(model, curve, epoch_cosine(run.epoch_steps, BB_T_MAX))


# ---- ft_sam -----------------------------------------------------------------------------------------------------

def smooth_cross_entropy(logits, y, smoothing):
    """Cross-entropy against the target 1 - smoothing on the true class and smoothing / (C - 1) on each other
    (BackdoorBench utils/defense_utils/sam/util.py smooth_crossentropy, which takes the KL divergence to that
    target: the same gradient, the loss lower by the target's entropy)."""
    logp = F.log_softmax(logits.float(), dim=1)
    target = torch.full_like(logp, smoothing / (logp.shape[1] - 1)).scatter_(1, y[:, None], 1.0 - smoothing)
    return -(target * logp).sum(1).mean()


def ft_sam(model, run, curve):
    """FT-SAM (Zhu et al., ICCV 2023; BackdoorBench defense/ft-sam.py): ft's recipe, each step sharpness-aware
    (sam_step) with radius --sam_rho (2.0), adaptive (ASAM) unless --no-sam_adaptive, on the label-smoothed
    loss (--sam_label_smoothing 0.1); CosineAnnealingLR(T_max=100) stepped after every batch, as _train_sam
    does, so the lr is a cosine of period 200 steps over the run. Deviations: no flip (see ft)."""
    smoothing = run.cfg.sam_label_smoothing

    def step(model, x, y, optimizer, precision):
        return sam_step(model, x, y, optimizer, precision, run.cfg.sam_rho, run.cfg.sam_adaptive,
                        loss_fn=lambda logits, y: smooth_cross_entropy(logits, y, smoothing))
    return run.fine_tune(model, curve, step_cosine(BB_T_MAX), step=step)


# ---- super_ft ---------------------------------------------------------------------------------------------------

def super_ft_lr(k, steps, cfg, max_lr):
    """The lr of optimisation step k (0-based) of a `steps`-step run (backdoor-toolbox super_finetuning.py
    adjust_lr, called after each step, so step k runs at the cycle's value of iteration k - 1 and step 0 at the
    base): triangular cycles from cfg.super_ft_base_lr up to the peak in cfg.super_ft_half_cycle steps and back
    down in as many; the peak `max_lr` while iteration k - 1 is in the first round(cfg.super_ft_phase1 * steps)
    steps, cfg.super_ft_max_lr2 after."""
    i = max(k - 1, 0)
    half = cfg.super_ft_half_cycle
    pos = i % (2 * half)
    peak = max_lr if i < round(cfg.super_ft_phase1 * steps) else cfg.super_ft_max_lr2
    rise = pos / half if pos < half else (2 * half - pos) / half
    return cfg.super_ft_base_lr + (peak - cfg.super_ft_base_lr) * rise


def super_ft(model, run, curve):
    """Super-fine-tuning (Sha et al. 2022, "Fine-tuning is all you need to mitigate backdoor attacks", arXiv
    2212.09067) as backdoor-toolbox runs it (github.com/vtu81/backdoor-toolbox 9d4d909, other_defenses_tool_box/
    super_finetuning.py with other_defense.py's CIFAR-10 lrs): plain SGD (no momentum, no weight decay) on every
    layer, no augmentation, under super_ft_lr's two-phase triangular cycles, cell.lr (--super_ft_max_lr 2.5) the
    phase-1 peak, for its 100 epochs of ceil(2000 / 128) steps. An earlier backdoor-toolbox had peaks 5.0 and 0.1."""
    schedule = lambda k: super_ft_lr(k, run.steps, run.cfg, run.cell.lr) / run.cell.lr
    return run.fine_tune(model, curve, schedule)


# ---- nad ----------------------------------------------------------------------------------------------------------

def attention_map(fm, p=NAD_P, eps=AT_EPS):
    """N x 1 x H x W: sum over channels of |fm|^p, divided by its L2 norm over H x W (+ eps), per sample
    (NAD at.py AT.attention_map)."""
    am = fm.float().abs().pow(p).sum(dim=1, keepdim=True)
    return am / (torch.linalg.vector_norm(am, dim=(2, 3), keepdim=True) + eps)


def nad_loss(logits, y, student_maps, teacher_maps, betas=NAD_BETAS, p=NAD_P):
    """CE + sum_i beta_i * mean((AT(student_i) - AT(teacher_i))^2), the mean over samples and positions
    (NAD main.py train_step: F.mse_loss of the attention maps); the teacher's maps are constants."""
    loss = F.cross_entropy(logits.float(), y)
    for beta, s, t in zip(betas, student_maps, teacher_maps):
        loss = loss + beta * F.mse_loss(attention_map(s, p), attention_map(t.detach(), p))
    return loss


def nad(model, run, curve):
    """Neural Attention Distillation (Li et al., ICLR 2021; github.com/bboylyg/NAD): the teacher, a copy of the
    model fine-tuned on the defender's data for --nad_teacher_epochs reference epochs at --defence_lr (constant;
    BackdoorBench's teacher cosine stays within 2.5% of it), then the model (the student) trained for NAD's 20
    epochs of ceil(2500 / 64) steps with CE + sum_i beta_i AT(student_i, teacher_i), the teacher in eval mode,
    at --nad_first_lr (0.1) for the first --nad_first_epochs (2) epochs, then cell.lr (0.01), as NAD's
    adjust_learning_rate. RandomCrop on both. Epoch 0 is before both.

    The layers: NAD distils the outputs of the three residual groups of a WRN-16, 32, 16 and 8 px at 32 px.
    torchvision's ResNet shrinks a 32 px image to 8 px before layer1 (stride-2 conv, max pool), so layer1-3 are
    8, 4 and 2 px there (56, 28, 14 at 224 px) and layer4 is 1 x 1, whose normalised attention is constant (no
    gradient): NAD_LAYERS are layer1-3, the deepest stages whose maps carry attention at 32 px, beta3 on layer3.
    Deviations: the shared SGD (momentum 0.9, weight decay --defence_weight_decay 5e-4) where NAD's student
    uses Nesterov momentum and 1e-4; no flip (see ft). defence_info records the teacher's skipped steps."""
    require_layers(model, NAD_LAYERS, "nad")
    cfg = run.cfg
    teacher = copy.deepcopy(model)
    params, bn_eval = scope_params(teacher, "all")
    with training_only(teacher, params):
        steps = cfg.nad_teacher_epochs * run.epoch_steps
        optimizer = run.optimizer(params, lambda k: 1.0, steps)
        train_epoch(teacher, run.domain, optimizer, run.device, run.precision, run.cell.batch_size, run.gen,
                    bn_eval_modules=bn_eval, desc="nad teacher", batches=run.take(steps), pixel_fn=run.pixel_fn())
    teacher.eval().requires_grad_(False)
    curve.defence_info = {"teacher_epochs": cfg.nad_teacher_epochs, "teacher_skipped_steps": optimizer.skipped}
    first = cfg.nad_first_epochs * run.epoch_steps
    schedule = lambda k: cfg.nad_first_lr / run.cell.lr if k < first else 1.0
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
        return run.fine_tune(model, curve, schedule, step=step)


# ---- fst ----------------------------------------------------------------------------------------------------------

@torch.no_grad()
def fst_reinit_head(head, gen):
    """FST's new head (fine_tune/ft.py): weight and bias uniform in +-1 / sqrt(fan_in), drawn from `gen`."""
    bound = 1 / math.sqrt(head.weight.shape[1])
    for p in (head.weight, head.bias) if head.bias is not None else (head.weight,):
        p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1).mul_(bound).to(p.device, p.dtype))


def fst_penalty(weight, original, alpha):
    """alpha * <W, W_orig>, the sum of the elementwise product: it pushes the new head away from the original's
    direction (its gradient is alpha W_orig)."""
    return alpha * (weight * original).sum()


@torch.no_grad()
def project_norm(weight, norm):
    """W <- W * norm / ||W|| (Frobenius): the head's weight back on the original's norm after every step."""
    weight.mul_(norm / torch.linalg.vector_norm(weight))


def fst(model, run, curve):
    """Feature Shift Tuning (Min et al., NeurIPS 2023; github.com/AISafety-HKUST/stable_backdoor_purification,
    fine_tune/ft.py --ft_mode fst with its README's command): the head re-initialised (fst_reinit_head), then
    every layer trained with CE + --fst_alpha <W, W_orig> on the head's weight, the weight projected back to the
    original's norm after every step; SGD momentum 0.9 without weight decay at cell.lr (0.01), RandomCrop,
    CosineAnnealingLR(T_max = the run's epochs) stepped per epoch, for its 10 epochs of ceil(1000 / 128) steps.
    Deviation: no flip (see ft). Epoch 0 is measured before the head is replaced."""
    head = classifier_head(model)
    original = head.weight.detach().clone()
    norm = torch.linalg.vector_norm(original)
    fst_reinit_head(head, run.gen)
    alpha = run.cfg.fst_alpha

    def step(model, x, y, optimizer, precision):
        optimizer.zero_grad(set_to_none=True)
        with precision.autocast():
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y) + fst_penalty(head.weight, original, alpha)
        loss.backward()
        optimizer.step()
        project_norm(head.weight, norm)
        return loss, logits
    return run.fine_tune(model, curve, epoch_cosine(run.epoch_steps, max(run.steps // run.epoch_steps, 1)), step=step)
