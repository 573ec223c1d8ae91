"""Fine-tuning attacks: strategies, the attack grid, and the overhead-versus-scratch verdicts."""
import argparse
import itertools
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from common.cli import UsageError, batch_size, comma_list, nonneg_int, pos_float, pos_int
from common.models import head_param_names, head_path, reinit_head
from common.train import OPTIMIZERS, make_optimizer, train_epoch

# strategy -> (re-initialise the head, which parameters train)
STRATEGIES = {"direct_all": (False, "all"), "initfc_all": (True, "all"),
              "direct_fc": (False, "head"), "initfc_fc": (True, "head")}
SCOPES = ("all", "head")


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


@dataclass(frozen=True)
class Attack:
    strategy: str
    optimizer: str
    lr: float
    batch_size: int
    epochs: int
    seed: int

    @property
    def family(self):
        return (self.strategy, self.optimizer, self.lr, self.batch_size)

    def label(self):
        return f"{self.strategy} {self.optimizer} lr={self.lr:g} bs={self.batch_size}"

    def as_dict(self):
        return asdict(self)


def grid_flags(default_epochs, default_lr, default_bs):
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--epochs", type=pos_int, default=default_epochs, help="fine-tuning epochs per attack")
    p.add_argument("--finetune_lr", type=pos_float, default=default_lr)
    p.add_argument("--strategies", type=comma_list(str, tuple(STRATEGIES)), default=["direct_all"],
                   help="direct_all, initfc_all (new head), direct_fc, initfc_fc (head only)")
    p.add_argument("--optimizers", type=comma_list(str, tuple(OPTIMIZERS)), default=["momentum"],
                   help="sgd, momentum, adam, adamw, rmsprop, adagrad, adadelta")
    p.add_argument("--lrs", type=comma_list(pos_float), default=None, help="default: [--finetune_lr]")
    p.add_argument("--batch_sizes", type=comma_list(batch_size), default=None, help="default: [--bs]")
    p.add_argument("--seeds", type=comma_list(nonneg_int), default=None, help="default: [--seed]")
    p.add_argument("--jobs", type=pos_int, default=1, help="worker processes running grid cells in parallel")
    p.add_argument("--devices", type=comma_list(str), default=None,
                   help="devices handed to the workers in turn, e.g. cuda:0,cuda:1 (default: --device)")
    return p


def expand_grid(args):
    """Every attack of the grid, in a stable order; list flags win over their single-value forms."""
    lrs = args.lrs or [args.finetune_lr]
    sizes = args.batch_sizes or [args.bs]
    seeds = args.seeds if args.seeds is not None else [args.seed]
    return [Attack(s, o, float(lr), int(b), args.epochs, int(seed))
            for s, o, lr, b, seed in itertools.product(args.strategies, args.optimizers, lrs, sizes, seeds)]


def run_attack(model, train_domain, attack, device, precision, evaluate, on_epoch=None):
    """Fine-tune `model` in place under `attack`; returns [evaluate(model)] for epochs 0..attack.epochs.

    Epoch 0 is measured as fine-tuning starts, after any head re-initialisation.
    """
    if attack.batch_size < 2:
        raise UsageError(f"batch size {attack.batch_size}: BatchNorm needs two samples per batch")
    gen = torch.Generator().manual_seed(attack.seed)
    reinit, scope = STRATEGIES[attack.strategy]
    if reinit:
        reinit_head(model, gen)
    trainable, bn_eval = scope_params(model, scope)
    keep = {id(p) for p in trainable}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    optimizer = make_optimizer(attack.optimizer, trainable, attack.lr, attack=True)
    curve = [evaluate(model)]
    if on_epoch:
        on_epoch(0, curve[0])
    for epoch in range(1, attack.epochs + 1):
        train_epoch(model, train_domain, optimizer, device, precision, attack.batch_size, gen,
                    bn_eval_modules=bn_eval, desc=f"fine-tune epoch {epoch}/{attack.epochs}")
        curve.append(evaluate(model))
        if on_epoch:
            on_epoch(epoch, curve[-1])
    for p in model.parameters():
        p.requires_grad_(True)
    return curve


# ---- verdicts ------------------------------------------------------------------------------------

def epochs_to_reach(curve, target):
    """First epoch (0-based, epoch 0 = before fine-tuning) whose value reaches `target`; None if never."""
    for epoch, value in enumerate(curve):
        if value >= target - 1e-9:
            return epoch
    return None


def auc(curve):
    """Trapezoidal area under a per-epoch curve, normalised by the number of epochs."""
    if len(curve) < 2:
        return float(curve[0]) if curve else 0.0
    return sum((a + b) / 2 for a, b in zip(curve[:-1], curve[1:])) / (len(curve) - 1)


def mean_std(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return mean, std


def scratch_verdicts(results, protected="sophon", reference="scratch", metric="test_acc_curve"):
    """Per attack: how much slower the protected model learns than a model trained from scratch.

    epochs_to_scratch_final: over seeds, the fastest epoch at which the protected curve reaches the
    reference's final accuracy (the attacker's best seed; None = no seed ever does). auc_ratio: area
    under the protected curve over the reference's (< 1: learns slower than scratch), mean +- std over seeds.
    """
    by_cell = {}
    for r in results:
        family = (r["strategy"], r["optimizer"], r["lr"], r["batch_size"])
        by_cell.setdefault(family, {}).setdefault(r["seed"], {})[r["start"]] = r[metric]
    verdicts = []
    for (strategy, optimizer, lr, bs), seeds in by_cell.items():
        reach, ratios = [], []
        for curves in seeds.values():
            if protected not in curves or reference not in curves:
                continue
            mine, ref = curves[protected], curves[reference]
            reach.append(epochs_to_reach(mine, ref[-1]))
            ratios.append(auc(mine) / auc(ref) if auc(ref) > 0 else None)
        if not reach:
            continue
        reached = [e for e in reach if e is not None]
        mean, std = mean_std(ratios)
        verdicts.append({"strategy": strategy, "optimizer": optimizer, "lr": lr, "batch_size": bs,
                         "protected": protected, "reference": reference,
                         "epochs_to_scratch_final": min(reached) if reached else None,
                         "epochs_to_scratch_final_per_seed": reach,
                         "auc_ratio_mean": mean, "auc_ratio_std": std, "seeds": len(reach)})
    return verdicts
