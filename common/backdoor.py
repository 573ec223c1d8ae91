"""BadNets: the trigger, poisoned training data, and the attack metrics (ASR, untargeted ASR, RA).

The trigger is a white `size` x `size` square flush with the bottom-right corner of the final image,
stamped on the un-normalised image after every geometric transform and before normalisation (the seed
stamped the normalised tensor and normalised again: a global corruption, not a patch). ASR, untargeted
ASR and RA count only test images whose true class is not the target.
"""
import functools
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F

from common.cli import UsageError, fraction, nonneg_int, pos_int
from common.settings import Settings, setting
from common.train import predict

POISON_SEED = 20240520  # fixed: the same samples are poisoned in every run
ATTACK_METRICS = ("asr", "untargeted_asr", "ra")  # besides clean test_acc, after every fine-tuning epoch


def stamp_trigger(x, size):
    """White square in the bottom-right corner of a batch (uint8: 255, float in [0, 1]: 1.0); a copy."""
    if size > x.shape[-1] or size > x.shape[-2]:
        raise UsageError(f"trigger of {size} px does not fit a {x.shape[-2]}x{x.shape[-1]} image")
    x = x.clone()
    x[..., -size:, -size:] = 255 if x.dtype == torch.uint8 else 1.0
    return x


def check_trigger(size, target, image_hw, num_classes):
    if size > min(image_hw):
        raise UsageError(f"--trigger_size {size} is larger than the {image_hw[0]}x{image_hw[1]} images")
    if not 0 <= target < num_classes:
        raise UsageError(f"--target_label {target} is outside the {num_classes} classes (0..{num_classes - 1})")


def poison(domain, percent, target, size):
    """A copy of `domain` with round(percent * N) non-target samples stamped and relabelled to `target`."""
    candidates = torch.nonzero(domain.labels != target).flatten()
    count = min(len(candidates), round(percent * len(domain)))
    gen = torch.Generator().manual_seed(POISON_SEED)
    chosen = candidates[torch.randperm(len(candidates), generator=gen)[:count]].sort().values
    images, labels = domain.images.clone(), domain.labels.clone()
    images[chosen] = stamp_trigger(images[chosen], size)
    labels[chosen] = target
    return replace(domain, images=images, labels=labels, _stats={}), chosen


class BackdoorEval:
    """Picklable evaluator: clean accuracy on every sample; ASR, untargeted ASR and RA on the triggered
    non-target samples. Keys are prefixed (e.g. "orig_") when asked."""

    def __init__(self, domain, size, target, bs=256, prefix=""):
        self.domain, self.size, self.target, self.bs, self.prefix = domain, size, target, bs, prefix
        self.victims = torch.nonzero(domain.labels != target).flatten()

    def __call__(self, model, device, precision):
        d = self.domain
        clean = predict(model, d, device, precision, self.bs)
        triggered = predict(model, d, device, precision, self.bs, functools.partial(stamp_trigger, size=self.size),
                            indices=self.victims)
        truth = d.labels[self.victims]
        n = max(len(self.victims), 1)
        p = self.prefix
        return {f"{p}test_acc": 100.0 * (clean == d.labels).sum().item() / max(len(d), 1),
                f"{p}asr": 100.0 * (triggered == self.target).sum().item() / n,
                f"{p}untargeted_asr": 100.0 * (triggered != truth).sum().item() / n,
                f"{p}ra": 100.0 * (triggered == truth).sum().item() / n}


def target_query_loss(domain, size, target, device, channels_last):
    """FTS query loss of the irreversible backdoor: CE towards the target on the triggered query images."""
    stamp = functools.partial(stamp_trigger, size=size)

    def loss(net, x, y):
        logits = net(domain.to_input(x, device, stamp, channels_last))
        return F.cross_entropy(logits.float(), torch.full((len(x),), target, device=device, dtype=torch.long))
    return loss


@dataclass
class TriggerSettings(Settings):
    """The trigger; None means 'from the parent checkpoint' (stages 2 and 3)."""
    poison_percent: Optional[float] = setting(None, "share of training samples poisoned", type=fraction)
    target_label: Optional[int] = setting(None, type=nonneg_int)
    trigger_size: Optional[int] = setting(None, "side of the white square (px)", type=pos_int)


def stage2_summary_keys(final_orig, final_finetune):
    """The backdoor's own stage-2 summary.json keys (SPEC §8); the fine-tune ones are None when skipped."""
    return {"orig_asr": final_orig["orig_asr"],
            "restrict_asr_after_finetune": None if final_finetune is None else final_finetune["asr"],
            "restrict_clean_acc_after_finetune": None if final_finetune is None else final_finetune["test_acc"]}
