"""The box attacker (common/box.py): the projected sign steps and their box, the premise that an Adam trajectory
stays inside it, the outer gradient at the worst-case weights, flat memory, SOPHON's box step, its state, and a
run through the stage script that stage 3 reads."""
import json
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.box import BOX, RELATIVE_FLOOR, ProjectedSignSGD, box_attackers, box_optimizers, box_radius
from common.fts import FTS, FineTuner, support_query_split
from common.losses import kl_uniform
from common.stage2 import Stage2Settings
from common.train import Precision
from helpers import (SCRIPTS, SavedBytes, TinyNet, linear_model, load_script, outer_loop, read_rows, step_resumed,
                     tiny_sophon)

CPU = Precision(torch.device("cpu"))


def _images(n_batches, n, seed, size=8, channels=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8),
             torch.randint(0, 10, (n,), generator=g)) for _ in range(n_batches)]


def _to_float(x):
    return x.float() / 255


def _box(**values):
    """Stage-2 settings (the box's flags are SOPHON's, composed into them)."""
    return Stage2Settings(**values)


# ---- the projected sign steps ---------------------------------------------------------------------------

@pytest.mark.parametrize("relative", [False, True])
def test_projected_sign_descent_reaches_the_worst_corner_of_a_linear_loss(relative):
    # L(w) = c . w over the box |w - w0| <= r u (u: 1, or the tensor's max(RMS(w0), floor)) is least at the corner
    # w0 - r u sign(c), where L = c . w0 - r u ||c||_1. Steps of 0.4 r u: 0.4, 0.8, then the face, and there it stays.
    w0 = torch.tensor([0.5, -2.0, 0.0, 3.0, -0.25])
    c = torch.tensor([1.0, -3.0, 0.5, -0.1, 2.0])
    r, steps = 0.1, 5
    u = float(np.sqrt(np.mean(np.square([0.5, -2.0, 0.0, 3.0, -0.25])))) if relative else 1.0
    w = torch.nn.Parameter(w0.clone())
    opt = ProjectedSignSGD([w], lr=2 * r / steps, radius=r, relative=relative)
    path = []
    for _ in range(steps):
        opt.zero_grad()
        (c * w).sum().backward()
        opt.step()
        path.append(w.detach().clone())
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0])
    torch.testing.assert_close(path[0], w0 - 0.4 * r * u * sign)
    torch.testing.assert_close(path[1], w0 - 0.8 * r * u * sign)
    for w_k in path[2:]:
        torch.testing.assert_close(w_k, w0 - r * u * sign)
    assert (c * path[-1]).sum().item() == pytest.approx((c * w0).sum().item() - r * u * 6.6, rel=1e-6)


def test_the_relative_box_of_a_tensor_at_zero_is_the_floor():
    w = torch.nn.Parameter(torch.zeros(3))  # a new head's bias
    opt = ProjectedSignSGD([w], lr=3.0, radius=2.0, relative=True)  # a step beyond the box
    w.grad = torch.tensor([1.0, -1.0, 0.0])
    opt.step()
    torch.testing.assert_close(w.detach(), torch.tensor([-2.0, 2.0, 0.0]) * RELATIVE_FLOOR)


@pytest.mark.parametrize("relative", [False, True])
def test_projected_sign_descent_never_leaves_the_box(relative):
    # steps as large as the box on a non-linear loss whose gradient signs change: every step lands on a face or
    # inside, never beyond (up to float rounding of w0 + delta)
    torch.manual_seed(0)
    model, r = TinyNet(), 0.05
    origin = [p.detach().clone() for p in model.parameters()]
    reach = [r * (o.pow(2).mean().sqrt().clamp_min(RELATIVE_FLOOR) if relative else 1.0) for o in origin]
    opt = ProjectedSignSGD(model.parameters(), lr=r, radius=r, relative=relative)
    on_face = 0
    for x, y in _images(10, 16, seed=1):
        opt.zero_grad()
        F.cross_entropy(model(_to_float(x)), y).backward()
        opt.step()
        for p, o, b in zip(model.parameters(), origin, reach):
            moved = (p.detach() - o).abs()
            assert moved.max() <= b + 1e-6
            on_face += int((moved >= b - 1e-6).sum())
    assert on_face > 0, "the steps reached the box's faces: the projection was exercised"


# ---- the premise: K Adam steps at lr stay inside the box of radius K * lr ----------------------------------

@pytest.mark.parametrize("optimizer,lr", [("adam", 1e-3), ("adam", 1e-2), ("adamw", 1e-2)])
def test_an_adam_trajectory_stays_inside_the_box(optimizer, lr):
    steps = 20
    torch.manual_seed(0)
    model = TinyNet()
    start = [p.detach().clone() for p in model.parameters()]
    opt = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[optimizer](model.parameters(), lr=lr)
    for x, y in _images(steps, 16, seed=2):
        opt.zero_grad()
        F.cross_entropy(model(_to_float(x)), y).backward()
        opt.step()
    moved = torch.cat([(p.detach() - s).abs().flatten() for p, s in zip(model.parameters(), start)])
    radius = box_radius(_box(box_adam_steps=steps, box_adam_lr=lr))
    assert radius == pytest.approx(steps * lr)
    assert moved.max() <= radius
    assert moved.max() >= 0.5 * radius, "the box is not loose: coordinates with a steady gradient sign go near it"


# ---- the outer gradient: the query loss's gradient at theta + delta* ---------------------------------------

def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_the_outer_gradient_is_the_query_gradient_at_the_worst_case_weights():
    d, classes, n, steps, seed = 6, 4, 20, 3, 5
    settings = _box(box_adam_steps=4, box_adam_lr=0.05, box_sign_steps=steps, box_head=["keep"])
    torch.manual_seed(0)
    model = linear_model(d, classes)
    W0, b0 = (t.detach().double().numpy().copy() for t in (model[1].weight, model[1].bias))
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)) for _ in range(steps)]
    attackers = box_attackers(settings, optimizer=None)
    finetuner = attackers.sampler.sample()
    assert (finetuner.optimizer, finetuner.head, finetuner.scope) == (BOX, "keep", "all")
    assert finetuner.lr == pytest.approx(2 * 0.2 / steps) and attackers.weights == {0: [0.0, 0.0, 1.0]}
    fts = FTS(model, lambda net, x, y: kl_uniform(net(x), y), lambda x: x, CPU, box_optimizers(settings))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    total, _ = fts.episode(model, batches, finetuner, attackers.weights[0], torch.Generator().manual_seed(seed))

    r, eta = 0.2, 2 * 0.2 / steps  # by hand: delta* by projected sign steps on the support cross-entropy
    W, b, split = W0.copy(), b0.copy(), torch.Generator().manual_seed(seed)
    for x, y in batches:
        support, query = support_query_split(n, split)
        xs, ys = x[support].double().numpy(), y[support].numpy()
        P = _softmax(xs @ W.T + b) - np.eye(classes)[ys]
        W = np.clip(W - eta * np.sign(P.T @ xs), W0 - r, W0 + r)
        b = np.clip(b - eta * np.sign(P.sum(axis=0)), b0 - r, b0 + r)
    xq = x[query].double().numpy()  # the query: after the last step alone, on its batch's query part
    Pq = _softmax(xq @ W.T + b)
    np.testing.assert_allclose(fts.learner[1].weight.detach().double().numpy(), W, atol=1e-6)
    assert np.abs(W - W0).max() == pytest.approx(r), "delta* reached the box"
    np.testing.assert_allclose(model[1].weight.grad.double().numpy(), (Pq - 1 / classes).T @ xq / len(xq),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(model[1].bias.grad.double().numpy(), (Pq - 1 / classes).mean(axis=0),
                               rtol=1e-4, atol=1e-6)
    assert total.item() == pytest.approx(np.mean(-np.log(classes) - np.log(Pq).mean(axis=1)), rel=1e-4)
    np.testing.assert_array_equal(model[1].weight.detach().double().numpy(), W0)  # theta itself did not move


def test_a_new_head_is_the_attackers_own_box_around_its_initialisation():
    settings = _box(box_adam_steps=1, box_adam_lr=0.05)
    torch.manual_seed(0)
    model = TinyNet()
    fts = FTS(model, lambda net, x, y: kl_uniform(net(_to_float(x)), y), _to_float, CPU, box_optimizers(settings))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    fts.episode(model, _images(3, 20, seed=4), FineTuner(BOX, 0.04, "reinit", "all"), [0, 0, 1],
                torch.Generator().manual_seed(0))
    assert (fts.learner.conv.weight - model.conv.weight).abs().max() <= 0.05 + 1e-6
    assert (fts.learner.fc.weight - model.fc.weight).abs().max() > 0.05, "the head is a new one, not the model's"
    assert model.conv.weight.grad.abs().sum() > 0
    assert torch.count_nonzero(model.fc.weight.grad) == 0, "the attacker's head takes no query gradient"


def _box_episode_peak(sign_steps):
    settings = _box(box_sign_steps=sign_steps)
    torch.manual_seed(0)
    model = TinyNet(width=8)
    fts = FTS(model, lambda net, x, y: kl_uniform(net(_to_float(x)), y), _to_float, CPU, box_optimizers(settings))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    weights = [0.0] * (sign_steps - 1) + [1.0]
    with SavedBytes() as meter:
        fts.episode(model, _images(sign_steps, 20, seed=7, size=16), FineTuner(BOX, 0.01, "reinit", "all"), weights,
                    torch.Generator().manual_seed(0))
    return meter.peak


def test_memory_does_not_grow_with_the_sign_steps():
    short, long = _box_episode_peak(2), _box_episode_peak(8)
    assert short > 0
    assert long <= short * 1.05


# ---- SOPHON's box step -------------------------------------------------------------------------------------

def test_the_box_step_replaces_fts_with_its_own_adam():
    algo = tiny_sophon(fts_loop=0, box_loop=2, box_head=("reinit", "keep"), fts_envs=2)
    before = {k: v.clone() for k, v in algo.model.state_dict().items()}
    result = outer_loop(algo)
    assert result.fts_loss is None and result.box_loss > 0 and result.ntr_loss > 0
    assert len(result.box_head.split(";")) == 4 and set(result.box_head.split(";")) <= {"reinit", "keep"}
    assert algo.fts_opt.state_dict()["state"] == {} and len(algo.box.optimizer.state_dict()["state"]) > 0
    assert algo.box.optimizer.param_groups[0]["lr"] == pytest.approx(algo.config.alpha * algo.config.lr)
    assert any(not torch.equal(v, before[k]) for k, v in algo.model.state_dict().items())


def test_beside_fts_both_steps_run_and_both_columns_are_written():
    algo = tiny_sophon(box_loop=1)
    assert algo.losses == ("fts_loss", "box_loss", "ntr_loss", "clean_loss") and algo.labels[-1] == "box_head"
    result = outer_loop(algo)
    assert result.fts_loss > 0 and result.box_loss > 0
    assert algo.fts_opt.state_dict()["state"] and algo.box.optimizer.state_dict()["state"]


def test_without_the_box_sophon_is_as_before():
    algo = tiny_sophon()
    assert algo.box is None and algo.losses == ("fts_loss", "ntr_loss", "clean_loss")
    assert "box_loss" not in algo.step()
    assert not {"box_opt", "box_sampler"} & set(algo.state_dict())


def _box_gradient_norm(algo):
    norms, step = [], algo.box.optimizer.step

    def recording_step(*args, **kwargs):
        norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in algo.model.parameters()])).item())
        return step(*args, **kwargs)

    algo.box.optimizer.step = recording_step
    algo.step()
    return norms[0]


def test_the_box_gradient_is_clipped_like_fts():
    raw = _box_gradient_norm(tiny_sophon(fts_loop=0, box_loop=1, fts_clip=1e6))
    assert raw > 1e-2
    assert _box_gradient_norm(tiny_sophon(fts_loop=0, box_loop=1, fts_clip=1e-3)) == pytest.approx(1e-3, rel=1e-4)


def test_state_dict_round_trip_reproduces_the_next_box_steps():
    config = dict(box_loop=1, box_head=("reinit", "keep"), box_scale="relative")
    reference = tiny_sophon(**config)
    reference.step()
    expected, got = step_resumed(reference, reference.state_dict(), lambda: tiny_sophon(**config), 3)
    assert [r.box_head for r in got] == [r.box_head for r in expected]
    assert [r.box_loss for r in got] == pytest.approx([r.box_loss for r in expected], rel=1e-5)


def test_restore_brings_back_the_box_adam_but_not_the_draws():
    algo = tiny_sophon(fts_loop=0, box_loop=1, box_head=("reinit", "keep"))
    snap = algo.snapshot()
    weights = {k: v.clone() for k, v in algo.model.state_dict().items()}
    algo.step()
    drawn = algo.box.sampler.state_dict()
    algo.restore(snap)
    assert all(torch.equal(v, weights[k]) for k, v in algo.model.state_dict().items())
    assert algo.box.optimizer.state_dict()["state"] == {}
    assert algo.box.sampler.state_dict() == drawn, "a rollback goes on with fresh attackers"


# ---- the flags and the stage script ------------------------------------------------------------------------

def test_the_box_flags_and_preset():
    parse_args = load_script("stage2").parse_args
    _, args = parse_args(["--preset", "box"])
    assert (args.fts_loop, args.box_loop, args.loss_type) == (0, 1, "entropy")
    assert (args.box_adam_steps, args.box_adam_lr, args.box_scale, args.box_sign_steps, args.box_sign_span,
            args.box_head) == (10, 1e-2, "absolute", 5, 2.0, ["reinit"])
    assert box_attackers(args, None).sampler.sample().lr == pytest.approx(2.0 * 0.1 / 5)
    _, args = parse_args(["--preset", "box", "--box_sign_span", "0.5", "--box_adam_steps", "20"])
    assert box_attackers(args, None).sampler.sample().lr == pytest.approx(0.5 * 0.2 / 5), "S * r / steps"
    _, args = parse_args(["--preset", "robust", "--box_loop", "1", "--box_scale", "relative", "--box_head", "keep"])
    assert args.fts_loop == 1 and args.box_loop == 1 and args.box_head == ["keep"] and args.box_scale == "relative"


@pytest.mark.slow
def test_a_box_run_through_the_stage_script_is_read_by_stage_3(tmp_path, data_root, stage1_run, monkeypatch,
                                                               restore_signals, quiet_log):
    out = tmp_path / "box"
    argv = ["--preset", "box", "--box_adam_steps", "4", "--box_sign_steps", "2", "--box_head", "reinit,keep",
            "--model_path", stage1_run, "--dataset", "MNIST", "--bs", "20", "--total_loop", "3", "--eval_interval",
            "1", "--test_interval", "0", "--final_finetune_epochs", "1", "--data_root", data_root, "--out_dir", out]
    argv = [str(a) for a in argv]
    monkeypatch.setattr(sys, "argv", [str(SCRIPTS["stage2"]), *argv])
    assert load_script("stage2").main(argv) == 0
    rows = read_rows(out / "metrics.csv")
    assert list(rows[0]) == ["loop", "fts_loss", "box_loss", "ntr_loss", "clean_loss", "orig_test_acc", "rolled_back",
                             "fts_optimizer", "fts_lr", "fts_head", "fts_scope", "fts_schedule", "box_head", "seconds"]
    assert all(r["fts_loss"] == "" and float(r["box_loss"]) > 0 and r["box_head"] in ("reinit", "keep") for r in rows)
    config = json.loads((out / "config.json").read_text())["config"]
    assert (config["box_loop"], config["box_adam_steps"], config["box_head"]) == (1, 4, ["reinit", "keep"])
    assert json.loads((out / "summary.json").read_text())["loops_completed"] == 3
    grid = tmp_path / "grid"
    stage3 = ["--path", out, "--start", "sophon,scratch", "--epochs", "1", "--bs", "16", "--data_root", data_root,
              "--out_dir", grid]
    assert load_script("stage3").main([str(a) for a in stage3]) == 0
    results = json.loads((grid / "summary.json").read_text())["results"]
    assert sorted(r["start"] for r in results) == ["scratch", "sophon"]
