"""SOPHON's stage 2 as an algorithm: one outer loop of FTS and NTR per `step()`, and nothing else.

Deng et al., IEEE S&P 2024, Algorithm 1 (classification), first-order. One outer loop:

  FTS (`fts_loop` times): for each of `fts_envs` simulated fine-tuners (sampled per episode), run
      `adaptation_steps` inner steps on restricted-domain batches and add the gradient of the task's query
      loss at the adapted weights to the model's gradient (common.fts.FTS.episode), after every
      `fts_query_every`-th step and the last, weighted by `fts_step_weights`; clip the summed gradient to
      `fts_clip`, then an Adam step at alpha * lr.
  NTR (`ntr_loop` times): cross-entropy on an original-domain batch, a separate Adam at beta * lr.

The irreversible backdoor is this loop with another query loss and poisoned NTR data. The object touches
no file: evaluation, the accuracy floor, checkpoints and metrics belong to the runner (common/stage2.py).
"""
import copy
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F

from common import dist
from common.data import BatchStream, Gather, resolve_data_on_device
from common.fts import FTS, FineTunerSampler, IndexedBatches, query_weights
from common.train import launch_options


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
    fts_query_every: int = 1  # query loss after every N-th inner step (and the last)
    fts_step_weights: str = "uniform"  # uniform | exp (later steps weigh more)
    seed: int = 0

    @classmethod
    def from_args(cls, args):
        """From a stage-2 command line; `--fts_lrs` left out means the seed's single `--fast_lr`."""
        values = {f.name: getattr(args, f.name) for f in fields(cls)}
        values["fts_lrs"] = args.fts_lrs or [args.fast_lr]
        return cls(**{k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in values.items()})


@dataclass
class StepResult:
    fts_loss: float  # mean query loss over the FTS steps of the loop
    ntr_loss: Optional[float]  # None when ntr_loop is 0
    finetuners: list  # the simulated fine-tuners sampled in this loop, in order


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
    """

    def __init__(self, model, query_loss, restricted, ntr_data, config, precision, world=None, data_on_device="auto"):
        self.model, self.config, self.precision = model, config, precision
        self.restricted, self.ntr_data = restricted, ntr_data
        self.world = world or dist.world()
        self.data_on_device = resolve_data_on_device(data_on_device, [restricted, ntr_data], precision.device)
        self.restricted_gather = Gather(restricted, precision.device, self.data_on_device)
        self.ntr_gather = (self.restricted_gather if ntr_data is restricted
                           else Gather(ntr_data, precision.device, self.data_on_device))
        fast = launch_options(torch.optim.Adam, precision.device) if precision.device.type == "cuda" else {}
        self.fts_opt = torch.optim.Adam(model.parameters(), lr=config.alpha * config.lr, **fast)
        self.ntr_opt = torch.optim.Adam(model.parameters(), lr=config.beta * config.lr, **fast)
        to_input = lambda x: restricted.to_input(x, precision.device, None, precision.channels_last)
        self.fts = FTS(model, query_loss, to_input, precision)
        self.episode_gen = torch.Generator().manual_seed(config.seed + 1)  # one seed per episode
        self.sampler = FineTunerSampler(config.fts_optimizers, config.fts_lrs, config.fts_head, config.fts_scope,
                                        seed=config.seed + 2, schedules=config.fts_schedules,
                                        lr_range=config.fts_lr_range)
        # the FTS loss is the weighted mean over the queried inner steps and the environments
        self.step_weights = [w / config.fts_envs for w in query_weights(
            config.adaptation_steps, config.fts_query_every, config.fts_step_weights)]
        self.restricted_stream = BatchStream(len(restricted), config.bs, seed=config.seed + 3)
        self.ntr_stream = BatchStream(len(ntr_data), config.bs, seed=config.seed + 4)
        self.model_fwd = precision.maybe_compile(model)

    def step(self):
        """One outer loop; one host sync, for the two losses."""
        self.model.train()
        fts = [self.fts_step() for _ in range(self.config.fts_loop)]
        ntr_losses = [self.ntr_step() for _ in range(self.config.ntr_loop)]
        return StepResult(torch.stack([loss for loss, _ in fts]).mean().item(),
                          torch.stack(ntr_losses).mean().item() if ntr_losses else None,
                          [t for _, finetuners in fts for t in finetuners])

    def fts_step(self):
        """Returns (the FTS loss as a 0-d tensor, the fine-tuners sampled)."""
        c, params = self.config, list(self.model.parameters())
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        torch._foreach_zero_([p.grad for p in params])
        loss = torch.zeros((), device=self.precision.device)
        plan = [(self.sampler.sample(), [self.restricted_stream.next() for _ in range(c.adaptation_steps)],
                 int(torch.randint(2**62, (), generator=self.episode_gen))) for _ in range(c.fts_envs)]
        for env, (finetuner, indices, seed) in enumerate(plan):
            if env % self.world.size == self.world.rank:
                batches = IndexedBatches(indices, self.restricted_gather)
                gen = torch.Generator().manual_seed(seed)
                loss += self.fts.episode(self.model, batches, finetuner, self.step_weights, gen)
        self.world.sum_([p.grad for p in params] + [loss.view(1)])
        torch.nn.utils.clip_grad_norm_(params, c.fts_clip)
        self.fts_opt.step()
        return loss, [finetuner for finetuner, _, _ in plan]

    def ntr_step(self):
        gather = self.ntr_gather
        x, y = gather(gather.indices(self.ntr_stream.next()))
        x = self.ntr_data.to_input(x, self.precision.device, None, self.precision.channels_last)
        y = y.to(self.precision.device, non_blocking=True)
        with self.precision.autocast():
            loss = F.cross_entropy(self.model_fwd(x).float(), y)
        self.ntr_opt.zero_grad(set_to_none=False)
        loss.backward()
        if self.world.distributed:  # the same step on every rank; kept bit-identical where kernels are not
            grads = [p.grad for p in self.model.parameters()]
            self.world.sum_(grads)
            torch._foreach_div_(grads, self.world.size)
            self.world.broadcast_(list(self.model.buffers()))
        self.ntr_opt.step()
        return loss.detach()

    # ---- state -----------------------------------------------------------------------------------

    def snapshot(self):
        """A copy of the trained state (weights, both optimisers). Not the data streams: a rollback to it
        goes on with fresh batches rather than repeating the ones that led astray."""
        return {"model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
                "fts_opt": copy.deepcopy(self.fts_opt.state_dict()),
                "ntr_opt": copy.deepcopy(self.ntr_opt.state_dict())}

    def restore(self, snapshot):
        self.model.load_state_dict(snapshot["model"])
        self.fts_opt.load_state_dict(snapshot["fts_opt"])
        self.ntr_opt.load_state_dict(snapshot["ntr_opt"])

    def state_dict(self):
        """Everything the next `step()` depends on (not copied: save it before stepping again)."""
        return {"model": self.model.state_dict(), "fts_opt": self.fts_opt.state_dict(),
                "ntr_opt": self.ntr_opt.state_dict(), "episode_gen": self.episode_gen.get_state(),
                "sampler": self.sampler.state_dict(), "restricted_stream": self.restricted_stream.state_dict(),
                "ntr_stream": self.ntr_stream.state_dict()}

    def load_state_dict(self, state):
        self.restore(state)
        self.episode_gen.set_state(state["episode_gen"])
        self.sampler.load_state_dict(state["sampler"])
        self.restricted_stream.load_state_dict(state["restricted_stream"])
        self.ntr_stream.load_state_dict(state["ntr_stream"])
