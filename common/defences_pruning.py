"""The defences that prune: fine-pruning (then fine-tunes) and the data-free CLP. Each is `recipe(model, run,
curve)` on a common.defence_run.DefenceRun; each docstring says which reference it follows and where it does not."""
import math

import torch
from torch import nn

from common.cli import UsageError
from common.defence_run import BB_T_MAX, Taps, epoch_cosine, require_layers
from common.models import classifier_head


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
