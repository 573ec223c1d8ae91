"""Representation Noising (RepNoise) as a stage-2 method (common.methods): the restricted domain's
representations pushed towards Gaussian noise, its cross-entropy ascended, the original task retained.

Rosati et al., NeurIPS 2024, "Representation noising: a defence mechanism against harmful fine-tuning"; code:
domenicrosati/representation-noising, representation_noising/loss.py (`rep_noise_loss`, `MMD_loss`). One outer
loop is one Adam step at --lr on the reference's single combined loss

    L = CE(original batch) + beta * mean_l MMD(h_l(restricted batch), N(0, I)) - alpha * log(CE(restricted batch) + 1)

Where we follow the reference:
- one loss, one optimiser step: the retain term is NTR's cross-entropy, but inside L rather than a separate
  common.persistence.SupervisedSteps, since alpha and beta weigh the terms against it and Adam normalises the
  sum, not each term;
- MMD_loss exactly (`gaussian_mmd`): each example's representation flattened, a sum of KERNEL_NUM Gaussian
  kernels exp(-|a - b|^2 / s) with s = m/4, m/2, m, 2m, 4m, where m is the mean squared distance between distinct
  points of the pooled sample (no gradient through m), and the biased estimate mean(K_xx + K_yy - K_xy - K_yx),
  diagonals included; fresh standard-normal noise of the same shape each step; the mean over the layers;
- the ascent term -alpha log(CE + 1): its gradient alpha / (CE + 1) fades as the restricted loss grows, which
  bounds the ascent where plain -CE would diverge;
- defaults alpha 1, beta 1e-3 (rep_noise_loss's and the demo's); the stage's --lr 1e-4 is the demo's.

Where we do not:
- the representations are the outputs of --repnoise_layers (resnet layer1-3 by default, where our fine-tuning
  measurements put the new-head attacker's head start), not every transformer block's MLP; no token mask
  (the reference noises only the tokens where a harmful answer differs from its paired refusal): the whole
  representation of a restricted image is noised. ResNet blocks end in a ReLU, so their outputs cannot match
  N(0, I) exactly; the MMD still pulls their scale and spread towards it;
- the restricted loss is the final head's cross-entropy alone: the reference also averages a logit-lens loss
  (each hidden state through the final norm and output embedding), and our intermediate layers have no head;
- --repnoise_ascent_head probe (ours): an attacker who replaces the head never sees the model's own, so the
  ascent can be satisfied by the head alone. The probe, a linear layer on the head's input fitted by one Adam
  step per loop on detached features (the head such an attacker would fit), is the head the body ascends through
  instead; it is not part of the model;
- Adam at a constant lr (common.sophon.outer_adam), not AdamW with a cosine schedule and 10% warm-up;
- BatchNorm: the restricted pass leaves the running statistics as they were (the reference's LLM has none), so
  the model evaluates the original domain with the original domain's statistics;
- the squared distances come from the Gram matrix, not from an n x n x d difference tensor, so memory is n^2.
The object touches no file; the run around it is common/stage2.py's.
"""
import contextlib
import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common import dist
from common.cli import UsageError, comma_list, nonneg_float, pos_float
from common.data import BatchStream, Gather, resolve_data_on_device
from common.models import classifier_head
from common.settings import Settings, setting
from common.sophon import outer_adam, outer_lr_scale

KERNEL_MUL, KERNEL_NUM = 2.0, 5  # MMD_loss's defaults: bandwidths m/4, m/2, m, 2m, 4m around the mean distance m
ASCENT_HEADS = ("model", "probe")


@dataclass
class RepNoiseSettings(Settings):
    repnoise_alpha: float = setting(1.0, "weight of the ascent term -alpha log(CE_restricted + 1)",
                                    type=nonneg_float)
    repnoise_beta: float = setting(1e-3, "weight of the noise term: the MMD between the restricted domain's "
                                         "representations and N(0, I)", type=nonneg_float)
    repnoise_layers: list = setting("layer1,layer2,layer3", "modules whose outputs on restricted images are pushed "
                                                            "towards noise (resnet: layer1..layer4, avgpool: the "
                                                            "head's input)", type=comma_list(str))
    repnoise_ascent_head: str = setting("model", "the head the restricted cross-entropy is ascended through: model "
                                                 "(its own, as the reference), probe (a linear probe on the head's "
                                                 "input, fitted each loop as a new-head attacker's head)",
                                        choices=ASCENT_HEADS)
    repnoise_probe_lr: float = setting(1e-2, "the probe's Adam lr (--repnoise_ascent_head probe)", type=pos_float)


def gaussian_mmd(x, y, kernel_mul=KERNEL_MUL, kernel_num=KERNEL_NUM):
    """Biased MMD^2 between the samples x and y (n x d each), as the reference's MMD_loss: a sum of Gaussian
    kernels whose bandwidths are the pooled sample's mean squared distance times kernel_mul^(i - kernel_num//2)."""
    if x.shape != y.shape:
        raise ValueError(f"MMD_loss compares samples of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    total = torch.cat([x, y]).float()
    sq = total.pow(2).sum(1)
    dist2 = (sq[:, None] + sq[None, :] - 2 * total @ total.T).clamp_min(0)
    n = len(total)
    base = dist2.detach().sum() / (n * n - n) / kernel_mul ** (kernel_num // 2)
    k = sum(torch.exp(-dist2 / (base * kernel_mul ** i)) for i in range(kernel_num))
    b = len(x)
    return (k[:b, :b] + k[b:, b:] - k[:b, b:] - k[b:, :b]).mean()


def repnoise_loss(ntr, noise, restricted, alpha, beta):
    """The reference's combined loss from its three terms (0-d tensors)."""
    return ntr + beta * noise - alpha * torch.log(restricted + 1)


@contextlib.contextmanager
def recorded(modules):
    """[(input, output)] of each module's latest forward inside the block."""
    seen = [None] * len(modules)

    def hook(i):
        return lambda module, inputs, output: seen.__setitem__(i, (inputs[0], output))
    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(modules)]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def bn_stats_aside(model):
    """Inside the block BatchNorm updates copies of its running statistics; the model's own stay as they were.
    Unlike common.train.bn_stats_kept nothing is written back in place, so the block's forward can still be
    differentiated after it (autograd saved the statistics it read; an in-place write-back invalidates them)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    own = [dict(m.named_buffers(recurse=False)) for m in norms]
    for m, buffers in zip(norms, own):
        for name, b in buffers.items():
            setattr(m, name, b.clone())
    try:
        yield
    finally:
        for m, buffers in zip(norms, own):
            for name, b in buffers.items():
                setattr(m, name, b)


def averaged(world, params):
    """The parameters' gradients averaged over the ranks, in place (nothing to do in a world of one)."""
    if world.distributed:
        grads = [p.grad for p in params]
        world.sum_(grads)
        torch._foreach_div_(grads, world.size)


class RepNoise:
    """The model, its Adam, the noise generator, the restricted and original batch streams, and the probe when
    the ascent goes through one. Under torchrun every rank takes the same step on the same batches and noise:
    gradients averaged, BatchNorm statistics from rank 0. `config`: the stage-2 settings
    (common.stage2.Stage2Settings), of which RepNoise reads lr, bs, seed, data_on_device and its repnoise_ flags.
    `lr_scale` ({parameter name: factor}): as Sophon's."""

    losses = ("ntr_loss", "noise_loss", "restricted_loss")  # restricted_loss: through the ascent head
    labels = ()
    settings = RepNoiseSettings

    @classmethod
    def build(cls, settings, model, task, precision):
        return cls(model, task.restricted_train, task.ntr_train, settings, precision,
                   lr_scale=outer_lr_scale(model, settings))

    def __init__(self, model, restricted, original, config, precision, world=None, lr_scale=None):
        self.model, self.config, self.precision = model, config, precision
        self.world = world or dist.world()
        modules = dict(model.named_modules())
        unknown = [name for name in config.repnoise_layers if name not in modules]
        if unknown:
            raise UsageError(f"--repnoise_layers: {type(model).__name__} has no module {', '.join(unknown)}")
        self.layers, self.head = [modules[name] for name in config.repnoise_layers], classifier_head(model)
        on_device = resolve_data_on_device(config.data_on_device, [restricted, original], precision.device)
        self.domains = {name: (domain, Gather(domain, precision.device, on_device),
                               BatchStream(len(domain), config.bs, seed=config.seed + offset))
                        for name, domain, offset in (("restricted", restricted, 3), ("original", original, 4))}
        self.optimizer = outer_adam(model, precision, lr_scale or {})(config.lr)
        self.noise_gen = torch.Generator(device=precision.device).manual_seed(config.seed + 1)
        self.probe = self.probe_opt = None
        if config.repnoise_ascent_head == "probe":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed + 2)
                self.probe = torch.nn.Linear(self.head.in_features, restricted.num_classes).to(precision.device)
            self.probe_opt = torch.optim.Adam(self.probe.parameters(), lr=config.repnoise_probe_lr)
        elif restricted.num_classes > self.head.out_features:
            raise UsageError(f"the model's head has {self.head.out_features} outputs, {restricted.name} "
                             f"{restricted.num_classes} classes: ascend through --repnoise_ascent_head probe")

    def step(self):
        """One combined step (and the probe's); one host sync, for the losses."""
        c = self.config
        self.model.train()
        terms = self.terms(self.batch("restricted"), self.batch("original"))
        loss = repnoise_loss(terms["ntr_loss"], terms["noise_loss"], terms["restricted_loss"], c.repnoise_alpha,
                             c.repnoise_beta)
        self.optimizer.zero_grad(set_to_none=False)
        loss.backward()
        averaged(self.world, self.model.parameters())
        self.optimizer.step()
        self.world.broadcast_(list(self.model.buffers()))
        return dict(zip(terms, torch.stack(list(terms.values())).tolist()))

    def terms(self, restricted, original):
        """The combined loss's three terms (0-d tensors) on (x, y) batches of each domain; fits the probe."""
        (x_r, y_r), (x_o, y_o) = restricted, original
        with recorded([*self.layers, self.head]) as seen, bn_stats_aside(self.model), self.precision.autocast():
            logits = self.model(x_r)
        hidden = [out.float().flatten(1) for _, out in seen[:-1]]
        noise = [torch.randn(h.shape, generator=self.noise_gen, device=h.device) for h in hidden]
        noise_loss = torch.stack([gaussian_mmd(h, z) for h, z in zip(hidden, noise)]).mean()
        if self.probe is None:
            restricted_loss = F.cross_entropy(logits.float(), y_r)
        else:
            features = seen[-1][0].float()
            weight, bias = (p.detach().clone() for p in (self.probe.weight, self.probe.bias))  # fitted next
            restricted_loss = F.cross_entropy(F.linear(features, weight, bias), y_r)
            self.fit_probe(features.detach(), y_r)
        with self.precision.autocast():
            ntr_loss = F.cross_entropy(self.model(x_o).float(), y_o)
        return {"ntr_loss": ntr_loss, "noise_loss": noise_loss, "restricted_loss": restricted_loss}

    def fit_probe(self, features, y):
        loss = F.cross_entropy(self.probe(features), y)
        self.probe_opt.zero_grad()
        loss.backward()
        averaged(self.world, self.probe.parameters())
        self.probe_opt.step()

    def batch(self, name):
        """The next (model input, labels) of the domain `name`, on the device."""
        domain, gather, stream = self.domains[name]
        x, y = gather(gather.indices(stream.next()))
        x = domain.to_input(x, self.precision.device, None, self.precision.channels_last)
        return x, y.to(self.precision.device, non_blocking=True)

    # ---- state -------------------------------------------------------------------------------------

    def _trained(self):
        """The trained state's parts: (name, object with state_dict/load_state_dict)."""
        parts = {"model": self.model, "optimizer": self.optimizer}
        return {**parts, "probe": self.probe, "probe_opt": self.probe_opt} if self.probe is not None else parts

    def snapshot(self):
        """A copy of the trained state (weights, optimisers, probe). Not the streams or the noise: a rollback
        goes on with fresh batches."""
        return {name: copy.deepcopy(part.state_dict()) for name, part in self._trained().items()}

    def restore(self, snapshot):
        for name, part in self._trained().items():
            part.load_state_dict(snapshot[name])

    def state_dict(self):
        """Everything the next `step()` depends on (not copied: save it before stepping again)."""
        return {**{name: part.state_dict() for name, part in self._trained().items()},
                **{f"{name}_stream": stream.state_dict() for name, (_, _, stream) in self.domains.items()},
                "noise_gen": self.noise_gen.get_state()}

    def load_state_dict(self, state):
        self.restore(state)
        for name, (_, _, stream) in self.domains.items():
            stream.load_state_dict(state[f"{name}_stream"])
        self.noise_gen.set_state(state["noise_gen"])
