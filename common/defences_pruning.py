"""The defences that prune: fine-pruning (then fine-tunes), the data-free CLP and ANP. Each is `recipe(model, run,
curve)` on a common.defence_run.DefenceRun; each docstring says which reference it follows and where it does not."""
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from common.cli import UsageError
from common.defence_run import BB_T_MAX, Taps, epoch_cosine, require_layers
from common.models import classifier_head
from common.train import bn_stats_kept, progress


# ---- fine_pruning -------------------------------------------------------------------------------------------------

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
    `max_drop` of the unpruned one. Pruning ends at the first share that does not, and that share is the one
    kept, as in BackdoorBench defense/fp.py, whose pruned net and kept net (`last_net = net_pruned`) are one
    object: the model it fine-tunes carries the mask of the step that broke the rule."""
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
        pruned, after = n, accuracy(mask)
        if before - after >= max_drop * before:
            break
    return order[:pruned], before, after


def fine_pruning(model, run, curve):
    """Fine-pruning (Liu et al., RAID 2018; BackdoorBench defense/fp.py): the output channels of layer4 (the
    last convolutional stage, before avgpool) ranked by mean activation on the defender's data, the lowest
    pruned 1% (--prune_step) at a time until clean accuracy on that data falls by 10% (relative,
    --prune_acc_drop) of the unpruned model's or more, the model kept pruned at that share (prune_plan), then
    ft's recipe (its budget, schedule and augmentation). Epoch 0 is before pruning.

    The mask is a forward hook on layer4 multiplying its output by 0/1 per channel: fine-tuning cannot bring
    a pruned channel back, and the hook stays on the model. BackdoorBench masks the same channels as columns
    of the head (identical outputs: avgpool is per channel). Deviations: accuracy is measured on the
    defender's training data, not on the clean test split as BackdoorBench does; it prunes exactly n
    channels at share n (BackdoorBench's seq_sort[0:n - 1] prunes n - 1); and only a drop ends pruning
    (BackdoorBench's abs() also stops at a 10% rise). defence_info records the channels pruned."""
    require_layers(model, ("layer4", "avgpool"), "fine_pruning")
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
    return run.fine_tune(model, curve, epoch_cosine(run.epoch_steps, BB_T_MAX))


# ---- clp ----------------------------------------------------------------------------------------------------------

def conv_bn_pairs(model):
    """(conv, BatchNorm2d) pairs: each BatchNorm2d with the Conv2d last seen before it in module order
    (BackdoorBench defense/clp.py CLP_prune: "Convolutional layer should be followed by a BN layer")."""
    pairs, conv = [], None
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            conv = m
        elif isinstance(m, nn.BatchNorm2d) and conv is not None and conv.out_channels == m.num_features:
            pairs.append((conv, m))
    return pairs


@torch.no_grad()
def channel_lipschitz(conv, bn):
    """UCLC per output channel k: the spectral norm of conv.weight[k] (C_in x kh kw) times |gamma_k / sigma_k|,
    sigma_k the square root of BatchNorm's running variance (clp.py, without eps, as there)."""
    w = conv.weight.detach().float().flatten(2) * (bn.weight.detach().float() / bn.running_var.float().sqrt()).abs(
    ).view(-1, 1, 1)
    return torch.linalg.matrix_norm(w, ord=2)


@torch.no_grad()
def clp_prune(model, u):
    """Zero gamma and beta of the channels whose UCLC exceeds mean + u * std (unbiased) of their layer's; returns
    (channels pruned, channels seen)."""
    pruned = seen = 0
    for conv, bn in conv_bn_pairs(model):
        lips = channel_lipschitz(conv, bn)
        index = torch.nonzero(lips > lips.mean() + u * lips.std()).flatten()
        bn.weight[index] = 0
        bn.bias[index] = 0
        pruned, seen = pruned + len(index), seen + len(lips)
    return pruned, seen


def clp(model, run, curve):
    """Channel Lipschitzness-based Pruning (Zheng et al., ECCV 2022; BackdoorBench defense/clp.py), data-free:
    in every Conv2d + BatchNorm2d pair, the channels whose upper bound of the channel Lipschitz constant exceeds
    the layer's mean + --clp_u (3) std are pruned (BatchNorm's gamma and beta zeroed). No training, no data; the
    cell's evaluations after epoch 0 all show the pruned model. defence_info records the channels pruned."""
    pruned, seen = clp_prune(model, run.cfg.clp_u)
    curve.defence_info = {"pruned_channels": pruned, "channels": seen}
    return run.hold(model, curve)


# ---- anp ----------------------------------------------------------------------------------------------------------

def bn_neurons(model):
    """ANP's neurons: the channels of every BatchNorm2d (with weight and bias), as (name, module) in module order."""
    bns = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and m.affine]
    if not bns:
        raise UsageError(f"defence anp perturbs and prunes BatchNorm2d channels; {type(model).__name__} has none")
    return bns


def perturbed_bn(model, bns, mask, noise=None):
    """`model`'s parameters as ANP's NoisyBatchNorm2d uses them (anp_batchnorm.py forward), for functional_call:
    each BatchNorm2d's weight times (mask + noise[0]) and its bias times (1 + noise[1]), per neuron (`mask` and each
    noise row flat over bn_neurons' channels); without `noise` the weight times the mask, the bias as it is. The
    model's own parameters enter detached: ANP trains none of them."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    ones = torch.ones_like(mask)
    weight, bias = (mask, ones) if noise is None else (mask + noise[0], ones + noise[1])
    sizes = [bn.num_features for _, bn in bns]
    for (name, bn), w, b in zip(bns, weight.split(sizes), bias.split(sizes)):
        params[f"{name}.weight"] = bn.weight.detach() * w
        params[f"{name}.bias"] = bn.bias.detach() * b
    return params


def anp_step(model, bns, x, y, mask, optimizer, cfg, gen, precision):
    """One iteration of optimize_mask_cifar.py mask_train on the batch (x, y), the model in train mode: every
    neuron's weight and bias noise drawn uniform in +-anp_eps (from `gen`), --anp_steps signed-gradient steps of
    anp_eps / anp_steps up the loss (sign_grad, then SGD at that lr; not clipped back to +-eps, as there), then one
    step of `optimizer` on the masks against anp_alpha * L(masks) + (1 - anp_alpha) * L(masks, noise), the masks
    clipped to [0, 1] (clip_mask). Without noise (anp_eps 0) the loss is anp_alpha * L(masks), as there."""
    def loss(noise):
        with precision.autocast():
            logits = functional_call(model, perturbed_bn(model, bns, mask, noise), (x,))
        return F.cross_entropy(logits.float(), y)

    eps, robust = cfg.anp_eps, 0.0
    if eps > 0:
        noise = torch.empty(2, len(mask)).uniform_(-eps, eps, generator=gen).to(mask.device).requires_grad_()
        for _ in range(cfg.anp_steps):
            grad, = torch.autograd.grad(loss(noise), noise)
            with torch.no_grad():
                noise += eps / cfg.anp_steps * grad.sign()
        robust = loss(noise.detach())
    total = cfg.anp_alpha * loss(None) + (1 - cfg.anp_alpha) * robust
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    with torch.no_grad():
        mask.clamp_(0, 1)
    return total.detach()


@torch.no_grad()
def anp_prune(bns, mask, threshold):
    """Prune the neurons whose mask is <= threshold as prune_neuron_cifar.py `pruning` does: the BatchNorm weight
    zeroed, the bias kept. Returns {layer name: neurons pruned} for the layers that lost any."""
    pruned = {}
    for (name, bn), m in zip(bns, mask.split([bn.num_features for _, bn in bns])):
        index = torch.nonzero(m <= threshold).flatten()
        bn.weight[index] = 0
        if len(index):
            pruned[name] = len(index)
    return pruned


def anp(model, run, curve):
    """Adversarial Neuron Pruning (Wu & Wang, NeurIPS 2021), as its code (github.com/csdongxian/ANP_backdoor,
    commit ec7b179 read: optimize_mask_cifar.py, prune_neuron_cifar.py, models/anp_batchnorm.py): a mask in [0, 1]
    (from 1) on every BatchNorm2d channel, optimised by SGD (--anp_lr 0.2, momentum 0.9, constant) for the budget
    (2000 steps) against alpha * the clean loss + (1 - alpha) * the loss under adversarial multiplicative noise on
    each channel's BatchNorm weight and bias (anp_step), on the defender's data with RandomCrop, the model in train
    mode; then the channels whose mask ends <= --anp_threshold (0.2) pruned, their BatchNorm weight zeroed and the
    bias kept (anp_prune). The model's own weights and BatchNorm statistics are not trained: the noisy BatchNorm is
    a functional_call with the scaled parameters, and the running statistics its train-mode passes move are put
    back, so the delivered model carries no hook, parametrisation or replaced module. The cell's evaluations after
    epoch 0 all show the pruned model. defence_info records the channels pruned, in all and per layer.

    BackdoorBench f02e353 (defense/anp.py, utils/defense_utils/anp/anp_model/anp_batchnorm.py, config/defense/anp/
    config.yaml, read) runs the same loop with its config's lr 0.01 at batch size 256 on 5% of CIFAR-10, and picks
    the threshold from a sweep (0 to 0.9 by 0.05) by the lowest ASR on the triggered test set within 10% of clean
    accuracy: a choice made with the attacker's trigger, which a defender holding clean data does not have; we
    prune at the paper's fixed threshold, on the original's lr. Deviations: the batch size is the cell's (the
    original: 128), its batches are drawn epoch after epoch from the defender's share (the original: with
    replacement from 1% of CIFAR-10), and RandomHorizontalFlip is not applied."""
    bns = bn_neurons(model)
    mask = torch.ones(sum(bn.num_features for _, bn in bns), device=bns[0][1].weight.device, requires_grad=True)
    optimizer = run.reference_optimizer([mask], run.cell.lr)
    pixel_fn, was_training = run.pixel_fn(), model.training
    model.train()
    try:
        with bn_stats_kept(model):
            for idx in progress(run.take(run.steps), desc="defence anp", leave=False):
                x = run.domain.to_input(run.domain.images[idx], run.device, pixel_fn, run.precision.channels_last)
                y = run.domain.labels[idx].to(run.device, non_blocking=True)
                anp_step(model, bns, x, y, mask, optimizer, run.cfg, run.gen, run.precision)
    finally:
        model.train(was_training)
    layers = anp_prune(bns, mask.detach(), run.cfg.anp_threshold)
    curve.defence_info = {"pruned_channels": sum(layers.values()), "channels": len(mask), "pruned_layers": layers}
    return run.hold(model, curve)
