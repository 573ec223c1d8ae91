"""The long-horizon, scale-free simulated fine-tuners: queried steps and their weights, in-episode lr
schedules, log-uniform learning rates, and the --preset that names a configuration."""
import math

import numpy as np
import pytest
import torch

from common.cli import UsageError
from common.finetune import schedule_factor
from common.fts import EXP_STEP_RATE, FTS, FineTuner, FineTunerSampler, query_weights, support_query_split
from common.losses import kl_uniform
from common.stage2 import setup_stage2
from common.train import Precision
from helpers import TinyNet, linear_model, load_script, outer_loop, step_resumed, tiny_sophon

CPU = Precision(torch.device("cpu"))


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# ---- which inner steps are queried, and their weights ---------------------------------------------

def test_query_weights_uniform_every_step_is_the_plain_mean():
    assert query_weights(5) == pytest.approx([0.2] * 5)


def test_query_weights_every_n_keeps_the_last_step():
    w = query_weights(10, every=4)
    assert [k + 1 for k, v in enumerate(w) if v] == [4, 8, 10]
    assert w[3] == w[7] == w[9] == pytest.approx(1 / 3)


def test_query_weights_exp_grow_by_the_documented_rate():
    w = query_weights(8, every=2, kind="exp")
    queried = {k + 1: v for k, v in enumerate(w) if v}
    assert list(queried) == [2, 4, 6, 8] and sum(w) == pytest.approx(1.0)
    raw = {k: math.exp(EXP_STEP_RATE * k / 8) for k in queried}
    for k in queried:
        assert queried[k] == pytest.approx(raw[k] / sum(raw.values()))
    assert queried[8] / queried[2] == pytest.approx(math.exp(EXP_STEP_RATE * 6 / 8))


# ---- the episode against a hand-computed one --------------------------------------------------------

@pytest.mark.parametrize("every,kind,schedule", [(1, "uniform", "constant"), (2, "exp", "cosine"),
                                                 (3, "uniform", "warmup_cosine"), (4, "exp", "constant")])
def test_weighted_queries_and_schedule_match_numpy_reference(every, kind, schedule):
    """Plain SGD with the schedule's lr at step k, query gradients only at the queried steps, each times
    its weight: numpy, float64, written from the definitions."""
    d, classes, n, steps, lr, seed = 6, 4, 20, 7, 0.5, 3
    torch.manual_seed(0)
    model = linear_model(d, classes)
    W = model[1].weight.detach().double().numpy().copy()
    b = model[1].bias.detach().double().numpy().copy()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)) for _ in range(steps)]
    weights = query_weights(steps, every, kind)
    calls = []

    def query(net, x, y):
        calls.append(len(x))
        return kl_uniform(net(x), y)

    fts = FTS(model, query, lambda x: x, CPU)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    total, _ = fts.episode(model, batches, FineTuner("sgd", lr, "keep", "all", schedule), weights,
                           torch.Generator().manual_seed(seed))

    split_gen = torch.Generator().manual_seed(seed)
    factor = schedule_factor(schedule, steps)
    gW, gb, loss = np.zeros_like(W), np.zeros_like(b), 0.0
    for k, (x, y) in enumerate(batches):
        support, q = support_query_split(len(y), split_gen)
        xs, ys = x[support].double().numpy(), y[support].numpy()
        P = _softmax(xs @ W.T + b)
        step_lr = lr * factor(k)
        W = W - step_lr * (P - np.eye(classes)[ys]).T @ xs / len(ys)
        b = b - step_lr * (P - np.eye(classes)[ys]).mean(axis=0)
        if weights[k]:
            xq = x[q].double().numpy()
            Pq = _softmax(xq @ W.T + b)
            loss += weights[k] * np.mean(-np.log(classes) - np.log(Pq).mean(axis=1))
            gW += weights[k] * (Pq - 1 / classes).T @ xq / len(xq)
            gb += weights[k] * (Pq - 1 / classes).mean(axis=0)
    np.testing.assert_allclose(model[1].weight.grad.double().numpy(), gW, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(model[1].bias.grad.double().numpy(), gb, rtol=1e-4, atol=1e-7)
    assert total.item() == pytest.approx(loss, rel=1e-4)
    assert len(calls) == sum(1 for w in weights if w), "unqueried steps skip the query pass"
    np.testing.assert_allclose(fts.learner[1].weight.detach().double().numpy(), W, rtol=1e-4, atol=1e-6)


def test_schedule_sets_each_inner_steps_lr():
    """Sign descent moves every weight by exactly lr * factor(k) at step k: the lr sequence can be read off."""
    steps, lr = 6, 1e-2
    torch.manual_seed(0)
    model = TinyNet()
    fts = FTS(model, lambda net, x, y: kl_uniform(net(x.float() / 255), y), lambda x: x.float() / 255, CPU)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    seen = []
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randint(0, 256, (20, 3, 8, 8), generator=g, dtype=torch.uint8), torch.randint(0, 10, (20,), generator=g))
               for _ in range(steps)]

    def spy(net, x, y):
        w = fts.learner.conv.weight.detach()
        seen.append((w - spy.last).abs().max().item())
        spy.last = w.clone()
        return kl_uniform(net(x.float() / 255), y)

    spy.last = model.conv.weight.detach().clone()
    fts.query_loss = spy
    fts.episode(model, batches, FineTuner("sign", lr, "keep", "all", "warmup_cosine"), 1.0, torch.Generator().manual_seed(0))
    factor = schedule_factor("warmup_cosine", steps)
    assert seen == pytest.approx([lr * factor(k) for k in range(steps)], rel=1e-4)


# ---- sampling ------------------------------------------------------------------------------------

def test_lr_range_is_drawn_log_uniformly_and_reproducibly():
    s = FineTunerSampler(["sgd", "sign"], [1e-4], ["reinit"], ["all"], seed=0, schedules=["constant", "cosine"],
                         lr_range=(1e-5, 1e-2))
    tuners = [s.sample() for _ in range(4000)]
    logs = np.log10([t.lr for t in tuners])
    assert logs.min() >= -5 and logs.max() <= -2
    # log-uniform: each of the three decades holds about a third
    counts = np.histogram(logs, bins=[-5, -4, -3, -2])[0]
    assert all(abs(c / len(logs) - 1 / 3) < 0.04 for c in counts), counts
    assert {t.optimizer for t in tuners} == {"sgd", "sign"} and {t.schedule for t in tuners} == {"constant", "cosine"}
    again = FineTunerSampler(["sgd", "sign"], [1e-4], ["reinit"], ["all"], seed=0, schedules=["constant", "cosine"],
                             lr_range=(1e-5, 1e-2))
    assert [again.sample() for _ in range(4000)] == tuners


def test_lr_range_sampler_state_round_trips():
    s = FineTunerSampler(["adam"], [1e-4], ["keep"], ["all"], seed=3, lr_range=(1e-4, 1e-3))
    for _ in range(5):
        s.sample()
    state = s.state_dict()
    ahead = [s.sample() for _ in range(5)]
    fresh = FineTunerSampler(["adam"], [1e-4], ["keep"], ["all"], seed=99, lr_range=(1e-4, 1e-3))
    fresh.load_state_dict(state)
    assert [fresh.sample() for _ in range(5)] == ahead


# ---- the learned lr (MLAC) -------------------------------------------------------------------------

def _one_episode(model, finetuner, batch, head_seed=0):
    fts = FTS(model, lambda net, x, y: kl_uniform(net(x.float() / 255), y), lambda x: x.float() / 255, CPU)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    _, origin = fts.episode(model, [batch], finetuner, 0.0, torch.Generator().manual_seed(head_seed))
    return fts, origin


def _probe_ce(fts, x, y):
    return torch.nn.functional.cross_entropy(fts[0].learner(x.float() / 255), y).item()


@pytest.mark.parametrize("head", ["keep", "reinit"])
def test_lr_slope_is_the_derivative_in_log_lr_for_one_sgd_step(head):
    """One SGD step is linear in the lr, so the first-order slope is exact: it must match a central
    difference of the held-out cross-entropy in log(lr), a new head's own starting point included."""
    torch.manual_seed(0)
    model = TinyNet()
    g = torch.Generator().manual_seed(4)
    images = lambda n: torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
    batch = (images(40), torch.randint(0, 10, (40,), generator=g))
    x, y = images(30), torch.randint(0, 10, (30,), generator=g)
    lr, eps = 0.3, 1e-2
    fts, origin = _one_episode(model, FineTuner("sgd", lr, head), batch)
    slope = fts.lr_slope(origin, x, y).item()
    ce = [_probe_ce(_one_episode(model, FineTuner("sgd", lr * math.exp(s), head), batch), x, y) for s in (eps, -eps)]
    assert abs(slope) > 1e-3
    assert slope == pytest.approx((ce[0] - ce[1]) / (2 * eps), rel=2e-2)


def test_learned_lr_starts_mid_range_steps_against_the_slope_per_optimiser_and_stays_in_range():
    s = FineTunerSampler(["adam", "sgd"], [1e-4], ["keep"], ["all"], seed=0, lr_range=(1e-4, 1e-2), lr_adapt=0.5)
    adam, sgd = FineTuner("adam", lr_learned=True), FineTuner("sgd", lr_learned=True)
    assert all(t.lr == pytest.approx(1e-3) and t.lr_learned for t in (s.sample() for _ in range(20)))
    s.adapt(adam, -0.2)  # a larger lr would have lowered the attacker's loss
    s.adapt(sgd, 3.0)
    s.adapt(sgd, float("nan"))  # a diverged episode teaches nothing
    lrs = {t.optimizer: t.lr for t in (s.sample() for _ in range(20))}
    assert lrs == pytest.approx({"adam": 1e-3 * math.exp(0.5), "sgd": 1e-3 * math.exp(-0.5)})
    for _ in range(20):
        s.adapt(adam, -1.0)
    state = s.state_dict()
    fresh = FineTunerSampler(["adam", "sgd"], [1e-4], ["keep"], ["all"], seed=0, lr_range=(1e-4, 1e-2), lr_adapt=0.5)
    fresh.load_state_dict(state)
    assert {t.optimizer: t.lr for t in (fresh.sample() for _ in range(20))}["adam"] == pytest.approx(1e-2)
    with pytest.raises(ValueError, match="lr_range"):
        FineTunerSampler(["adam"], [1e-4], ["keep"], ["all"], seed=0, lr_adapt=0.5)


def test_learned_share_mixes_learned_and_drawn_lrs_and_only_learned_episodes_step_the_lr():
    s = FineTunerSampler(["adam"], [1e-4], ["keep"], ["all"], seed=0, lr_range=(1e-5, 1e-1), lr_adapt=0.5,
                         learned_share=0.25)
    tuners = [s.sample() for _ in range(2000)]
    learned = [t for t in tuners if t.lr_learned]
    drawn = [math.log10(t.lr) for t in tuners if not t.lr_learned]
    assert 0.2 < len(learned) / len(tuners) < 0.3
    assert all(t.lr == pytest.approx(1e-3) for t in learned)
    assert min(drawn) >= -5 and max(drawn) <= -1 and -3.15 < sum(drawn) / len(drawn) < -2.85  # log-uniform
    assert sum(d < -4 for d in drawn) / len(drawn) == pytest.approx(0.25, abs=0.04)
    s.adapt(next(t for t in tuners if not t.lr_learned), -1.0)  # a drawn episode's slope is not the learned lr's
    assert all(t.lr == pytest.approx(1e-3) for t in (s.sample() for _ in range(50)) if t.lr_learned)
    s.adapt(learned[0], -1.0)
    assert all(t.lr == pytest.approx(1e-3 * math.exp(0.5)) for t in (s.sample() for _ in range(50)) if t.lr_learned)
    with pytest.raises(ValueError, match="learned_share"):
        FineTunerSampler(["adam"], [1e-4], ["keep"], ["all"], seed=0, lr_range=(1e-5, 1e-1), lr_adapt=0.5,
                         learned_share=0)


def test_stage2_moves_each_episodes_lr_by_the_step_and_resumes_it():
    config = dict(fts_optimizers=("sgd",), fts_lr_range=(1e-3, 1.0), fts_lr_adapt=0.25, fts_envs=2, fts_head=("keep",))
    algo = tiny_sophon(**config)
    lrs = [t.lr for _ in range(4) for t in outer_loop(algo).finetuners]
    assert lrs[0] == lrs[1] == pytest.approx(math.sqrt(1e-3)), "both environments of a step share the lr"
    moves = [math.log(b / a) for a, b in zip(lrs[1::2], lrs[2::2])]
    assert all(abs(m) == pytest.approx(0.5) or abs(m) == pytest.approx(0.0, abs=1e-9) for m in moves), moves
    assert any(m for m in moves), "the attacker's lr moved"
    expected, got = step_resumed(algo, algo.state_dict(), lambda: tiny_sophon(**config), 2)
    assert [t.lr for r in got for t in r.finetuners] == pytest.approx([t.lr for r in expected for t in r.finetuners])


def test_stage2_mixes_learned_and_drawn_lrs_and_resumes_the_mix():
    config = dict(fts_optimizers=("sgd",), fts_lr_range=(1e-3, 1.0), fts_lr_adapt=0.25, fts_lr_learned_share=0.5,
                  fts_envs=2, fts_head=("keep",))
    algo = tiny_sophon(**config)
    tuners = [t for _ in range(4) for t in outer_loop(algo).finetuners]
    learned = [t.lr for t in tuners if t.lr_learned]
    assert learned and len(learned) < len(tuners)
    assert learned[0] == pytest.approx(math.sqrt(1e-3))
    moves = [math.log(b / a) for a, b in zip(learned, learned[1:])]
    assert all(min(abs(m - k * 0.25) for k in range(-2, 3)) < 1e-9 for m in moves), moves  # +-ETA per learned episode
    expected, got = step_resumed(algo, algo.state_dict(), lambda: tiny_sophon(**config), 3)
    assert [(t.lr, t.lr_learned) for r in got for t in r.finetuners] == \
        [(pytest.approx(t.lr), t.lr_learned) for r in expected for t in r.finetuners]


# ---- the named preset ------------------------------------------------------------------------------

PRESETS = [("stage2", "robust", "fts_query_every", 9), ("bd_stage2", "persistent", "clean_loop", 3),
           ("bd_stage2", "persistent_quiet", "clean_head", "model")]


@pytest.mark.parametrize("script, name, override, value", PRESETS)
def test_preset_sets_its_flags_and_given_flags_win(script, name, override, value):
    module = load_script(script)
    _, plain = module.parse_args([])
    _, chosen = module.parse_args(["--preset", name])
    preset = module.PRESETS[name]
    changed = {k for k in preset if getattr(chosen, k) != getattr(plain, k)}
    assert changed == set(preset), f"the preset leaves {set(preset) - changed} at their defaults"
    _, ref = module.parse_args([f"--{k}={v}" for k, v in preset.items()])
    for k in preset:
        assert getattr(chosen, k) == getattr(ref, k), k
    assert override in preset
    for argv in (["--preset", name, f"--{override}", str(value)], [f"--{override}", str(value), "--preset", name]):
        _, given = module.parse_args(argv)
        assert getattr(given, override) == value
        assert all(getattr(given, k) == getattr(chosen, k) for k in preset if k != override)


@pytest.mark.parametrize("typed", [["--fts_lrs", "1e-2"], ["--fast_lr", "1e-2"]])
def test_a_typed_lr_replaces_the_presets_lr_range(typed):
    """--preset robust draws the lr from a range; an lr typed after (or before) it is the one simulated."""
    module = load_script("stage2")
    for argv in (["--preset", "robust", *typed], [*typed, "--preset", "robust"]):
        _, args = module.parse_args(argv)
        assert args.fts_lr_range is None
        assert args.simulated_lrs == (1e-2,)
        assert args.adaptation_steps == 20  # the rest of the preset stays


def test_lrs_and_an_lr_range_both_set_by_constants_are_refused():
    module = load_script("stage2")
    _, args = module.parse_args([])
    args.fts_lrs, args.fts_lr_range = [1e-2], [1e-4, 1e-3]
    with pytest.raises(UsageError, match="give one"):
        setup_stage2(args, "sophon_orig", module.STAGE)


@pytest.mark.parametrize("script, name, override, value", PRESETS)
def test_preset_help_lists_what_it_sets(capsys, script, name, override, value):
    module = load_script(script)
    parser, _ = module.parse_args([])
    text = " ".join(parser.format_help().split())
    for k, v in module.PRESETS[name].items():
        assert f"--{k} {v}" in text, k
