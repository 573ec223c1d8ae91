"""FTS: the first-order meta-gradient, what an episode may touch, inner optimisers, memory, sampling."""
import copy
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.fts import FTS, FTS_OPTIMIZERS, FineTuner, FineTunerSampler, query_weights, support_query_split
from common.losses import inverse_ce, kl_uniform
from common.models import build_model
from common.train import Precision
from helpers import SavedBytes, TinyNet, linear_model

CPU = Precision(torch.device("cpu"))


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _zero_grads(model, fill=0.0):
    for p in model.parameters():
        p.grad = torch.full_like(p, fill)


def _float_batches(n_batches, n, d, classes, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)) for _ in range(n_batches)]


def _image_batches(n_batches, n, size, seed, channels=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8),
             torch.randint(0, 10, (n,), generator=g)) for _ in range(n_batches)]


def _to_float(x):
    return x.float() / 255


def _splits(seed, batches):
    gen = torch.Generator().manual_seed(seed)
    return [support_query_split(len(y), gen) for _, y in batches]


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# ---- a. the first-order meta-gradient ------------------------------------------------------------

def test_first_order_meta_gradient_matches_numpy_reference():
    d, classes, n, steps, lr, weight, seed = 6, 4, 20, 3, 0.5, 0.25, 11
    torch.manual_seed(0)
    model = linear_model(d, classes)
    W0 = model[1].weight.detach().double().numpy().copy()
    b0 = model[1].bias.detach().double().numpy().copy()
    batches = _float_batches(steps, n, d, classes, seed=3)
    fts = FTS(model, lambda net, x, y: kl_uniform(net(x), y), lambda x: x, CPU)
    _zero_grads(model, fill=1.0)  # grads accumulate: whatever was there stays
    total, _ = fts.episode(model, batches, FineTuner(optimizer="sgd", lr=lr, head="keep", scope="all"), weight,
                           _gen(seed))

    W, b = W0.copy(), b0.copy()
    gW, gb, losses = np.zeros_like(W), np.zeros_like(b), []
    for (x, y), (support, query) in zip(batches, _splits(seed, batches)):
        xs, ys = x[support].double().numpy(), y[support].numpy()
        P = _softmax(xs @ W.T + b)
        Yh = np.eye(classes)[ys]
        W = W - lr * (P - Yh).T @ xs / len(ys)  # one plain SGD step on the support CE
        b = b - lr * (P - Yh).mean(axis=0)
        xq = x[query].double().numpy()
        Pq = _softmax(xq @ W.T + b)  # query KL at the adapted weights
        losses.append(np.mean(-np.log(classes) - np.log(Pq).mean(axis=1)))
        gW += (Pq - 1 / classes).T @ xq / len(xq)
        gb += (Pq - 1 / classes).mean(axis=0)
    np.testing.assert_allclose(model[1].weight.grad.double().numpy(), 1.0 + weight * gW, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(model[1].bias.grad.double().numpy(), 1.0 + weight * gb, rtol=1e-4, atol=1e-6)
    assert total.item() == pytest.approx(weight * sum(losses), rel=1e-4)
    # the model itself did not move; the learner holds the adapted weights
    np.testing.assert_array_equal(model[1].weight.detach().double().numpy(), W0)
    np.testing.assert_allclose(fts.learner[1].weight.detach().double().numpy(), W, rtol=1e-4, atol=1e-6)


def test_support_query_split_is_a_partition():
    gen = torch.Generator().manual_seed(0)
    for n in (4, 20, 37, 150):
        support, query = support_query_split(n, gen)
        assert len(query) == max(2, n // 10)
        assert sorted(torch.cat([support, query]).tolist()) == list(range(n))


# ---- b. the model's own state is untouched ------------------------------------------------------

def test_episode_leaves_resnet_params_and_batchnorm_stats_unchanged():
    torch.manual_seed(0)
    model = build_model("resnet18", 10)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fts = FTS(model, lambda net, x, y: inverse_ce(net(_to_float(x)), y), _to_float, CPU)
    _zero_grads(model)
    fts.episode(model, _image_batches(2, 20, 16, seed=1), FineTuner("sgd", 1e-2, "reinit", "all"), 0.5, _gen(0))
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k
    assert any("running_mean" in k for k in before)
    # ... while the learner's BatchNorm statistics did move (so the check above can fail)
    assert not torch.equal(fts.learner.bn1.running_mean, before["bn1.running_mean"])
    assert model.conv1.weight.grad.abs().sum() > 0


# ---- c. the head policy ---------------------------------------------------------------------------

@pytest.mark.parametrize("head", ["reinit", "keep"])
def test_head_gradient_follows_head_policy(head):
    torch.manual_seed(0)
    model = TinyNet()
    fts = FTS(model, lambda net, x, y: inverse_ce(net(_to_float(x)), y), _to_float, CPU)
    _zero_grads(model)
    fts.episode(model, _image_batches(2, 20, 8, seed=2), FineTuner("sgd", 0.1, head, "all"), 1.0, _gen(0))
    assert model.conv.weight.grad.abs().sum() > 0
    assert model.bn.weight.grad.abs().sum() > 0
    if head == "reinit":  # a re-initialised head is the attacker's: its query gradient goes nowhere
        assert torch.count_nonzero(model.fc.weight.grad) == 0
        assert torch.count_nonzero(model.fc.bias.grad) == 0
    else:
        assert model.fc.weight.grad.abs().sum() > 0


def test_reinit_gives_the_learner_a_fresh_head():
    torch.manual_seed(0)
    model = TinyNet()
    fts = FTS(model, lambda net, x, y: inverse_ce(net(_to_float(x)), y), _to_float, CPU)
    _zero_grads(model)
    # lr tiny: the learner's head after the episode is (nearly) its initial value
    fts.episode(model, _image_batches(1, 20, 8, seed=2), FineTuner("sgd", 1e-12, "reinit", "head"), 1.0, _gen(0))
    assert not torch.allclose(fts.learner.fc.weight, model.fc.weight)
    assert torch.allclose(fts.learner.fc.bias, torch.zeros_like(fts.learner.fc.bias), atol=1e-9)


# ---- d. inner optimisers are torch's own ----------------------------------------------------------

class _HandStep:
    """A hand-written update for the optimisers torch does not have: sign descent and the normalised step."""

    def __init__(self, params, lr, rule):
        self.params, self.lr, self.rule = list(params), lr, rule

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self):
        if self.rule == "sign":
            for p in self.params:
                p -= self.lr * torch.where(p.grad > 0, 1.0, torch.where(p.grad < 0, -1.0, 0.0))
        else:
            norm = torch.cat([p.grad.flatten() for p in self.params]).double().pow(2).sum().sqrt().float()
            for p in self.params:
                p -= self.lr * p.grad / norm


REFERENCE_OPTIMIZERS = {
    "sgd": (torch.optim.SGD, {}),
    "momentum": (torch.optim.SGD, {"momentum": 0.9}),
    "adam": (torch.optim.Adam, {}),
    "adamw": (torch.optim.AdamW, {}),
    "rmsprop": (torch.optim.RMSprop, {}),
    "sign": (_HandStep, {"rule": "sign"}),
    "normalized": (_HandStep, {"rule": "normalized"}),
}


def test_every_fts_optimizer_has_a_reference():
    assert set(FTS_OPTIMIZERS) == set(REFERENCE_OPTIMIZERS)


@pytest.mark.parametrize("name", sorted(REFERENCE_OPTIMIZERS))
def test_inner_optimizer_matches_torch_step_for_step(name):
    lr, seed = 0.05, 5
    torch.manual_seed(0)
    model = TinyNet()
    reference = copy.deepcopy(model)
    batches = _image_batches(3, 20, 8, seed=4)
    fts = FTS(model, lambda net, x, y: kl_uniform(net(_to_float(x)), y), _to_float, CPU)
    _zero_grads(model)
    fts.episode(model, batches, FineTuner(name, lr, "keep", "all"), 1.0, _gen(seed))

    cls, kwargs = REFERENCE_OPTIMIZERS[name]
    opt = cls(reference.parameters(), lr=lr, **kwargs)
    reference.train()
    for (x, y), (support, _) in zip(batches, _splits(seed, batches)):
        opt.zero_grad()
        F.cross_entropy(reference(_to_float(x[support])), y[support]).backward()
        opt.step()
    moved = False
    for (n, lp), rp, mp in zip(fts.learner.named_parameters(), reference.parameters(), model.parameters()):
        torch.testing.assert_close(lp, rp, rtol=1e-5, atol=1e-6, msg=f"{name}: {n}")
        moved |= not torch.allclose(lp, mp)
    assert moved


# ---- e. head-only scope ------------------------------------------------------------------------------

def test_head_scope_adapts_only_the_head():
    torch.manual_seed(0)
    model = TinyNet()
    fts = FTS(model, lambda net, x, y: kl_uniform(net(_to_float(x)), y), _to_float, CPU)
    _zero_grads(model)
    fts.episode(model, _image_batches(3, 20, 8, seed=6), FineTuner("adam", 0.05, "keep", "head"), 1.0, _gen(0))
    learner = dict(fts.learner.named_parameters())
    for name, p in model.named_parameters():
        if name.startswith("fc."):
            assert not torch.allclose(learner[name], p), name
        else:
            assert torch.equal(learner[name], p), name
    # the body is frozen, BatchNorm statistics included
    assert torch.equal(fts.learner.bn.running_mean, model.bn.running_mean)
    assert torch.equal(fts.learner.bn.running_var, model.bn.running_var)


# ---- f. memory does not grow with adaptation_steps ------------------------------------------------

def _episode_peak(steps, optimizer, schedule="constant", every=1, kind="uniform"):
    torch.manual_seed(0)
    model = TinyNet(width=8)
    fts = FTS(model, lambda net, x, y: kl_uniform(net(_to_float(x)), y), _to_float, CPU)
    _zero_grads(model)
    batches = _image_batches(steps, 20, 16, seed=7)
    with SavedBytes() as meter:
        fts.episode(model, batches, FineTuner(optimizer, 1e-2, "reinit", "all", schedule),
                    query_weights(steps, every, kind), _gen(0))
    return meter.peak


def test_memory_meter_sees_graphs_kept_alive():
    # control: summing the query losses and calling backward once keeps every step's graph alive
    def naive(steps):
        torch.manual_seed(0)
        model = TinyNet(width=8)
        with SavedBytes() as meter:
            losses = [kl_uniform(model(_to_float(x))) for x, _ in _image_batches(steps, 20, 16, seed=7)]
            torch.stack(losses).sum().backward()
        return meter.peak

    assert naive(8) > 3 * naive(2)


@pytest.mark.parametrize("optimizer,schedule,every,kind", [
    ("sgd", "constant", 1, "uniform"), ("adam", "constant", 1, "uniform"), ("sign", "cosine", 2, "exp"),
    ("normalized", "warmup_cosine", 3, "uniform")])
def test_memory_does_not_grow_with_adaptation_steps(optimizer, schedule, every, kind):
    short = _episode_peak(2, optimizer, schedule, every, kind)
    long = _episode_peak(8, optimizer, schedule, every, kind)
    assert short > 0
    assert long <= short * 1.05


# ---- g. the fine-tuner sampler ---------------------------------------------------------------------

def _sampler(seed):
    return FineTunerSampler(["sgd", "adam", "rmsprop"], [1e-3, 1e-2], ["reinit", "keep"], ["all", "head"], seed)


def test_sampler_covers_every_combination():
    s = _sampler(0)
    drawn = {s.sample() for _ in range(500)}
    expected = {FineTuner(o, lr, h, sc) for o in ("sgd", "adam", "rmsprop") for lr in (1e-3, 1e-2)
                for h in ("reinit", "keep") for sc in ("all", "head")}
    assert drawn == expected


def test_sampler_is_deterministic_per_seed():
    a, b, c = _sampler(3), _sampler(3), _sampler(4)
    seq_a = [a.sample() for _ in range(40)]
    assert seq_a == [b.sample() for _ in range(40)]
    assert seq_a != [c.sample() for _ in range(40)]


def test_sampler_state_round_trip_through_a_weights_only_checkpoint():
    s = _sampler(7)
    for _ in range(13):
        s.sample()
    buf = io.BytesIO()
    torch.save({"sampler": s.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)["sampler"]
    expected = [s.sample() for _ in range(30)]
    other = _sampler(999)
    other.load_state_dict(state)
    assert [other.sample() for _ in range(30)] == expected


def test_single_choice_sampler():
    s = FineTunerSampler(["sgd"], [1e-4], ["reinit"], ["all"], 0)
    assert {s.sample() for _ in range(5)} == {FineTuner("sgd", 1e-4, "reinit", "all")}
