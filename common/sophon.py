"""SOPHON's stage 2 as an algorithm: one outer loop of FTS and NTR per `step()`, and nothing else.

Deng et al., IEEE S&P 2024, Algorithm 1 (classification), first-order. One outer loop:

  FTS (`fts_loop` times): for each of `fts_envs` simulated fine-tuners (sampled per episode), run
      `adaptation_steps` inner steps on restricted-domain batches and add the gradient of the task's query
      loss at the adapted weights to the model's gradient (common.fts.FTS.episode), after every
      `fts_query_every`-th step and the last, weighted by `fts_step_weights`; clip the summed gradient to
      `fts_clip`, then an Adam step at alpha * lr. With `fts_lr_adapt` the fine-tuners' lrs are the simulated
      attacker's own, learned from each episode's effect on a held-out restricted batch (MLAC); in a
      `fts_lr_learned_share` of the episodes, the others' drawn from `fts_lr_range`.
  NTR (`ntr_loop` times): cross-entropy on an original-domain batch, a separate Adam at beta * lr.

Two optional parts, written for the irreversible backdoor (both off by default):
  clean (`clean_loop` times): cross-entropy on a clean restricted-domain batch through the model's own head,
      a third Adam at beta * lr: SBL's second task (Pham et al., ECCV'24), continual learning on clean data,
      NTR's poisoned original-domain batches being the replay that keeps task one. The model moves into the
      region clean fine-tuning would take it to, with the backdoor kept, so a defender's fine-tuning has
      little left to change. With `sam_rho` > 0 the NTR and clean steps are sharpness-aware (SAM).
  mask (`mask_share` > 0): Neurotoxin (Zhang et al., ICML'22). Every `mask_every` loops, the share of
      coordinates with the largest clean restricted-domain gradient (summed over MASK_BATCHES batches) is
      frozen for the FTS and NTR updates, so the backdoor is written where clean fine-tuning moves the weights
      least.

The irreversible backdoor is this loop with another query loss and poisoned NTR data. The object touches
no file: evaluation, the accuracy floor, checkpoints and metrics belong to the runner (common/stage2.py).
"""
import contextlib
import copy
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F

from common import dist
from common.data import BatchStream, Gather, resolve_data_on_device
from common.fts import FTS, FineTunerSampler, IndexedBatches, query_weights
from common.train import bn_stats_kept, launch_options, sam_step

MASK_BATCHES = 8  # clean restricted-domain batches whose summed gradient ranks the coordinates for the mask


def outer_param_groups(model, lr, lr_scale):
    """An outer optimiser's parameter groups: every parameter at `lr`, but those named in `lr_scale`
    ({name: factor}) at lr * factor, one group per factor."""
    unknown = set(lr_scale) - {name for name, _ in model.named_parameters()}
    if unknown:
        raise ValueError(f"lr_scale names no parameter of the model: {', '.join(sorted(unknown))}")
    groups = {}
    for name, p in model.named_parameters():
        groups.setdefault(lr_scale.get(name, 1.0), []).append(p)
    return [{"params": params, "lr": lr * factor} for factor, params in groups.items()]


@dataclass(frozen=True)
class SophonConfig:
    alpha: float = 3.0  # FTS step = alpha * lr
    beta: float = 5.0  # NTR step = beta * lr
    lr: float = 1e-4
    bs: int = 150  # restricted batch (support + query) and NTR batch
    fts_loop: int = 1
    ntr_loop: int = 1
    adaptation_steps: int = 50  # inner steps per simulated fine-tuning
    fts_envs: int = 1  # simulated fine-tuners per FTS step, gradients averaged
    fts_clip: float = 0.5  # max norm of the FTS gradient (the official code's value)
    fts_optimizers: tuple = ("sgd",)
    fts_lrs: tuple = (1e-4,)
    fts_head: tuple = ("reinit",)
    fts_scope: tuple = ("all",)
    fts_schedules: tuple = ("constant",)  # lr schedule inside an episode, sampled per episode
    fts_lr_range: Optional[tuple] = None  # (lo, hi): lr drawn log-uniformly per episode instead of fts_lrs
    fts_lr_adapt: float = 0.0  # > 0: the lr is learned by the simulated attacker instead (MLAC), this step in log lr
    fts_lr_learned_share: float = 1.0  # share of the episodes at the learned lr; the others draw it from the range
    fts_query_every: int = 1  # query loss after every N-th inner step (and the last)
    fts_step_weights: str = "uniform"  # uniform | exp (later steps weigh more)
    clean_loop: int = 0  # SBL: clean restricted-domain steps per outer loop (head kept)
    sam_rho: float = 0.0  # > 0: NTR and clean steps are sharpness-aware, of this radius
    mask_share: float = 0.0  # Neurotoxin: share of coordinates frozen for FTS and NTR (largest clean gradient)
    mask_every: int = 25  # outer loops between recomputations of the mask
    seed: int = 0

    @classmethod
    def from_args(cls, args):
        """From a stage-2 command line; `--fts_lrs` left out means the seed's single `--fast_lr`."""
        values = {f.name: getattr(args, f.name) for f in fields(cls)}
        values["fts_lrs"] = args.fts_lrs or [args.fast_lr]
        return cls(**{k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in values.items()})


@dataclass
class StepResult:
    fts_loss: Optional[float]  # mean query loss over the FTS steps of the loop; None when fts_loop is 0
    ntr_loss: Optional[float]  # None when ntr_loop is 0
    finetuners: list  # the simulated fine-tuners sampled in this loop, in order
    clean_loss: Optional[float] = None  # None when clean_loop is 0


class Sophon:
    """The model, its two optimisers, the FTS inner loop, the fine-tuner sampler and the batch streams.

    Under torchrun (`world`) the `fts_envs` environments of an FTS step are dealt to the ranks. Every rank
    draws every environment's fine-tuner, batches and random seed, in the same order, and runs its own:
    environment e is the same episode whichever rank runs it, so the result does not depend on the world
    size. The FTS gradient is summed over the ranks before the clip; NTR is one step on the same batch on
    every rank, its gradient averaged and the BatchNorm statistics taken from rank 0, so the ranks stay
    identical.

    `data_on_device` ('auto', 'on', 'off'; common.data.resolve_data_on_device): the restricted and NTR images
    live on the device and batches are gathered there. The indices are drawn on the host either way (the
    streams' generators are what a resume restores and what makes environment e the same on every rank),
    so both placements see exactly the same batches.

    `lr_scale` ({parameter name: factor}): the outer optimisers step those parameters at factor x their lr
    (stage 2's `--rescale_outer_lr`: a layer rescaled by F then moves as much, relatively, as at scale 1).
    """

    OPTIMIZERS = ("fts_opt", "ntr_opt", "clean_opt")
    STREAMS = ("restricted_stream", "ntr_stream", "clean_stream", "mask_stream")

    def __init__(self, model, query_loss, restricted, ntr_data, config, precision, world=None, data_on_device="auto",
                 lr_scale=None):
        self.model, self.config, self.precision = model, config, precision
        self.restricted, self.ntr_data = restricted, ntr_data
        self.world = world or dist.world()
        self.data_on_device = resolve_data_on_device(data_on_device, [restricted, ntr_data], precision.device)
        self.restricted_gather = Gather(restricted, precision.device, self.data_on_device)
        self.ntr_gather = (self.restricted_gather if ntr_data is restricted
                           else Gather(ntr_data, precision.device, self.data_on_device))
        cuda = precision.device.type == "cuda"
        fast = launch_options(torch.optim.Adam, precision.device, precision.compile) if cuda else {}
        groups = lambda lr: outer_param_groups(model, lr, lr_scale or {})
        self.fts_opt = torch.optim.Adam(groups(config.alpha * config.lr), **fast)
        self.ntr_opt = torch.optim.Adam(groups(config.beta * config.lr), **fast)
        self.clean_opt = torch.optim.Adam(groups(config.beta * config.lr), **fast)
        to_input = lambda x: restricted.to_input(x, precision.device, None, precision.channels_last)
        self.fts = FTS(model, query_loss, to_input, precision)
        self.episode_gen = torch.Generator().manual_seed(config.seed + 1)  # one seed per episode
        self.sampler = FineTunerSampler(config.fts_optimizers, config.fts_lrs, config.fts_head, config.fts_scope,
                                        seed=config.seed + 2, schedules=config.fts_schedules,
                                        lr_range=config.fts_lr_range, lr_adapt=config.fts_lr_adapt,
                                        learned_share=config.fts_lr_learned_share)
        # the FTS loss is the weighted mean over the queried inner steps and the environments
        self.step_weights = [w / config.fts_envs for w in query_weights(
            config.adaptation_steps, config.fts_query_every, config.fts_step_weights)]
        self.restricted_stream = BatchStream(len(restricted), config.bs, seed=config.seed + 3)
        self.ntr_stream = BatchStream(len(ntr_data), config.bs, seed=config.seed + 4)
        self.clean_stream = BatchStream(len(restricted), config.bs, seed=config.seed + 5)
        self.mask_stream = BatchStream(len(restricted), config.bs, seed=config.seed + 6)
        self.mask, self.steps = None, 0  # mask: per parameter, True where the coordinate is frozen
        self.model_fwd = precision.maybe_compile(model)

    def step(self):
        """One outer loop; one host sync, for the losses (and one per FTS step for the learned lr's slopes)."""
        c = self.config
        self.model.train()
        if c.mask_share and self.steps % c.mask_every == 0:
            self.mask = self.clean_gradient_mask()
        self.steps += 1
        fts = [self.fts_step() for _ in range(c.fts_loop)]
        ntr_losses = [self.supervised_step(self.ntr_data, self.ntr_gather, self.ntr_stream, self.ntr_opt, masked=True)
                      for _ in range(c.ntr_loop)]
        clean_losses = [self.supervised_step(self.restricted, self.restricted_gather, self.clean_stream,
                                             self.clean_opt, masked=False) for _ in range(c.clean_loop)]
        mean = lambda losses: torch.stack(losses).mean().item() if losses else None
        return StepResult(mean([loss for loss, _ in fts]), mean(ntr_losses),
                          [t for _, finetuners in fts for t in finetuners], mean(clean_losses))

    def fts_step(self):
        """Returns (the FTS loss as a 0-d tensor, the fine-tuners sampled)."""
        c, params = self.config, list(self.model.parameters())
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        torch._foreach_zero_([p.grad for p in params])
        loss = torch.zeros((), device=self.precision.device)
        slopes = torch.zeros(c.fts_envs, device=self.precision.device)  # d(attacker's loss)/d(log lr) per env
        plan = [(self.sampler.sample(), [self.restricted_stream.next() for _ in range(c.adaptation_steps)],
                 int(torch.randint(2**62, (), generator=self.episode_gen)),
                 self.restricted_stream.next() if c.fts_lr_adapt else None) for _ in range(c.fts_envs)]
        for env, (finetuner, indices, seed, probe) in enumerate(plan):
            if env % self.world.size == self.world.rank:
                batches = IndexedBatches(indices, self.restricted_gather)
                gen = torch.Generator().manual_seed(seed)
                loss += self.fts.episode(self.model, batches, finetuner, self.step_weights, gen)
                if finetuner.lr_learned:  # probe: a batch the episode did not train on, the attacker's held-out loss
                    slopes[env] = self.fts.lr_slope(*self.restricted_gather(self.restricted_gather.indices(probe)))
        self.world.sum_([p.grad for p in params] + [loss.view(1)] + ([slopes] if c.fts_lr_adapt else []))
        torch.nn.utils.clip_grad_norm_(params, c.fts_clip)
        with self.masked():
            self.fts_opt.step()
        if c.fts_lr_adapt:
            for (finetuner, *_), slope in zip(plan, slopes.tolist()):
                self.sampler.adapt(finetuner, slope)
        return loss, [finetuner for finetuner, *_ in plan]

    def supervised_step(self, domain, gather, stream, optimizer, masked):
        """Cross-entropy on one batch of `domain` (NTR, or SBL's clean step), plain or sharpness-aware. The
        same step on every rank: gradients averaged, BatchNorm statistics from rank 0, so the ranks stay
        identical where kernels are not bit-exact."""
        x, y = gather(gather.indices(stream.next()))
        x = domain.to_input(x, self.precision.device, None, self.precision.channels_last)
        y = y.to(self.precision.device, non_blocking=True)
        sync = self.average_ if self.world.distributed else None
        with self.masked() if masked else contextlib.nullcontext():
            if self.config.sam_rho:
                loss, _ = sam_step(self.model_fwd, x, y, optimizer, self.precision, self.config.sam_rho, sync=sync)
            else:
                with self.precision.autocast():
                    loss = F.cross_entropy(self.model_fwd(x).float(), y)
                optimizer.zero_grad(set_to_none=False)
                loss.backward()
                if sync:
                    sync([p.grad for p in self.model.parameters()])
                optimizer.step()
        self.world.broadcast_(list(self.model.buffers()))
        return loss.detach()

    def average_(self, grads):
        self.world.sum_(grads)
        torch._foreach_div_(grads, self.world.size)

    @contextlib.contextmanager
    def masked(self):
        """Neurotoxin: the optimiser step inside leaves the frozen coordinates (self.mask) where they were."""
        if self.mask is None:
            yield
            return
        params = list(self.model.parameters())
        before = [p.detach().clone() for p in params]
        yield
        with torch.no_grad():
            for p, old, frozen in zip(params, before, self.mask):
                p.copy_(torch.where(frozen, old, p))

    def clean_gradient_mask(self):
        """True at the `mask_share` of all coordinates with the largest |summed clean gradient| (CE on
        MASK_BATCHES restricted-domain batches through the model's head: the direction a defender's clean
        fine-tuning starts in). Rank 0's gradient decides, so every rank freezes the same coordinates."""
        params = list(self.model.parameters())
        grads = [torch.zeros_like(p) for p in params]
        gather = self.restricted_gather
        with bn_stats_kept(self.model):
            for _ in range(MASK_BATCHES):
                x, y = gather(gather.indices(self.mask_stream.next()))
                x = self.restricted.to_input(x, self.precision.device, None, self.precision.channels_last)
                with self.precision.autocast():
                    loss = F.cross_entropy(self.model_fwd(x).float(), y.to(self.precision.device))
                torch._foreach_add_(grads, torch.autograd.grad(loss, params))
        self.world.broadcast_(grads)
        magnitude = torch.cat([g.abs().flatten() for g in grads])
        k = max(1, round(self.config.mask_share * magnitude.numel()))
        threshold = torch.topk(magnitude, k, sorted=False).values.min()
        return [g.abs() >= threshold for g in grads]

    # ---- state -----------------------------------------------------------------------------------

    def snapshot(self):
        """A copy of the trained state (weights, both optimisers). Not the data streams: a rollback to it
        goes on with fresh batches rather than repeating the ones that led astray."""
        return {"model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
                **{name: copy.deepcopy(getattr(self, name).state_dict()) for name in self.OPTIMIZERS}}

    def restore(self, snapshot):
        self.model.load_state_dict(snapshot["model"])
        for name in self.OPTIMIZERS:
            if name in snapshot:  # clean_opt: not in checkpoints written before it existed
                getattr(self, name).load_state_dict(snapshot[name])

    def state_dict(self):
        """Everything the next `step()` depends on (not copied: save it before stepping again)."""
        return {"model": self.model.state_dict(),
                **{name: getattr(self, name).state_dict() for name in self.OPTIMIZERS + self.STREAMS},
                "episode_gen": self.episode_gen.get_state(), "sampler": self.sampler.state_dict(),
                "mask": self.mask, "steps": self.steps}

    def load_state_dict(self, state):
        self.restore(state)
        self.episode_gen.set_state(state["episode_gen"])
        self.sampler.load_state_dict(state["sampler"])
        for name in self.STREAMS:
            if name in state:
                getattr(self, name).load_state_dict(state[name])
        self.steps = int(state.get("steps", 0))
        mask = state.get("mask")
        self.mask = None if mask is None else [m.to(self.precision.device) for m in mask]
