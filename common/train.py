"""Device, precision, optimisers, and the plain training / evaluation loops."""
import contextlib
import inspect
import logging
import random
import sys

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common.cli import UsageError
from common.data import epoch_batches

log = logging.getLogger("sophon")

class _DirectionStep(torch.optim.Optimizer):
    """w <- w - lr * direction(g), the direction computed from all of a group's gradients at once."""

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                torch._foreach_add_(params, self.direction([p.grad for p in params]), alpha=-group["lr"])


class SignSGD(_DirectionStep):
    """w <- w - lr * sign(g): every coordinate moves by lr whatever its gradient's size. Adam's first step
    (and nearly every step while its second moment tracks g^2) is this update, so it is the scale-free
    attacker in its simplest form (signSGD, Bernstein et al. 2018)."""

    @staticmethod
    def direction(grads):
        return torch._foreach_sign(grads)


class NormalizedSGD(_DirectionStep):
    """w <- w - lr * g / ||g||, the norm over all of a group's gradients: a step of length lr whatever the
    gradient's scale (Booster's normalised simulated attack step, Huang et al. ICLR'25)."""

    @staticmethod
    def direction(grads):
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        return torch._foreach_div(grads, norm.clamp_min(1e-12))


# One table for attacks and simulated fine-tuners: torch defaults except lr (SPEC §9).
OPTIMIZERS = {
    "sgd": (torch.optim.SGD, {}),
    "momentum": (torch.optim.SGD, {"momentum": 0.9}),
    "adam": (torch.optim.Adam, {}),
    "adamw": (torch.optim.AdamW, {}),
    "rmsprop": (torch.optim.RMSprop, {}),
    "adagrad": (torch.optim.Adagrad, {}),
    "adadelta": (torch.optim.Adadelta, {}),
    "sign": (SignSGD, {}),
    "normalized": (NormalizedSGD, {}),
}
ATTACK_WEIGHT_DECAY = {"sgd": 1e-4, "momentum": 1e-4}


def make_optimizer(name, params, lr, *, attack=False, device=None, compiled=False, table=OPTIMIZERS):
    """`table`: name -> (class, keyword arguments), OPTIMIZERS or a registry drawn from it (FTS_OPTIMIZERS).
    `device` (the simulated fine-tuners' optimisers pass it): few kernel launches per step, fused on CUDA
    where torch has it (Adam, AdamW, SGD) and the model is not compiled, else foreach; the same update up to
    float rounding."""
    cls, kwargs = table[name]
    kwargs = dict(kwargs, lr=lr)
    if attack and name in ATTACK_WEIGHT_DECAY:
        kwargs["weight_decay"] = ATTACK_WEIGHT_DECAY[name]
    if device is not None:
        kwargs.update(launch_options(cls, device, compiled))
    return cls(params, **kwargs)


def launch_options(cls, device, compiled=False):
    """Fused kernels refuse a gradient laid out unlike its parameter, and a compiled backward gives convolution
    weights inductor's layout (seen on an H200, torch 2.11: "check_fast_path_restrictions"), so a compiled
    model's optimisers take foreach, which accepts any layout."""
    accepted = inspect.signature(cls.__init__).parameters
    fusable = cls in (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)
    if device.type == "cuda" and not compiled and "fused" in accepted and fusable:
        return {"fused": True}  # SGD has it from torch 2.3 on (else foreach)
    return {"foreach": True} if "foreach" in accepted else {}


def resolve_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError("--device mps: MPS is not available")
    return torch.device(name)


class Precision:
    """Speed options resolved once: bf16 autocast and channels_last on CUDA only; torch.compile on CUDA, and
    on any device with compile="always" (the benchmark, the tests).

    channels_last is not applied under compile: inductor lays out convolutions itself on CUDA
    (torch._inductor.config.layout_optimization), and channels_last parameters under compile crash torch 2.11's
    compiled convolution backward (assert_size_stride 'stride 9==1 at dim=1': its meta function predicted
    the weight gradient's layout from (input, grad_output) where cuDNN uses (input, weight);
    https://github.com/pytorch/pytorch/issues/171622, changed in 2.12; not re-tested on a GPU here)."""

    def __init__(self, device, amp="off", channels_last=False, compile=False):
        self.device = device
        cuda = device.type == "cuda"
        self.amp = cuda and amp == "auto" and torch.cuda.is_bf16_supported()
        self.compile = bool(compile) and (cuda or compile == "always")
        self.channels_last = cuda and channels_last and not self.compile
        if cuda and channels_last and self.compile:
            log.warning("--channels_last is not applied under --compile (inductor chooses the convolution layout "
                        "itself; channels_last parameters crash the compiled backward of torch 2.11, "
                        "pytorch/pytorch#171622)")

    def autocast(self):
        if self.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def prepare(self, model):
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def maybe_compile(self, model):
        """The model's forward (and, through AOTAutograd, its backward) compiled for fixed shapes: one graph
        per batch shape and BatchNorm mode (stage 2: support, query, NTR, and the query and support shapes again
        with frozen BatchNorm for head-only fine-tuners; stage 1: full and last batch), never a dynamic-shape
        recompile."""
        return torch.compile(model, dynamic=False) if self.compile else model

    def describe(self):
        return f"amp={'bf16' if self.amp else 'off'} channels_last={self.channels_last} compile={self.compile}"

    @property
    def numerics(self):
        """What changes a training curve beyond run-to-run noise: the device type and the arithmetic."""
        return f"{self.device.type} {'bf16' if self.amp else 'fp32'}"


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def progress(iterable=None, disable=False, **kwargs):
    """tqdm, quiet when stderr is not a terminal (logs, CI) or when `disable` (ranks other than 0)."""
    return tqdm(iterable, disable=disable or not sys.stderr.isatty(), dynamic_ncols=True, **kwargs)


@torch.no_grad()
def predict(model, domain, device, precision, bs=256, pixel_fn=None, indices=None):
    """Predicted labels for every sample (or `indices`) of a domain, in order; no sample dropped."""
    was_training = model.training
    model.eval()
    idx_all = torch.arange(len(domain)) if indices is None else indices
    preds = []
    for start in range(0, len(idx_all), bs):
        idx = idx_all[start:start + bs]
        x = domain.to_input(domain.images[idx], device, pixel_fn, precision.channels_last)
        with precision.autocast():
            preds.append(model(x).argmax(1).cpu())
    model.train(was_training)
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.int64)


def accuracy(model, domain, device, precision, bs=256):
    """Top-1 accuracy in percent over every sample of the domain."""
    preds = predict(model, domain, device, precision, bs)
    return 100.0 * (preds == domain.labels).sum().item() / max(len(domain), 1)


def ce_step(model, x, y, optimizer, precision):
    """The plain training step: cross-entropy, backward, optimizer.step(). Returns (loss, logits)."""
    with precision.autocast():
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss, logits


SAM_EPS = 1e-12  # added to the gradient norm (BackdoorBench utils/defense_utils/sam/sam.py perturb_eps)


@contextlib.contextmanager
def bn_stats_kept(model):
    """BatchNorm running statistics (and batch counts) as they were before the block, whatever it ran."""
    buffers = [b for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for b in m.buffers()]
    saved = [b.detach().clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in zip(buffers, saved):
                b.copy_(s)


def sam_step(model, x, y, optimizer, precision, rho, adaptive=False, sync=None, loss_fn=None):
    """One sharpness-aware step (Foret et al. 2021; ASAM, Kwon et al. 2021, when `adaptive`).

    g = grad L(w); e = rho g / (||g|| + SAM_EPS), the norm global over every trained tensor (adaptive:
    e = rho w^2 g / (||w g|| + SAM_EPS), as BackdoorBench's SAM); the gradient at w + e, then w restored
    exactly and optimizer.step() with that second gradient. Returns the first pass's (loss, logits). The first
    pass updates BatchNorm's running statistics as any training step; the perturbed pass leaves them as they
    were (BackdoorBench sets the momentum of BatchNorm to 0 for it: the same). A non-finite first gradient is
    not used to perturb; the step is then skipped by the optimizer (common.finetune._ScheduledSteps).
    `sync(grads)`, when given, runs on both passes' gradients before they are used (stage 2 averages them over
    the ranks there). `loss_fn(logits, y)`: the loss of both passes (default cross-entropy)."""
    loss_fn = loss_fn or (lambda logits, y: F.cross_entropy(logits.float(), y))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    optimizer.zero_grad(set_to_none=True)
    with precision.autocast():
        logits = model(x)
    loss = loss_fn(logits, y)
    loss.backward()
    live = [p for p in params if p.grad is not None]
    if sync is not None:
        sync([p.grad for p in live])
    with torch.no_grad():
        scaled = [p.grad * p.abs() if adaptive else p.grad for p in live]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s) for s in scaled]))
        saved = [p.detach().clone() for p in live]
        if bool(norm.isfinite()):
            scale = rho / (norm + SAM_EPS)
            for p, s in zip(live, scaled):
                p.add_((s * p.abs() if adaptive else s) * scale)
    optimizer.zero_grad(set_to_none=True)
    with bn_stats_kept(model):  # restored after backward: the forward saved the statistics for it
        with precision.autocast():
            perturbed = loss_fn(model(x), y)
        perturbed.backward()
    if sync is not None:
        sync([p.grad for p in live])
    with torch.no_grad():
        for p, w in zip(live, saved):
            p.copy_(w)
    optimizer.step()
    return loss, logits


def train_epoch(model, domain, optimizer, device, precision, bs, gen, params=None, bn_eval_modules=(), desc="train",
                step=ce_step, batches=None, pixel_fn=None):
    """One epoch of `step` (ce_step, or a defence's own, with its signature) over shuffled batches (or over the
    index batches `batches`), `pixel_fn` editing each [0, 1] image batch (a train-time augmentation); returns
    (mean loss, train accuracy %) from the steps' on-the-fly figures."""
    model.train()
    for m in bn_eval_modules:
        m.eval()
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    batches = epoch_batches(len(domain), bs, gen) if batches is None else batches
    for idx in progress(list(batches), desc=desc, leave=False):
        x = domain.to_input(domain.images[idx], device, pixel_fn, precision.channels_last)
        y = domain.labels[idx].to(device, non_blocking=True)
        loss, logits = step(model, x, y, optimizer, precision)
        total_loss += loss.detach() * len(idx)
        correct += (logits.argmax(1) == y).sum()
        seen += len(idx)
    return (total_loss / max(seen, 1)).item(), 100.0 * correct.item() / max(seen, 1)


class AccuracyEval:
    """Picklable evaluator (grid workers get a copy): {"test_acc": %} on a domain's every sample."""

    def __init__(self, domain, bs=256, key="test_acc"):
        self.domain, self.bs, self.key = domain, bs, key

    def __call__(self, model, device, precision):
        return {self.key: accuracy(model, self.domain, device, precision, self.bs)}
