"""The defences that unlearn adversarial perturbations: i-BAU and SAU. Each is `recipe(model, run, curve)` on a
common.defence_run.DefenceRun; each docstring says which reference it follows and where it does not."""
import copy

import torch
import torch.nn.functional as F

from common.catalog import DATASETS
from common.defence_run import IBAU_INNER_STEP, IBAU_PERTURB_LR, IBAU_REG

# ---- i_bau --------------------------------------------------------------------------------------------------------

def fixed_point_hypergradient(delta, theta, phi, outer_loss, K):
    """The implicit hypergradient d/d theta of the outer loss E(delta*(theta), theta), where the inner solution
    delta* is a fixed point of delta = phi(delta, theta) (Zeng et al., ICLR 2022; hypertorch's fixed_point as
    I-BAU's hypergrad.py has it): by the implicit function theorem it is dE/d theta +
    (d phi/d theta)^T (I - d phi/d delta)^-T dE/d delta; K fixed-point iterations v <- (d phi/d delta)^T v +
    dE/d delta from v = 0 sum the first K terms of that inverse's Neumann series. `delta`: the inner solution,
    held fixed; `theta`: the tensors differentiated; `phi(delta)` and `outer_loss(delta)` read theta themselves.
    Returns a gradient per tensor of theta. Unlike hypertorch it never stops before K (its tolerance, 1e-10 on
    ||v_k - v_k-1||, only ends a sum that has already converged)."""
    delta = delta.detach().requires_grad_(True)
    dE_ddelta, *dE_dtheta = _grads(outer_loss(delta), [delta, *theta])
    mapped = phi(delta)
    v = torch.zeros_like(delta)
    for _ in range(K):
        v = torch.autograd.grad(mapped, delta, v, retain_graph=True)[0] + dE_ddelta
    return [direct + indirect for direct, indirect in zip(dE_dtheta, _grads(mapped, theta, v))]


def _grads(output, inputs, grad_output=None):
    """torch.autograd.grad, zeros for the inputs `output` does not depend on (hypertorch's grad_unused_zero)."""
    grads = torch.autograd.grad(output, inputs, grad_output, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]


def gradient_descent_map(inner_loss, step):
    """phi(delta) = delta - step * d inner_loss(delta)/d delta, kept differentiable in delta and in the weights
    inner_loss reads: the fixed-point map of I-BAU's inner problem (hypertorch's GradientDescent(loss_inner,
    step))."""
    def phi(delta):
        grad, = torch.autograd.grad(inner_loss(delta), delta, create_graph=True)
        return delta - step * grad
    return phi


def universal_perturbation(model, inputs, start, precision, lr=IBAU_PERTURB_LR, reg=IBAU_REG, radius=None):
    """I-BAU's inner maximisation, once a round (BackdoorBench i-bau.py, `batch_pert`): one perturbation, shaped
    as one input and shared by every image, from `start` by SGD at `lr` (no momentum), a step per batch of
    model input in `inputs`, ascending the cross-entropy of the model on the perturbed batch against its own
    predictions on the clean batch, held back by the ridge `reg` ||delta||^2; then scaled onto the L2 ball of
    `radius` if given. Returns it detached."""
    delta = start.detach().clone().requires_grad_(True)
    for x in inputs:
        with torch.no_grad(), precision.autocast():
            own = model(x).argmax(1)
        with precision.autocast():
            logits = model(x + delta)
        loss = -F.cross_entropy(logits.float(), own) + reg * delta.square().sum()
        grad, = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta -= lr * grad
    delta = delta.detach()
    if radius is not None:
        delta = delta * torch.clamp(radius / torch.linalg.vector_norm(delta), max=1.0)
    return delta


def patch_mask(n, portion, gen, device):
    """n x 1 x 1 x 1: 1 on max(1, int(n * portion)) images drawn from `gen`, 0 on the rest (loss_outer's
    `rand_idx`)."""
    mask = torch.zeros(n, 1, 1, 1)
    mask[torch.randperm(n, generator=gen)[:max(1, int(n * portion))]] = 1.0
    return mask.to(device)


def i_bau(model, run, curve):
    """Implicit Backdoor Adversarial Unlearning (Zeng et al., ICLR 2022) as BackdoorBench runs it (defense/i-bau.py
    and config/defense/i-bau/config.yaml, read at f02e353; its code is I-BAU's, github.com/YiZeng623/I-BAU,
    defense.py and hypergrad.py, read at d4bfa52). The reference's budget: --defence_steps (5 rounds x 10 steps,
    one per batch of its 2,500 images at batch size 256), a round --defence_epoch_steps. Each round:
    1. the universal perturbation delta (universal_perturbation): from zero, SGD at lr 10 over one round of
       batches (its pass over the data) on -CE(model(x + delta), the model's own predictions on x)
       + 0.001 ||delta||^2;
    2. then each step of the round one Adam update (AMSGrad, betas 0.9, 0.999, no weight decay, --ibau_lr 1e-4,
       constant) along the implicit hypergradient (fixed_point_hypergradient, --ibau_k 5 iterations) of the outer
       loss, CE with the true labels on the step's batch, --ibau_portion (1%) of its images given delta, where delta
       is a fixed point of one gradient step of 0.1 (gradient_descent_map) on the inner loss: -CE(model(x0 +
       delta), y0) + 0.001 ||delta||^2, (x0, y0) the defence's first batch with its true labels, for every step.
    As there: delta is added to the model's (normalised) input, not clamped, not projected (--ibau_radius: the
    paper's L2 ball, commented out in both codes; BackdoorBench's inputs are normalised, I-BAU's own [0, 1]
    pixels); the model is in eval mode throughout (BatchNorm on running statistics, left as they were);
    RandomCrop on every batch (BackdoorBench's train transform). Deviations: at least one image of a batch is
    given delta (the reference's int(n * 0.01) gives none below batch size 100, and i-BAU would then be plain
    fine-tuning); each round unlearns on fresh batches (the reference reuses one list of its first pass's
    batches every round; ours loops over the data as the other defences do); no flip (see ft). defence_info
    records ||delta|| of each round."""
    cfg, pixel_fn = run.cfg, run.pixel_fn()
    delta = first = None
    k, norms = 0, []

    def inputs(batches, precision):
        return (run.domain.to_input(run.domain.images[idx], run.device, pixel_fn, precision.channels_last)
                for idx in batches)

    def step(model, x, y, optimizer, precision):
        nonlocal delta, first, k
        model.eval()  # train_epoch sets train mode; the reference's model.eval() holds for the whole defence
        if k % run.epoch_steps == 0:
            delta = universal_perturbation(model, inputs(run.take(run.epoch_steps), precision),
                                           torch.zeros_like(x[:1]), precision, radius=cfg.ibau_radius)
            norms.append(float(torch.linalg.vector_norm(delta)))
        k += 1
        x0, y0 = first = first or (x, y)
        mask = patch_mask(len(x), cfg.ibau_portion, run.gen, x.device)
        logits = None

        def inner_loss(delta):
            with precision.autocast():
                out = model(x0 + delta)
            return -F.cross_entropy(out.float(), y0) + IBAU_REG * delta.square().sum()

        def outer_loss(delta):
            nonlocal logits
            with precision.autocast():
                logits = model(x + mask * delta)
            return F.cross_entropy(logits.float(), y)

        optimizer.zero_grad(set_to_none=True)
        grads = fixed_point_hypergradient(delta, optimizer.params, gradient_descent_map(inner_loss, IBAU_INNER_STEP),
                                          outer_loss, cfg.ibau_k)
        for p, g in zip(optimizer.params, grads):
            p.grad = g
        optimizer.step()
        logits = logits.detach()
        return F.cross_entropy(logits.float(), y), logits

    curve = run.fine_tune(model, curve, lambda k: 1.0, step=step)
    curve.defence_info = {"perturbation_norms": norms}
    return curve


# ---- sau ----------------------------------------------------------------------------------------------------------


def init_perturbation(x, init, bound, gen=None):
    """PGD's starting perturbation, one per sample and pixel, projected onto the L_inf ball of radius `bound`
    (Shared_PGD.init_pert): "zero", "random" (uniform in [0, 1) from `gen`, so in [0, bound] once projected),
    "max" (+bound everywhere) or "min" (-bound)."""
    if init == "random":
        pert = torch.rand(x.shape, generator=gen).to(x.device, x.dtype)
    else:
        pert = torch.full_like(x, {"zero": 0.0, "max": bound, "min": -bound}[init])
    return pert.clamp(-bound, bound)


def adversarial_loss(logits, logits_ref, y, fooled, fooled_ref):
    """L_adv: minus the cross-entropy of the true labels y, the two models' halves averaged over the batch, on
    the samples each model is not yet fooled on (the reference's "early stop" against a very large loss)."""
    ce = F.cross_entropy(logits.float(), y, reduction="none")[~fooled].sum()
    ce_ref = F.cross_entropy(logits_ref.float(), y, reduction="none")[~fooled_ref].sum()
    return -(ce + ce_ref) / 2 / len(y)


def shared_loss(logits, logits_ref, shared):
    """L_share: the Jensen-Shannon divergence between the two models' predictions (probabilities clamped at
    1e-8), summed over the samples that are not yet shared adversarial examples, over the batch size."""
    p = F.softmax(logits.float(), 1).clamp(min=1e-8)
    q = F.softmax(logits_ref.float(), 1).clamp(min=1e-8)
    m = (p + q) / 2
    js = 0.5 * (p * p.log() + q * q.log()) - 0.5 * (p * m.log() + q * m.log())
    return js[~shared].sum() / len(shared)


def shared_pgd(model, reference, x, y, perturb, cfg, gen=None):
    """Shared adversarial examples (Shared_PGD.attack at norm_type L_inf): a perturbation per sample, in pixel
    units (`perturb(x, pert)` is the model's input), that moves the model h and the frozen reference h_0 off
    their clean predictions and onto one class. From init_perturbation(--sau_pgd_init), --sau_adv_steps
    signed-gradient descent steps of --sau_adv_lr on beta_1 L_adv + beta_2 L_share, each projected back onto the
    L_inf ball of radius --sau_trigger_norm; it stops after the step taken once every sample was shared. No clip
    to the valid pixel range (the reference leaves it out: "not necessary for backdoor defense")."""
    bound = cfg.sau_trigger_norm
    with torch.no_grad():
        clean, clean_ref = model(x).argmax(1), reference(x).argmax(1)
    pert = init_perturbation(x, cfg.sau_pgd_init, bound, gen)
    for _ in range(cfg.sau_adv_steps):
        pert.requires_grad_(True)
        x_adv = perturb(x, pert)
        logits, logits_ref = model(x_adv), reference(x_adv)
        fooled, fooled_ref = logits.argmax(1) != clean, logits_ref.argmax(1) != clean_ref
        shared = fooled & fooled_ref & (logits.argmax(1) == logits_ref.argmax(1))
        loss = (cfg.sau_beta_1 * adversarial_loss(logits, logits_ref, y, fooled, fooled_ref)
                + cfg.sau_beta_2 * shared_loss(logits, logits_ref, shared))
        grad, = torch.autograd.grad(loss, pert)
        pert = (pert.detach() - cfg.sau_adv_lr * grad.sign()).clamp(-bound, bound)
        if shared.all():
            break
    return pert.detach()


def sau_loss(logits, logits_adv, logits_ref, logits_ref_adv, y, cfg):
    """The unlearning loss: lmd_1 CE(h(x), y) + lmd_2 CE(h(x + pert), y) + lmd_3 L_sar. L_sar keeps the model
    from the reference's adversarial class y0 = h_0(x + pert) on the samples where y0 is neither the true label
    nor h_0's clean prediction (the reference's "potential poison"; whether h shares y0 does not matter there):
    -(log(1e-6 + (1 - p)) + log(1 + 1e-6 - p)) / 2 summed over them, over the batch size, p = h's probability
    of y0 on x + pert, 1 - p summed over the other classes, clamped as there (p >= 0.001, 1 - p <= 0.999)."""
    y0 = logits_ref_adv.argmax(1)
    poison = (y0 != y) & (y0 != logits_ref.argmax(1))
    probs = F.softmax(logits_adv.float(), 1)
    one_hot = F.one_hot(y0, probs.shape[1])
    other, p = (probs * (1 - one_hot)).sum(1)[poison], (probs * one_hot).sum(1)[poison]
    l_sar = -(torch.log(1e-6 + other.clamp(max=0.999)).sum() + torch.log(1 + 1e-6 - p.clamp(min=0.001)).sum()) / 2
    return (cfg.sau_lmd_1 * F.cross_entropy(logits.float(), y) + cfg.sau_lmd_2 * F.cross_entropy(logits_adv.float(), y)
            + cfg.sau_lmd_3 * l_sar / len(y))


def sau(model, run, curve):
    """Shared Adversarial Unlearning (Wei et al., NeurIPS 2023; BackdoorBench defense/sau.py and config/defense/
    sau/config.yaml, read at f02e353): h_0, a frozen copy of the model as it comes; per batch, shared_pgd's
    perturbations against h and h_0, then one step on sau_loss, for n_rounds 100 rounds of ceil(2500 / 256)
    steps (its 5% of CIFAR-10 at batch size 256). As the reference: Adam (amsgrad, betas 0.9/0.999, no weight
    decay) at cell.lr (--sau_lr 1e-4) and constant (its CosineAnnealingLR is built but never stepped), no
    augmentation (its train loader takes the test transform), the model in eval mode throughout (BatchNorm
    statistics fixed; --sau_train_mode: train mode for the update's forward of the clean and perturbed batch
    together, as its --train_mode), the perturbation in [0, 1] pixel units (added before normalisation; on gray
    domains per channel of the 3-channel input the model reads). Deviations: L_inf only (its L1, L2 and Reg norm
    types not offered); one update per perturbation (its outer_steps is 1); bf16 autocast where --amp has it.

    Cost: a step costs about 8 ft steps (measured on one CPU core, resnet18 at 32 px, batch 64: 4.8 s against
    0.63 s): two clean forwards, 5 PGD steps of a forward and a backward to the input through both models, then
    the update on the doubled batch; so its 1,000 steps cost what about 8,000 ft steps do. --defence_steps
    shortens it."""
    cfg = run.cfg
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    std = torch.tensor(DATASETS[run.domain.name].std, device=run.device).view(1, -1, 1, 1)
    perturb = lambda x, pert: x + pert / std  # normalise(pixels + pert), x already normalised

    def step(model, x, y, optimizer, precision):
        model.eval()
        with precision.autocast():
            pert = shared_pgd(model, reference, x, y, perturb, cfg, run.gen)
        x_adv = perturb(x, pert)
        model.train(cfg.sau_train_mode)
        with precision.autocast():
            logits, logits_adv = model(torch.cat([x, x_adv])).chunk(2)
            with torch.no_grad():
                logits_ref, logits_ref_adv = reference(x), reference(x_adv)
        model.eval()
        loss = sau_loss(logits, logits_adv, logits_ref, logits_ref_adv, y, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss, logits
    return run.fine_tune(model, curve, lambda k: 1.0, step=step)
