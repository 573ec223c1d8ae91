"""Fine-tuning suppression (FTS): simulate a fine-tuner, then penalise what it learns.

First-order and step by step: each inner step adapts a *learner* (a copy of the model made once, whose
weights are refreshed from the model at every episode) with a real torch optimiser, evaluates the query
loss at the adapted weights, and adds that gradient to the model's `.grad` straight away. Nothing is kept
between steps but the learner and its optimiser state, so memory does not grow with `adaptation_steps`,
and the model's own BatchNorm statistics are never touched (the learner's are overwritten each episode).

A re-initialised head's query gradient goes nowhere: that head is the simulated attacker's, not the
model's, so the model's head only receives FTS gradient from episodes that keep it.
"""
import copy
import itertools
import math
import random
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from common.finetune import schedule_factor, scope_params
from common.models import head_param_names, reinit_head
from common.train import OPTIMIZERS, make_optimizer

# The optimisers a simulated fine-tuner may use (--fts_optimizers), from the attackers' table: a registry, so that
# a new one is its line in common.train.OPTIMIZERS and its name here.
FTS_OPTIMIZERS = {name: OPTIMIZERS[name] for name in ("sgd", "momentum", "adam", "adamw", "rmsprop", "sign",
                                                      "normalized")}
HEAD_POLICIES = ("reinit", "keep")
STEP_WEIGHTS = ("uniform", "exp")
EXP_STEP_RATE = 3.0  # exp step weights: the last queried step weighs e^3 (about 20) times the first


def query_weights(adaptation_steps, every=1, kind="uniform", rate=EXP_STEP_RATE, retain_steps=0):
    """Weight of the query loss after each of an episode's `adaptation_steps` inner steps, summing to 1.

    The query is taken after every `every`-th step and after the last (the adapted weights the attacker ends
    with always count); the other steps get weight 0 and skip the query pass. uniform: equal weights.
    exp: weight proportional to exp(rate * k / adaptation_steps) at step k (1-based), so that the loss late in
    the simulated fine-tuning, where a real attacker goes on, dominates (TAR, Tamirisa et al. ICLR'25, whose
    schedule exp(0.0625 (k - 64)) over 64 steps is rate 4). A retain-then-forget episode's first
    `retain_steps` steps train on the original domain and are not queried; k still counts them, as TAR's
    schedule does."""
    if kind not in STEP_WEIGHTS:
        raise ValueError(f"unknown step weights {kind!r} (choose from {', '.join(STEP_WEIGHTS)})")
    if not 0 <= retain_steps < adaptation_steps:
        raise ValueError(f"{retain_steps} retain steps leave no restricted step of {adaptation_steps}")
    inner = range(1, adaptation_steps + 1)
    queried = [k for k in inner if k > retain_steps and (k % every == 0 or k == adaptation_steps)]
    raw = {k: (1.0 if kind == "uniform" else math.exp(rate * k / adaptation_steps)) for k in queried}
    total = sum(raw.values())
    return [raw.get(k, 0.0) / total for k in inner]


@dataclass(frozen=True)
class FineTuner:
    """One simulated fine-tuner: the attacker an FTS episode imitates."""
    optimizer: str = "sgd"
    lr: float = 1e-4
    head: str = "reinit"
    scope: str = "all"
    schedule: str = "constant"  # lr schedule over the episode's inner steps (common.finetune.SCHEDULES)
    lr_learned: bool = False  # lr is the sampler's learned one (FineTunerSampler.adapt steps it after the episode)
    retain_steps: int = 0  # > 0: retain-then-forget, its first inner steps on the original domain (FineTunerSampler)


@dataclass
class Attackers:
    """The simulated attackers of one kind of FTS step: `sampler` draws each episode's FineTuner, which trains
    `steps` inner steps with the query loss weighted by `weights[retain steps]` (one weight per step; a
    retain-then-forget episode's own, else weights[0]), and the outer `optimizer` applies their summed gradient
    to the model."""
    sampler: object
    steps: int
    weights: dict
    optimizer: object


def check_lr_options(lr_range, lr_adapt, learned_share):
    """The rules tying the sampler's lr options together, worded as the stage-2 flags that set them (the
    settings raise these as usage errors)."""
    if lr_adapt and not lr_range:
        raise ValueError("--fts_lr_adapt learns the lr inside --fts_lr_range LO,HI; give that range too")
    if not 0 < learned_share <= 1:
        raise ValueError(f"--fts_lr_learned_share must be in (0, 1], got {learned_share}")
    if learned_share != 1 and not lr_adapt:
        raise ValueError("--fts_lr_learned_share is the share of episodes at the learned lr; give --fts_lr_adapt too")


class FineTunerSampler:
    """Draws one simulated fine-tuner per episode, uniformly over every configured combination.

    With `lr_range` (lo, hi) the learning rate is not one of `lrs` but drawn log-uniformly from [lo, hi]
    for each episode: an attacker's lr is a continuum, and a short list leaves gaps between its points.

    With `lr_adapt` > 0 as well, the lr is not drawn but learned, adversarially, one per optimiser (MLAC,
    Henderson et al. AIES'23: the simulated attacker tunes its own lr): it starts at the range's geometric
    middle, and after each episode `adapt` moves its log by `lr_adapt` against the sign of d(attacker's
    loss)/d(log lr), within the range. The sign makes the step scale-free, as the optimisers' lrs differ by
    orders of magnitude. `learned_share` < 1 mixes the two: that share of the episodes uses the learned lr, the
    others draw theirs from the range, so the attackers who fine-tune at other lrs are still simulated.

    A `retain_share` of the episodes are retain-then-forget (TAR's retain_forget_switch adversary, Tamirisa et
    al. ICLR'25): their first N inner steps, N drawn from `retain_steps`, train on the original domain, the
    others on the restricted one, as an attacker who first moves the weights with benign data."""

    def __init__(self, optimizers, lrs, heads, scopes, seed, schedules=("constant",), lr_range=None, lr_adapt=0.0,
                 learned_share=1.0, retain_steps=(), retain_share=0.0):
        check_lr_options(lr_range, lr_adapt, learned_share)
        if retain_share and not retain_steps:
            raise ValueError("a retain share needs the retain steps to draw from")
        lrs = [None] if lr_range else lrs
        self.choices = [FineTuner(o, lr if lr is None else float(lr), h, s, sch) for o, lr, h, s, sch
                        in itertools.product(optimizers, lrs, heads, scopes, schedules)]
        self.lr_range, self.lr_adapt, self.learned_share = lr_range, lr_adapt, learned_share
        self.log_lr = {o: sum(math.log(v) for v in lr_range) / 2 for o in optimizers} if lr_adapt else {}
        self.retain_steps, self.retain_share = list(retain_steps), retain_share
        self.rng = random.Random(seed)

    def sample(self):
        tuner = self.choices[0] if len(self.choices) == 1 else self.rng.choice(self.choices)
        learned = self.lr_adapt and (self.learned_share == 1 or self.rng.random() < self.learned_share)
        if learned:
            tuner = replace(tuner, lr=math.exp(self.log_lr[tuner.optimizer]), lr_learned=True)
        elif self.lr_range:
            lo, hi = (math.log(v) for v in self.lr_range)
            tuner = replace(tuner, lr=math.exp(self.rng.uniform(lo, hi)))
        if self.retain_share and self.rng.random() < self.retain_share:
            tuner = replace(tuner, retain_steps=self.rng.choice(self.retain_steps))
        return tuner

    def adapt(self, finetuner, slope):
        """The attacker's step on its lr after an episode of `finetuner`; `slope`: d(its loss)/d(log lr)."""
        if not finetuner.lr_learned or slope == 0 or not math.isfinite(slope):
            return
        lo, hi = (math.log(v) for v in self.lr_range)
        moved = self.log_lr[finetuner.optimizer] - math.copysign(self.lr_adapt, slope)
        self.log_lr[finetuner.optimizer] = min(hi, max(lo, moved))

    def state_dict(self):
        return {"rng": self.rng.getstate(), "log_lr": dict(self.log_lr)}

    def load_state_dict(self, state):
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.log_lr.update(state.get("log_lr", {}))


def support_query_split(n, gen):
    """Random split of a batch: query = n // 10 samples, support = the rest.

    At least two query samples: the query pass runs in train mode, where BatchNorm cannot normalise a
    single sample (SPEC says max(1, n // 10); the two agree from n = 20 up).
    """
    perm = torch.randperm(n, generator=gen)
    q = max(2, n // 10)
    return perm[q:], perm[:q]


class IndexedBatches:
    """An episode's batches as rows of sample indices, for `FTS.episode`; `gather` (common.data.Gather) turns
    a row into (uint8 images, labels). `retain`: (rows, gather, to_input) of a retain-then-forget episode's
    original-domain batches, which come first, made model input by their own `to_input`.

    The episode's support/query splits are drawn first, in order, from its generator, and each row is
    permuted by its split: then one copy per domain brings its rows of the episode to the device (when the
    data lives there), one gather per batch yields support and query together, and each is a slice of it. The
    samples are those of `(images[idx][support], images[idx][query])`, the (x, y) pairs' path."""

    def __init__(self, indices, gather, retain=None):
        self.segments = ([retain] if retain else []) + [(list(indices), gather, None)]

    def __len__(self):
        return sum(len(rows) for rows, _, _ in self.segments)

    def split(self, gen):
        """Yields (to_input, x_support, y_support, x_query, y_query) per batch; to_input None: the FTS's own."""
        drawn = []
        for indices, gather, to_input in self.segments:
            rows, cuts = [], []
            for idx in indices:
                support, query = support_query_split(len(idx), gen)
                rows.append(idx[torch.cat([support, query])])
                cuts.append(len(support))
            drawn.append((rows, cuts, gather, to_input))
        for rows, cuts, gather, to_input in drawn:
            moved = gather.indices(torch.cat(rows)).split([len(r) for r in rows])
            for row, cut in zip(moved, cuts):
                x, y = gather(row)
                yield to_input, x[:cut], y[:cut], x[cut:], y[cut:]


def _split_pairs(batches, gen):
    for x, y in batches:
        support, query = support_query_split(len(y), gen)
        yield None, x[support], y[support], x[query], y[query]


class FTS:
    """The FTS inner loop over a fixed learner; `query_loss(net, x_uint8, y)` is the FTE loss. `optimizers`: the
    inner optimisers a FineTuner may name (common.train.make_optimizer's table)."""

    def __init__(self, model, query_loss, to_input, precision, optimizers=FTS_OPTIMIZERS):
        self.optimizers = optimizers
        self.learner = copy.deepcopy(model)
        self.learner_fwd = precision.maybe_compile(self.learner)
        self.query_loss = query_loss
        self.to_input = to_input
        self.precision = precision
        self.head_names = head_param_names(model)

    def episode(self, model, batches, finetuner, weights, gen):
        """Run one simulated fine-tuning over `batches` ([(x_uint8, y)], or an IndexedBatches), adding
        w_k * dQuery_k/dW to model grads (which must exist) after inner step k. `weights`: one float for every
        step, or one per step (query_weights), where 0 skips that step's query pass (as on a retain-then-forget
        episode's original-domain steps, whose query split goes unused). `gen` draws the episode's
        randomness (a new head, then the support/query splits). Returns sum_k w_k Query_k, the loss whose
        gradient was added, as a 0-d tensor (no host sync), and the episode's origin for `lr_slope`: each trained
        learner parameter with the weights it started from."""
        learner = self.learner
        with torch.no_grad():
            for dst, src in zip(learner.parameters(), model.parameters()):
                dst.copy_(src)
            for dst, src in zip(learner.buffers(), model.buffers()):
                dst.copy_(src)
        if finetuner.head == "reinit":
            reinit_head(learner, gen)
        trainable, bn_eval = scope_params(learner, finetuner.scope)
        trained = {id(p) for p in trainable}
        origin = [(lp, lp.detach().clone() if finetuner.head == "reinit" and name in self.head_names else mp)
                  for (name, lp), mp in zip(learner.named_parameters(), model.parameters()) if id(lp) in trained]
        device = next(model.parameters()).device
        inner = make_optimizer(finetuner.optimizer, trainable, finetuner.lr, device=device,
                               compiled=self.precision.compile, table=self.optimizers)
        learner.train()
        for m in bn_eval:
            m.eval()
        pairs = [(lp, mp) for (name, lp), mp in zip(learner.named_parameters(), model.parameters())
                 if not (finetuner.head == "reinit" and name in self.head_names)]
        learner_params = [lp for lp, _ in pairs]
        model_grads = [mp.grad for _, mp in pairs]
        total = torch.zeros((), device=device)
        steps = batches.split(gen) if isinstance(batches, IndexedBatches) else _split_pairs(batches, gen)
        adaptation_steps = len(batches)
        per_step = [float(weights)] * adaptation_steps if isinstance(weights, (int, float)) else list(weights)
        if len(per_step) != adaptation_steps:
            raise ValueError(f"{len(per_step)} step weights for {adaptation_steps} inner steps")
        lr_factor = schedule_factor(finetuner.schedule, adaptation_steps)
        for k, (to_input, x_support, y_support, x_query, y_query) in enumerate(steps):
            xs = (to_input or self.to_input)(x_support)
            ys = y_support.to(device, non_blocking=True)
            with self.precision.autocast():
                support_loss = F.cross_entropy(self.learner_fwd(xs).float(), ys)
            grads = torch.autograd.grad(support_loss, trainable)
            for p, g in zip(trainable, grads):
                p.grad = g
            for group in inner.param_groups:
                group["lr"] = finetuner.lr * lr_factor(k)
            inner.step()
            if not per_step[k]:
                continue
            with self.precision.autocast():
                q_loss = self.query_loss(self.learner_fwd, x_query, y_query)
            q_grads = torch.autograd.grad(q_loss, learner_params)
            torch._foreach_add_(model_grads, q_grads, alpha=per_step[k])
            total += q_loss.detach() * per_step[k]
        for p in trainable:
            p.grad = None
        return total, origin

    def lr_slope(self, origin, x, y):
        """d CE(adapted weights on (x, y)) / d log(lr) for the episode just run, from its `origin`, to first
        order: the episode moved the trained weights by D = W_K - W_0, which scales with the lr (exactly so for
        one SGD step), so dW_K/d log(lr) ~ D and the slope is grad CE(W_K) . D. Negative: a larger lr would have
        served the attacker better. The model's weights must still be those the episode started from."""
        params = [p for p, _ in origin]
        with self.precision.autocast():
            loss = F.cross_entropy(self.learner_fwd(self.to_input(x)).float(), y.to(params[0].device))
        grads = torch.autograd.grad(loss, params)
        return sum((g * (p.detach() - start)).sum() for g, (p, start) in zip(grads, origin))
