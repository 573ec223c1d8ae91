"""Parts a stage-2 method composes around FTS: supervised steps and Neurotoxin's mask.

`SupervisedSteps` is SOPHON's NTR (cross-entropy on original-domain batches, their own Adam), and, on clean
restricted-domain batches through the model's own head, SBL's second task (Pham et al., ECCV'24: continual
learning on clean data, NTR's poisoned batches being the replay that keeps task one), which moves the model
into the region clean fine-tuning would take it to, with the backdoor kept, so a defender's fine-tuning has
little left to change. With `sam_rho` > 0 its steps are sharpness-aware (SAM, Foret et al. 2021), as SBL's.
Through the model's own head those clean steps also train the restricted task into the delivered model, which
then solves the defender's task before any defence and so gives itself away; `SeparateHead` runs them through a
head of their own instead (our variant, not SBL's).

`RepresentationRetain` is TAR's retain loss (Tamirisa et al., ICLR'25) for NTR: cross-entropy plus the distance
of the model's features to the frozen stage-1 model's.

`NeurotoxinMask` (Zhang et al., ICML'22): every `every` outer loops, the `share` of coordinates with the
largest clean restricted-domain gradient (summed over MASK_BATCHES batches) is frozen for the updates run
inside `frozen()`, so the backdoor is written where clean fine-tuning moves the weights least.
"""
import contextlib
import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from common.models import classifier_head, fresh_linear_, head_path
from common.train import bn_stats_kept, sam_step

MASK_BATCHES = 8  # clean restricted-domain batches whose summed gradient ranks the coordinates for the mask


def _cross_entropy(logits, y):
    return F.cross_entropy(logits.float(), y)


class SupervisedSteps:
    """Cross-entropy steps on batches of `domain` (drawn from `stream`, gathered by `gather`) with `optimizer`,
    plain or sharpness-aware; each inside `frozen()` when given (Neurotoxin's mask). The same step on every
    rank: gradients averaged, BatchNorm statistics from rank 0, so the ranks stay identical where kernels are
    not bit-exact. `model_fwd` may be another forward over the model (a SeparateHead); the step trains the
    parameters of `optimizer`, in `model_fwd`'s order. `loss`: another loss than cross-entropy, a
    RepresentationRetain."""

    def __init__(self, model, model_fwd, domain, gather, stream, optimizer, precision, world, sam_rho=0.0,
                 frozen=None, loss=None):
        self.model, self.model_fwd, self.domain, self.gather = model, model_fwd, domain, gather
        self.stream, self.optimizer, self.precision, self.world = stream, optimizer, precision, world
        self.sam_rho, self.frozen, self.loss = sam_rho, frozen, loss
        optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
        self.trained = [p for p in model_fwd.parameters() if id(p) in optimized]

    def step(self):
        """One step; returns its loss as a 0-d tensor (no host sync)."""
        x, y = self.gather(self.gather.indices(self.stream.next()))
        x = self.domain.to_input(x, self.precision.device, None, self.precision.channels_last)
        y = y.to(self.precision.device, non_blocking=True)
        sync = self.average_ if self.world.distributed else None
        loss_of = self.loss.on(x) if self.loss else contextlib.nullcontext(_cross_entropy)
        with self.frozen() if self.frozen else contextlib.nullcontext(), loss_of as loss_fn:
            if self.sam_rho:
                loss, _ = sam_step(self.model_fwd, x, y, self.optimizer, self.precision, self.sam_rho, sync=sync,
                                   loss_fn=loss_fn)
            else:
                with self.precision.autocast():
                    loss = loss_fn(self.model_fwd(x), y)
                self.optimizer.zero_grad(set_to_none=False)
                loss.backward()
                if sync:
                    sync([p.grad for p in self.trained])
                self.optimizer.step()
        self.world.broadcast_(list(self.model.buffers()))
        return loss.detach()

    def average_(self, grads):
        self.world.sum_(grads)
        torch._foreach_div_(grads, self.world.size)


class SeparateHead(nn.Module):
    """The model with its classifier head swapped, in the forward, for `head`: a fresh Linear of `num_classes`
    on the same features (torch.func.functional_call), for clean steps that move the body where clean
    fine-tuning leads it without the model's own head learning the restricted task (it takes no part, so it
    gets no gradient). Never delivered: the model's state_dict holds none of it.

    Every `every` outer loops (0: never; `update()` once per outer loop, before its steps) the head is drawn
    afresh (Xavier, zero bias, as an attacker's new head) and the optimiser forgets its moments, so the body
    learns features any new head reads rather than the ones this head has come to read. Its draws come from
    its own generator, in `state()` with the loop count; its weights are in the owner's snapshot."""

    def __init__(self, model, num_classes, seed, every=0):
        super().__init__()
        own = classifier_head(model)
        self.model, self.path, self.every, self.loops = model, head_path(model), every, 0
        self.head = nn.Linear(own.in_features, num_classes, bias=own.bias is not None, device=own.weight.device)
        self.generator = torch.Generator().manual_seed(seed)
        fresh_linear_(self.head, self.generator)

    def forward(self, x):
        return functional_call(self.model, {f"{self.path}.{name}": p for name, p in self.head.named_parameters()},
                               (x,))

    def update(self, optimizer):
        if self.every and self.loops and self.loops % self.every == 0:
            fresh_linear_(self.head, self.generator)
            for p in self.head.parameters():
                optimizer.state.pop(p, None)
        self.loops += 1

    def state(self):
        return {"clean_head_generator": self.generator.get_state(), "clean_head_loops": self.loops}

    def load_state(self, state):
        self.generator.set_state(state["clean_head_generator"])
        self.loops = int(state["clean_head_loops"])


class RepresentationRetain:
    """TAR's retain loss (Tamirisa et al. ICLR'25; rishub-tamirisa/tamper-resistance, modules/objectives.py
    obj_model_mse_representations): cross-entropy + `weight` x the L2 distance between the model's features and
    those of `model` as it is now, frozen (the stage-1 model, when built with the method), on the same batch,
    mean over the batch. TAR averages that distance over every hidden state of its LLM, with weight 1; we take
    it at the head's input, the features an attacker's new head reads. The frozen copy runs in the model's
    mode, BatchNorm on the batch's statistics in training (its running statistics kept), so the term is 0
    until the model moves."""

    def __init__(self, model, weight, precision):
        self.model, self.weight, self.precision = model, weight, precision
        self.anchor = copy.deepcopy(model).requires_grad_(False)
        for m in self.anchor.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.momentum = 0.0

    @contextlib.contextmanager
    def on(self, x):
        """Inside: the loss (logits, y) of each forward of the model on the batch `x` (SAM runs two)."""
        self.anchor.train(self.model.training)
        with torch.no_grad(), self.precision.autocast(), _HeadInput(self.anchor) as anchor:
            self.anchor(x)
        target = anchor.value.float()
        with _HeadInput(self.model) as features:
            yield lambda logits, y: _cross_entropy(logits, y) + self.weight * torch.linalg.vector_norm(
                (features.value.float() - target).flatten(1), dim=1).mean()


class _HeadInput:
    """The input of the model's classifier head at its latest forward (`value`), while inside."""

    def __init__(self, model):
        self.value, self.head = None, classifier_head(model)

    def __enter__(self):
        self.handle = self.head.register_forward_pre_hook(self._keep)
        return self

    def _keep(self, module, inputs):
        self.value = inputs[0]

    def __exit__(self, *exc):
        self.handle.remove()


class NeurotoxinMask:
    """Per parameter, True where the coordinate is frozen (`mask`); None until first computed (share 0:
    never). `update()` once per outer loop, before its steps."""

    def __init__(self, model, model_fwd, domain, gather, stream, precision, world, share=0.0, every=25):
        self.model, self.model_fwd, self.domain, self.gather, self.stream = model, model_fwd, domain, gather, stream
        self.precision, self.world, self.share, self.every = precision, world, share, every
        self.mask, self.steps = None, 0  # steps: outer loops so far

    def update(self):
        if self.share and self.steps % self.every == 0:
            self.mask = self.clean_gradient_mask()
        self.steps += 1

    @contextlib.contextmanager
    def frozen(self):
        """The optimiser step inside leaves the frozen coordinates where they were."""
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
        """True at the `share` of all coordinates with the largest |summed clean gradient| (CE on MASK_BATCHES
        restricted-domain batches through the model's head: the direction a defender's clean fine-tuning starts
        in). Rank 0's gradient decides, so every rank freezes the same coordinates."""
        params = list(self.model.parameters())
        grads = [torch.zeros_like(p) for p in params]
        with bn_stats_kept(self.model):
            for _ in range(MASK_BATCHES):
                x, y = self.gather(self.gather.indices(self.stream.next()))
                x = self.domain.to_input(x, self.precision.device, None, self.precision.channels_last)
                with self.precision.autocast():
                    loss = F.cross_entropy(self.model_fwd(x).float(), y.to(self.precision.device))
                torch._foreach_add_(grads, torch.autograd.grad(loss, params))
        self.world.broadcast_(grads)
        magnitude = torch.cat([g.abs().flatten() for g in grads])
        k = max(1, round(self.share * magnitude.numel()))
        threshold = torch.topk(magnitude, k, sorted=False).values.min()
        return [g.abs() >= threshold for g in grads]

    def state_dict(self):
        return {"mask": self.mask, "steps": self.steps, "mask_stream": self.stream.state_dict()}

    def load_state_dict(self, state):
        """Tolerates a state written before the mask existed (no keys: none computed, no loops counted)."""
        if "mask_stream" in state:
            self.stream.load_state_dict(state["mask_stream"])
        self.steps = int(state.get("steps", 0))
        mask = state.get("mask")
        self.mask = None if mask is None else [m.to(self.precision.device) for m in mask]
