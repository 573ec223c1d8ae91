"""Condition-number immunization as a stage-2 method (common.methods): `--method condnum`.

Zheng, Bai, Bullins & Yeh, "Model Immunization from a Condition Number Perspective", ICML 2025; code
amberyzheng/model-immunization-cond-num at b749964 (models/model.py `Model.reg_loss`, `total_loss`,
`configure_optimizers`; utils/loss.py `condition_number`; utils/train_imagenet.py `ImmuLoss`; configs/).
A linear probe trained by gradient descent on features X converges at a rate set by the condition number of
S = X^T X; the paper makes the restricted ("harmful") domain's S ill-conditioned and the original domain's
well-conditioned, while keeping the original task. One outer loop is one step on their combined loss:

    CE(original batch) + well * mean_l R_well(S_orig^l) + ill * mean_l R_ill(S_restricted^l)

    R_well(S) = sigma_max(S)^2 / 2 - ||S||_F^2 / (2d)        (zero iff every eigenvalue is equal)
    R_ill(S)  = 1 / (||S||_F^2 / (2d) - sigma_min(S)^2 / 2)  (small when sigma_min is small against the rest)

`--condnum_term kappa` uses the reference's other regulariser (ImmuLoss, loss_type "kappa"):
well * log kappa(S_orig) + ill / log kappa(S_restricted).

Where we follow the reference: S = X^T X, uncentred, over one batch, in float64; sigma_min is the smallest
eigenvalue that is not zero (the reference adds 1e-6 I and takes the smallest eigenvalue above it: a batch of
64 has rank 64 < 512 features, so X^T X is singular and its zero eigenvalues say nothing about the probe);
R_well and R_ill as `reg_loss` computes them, d the features' dimension (as ImmuLoss.upper_bound_loss;
`reg_loss` divides by the input's last dimension); CE on the original domain plus the weighted terms in one
step (`total_loss`), rather than alternating NTR steps (common.persistence.SupervisedSteps).
Where we do not:
- Where: the reference conditions the head's input only, training a ResNet18's layer4 and head (a linear
  probe's view). `--condnum_layers` also conditions the outputs of ResNet stages (layer1-3 by default, where
  this project's head start lives: FINDINGS.md), and the whole model is trained. A stage's output map
  (B x C x H x W) counts every position of every image as one sample of a C-vector (X is BHW x C), neither
  globally pooled nor flattened: the attacker's next convolution reads exactly these vectors (its kernel's
  taps), so their second moment is the Hessian of that layer's weights under a squared loss, the paper's
  linear-probe argument one layer down. Pooling would drop the spatial variation the next layer learns
  from and leave layer3's 256 channels with fewer samples than dimensions (bs 150); flattening gives
  C*H*W dimensions (4096 at layer1, 32 px; 200,704 at 224 px), whose S is never full rank at a batch's size
  and costs O((CHW)^3) to decompose. The head's input is B x d as in the reference.
- Scale: each S is divided by its mean eigenvalue (trace / d) before the terms. Unnormalised, R_ill falls
  as the features' scale^-4 and R_well rises as scale^4, and a BatchNorm network can change the scale at no
  cost to CE, so the terms would trade scale rather than shape; normalised, they see only the spectrum's
  shape and one pair of weights serves every layer (the reference's lambda_r1 5e-5 and lambda_r2 2e6 were
  tuned to ImageNet features at batch 64). The terms are averaged over the layers. The default weights make
  both terms move their condition numbers within tens of loops on the project's resnet18 at 32 px, where
  R_well is in the thousands (uncentred features have one dominant mean direction) and R_ill about 0.05.
- With n < d samples the spectrum is taken from the n x n Gram matrix X X^T (the same nonzero eigenvalues)
  instead of adding a jitter and thresholding at it; zero eigenvalues (fewer samples, dead channels) are
  those below ZERO_EIG times the largest.
- Optimisation: one Adam over the whole model at --lr (the stage's outer Adam, common.sophon.outer_adam) and
  plain CE, where the reference runs SGD with Nesterov momentum at 1e-5 and label smoothing 0.1; its
  `use_precond` linear layer (a ridge-preconditioned gradient for its linear extractor) has no counterpart.
- The running BatchNorm statistics stay the original domain's: the restricted batch goes through the model
  in training mode (batch statistics, as the attacker's fine-tuning sees it) and its updates are undone.

`--condnum_adam_aware`: Adam preconditions by a diagonal matrix, diag(v)^-1/2 (for a probe, v_i, the mean
squared gradient, is about sigma_r^2 S_ii / n when the residuals are independent of the features). Whatever
diagonal P an optimiser uses, gradient descent on the probe converges at the rate of kappa(P^1/2 S P^1/2),
and by van der Sluis (1969) no diagonal P brings that below kappa(C) / d, C = D^-1/2 S D^-1/2, D = diag(S)
(the uncentred correlation, or cosine, matrix). kappa(S) has no such floor: an S made ill-conditioned by
coordinates of unequal scale is made well-conditioned again by a diagonal preconditioner, Adam's included
(as a function-preserving rescale only moved our attacker's best lr: FINDINGS.md); only ill-conditioning
that survives every diagonal rescaling, near-collinear features, is left to slow it. The variant makes
kappa(C) of the restricted domain large; C is unchanged by any per-coordinate rescaling of the features (up
to CORR_EPS). The original domain's term stays on S: kappa(C) <= d kappa(S), so a well-conditioned S keeps C
well-conditioned, for SGD and Adam alike.

Not built: a term on the weights' own spectra (each conv weight as out x in*k*k). The head start survives
shuffling every weight tensor (FINDINGS.md), which keeps each tensor's distribution of entries and replaces
its spectrum by a random matrix's: the head start does not need the spectrum, so conditioning it has no
measured reason to remove it.

Cost: per step, one more forward and backward (the restricted batch) than an NTR step, and per layer and
domain S = X^T X in float64 (BHW x C^2 multiply-adds: 9600 x 64^2 at layer1, 32 px, bs 150; 470,400 x 64^2
at 224 px) and one eigvalsh of a d x d (or n x n) float64 matrix. At d = 512 an eigvalsh took 30 ms on one
CPU thread here; the terms of layer1-3 and the head, both domains, forward and backward, 0.3 s of a 2.6 s
step at 32 px, bs 150 (a plain CE step: 1.2 s). Not measured on a GPU, where float64 is slow on most cards
but not on an H100/H200. The eigenvalues' backward is V diag(g) V^T, free of 1 / (lambda_i - lambda_j), so
repeated eigenvalues do not blow it up. Under bf16 autocast (--amp on CUDA) the features are rounded to 8
bits, which puts a floor of about 2^-16 of the mean eigenvalue under the smallest: condition numbers beyond
about 1e4 d are not resolved there. The model is not compiled (--compile): the features are taken by
forward hooks, registered per step.
"""
import argparse
import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from common import dist
from common.cli import UsageError, comma_list, nonneg_float
from common.data import BatchStream, Gather, resolve_data_on_device
from common.defence_run import Taps
from common.models import head_path
from common.settings import Settings, setting
from common.sophon import outer_adam, outer_lr_scale
from common.train import bn_stats_kept

ZERO_EIG = 1e-12  # an eigenvalue below this times the largest is zero up to float64 rounding
# D + CORR_EPS * mean(D): a dead channel stays zero, and a nearly dead one is not blown up to unit scale (as Adam
# leaves a coordinate alone whose gradient is below its eps); the invariance holds for channels well above it
CORR_EPS = 1e-8
HEAD = "head"  # --condnum_layers' name for the head's input
LAYERS = ("layer1", "layer2", "layer3", "layer4", HEAD)  # a torchvision ResNet's stages, and the head's input
TERMS = ("bounds", "kappa")


def feature_samples(features):
    """A layer's output as samples x dimensions: a map B x C x H x W gives BHW samples of C channels."""
    if features.dim() == 2:
        return features
    return features.movedim(1, -1).reshape(-1, features.shape[1])


def spectrum(x, correlation=False):
    """The nonzero eigenvalues (ascending, float64) of S = X^T X for `x` (n samples x d), scaled so that the
    mean of all d eigenvalues is 1; `correlation`: of D^-1/2 S D^-1/2, D = diag(S), instead. Returns
    (eigenvalues, d)."""
    x = x.double()
    d = x.shape[1]
    if correlation:
        diag = x.square().sum(0)
        x = x / (diag + CORR_EPS * diag.mean()).sqrt()
    x = x * (d / x.square().sum()).sqrt()
    gram = x.T @ x if x.shape[0] >= d else x @ x.T  # the same nonzero eigenvalues, the smaller matrix
    eigs = torch.linalg.eigvalsh(gram)
    return eigs[eigs > ZERO_EIG * eigs[-1].detach()], d


def r_well(eigs, d):
    """The paper's R_well: sigma_max^2 / 2 - ||S||_F^2 / (2d); minimising it equalises the eigenvalues."""
    return eigs[-1].square() / 2 - eigs.square().sum() / (2 * d)


def r_ill(eigs, d):
    """The paper's R_ill: 1 / (||S||_F^2 / (2d) - sigma_min^2 / 2); minimising it drives sigma_min down."""
    return 1 / (eigs.square().sum() / (2 * d) - eigs[0].square() / 2)


def log_condition(eigs):
    return eigs[-1].log() - eigs[0].log()


def condition_terms(term, original, restricted, adam_aware):
    """(well, ill, log kappa of the original's S, log kappa of the restricted's): the terms for one layer's
    original and restricted features (samples x dimensions)."""
    orig, d = spectrum(original)
    restr, d = spectrum(restricted, correlation=adam_aware)
    if term == "kappa":
        return log_condition(orig), 1 / log_condition(restr), log_condition(orig), log_condition(restr)
    return r_well(orig, d), r_ill(restr, d), log_condition(orig), log_condition(restr)


def layer_features(tapped, layer, head):
    """A layer's features (from Taps.out) as samples x dimensions; the head's input is kept under its module's
    name, `head`."""
    return feature_samples(tapped[head if layer == HEAD else layer])


@dataclass
class CondNumSettings(Settings):
    condnum_layers: list = setting(
        "layer1,layer2,layer3,head", "where the features are conditioned: the outputs of these ResNet stages (every "
        "position a sample of its channels) and/or the head's input", type=comma_list(str, LAYERS))
    condnum_term: str = setting("bounds", "bounds: the paper's R_well and R_ill; kappa: well * log kappa (original) + "
                                          "ill / log kappa (restricted), the reference's other loss", choices=TERMS)
    condnum_well: float = setting(1e-5, "weight of the original domain's well-conditioning term (the reference's "
                                        "lambda_r1; the default is for --condnum_term bounds)", type=nonneg_float)
    condnum_ill: float = setting(100.0, "weight of the restricted domain's ill-conditioning term (lambda_r2; the "
                                        "default is for --condnum_term bounds)", type=nonneg_float)
    condnum_adam_aware: bool = setting(
        False, "condition the restricted domain's correlation matrix D^-1/2 S D^-1/2 (D = diag S), which Adam's "
               "per-coordinate scaling cannot undo, instead of S", action=argparse.BooleanOptionalAction)


class CondNum:
    """The model, its Adam and the two batch streams; one step of the combined loss per outer loop.

    Under torchrun every rank takes the same batches and the gradients are averaged, as NTR's steps
    (common.persistence.SupervisedSteps), so the ranks stay identical."""

    settings = CondNumSettings
    labels = ()

    @classmethod
    def build(cls, settings, model, task, precision):
        return cls(model, task.ntr_train, task.restricted_train, settings, precision,
                   lr_scale=outer_lr_scale(model, settings))

    def __init__(self, model, original, restricted, config, precision, world=None, lr_scale=None):
        missing = [n for n in config.condnum_layers if n != HEAD and not isinstance(getattr(model, n, None), nn.Module)]
        if missing:
            raise UsageError(f"--condnum_layers {','.join(missing)}: {type(model).__name__} has no such stage "
                             f"(a torchvision ResNet's layer1-4)")
        self.model, self.config, self.precision = model, config, precision
        self.world = world or dist.world()
        self.layers = tuple(config.condnum_layers)
        self.head = head_path(model)
        self.losses = ("ntr_loss", "well_loss", "ill_loss",
                       *(f"logcond_{domain}_{layer}" for domain in ("orig", "restricted") for layer in self.layers))
        self.optimizer = outer_adam(model, precision, lr_scale or {})(config.lr)
        on_device = resolve_data_on_device(config.data_on_device, [original, restricted], precision.device)
        self.domains = {"original": original, "restricted": restricted}
        self.gathers = {name: Gather(d, precision.device, on_device) for name, d in self.domains.items()}
        # the seeds SOPHON's NTR and FTS streams use: the same batches as its run with the same --seed
        self.streams = {"original": BatchStream(len(original), config.bs, seed=config.seed + 4),
                        "restricted": BatchStream(len(restricted), config.bs, seed=config.seed + 3)}

    def step(self):
        """One step on the combined loss; one host sync, for the reported values."""
        c = self.config
        self.model.train()
        x, y = self.batch("original")
        with self.taps() as taps, self.precision.autocast():
            ntr_loss = F.cross_entropy(self.model(x).float(), y)
        original = taps.out
        # restored after the backward, which needs the buffers as the forward left them
        with bn_stats_kept(self.model):
            x, _ = self.batch("restricted")
            with self.taps() as taps, self.precision.autocast():
                self.model(x)
            terms = [condition_terms(c.condnum_term, layer_features(original, layer, self.head),
                                     layer_features(taps.out, layer, self.head), c.condnum_adam_aware)
                     for layer in self.layers]
            well, ill, cond_orig, cond_restricted = (torch.stack(t) for t in zip(*terms))
            loss = ntr_loss + c.condnum_well * well.mean() + c.condnum_ill * ill.mean()
            self.optimizer.zero_grad(set_to_none=False)
            loss.backward()
        if self.world.distributed:
            grads = [p.grad for p in self.model.parameters()]
            self.world.sum_(grads)
            torch._foreach_div_(grads, self.world.size)
        self.optimizer.step()
        self.world.broadcast_(list(self.model.buffers()))
        values = torch.cat([torch.stack([ntr_loss.double(), well.mean(), ill.mean()]), cond_orig, cond_restricted])
        return dict(zip(self.losses, values.tolist()))

    def batch(self, domain):
        gather = self.gathers[domain]
        x, y = gather(gather.indices(self.streams[domain].next()))
        x = self.domains[domain].to_input(x, self.precision.device, None, self.precision.channels_last)
        return x, y.to(self.precision.device, non_blocking=True)

    def taps(self):
        stages = [n for n in self.layers if n != HEAD]
        return Taps(self.model, stages, inputs=[self.head] if HEAD in self.layers else [])

    def snapshot(self):
        """A copy of the trained state (weights, Adam); not the streams: a rollback goes on with fresh batches."""
        return {"model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
                "optimizer": copy.deepcopy(self.optimizer.state_dict())}

    def restore(self, snapshot):
        self.model.load_state_dict(snapshot["model"])
        self.optimizer.load_state_dict(snapshot["optimizer"])

    def state_dict(self):
        """Everything the next `step()` depends on (not copied: save it before stepping again)."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                **{f"{name}_stream": stream.state_dict() for name, stream in self.streams.items()}}

    def load_state_dict(self, state):
        self.restore(state)
        for name, stream in self.streams.items():
            stream.load_state_dict(state[f"{name}_stream"])
