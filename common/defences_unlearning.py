"""The defences that unlearn adversarial perturbations: i-BAU and SAU. Each is `recipe(model, run, curve)` on a
common.defence_run.DefenceRun; each docstring says which reference it follows and where it does not."""
import torch
import torch.nn.functional as F

from common.defence_run import IBAU_ADAM_BETAS, IBAU_INNER_STEP, IBAU_PERTURB_LR, IBAU_REG

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

    adam = lambda params, lr: torch.optim.Adam(params, lr=lr, betas=IBAU_ADAM_BETAS, amsgrad=True)
    curve = run.fine_tune(model, curve, lambda k: 1.0, step=step, make=adam)
    curve.defence_info = {"perturbation_norms": norms}
    return curve
