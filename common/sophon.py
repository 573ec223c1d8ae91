"""SOPHON's stage 2 as a method (common.methods): one outer loop of FTS and NTR per `step()`.

Deng et al., IEEE S&P 2024, Algorithm 1 (classification), first-order. One outer loop:

  FTS (`fts_loop` times): for each of `fts_envs` simulated fine-tuners (sampled per episode), run
      `adaptation_steps` inner steps on restricted-domain batches and add the gradient of the task's query
      loss at the adapted weights to the model's gradient (common.fts.FTS.episode), after every
      `fts_query_every`-th step and the last, weighted by `fts_step_weights`; clip the summed gradient to
      `fts_clip`, then an Adam step at alpha * lr. With `fts_lr_adapt` the fine-tuners' lrs are the simulated
      attacker's own, learned from each episode's effect on a held-out restricted batch (MLAC); in a
      `fts_lr_learned_share` of the episodes, the others' drawn from `fts_lr_range`. A `fts_retain_share` of
      the episodes are TAR's retain-then-forget adversary (Tamirisa et al. ICLR'25): their first N of the
      `adaptation_steps` (N from `fts_retain_steps`) train on NTR's batches, and only the restricted steps
      after them are queried.
  NTR (`ntr_loop` times): cross-entropy on an original-domain batch, a separate Adam at beta * lr; with
      `ntr_rep_weight`, plus TAR's distance to the stage-1 model's features (common.persistence).

  Box (`box_loop` times, beside FTS or in its place; common.box): the worst case of the L-infinity box an Adam
      attacker reaches, found by projected sign steps on the restricted-domain cross-entropy, then an FTS step
      with the query loss's gradient there, clipped to `fts_clip`, by its own Adam at alpha * lr.

The irreversible backdoor is this loop with another query loss and poisoned NTR data, and its persistence
parts (common.persistence, inert at their defaults): Neurotoxin's mask around the FTS and NTR updates
(`mask_share`), SBL's clean steps after NTR (`clean_loop`, NTR their replay; through the model's head or, with
`clean_head` 'separate', a head of their own, re-drawn every `clean_head_reset` loops), SAM in both (`sam_rho`). The
object touches no file: evaluation, the accuracy floor, checkpoints and metrics belong to the runner
(common/stage2.py).
"""
import copy
import logging

import torch

from common import dist
from common.box import BoxSettings, box_attackers, box_optimizers
from common.data import BatchStream, Gather, resolve_data_on_device
from common.fts import FTS, FTS_OPTIMIZERS, Attackers, FineTunerSampler, IndexedBatches, query_weights
from common.models import batchnorm_fed_layers, head_param_names
from common.persistence import NeurotoxinMask, RepresentationRetain, SeparateHead, SupervisedSteps
from common.train import launch_options

log = logging.getLogger("sophon")


class SophonState:
    """Sophon's checkpoint and rollback state: the trained modules, the optimisers, the data streams and the
    generators, under last.pt's keys as they were before the optional parts (a run saved then resumes)."""

    def _modules(self):  # the trained modules: the model and a separate clean head (never delivered)
        return {"model": self.model, **({"clean_head": self.separate.head} if self.separate else {})}

    def _optimizers(self):
        return {"fts_opt": self.fts_opt, "ntr_opt": self.ntr.optimizer, "clean_opt": self.clean.optimizer,
                **({"box_opt": self.box.optimizer} if self.box else {})}

    def _streams(self):
        return {"restricted_stream": self.restricted_stream, "ntr_stream": self.ntr.stream,
                "clean_stream": self.clean.stream, **({"box_sampler": self.box.sampler} if self.box else {}),
                **({"retain_stream": self.retain_stream} if self.config.fts_retain_share else {})}

    def snapshot(self):
        """A copy of the trained state (weights, optimisers). Not the data streams: a rollback to it goes on
        with fresh batches rather than repeating the ones that led astray."""
        return {**{name: {k: v.detach().clone() for k, v in module.state_dict().items()}
                   for name, module in self._modules().items()},
                **{name: copy.deepcopy(opt.state_dict()) for name, opt in self._optimizers().items()}}

    def restore(self, snapshot):
        for name, part in {**self._modules(), **self._optimizers()}.items():
            if name in snapshot:  # clean_opt: not in checkpoints written before it existed
                part.load_state_dict(snapshot[name])

    def state_dict(self):
        """Everything the next `step()` depends on (not copied: save it before stepping again)."""
        return {**{name: part.state_dict() for name, part in
                   {**self._modules(), **self._optimizers(), **self._streams()}.items()},
                "episode_gen": self.episode_gen.get_state(), "sampler": self.sampler.state_dict(),
                **self.neurotoxin.state_dict(), **(self.separate.state() if self.separate else {})}

    def load_state_dict(self, state):
        self.restore(state)
        self.episode_gen.set_state(state["episode_gen"])
        self.sampler.load_state_dict(state["sampler"])
        for name, stream in self._streams().items():
            if name in state:
                stream.load_state_dict(state[name])
        self.neurotoxin.load_state_dict(state)
        if self.separate:
            self.separate.load_state(state)



class Sophon(SophonState):
    """The model, its optimisers, the FTS inner loop, the fine-tuner sampler and the batch streams.

    Under torchrun (`world`) the `fts_envs` environments of an FTS step are dealt to the ranks. Every rank
    draws every environment's fine-tuner, batches and random seed, in the same order, and runs its own:
    environment e is the same episode whichever rank runs it, so the result does not depend on the world
    size. The FTS gradient is summed over the ranks before the clip; NTR is one step on the same batch on
    every rank (common.persistence.SupervisedSteps), so the ranks stay identical.

    `config`: the stage-2 settings (common.stage2.Stage2Settings). `data_on_device` ('auto', 'on', 'off';
    common.data.resolve_data_on_device): the training images live on the device and batches are gathered
    there; the indices are drawn on the host either way, so both placements see exactly the same batches.
    `lr_scale` ({parameter name: factor}): the outer optimisers step those parameters at factor x their lr.
    """

    losses = ("fts_loss", "ntr_loss", "clean_loss")  # step()'s floats, in metrics.csv's order
    labels = ("fts_optimizer", "fts_lr", "fts_head", "fts_scope", "fts_schedule")  # its strings: what it drew
    settings = BoxSettings  # the box attacker's flags; the others are Stage2Flags'

    @classmethod
    def build(cls, settings, model, task, precision):
        algo = cls(model, task.query_loss, task.restricted_train, task.ntr_train, settings, precision,
                   data_on_device=settings.data_on_device, lr_scale=outer_lr_scale(model, settings))
        log.info("training data on the %s", "device" if algo.data_on_device else "host")
        return algo

    def __init__(self, model, query_loss, restricted, ntr_data, config, precision, world=None, data_on_device="auto",
                 lr_scale=None):
        self.model, self.config, self.precision, self.restricted = model, config, precision, restricted
        self.finetuners = []  # the simulated fine-tuners of the last step, in order
        self.world = world or dist.world()
        self.data_on_device = resolve_data_on_device(data_on_device, [restricted, ntr_data], precision.device)
        self.restricted_gather = Gather(restricted, precision.device, self.data_on_device)
        ntr_gather = (self.restricted_gather if ntr_data is restricted
                      else Gather(ntr_data, precision.device, self.data_on_device))
        # a retain-then-forget episode's first steps: NTR's domain, its own stream
        self.retain = (ntr_gather, lambda x: ntr_data.to_input(x, precision.device, None, precision.channels_last))
        adam = outer_adam(model, precision, lr_scale or {})
        self.fts_opt = adam(config.alpha * config.lr)
        self.box = box_attackers(config, adam(config.alpha * config.lr)) if config.box_loop else None
        if self.box:  # its column in the runs that have it alone
            self.losses = ("fts_loss", "box_loss", "ntr_loss", "clean_loss")
        to_input = lambda x: restricted.to_input(x, precision.device, None, precision.channels_last)
        self.fts = FTS(model, query_loss, to_input, precision, {**FTS_OPTIMIZERS, **box_optimizers(config)})
        self.episode_gen = torch.Generator().manual_seed(config.seed + 1)  # one seed per episode
        self.sampler = FineTunerSampler(config.fts_optimizers, config.simulated_lrs, config.fts_head,
                                        config.fts_scope, seed=config.seed + 2, schedules=config.fts_schedules,
                                        lr_range=config.fts_lr_range, lr_adapt=config.fts_lr_adapt,
                                        learned_share=config.fts_lr_learned_share,
                                        retain_steps=config.fts_retain_steps or (),
                                        retain_share=config.fts_retain_share)
        # the FTS loss is the weighted mean over the queried inner steps and the environments, per retain steps
        self.step_weights = {n: [w / config.fts_envs for w in query_weights(
            config.adaptation_steps, config.fts_query_every, config.fts_step_weights, config.fts_exp_rate, n)]
            for n in (0, *(self.sampler.retain_steps if config.fts_retain_share else ()))}
        self.attackers = Attackers(self.sampler, config.adaptation_steps, self.step_weights, self.fts_opt)
        # the columns of the parts a run has, and only those
        self.labels = (*type(self).labels, *(("fts_retain_steps",) if config.fts_retain_share else ()),
                       *(("box_head",) if self.box else ()))
        stream = lambda domain, offset: BatchStream(len(domain), config.bs, seed=config.seed + offset)
        self.restricted_stream, self.retain_stream = stream(restricted, 3), stream(ntr_data, 7)
        # NTR, and the irreversible backdoor's persistence parts (common.persistence; inert at their defaults):
        # Neurotoxin's mask around the FTS and NTR updates, SBL's clean steps after NTR, SAM in both
        fwd, part = precision.maybe_compile(model), dict(precision=precision, world=self.world)
        self.neurotoxin = NeurotoxinMask(model, fwd, restricted, self.restricted_gather, stream(restricted, 6),
                                         share=config.mask_share, every=config.mask_every, **part)
        rep = RepresentationRetain(model, config.ntr_rep_weight, precision) if config.ntr_rep_weight else None
        self.ntr = SupervisedSteps(model, fwd, ntr_data, ntr_gather, stream(ntr_data, 4), adam(config.beta * config.lr),
                                   sam_rho=config.sam_rho, frozen=self.neurotoxin.frozen, loss=rep, **part)
        self.separate = (SeparateHead(model, restricted.num_classes, config.seed + 7, every=config.clean_head_reset)
                         if config.clean_head == "separate" else None)
        clean_fwd = precision.maybe_compile(self.separate) if self.separate else fwd  # through the head it trains
        self.clean = SupervisedSteps(model, clean_fwd, restricted, self.restricted_gather, stream(restricted, 5),
                                     adam(config.beta * config.lr, self.separate), sam_rho=config.sam_rho, **part)

    def step(self):
        """One outer loop; one host sync, for the losses (and one per FTS step for the learned lr's slopes)."""
        c = self.config
        self.model.train()
        self.neurotoxin.update()
        fts = [self.fts_step(self.attackers) for _ in range(c.fts_loop)]
        box = [self.fts_step(self.box) for _ in range(c.box_loop)]
        ntr = [self.ntr.step() for _ in range(c.ntr_loop)]
        if self.separate:
            self.separate.update(self.clean.optimizer)
        clean = [self.clean.step() for _ in range(c.clean_loop)]
        mean = lambda losses: torch.stack(losses).mean().item() if losses else None
        self.finetuners = tuners = [t for _, finetuners in fts for t in finetuners]
        drawn = lambda t, label: f"{t.lr:g}" if label == "fts_lr" else str(getattr(t, label.removeprefix("fts_")))
        return {"fts_loss": mean([loss for loss, _ in fts]), "ntr_loss": mean(ntr), "clean_loss": mean(clean),
                **{label: ";".join(drawn(t, label) for t in tuners) for label in self.labels if label.startswith("fts_")},
                **({"box_loss": mean([loss for loss, _ in box]),
                    "box_head": ";".join(t.head for _, sampled in box for t in sampled)} if self.box else {})}

    def fts_step(self, attackers):
        """An FTS step of `attackers` (common.fts.Attackers: the simulated fine-tuners, or the box's); returns (its
        loss as a 0-d tensor, the fine-tuners sampled)."""
        c, params, sampler = self.config, list(self.model.parameters()), attackers.sampler
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        torch._foreach_zero_([p.grad for p in params])
        loss = torch.zeros((), device=self.precision.device)
        slopes = torch.zeros(c.fts_envs, device=self.precision.device)  # d(attacker's loss)/d(log lr) per env
        tuners = [sampler.sample() for _ in range(c.fts_envs)]  # each generator draws in the same order
        plan = [(t, [self.retain_stream.next() for _ in range(t.retain_steps)],
                 [self.restricted_stream.next() for _ in range(attackers.steps - t.retain_steps)],
                 int(torch.randint(2**62, (), generator=self.episode_gen)),
                 self.restricted_stream.next() if sampler.lr_adapt else None) for t in tuners]
        for env, (finetuner, retain, indices, seed, probe) in enumerate(plan):
            if env % self.world.size == self.world.rank:
                batches = IndexedBatches(indices, self.restricted_gather, (retain, *self.retain) if retain else None)
                gen = torch.Generator().manual_seed(seed)
                episode_loss, origin = self.fts.episode(self.model, batches, finetuner,
                                                        attackers.weights[finetuner.retain_steps], gen)
                loss += episode_loss
                if finetuner.lr_learned:  # probe: a batch the episode did not train on, the attacker's held-out loss
                    probe_batch = self.restricted_gather(self.restricted_gather.indices(probe))
                    slopes[env] = self.fts.lr_slope(origin, *probe_batch)
        self.world.sum_([p.grad for p in params] + [loss.view(1)] + ([slopes] if sampler.lr_adapt else []))
        torch.nn.utils.clip_grad_norm_(params, c.fts_clip)
        with self.neurotoxin.frozen():
            attackers.optimizer.step()
        if sampler.lr_adapt:
            for (finetuner, *_), slope in zip(plan, slopes.tolist()):
                sampler.adapt(finetuner, slope)
        return loss, [finetuner for finetuner, *_ in plan]


def outer_adam(model, precision, lr_scale):
    """(lr, separate=None) -> an outer Adam over the model (fused on CUDA); parameters named in `lr_scale` ({name:
    factor}) step at lr * factor, one group per factor. With `separate` (common.persistence.SeparateHead) it steps
    that head at lr in place of the model's own, which it leaves out."""
    cuda = precision.device.type == "cuda"
    fast = launch_options(torch.optim.Adam, precision.device, precision.compile) if cuda else {}

    def make(lr, separate=None):
        if separate is None:
            return torch.optim.Adam(outer_param_groups(model, lr, lr_scale), **fast)
        body = outer_param_groups(model, lr, lr_scale, left_out=head_param_names(model))
        return torch.optim.Adam([*body, {"params": list(separate.head.parameters()), "lr": lr}], **fast)
    return make


def outer_param_groups(model, lr, lr_scale, left_out=()):
    """An outer optimiser's parameter groups: every parameter but those named in `left_out` at `lr`, those named
    in `lr_scale` ({name: factor}) at lr * factor, one group per factor."""
    unknown = set(lr_scale) - {name for name, _ in model.named_parameters()}
    if unknown:
        raise ValueError(f"lr_scale names no parameter of the model: {', '.join(sorted(unknown))}")
    groups = {}
    for name, p in model.named_parameters():
        if name not in left_out:
            groups.setdefault(lr_scale.get(name, 1.0), []).append(p)
    return [{"params": params, "lr": lr * factor} for factor, params in groups.items()]


def outer_lr_scale(model, settings):
    """{parameter name: F} for the layers `--rescale F` rescaled, when `--rescale_outer_lr`; else None: stage
    2's own optimisers then step those layers at F times their lr (a layer rescaled by F then moves as much,
    relatively, as at scale 1)."""
    if not settings.rescale_outer_lr:
        return None
    rescaled = {id(p) for layer, _ in batchnorm_fed_layers(model, settings.image_size or 224)
                for p in layer.parameters(recurse=False)}
    return {name: settings.rescale for name, p in model.named_parameters() if id(p) in rescaled}
