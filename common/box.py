"""The worst case of what an Adam attacker can reach: a simulated attacker for SOPHON's outer loop, beside FTS's
sampled fine-tuning trajectories or in their place (issue 38; common.sophon runs it, `--box_loop`).

Adam moves each coordinate by about its lr per step whatever the gradient's scale, so K Adam steps at lr stay
inside the L-infinity box ||delta||_inf <= r = K * lr around the weights they start from. A box step trains the
model against the worst point of that box instead of one sampled trajectory:

    delta* ~ argmin_{||delta||_inf <= r} CE_restricted(theta + delta)       `box_sign_steps` projected sign steps
    theta <- Adam_{alpha * lr}(clip(grad_theta' Query(theta') at theta' = theta + delta*))   first-order

It runs as an FTS episode (common.fts.FTS.episode) whose inner optimiser is `ProjectedSignSGD` and whose only query
is after the last inner step: the same learner, head policy, support/query split of each restricted batch,
BatchNorm handling and flat memory, its own Adam (alpha * lr) and the FTS clip (`--fts_clip`).

Where we follow the references and where not:
- Kingma & Ba (ICLR'15), §2.1: Adam's step |Delta_t| is at most lr * (1 - beta1) / sqrt(1 - beta2) (3.2 lr at
  torch's defaults), reached in the most severe sparsity (the gradient zero at every earlier step), and about lr
  in common cases; the box takes the common case, K * lr, which a few coordinates may pass by a little
  (tests/test_box.py checks it on Adam and AdamW trajectories of a small network).
- SAM (Foret et al., ICLR'21): the gradient at perturbed weights applied to the unperturbed ones, first-order. We
  change the ball (L-infinity, Adam's reach, not L2), its objective (the attacker's restricted-domain
  cross-entropy, minimised, not the trained loss maximised) and the gradient taken there (the query loss's).
- PGD (Madry et al., ICLR'18): projected sign steps in an L-infinity ball, here on weights, not inputs. We start
  from delta = 0 (where the attacker starts), not a random point, and take steps of S * r / steps with S =
  `box_sign_span`, 2 by default so that the steps together can cross the box (Madry et al.'s CIFAR-10 attack: 7
  steps of 2 for a radius of 8). With S <= 1 the walk never reaches a face: the projection is then inert and a
  box step is an FTS episode of sign descent at step S * r / steps, queried once at its end.
- The relative box (`--box_scale relative`) measures lr and radius in units of each tensor's scale, max(RMS(w),
  RELATIVE_FLOOR), as Adafactor's relative step size (Shazeer & Stern, ICML'18, whose epsilon_2 is the floor): the
  reach of an optimiser whose step grows with the weights. A per-coordinate |w| would freeze every weight at zero
  (a new head's bias) and forbid a sign change. Absolute is the default: it is Adam's reach, which is the premise.
"""
from dataclasses import dataclass

import torch

from common.cli import comma_list, nonneg_int, pos_float, pos_int
from common.fts import HEAD_POLICIES, Attackers, FineTunerSampler, query_weights
from common.settings import Settings, setting

BOX = "box"  # the inner optimiser's name, in a box episode's FineTuner and the FTS's optimiser table
RELATIVE_FLOOR = 1e-3  # the relative box's smallest unit (Adafactor's epsilon_2): a tensor at zero still moves
SCALES = ("absolute", "relative")


@dataclass
class BoxSettings(Settings):
    """The box attacker's flags (SOPHON's, composed into every stage-2 script)."""
    box_loop: int = setting(0, "box steps per outer loop, beside the FTS steps (--fts_loop 0: in their place): the "
                               "model trained against the worst case of the L-infinity box an Adam attacker reaches "
                               "(common/box.py); 0: none", type=nonneg_int)
    box_adam_steps: int = setting(10, "K: the box holds K Adam steps at --box_adam_lr, radius K * lr", type=pos_int,
                                  metavar="K")
    box_adam_lr: float = setting(1e-2, "the lr of the Adam attacker the box holds", type=pos_float)
    box_scale: str = setting("absolute", "absolute: every coordinate within K * lr, Adam's reach; relative: within "
                                         "K * lr * max(RMS(tensor), %g), the reach of steps that grow with the weights"
                                         % RELATIVE_FLOOR, choices=SCALES)
    box_sign_steps: int = setting(5, "projected sign steps that find the worst case in the box", type=pos_int)
    box_sign_span: float = setting(2.0, "the sign steps together span S radii (each S * r / steps): S > 1 reaches the "
                                        "box's faces and corners (PGD's choice); S <= 1 never reaches them, the box "
                                        "step is then sign descent at that step", type=pos_float, metavar="S")
    box_head: list = setting("reinit", "the box attacker's head, drawn per attacker: reinit (new, its box around its "
                                       "initialisation) or keep (the model's)", type=comma_list(str, HEAD_POLICIES))


class ProjectedSignSGD(torch.optim.Optimizer):
    """Sign descent kept inside the L-infinity box of half-width `radius` around the weights it was made with:
    w <- clip(w - lr * sign(g), w0 - radius, w0 + radius) per coordinate. `relative`: lr and radius in units of
    each tensor's max(RMS(w0), RELATIVE_FLOOR). Memory: w0 per parameter, whatever the number of steps."""

    def __init__(self, params, lr, radius, relative=False):
        super().__init__(params, {"lr": lr, "radius": radius})
        for group in self.param_groups:
            for p in group["params"]:
                origin = p.detach().clone()
                unit = origin.pow(2).mean().sqrt().clamp_min(RELATIVE_FLOOR) if relative else origin.new_ones(())
                self.state[p].update(origin=origin, unit=unit)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                origin, unit = self.state[p]["origin"], self.state[p]["unit"]
                reach = group["radius"] * unit
                p.sub_(p.grad.sign() * (group["lr"] * unit))
                p.copy_(origin + torch.clamp(p - origin, -reach, reach))


def box_optimizers(settings):
    """The box attacker's inner optimiser as an entry of the FTS's table (common.fts.FTS's `optimizers`)."""
    return {BOX: (ProjectedSignSGD, {"radius": box_radius(settings), "relative": settings.box_scale == "relative"})}


def box_radius(settings):
    """r = K * lr: the reach of K Adam steps at lr (in units of each tensor's scale when relative)."""
    return settings.box_adam_steps * settings.box_adam_lr


def box_attackers(settings, optimizer):
    """The box step's attackers (common.fts.Attackers), from the stage-2 `settings`: ProjectedSignSGD at step
    S * r / steps (S: `box_sign_span`) over every layer, a head drawn from `box_head` per attacker, the query after
    the last step alone (averaged over the `fts_envs` attackers), `optimizer` (an Adam at alpha * lr) applying the
    step."""
    steps = settings.box_sign_steps
    sampler = FineTunerSampler([BOX], [settings.box_sign_span * box_radius(settings) / steps], settings.box_head,
                               ["all"], seed=settings.seed + 7)
    return Attackers(sampler, steps, {0: [w / settings.fts_envs for w in query_weights(steps, every=steps)]},
                     optimizer)
