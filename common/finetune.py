"""Fine-tuning attacks: strategies, the attack grid, and one attack run on a model."""
import argparse
import itertools
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

    def as_dict(self):
        return asdict(self)


def grid_flags(default_epochs, default_lr, default_bs, starts):
    """The attack grid's flags; `starts` names the start models a script fine-tunes (default: all)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--start", "--starts", dest="start", type=comma_list(str, starts), default=list(starts),
                   help=f"start models to fine-tune (any of {','.join(starts)}); under torchrun write --starts: "
                        f"torchrun's own parser takes --start for its --start-method")
    p.add_argument("--epochs", type=pos_int, default=default_epochs, help="fine-tuning epochs per attack")
    p.add_argument("--finetune_lr", type=pos_float, default=default_lr)
    p.add_argument("--strategies", type=comma_list(str, tuple(STRATEGIES)), default=["direct_all"],
                   help="direct_all, initfc_all (new head), direct_fc, initfc_fc (head only)")
    p.add_argument("--optimizers", type=comma_list(str, tuple(OPTIMIZERS)), default=["momentum"],
                   help="sgd, momentum, adam, adamw, rmsprop, adagrad, adadelta")
    p.add_argument("--lrs", type=comma_list(pos_float), default=None, help="default: [--finetune_lr]")
    p.add_argument("--batch_sizes", type=comma_list(batch_size), default=None, help="default: [--bs]")
    p.add_argument("--seeds", type=comma_list(nonneg_int), default=None, help="default: [--seed]")
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
    was_trainable = [(p, p.requires_grad) for p in model.parameters()]
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
    for p, flag in was_trainable:
        p.requires_grad_(flag)
    return curve
