"""TAR's recipe in SOPHON's FTS (Tamirisa et al. ICLR'25): the retain-then-forget adversary, the representation
term of the retain loss, the exp weights' rate, and --preset tar through the stage script."""
import copy
import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from common.cli import UsageError
from common.data import Gather
from common.fts import FTS, FineTuner, FineTunerSampler, IndexedBatches, query_weights, support_query_split
from common.persistence import RepresentationRetain
from common.train import Precision, sam_step
from helpers import (SCRIPTS, SavedBytes, TinyNet, load_script, outer_loop, read_rows, step_resumed, tiny_domain,
                     tiny_sophon)

from test_fts_horizons import test_preset_help_lists_what_it_sets as help_lists_preset
from test_fts_horizons import test_preset_sets_its_flags_and_given_flags_win as preset_sets_flags

CPU = Precision(torch.device("cpu"))


def _members(domain):
    return {bytes(img.numpy()) for img in domain.images}


def _rows(n_rows, domain, seed, bs=20):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randperm(len(domain), generator=gen)[:bs] for _ in range(n_rows)]


# ---- which inner steps are queried, and their weights ---------------------------------------------

def test_query_weights_skip_the_retain_steps_and_keep_tars_schedule_over_all_steps():
    w = query_weights(8, every=2, kind="exp", rate=4.0, retain_steps=5)
    assert [k + 1 for k, v in enumerate(w) if v] == [6, 8]  # step 4 is an original-domain step: not queried
    raw = [math.exp(4.0 * 6 / 8), math.exp(4.0 * 8 / 8)]
    assert [w[5], w[7]] == pytest.approx([r / sum(raw) for r in raw])
    assert query_weights(8, 2, "exp", 4.0) == pytest.approx(query_weights(8, 2, "exp", 4.0, retain_steps=0))
    with pytest.raises(ValueError, match="no restricted step"):
        query_weights(8, retain_steps=8)


def test_tars_schedule_is_rate_4_over_its_64_steps():
    """TAR's weight exp(0.0625 (i - 63)) at 0-based inner step i, on every 4th step, normalised."""
    tar = {i + 1: math.exp(0.0625 * (i - 63)) for i in range(64) if (i + 1) % 4 == 0}
    w = query_weights(64, every=4, kind="exp", rate=4.0)
    assert [w[k - 1] for k in tar] == pytest.approx([v / sum(tar.values()) for v in tar.values()])


# ---- the retain-then-forget episode --------------------------------------------------------------

def test_retain_then_forget_episode_trains_n_original_steps_then_queries_only_restricted_ones():
    k_steps, n_retain = 6, 4
    algo = tiny_sophon(adaptation_steps=k_steps, fts_retain_steps=[n_retain], fts_retain_share=1.0)
    restricted, original = _members(algo.restricted), _members(algo.ntr.domain)
    assert not restricted & original
    steps, queries = [], []

    def spy(name, to_input):
        def record(x):
            steps.append((name, {bytes(img.numpy()) for img in x}))
            return to_input(x)
        return record

    algo.fts.to_input = spy("restricted", algo.fts.to_input)
    algo.retain = (algo.retain[0], spy("original", algo.retain[1]))
    query = algo.fts.query_loss
    algo.fts.query_loss = lambda net, x, y: (queries.append({bytes(img.numpy()) for img in x}), query(net, x, y))[1]
    result = outer_loop(algo)
    assert [name for name, _ in steps] == ["original"] * n_retain + ["restricted"] * (k_steps - n_retain)
    for name, images in steps:
        assert images <= (original if name == "original" else restricted), name
    assert len(queries) == k_steps - n_retain and all(q <= restricted for q in queries)
    assert [t.retain_steps for t in result.finetuners] == [n_retain] and result.fts_retain_steps == str(n_retain)


def test_retain_then_forget_episode_matches_a_hand_written_one():
    """SGD on N original-domain supports (normalised as that domain), then on the restricted ones; the query
    gradient taken only after the queried restricted steps, each times its weight."""
    torch.manual_seed(0)
    restricted, original = tiny_domain("MNIST", 1), tiny_domain("FashionMNIST", 2)
    retain_rows, rows = _rows(3, original, 5), _rows(2, restricted, 6)
    query = lambda net, x, y: F.cross_entropy(net(restricted.to_input(x, CPU.device)), y)
    model = TinyNet()
    reference = copy.deepcopy(model)
    fts = FTS(model, query, lambda x: restricted.to_input(x, CPU.device), CPU)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    weights = query_weights(5, every=1, retain_steps=3)
    batches = IndexedBatches(rows, Gather(restricted, CPU.device, False),
                             (retain_rows, Gather(original, CPU.device, False),
                              lambda x: original.to_input(x, CPU.device)))
    lr, seed = 0.1, 9
    fts.episode(model, batches, FineTuner("sgd", lr, "keep", "all"), weights, torch.Generator().manual_seed(seed))

    gen = torch.Generator().manual_seed(seed)
    splits = [support_query_split(len(idx), gen) for idx in retain_rows + rows]
    optimizer = torch.optim.SGD(reference.parameters(), lr=lr)
    expected = [torch.zeros_like(p) for p in reference.parameters()]
    reference.train()
    for k, (domain, idx) in enumerate([(original, i) for i in retain_rows] + [(restricted, i) for i in rows]):
        support, held = idx[splits[k][0]], idx[splits[k][1]]
        optimizer.zero_grad()
        x = domain.to_input(domain.images[support], CPU.device)
        F.cross_entropy(reference(x), domain.labels[support]).backward()
        optimizer.step()
        if weights[k]:
            grads = torch.autograd.grad(query(reference, restricted.images[held], restricted.labels[held]),
                                        list(reference.parameters()))
            expected = [e + weights[k] * g for e, g in zip(expected, grads)]
    assert weights[:3] == [0.0] * 3 and all(weights[3:])
    for (name, p), want in zip(model.named_parameters(), expected):
        torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-6, msg=name)


def test_memory_does_not_grow_with_inner_steps_in_retain_then_forget_episodes():
    def peak(k_steps):
        torch.manual_seed(0)
        restricted, original = tiny_domain("MNIST", 1, size=16), tiny_domain("FashionMNIST", 2, size=16)
        model = TinyNet(width=8)
        fts = FTS(model, lambda net, x, y: F.cross_entropy(net(restricted.to_input(x, CPU.device)), y),
                  lambda x: restricted.to_input(x, CPU.device), CPU)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        n_retain = k_steps // 2
        batches = IndexedBatches(_rows(k_steps - n_retain, restricted, 1), Gather(restricted, CPU.device, False),
                                 (_rows(n_retain, original, 2), Gather(original, CPU.device, False),
                                  lambda x: original.to_input(x, CPU.device)))
        with SavedBytes() as meter:
            fts.episode(model, batches, FineTuner("adamw", 1e-2, "reinit", "all"),
                        query_weights(k_steps, 2, "exp", 4.0, n_retain), torch.Generator().manual_seed(0))
        return meter.peak

    short, long = peak(4), peak(16)
    assert short > 0
    assert long <= short * 1.05


# ---- the sampler ----------------------------------------------------------------------------------

def test_sampler_draws_the_retain_share_within_binomial_tolerance():
    n, share, steps = 4000, 0.33, [29, 37, 43]
    sampler = FineTunerSampler(["adamw"], [1e-3, 1e-2], ["reinit", "keep"], ["all"], seed=0, retain_steps=steps,
                               retain_share=share)
    drawn = [sampler.sample() for _ in range(n)]
    retained = [t.retain_steps for t in drawn if t.retain_steps]
    tolerance = 4 * math.sqrt(n * share * (1 - share))  # 4 standard deviations of Binomial(n, share)
    assert abs(len(retained) - n * share) <= tolerance, (len(retained), n * share, tolerance)
    per_value = len(retained) / len(steps)
    for v in steps:
        count = retained.count(v)
        assert abs(count - per_value) <= 4 * math.sqrt(per_value * (1 - 1 / len(steps))), (v, count)
    assert {(t.lr, t.head) for t in drawn if t.retain_steps} == {(lr, h) for lr in (1e-3, 1e-2)
                                                                for h in ("reinit", "keep")}


def test_sampler_without_retain_share_draws_as_before():
    plain = FineTunerSampler(["sgd", "adam"], [1e-3, 1e-2], ["reinit"], ["all"], seed=3)
    unused = FineTunerSampler(["sgd", "adam"], [1e-3, 1e-2], ["reinit"], ["all"], seed=3, retain_steps=[2])
    assert [plain.sample() for _ in range(50)] == [unused.sample() for _ in range(50)]
    with pytest.raises(ValueError, match="retain steps"):
        FineTunerSampler(["sgd"], [1e-3], ["reinit"], ["all"], seed=0, retain_share=0.5)


def test_retain_episodes_resume_to_the_same_steps():
    config = dict(adaptation_steps=4, fts_retain_steps=[1, 3], fts_retain_share=0.5, ntr_rep_weight=0.5)
    algo = tiny_sophon(**config)
    for _ in range(3):
        outer_loop(algo)
    assert "retain_stream" in algo.state_dict()
    expected, got = step_resumed(algo, algo.state_dict(), lambda: tiny_sophon(**config), 4)
    assert [t for r in got for t in r.finetuners] == [t for r in expected for t in r.finetuners]
    assert [r.fts_loss for r in got] == pytest.approx([r.fts_loss for r in expected], rel=1e-5)


def test_labels_and_state_unchanged_without_retain_episodes():
    algo = tiny_sophon()
    assert "fts_retain_steps" not in algo.labels and "fts_retain_steps" not in vars(outer_loop(algo))
    assert "retain_stream" not in algo.state_dict()


# ---- the representation term ----------------------------------------------------------------------

def _features(net, x):
    return net.pool(torch.relu(net.bn(net.conv(x)))).flatten(1)


def test_representation_term_is_the_feature_distance_to_the_frozen_model():
    torch.manual_seed(0)
    model = TinyNet()
    model.train()
    weight = 0.7
    term = RepresentationRetain(model, weight, CPU)
    frozen = copy.deepcopy(model)
    x, y = torch.randn(12, 3, 8, 8), torch.randint(0, 10, (12,))
    with term.on(x) as loss_fn:
        at_start = loss_fn(model(x), y)
    assert at_start.item() == pytest.approx(F.cross_entropy(frozen(x), y).item(), rel=1e-6)  # nothing moved yet
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    anchor_stats = term.anchor.bn.running_mean.clone()
    with term.on(x) as loss_fn:
        loss = loss_fn(model(x), y)
    distance = (_features(model, x) - _features(frozen, x)).pow(2).sum(dim=1).sqrt().mean()
    assert loss.item() == pytest.approx((F.cross_entropy(model(x), y) + weight * distance).item(), rel=1e-5)
    assert distance.item() > 0.01
    assert torch.equal(term.anchor.bn.running_mean, anchor_stats)  # the frozen model's statistics stay
    assert not any(p.requires_grad for p in term.anchor.parameters())


class _Recording(TinyNet):
    """TinyNet keeping the features its head read at its last forward."""

    def forward(self, x):
        self.features = _features(self, x)
        return self.fc(self.features)


@pytest.mark.parametrize("sam_rho", [0.0, 0.3])
def test_ntr_with_the_representation_term_steps_on_its_gradient(sam_rho):
    """Two NTR steps (the second one away from the stage-1 model, where the term is not 0), against Adam on
    cross-entropy + w x feature distance to the model as built, written by hand."""
    weight = 2.0
    algo = tiny_sophon(fts_loop=0, ntr_rep_weight=weight, sam_rho=sam_rho)
    reference, frozen = _Recording(), copy.deepcopy(algo.model)
    reference.load_state_dict(algo.model.state_dict())
    optimizer = torch.optim.Adam(reference.parameters(), lr=algo.config.beta * algo.config.lr)
    domain, stream = algo.ntr.domain, copy.deepcopy(algo.ntr.stream)
    reference.train()
    frozen.train()
    for _ in range(2):
        idx = stream.next()
        x, y = domain.to_input(domain.images[idx], CPU.device), domain.labels[idx]
        with torch.no_grad():
            target = _features(frozen, x)

        def loss_fn(logits, labels):
            distance = torch.norm(reference.features - target, dim=-1).mean()  # TAR's expression
            return F.cross_entropy(logits, labels) + weight * distance

        if sam_rho:
            sam_step(reference, x, y, optimizer, CPU, sam_rho, loss_fn=loss_fn)
        else:
            optimizer.zero_grad()
            loss_fn(reference(x), y).backward()
            optimizer.step()
        outer_loop(algo)
    for (name, got), want in zip(algo.model.state_dict().items(), reference.state_dict().values()):
        assert torch.allclose(got.float(), want.float(), atol=1e-5), name


# ---- the preset ------------------------------------------------------------------------------------

TAR_FLAGS = {"loss_type": "entropy", "adaptation_steps": 64, "fts_optimizers": ["adamw"],
             "fts_lrs": [1e-3, 1e-2, 2e-2], "fts_head": ["reinit", "keep"], "fts_scope": ["all"],
             "fts_schedules": ["constant"], "fts_envs": 1, "fts_query_every": 4, "fts_step_weights": "exp",
             "fts_exp_rate": 4.0, "fts_retain_steps": [29, 37, 43, 48, 54], "fts_retain_share": 0.33,
             "ntr_rep_weight": 1.0, "alpha": 4.0, "beta": 1.0, "lr": 1e-4, "total_loop": 750, "fts_lr_range": None}


def test_preset_tar_parses_to_tars_values():
    _, args = load_script("stage2").parse_args(["--preset", "tar"])
    assert {k: getattr(args, k) for k in TAR_FLAGS} == TAR_FLAGS


def test_preset_tar_sets_every_flag_it_names_and_typed_flags_win(capsys):
    preset_sets_flags("stage2", "tar", "fts_retain_share", 0.5)
    help_lists_preset(capsys, "stage2", "tar", "fts_retain_share", 0.5)


def test_preset_tar_retain_steps_must_fit_a_shorter_episode():
    parse_args = load_script("stage2").parse_args
    with pytest.raises(UsageError, match="leaves no restricted step"):
        parse_args(["--preset", "tar", "--adaptation_steps", "16"])
    _, args = parse_args(["--preset", "tar", "--adaptation_steps", "16", "--fts_retain_steps", "7,9,11"])
    assert args.fts_retain_steps == [7, 9, 11] and args.fts_retain_share == 0.33


@pytest.mark.slow
def test_preset_tar_runs_through_the_stage_script(tmp_path, data_root, stage1_run, monkeypatch, restore_signals,
                                                  quiet_log):
    out = tmp_path / "run"
    argv = ["--preset", "tar", "--adaptation_steps", "6", "--fts_query_every", "2", "--fts_retain_steps", "2,3",
            "--fts_retain_share", "0.5", "--total_loop", "4", "--model_path", str(stage1_run), "--dataset", "MNIST",
            "--bs", "20", "--eval_interval", "2", "--test_interval", "0", "--final_finetune_epochs", "1",
            "--finetune_epochs", "1", "--min_orig_acc", "0", "--data_root", str(data_root), "--out_dir", str(out)]
    monkeypatch.setattr(sys, "argv", [str(SCRIPTS["stage2"]), *argv])
    assert load_script("stage2").main(argv) == 0
    rows = read_rows(out / "metrics.csv")
    assert list(rows[0])[-2:] == ["fts_retain_steps", "seconds"]
    assert [r["loop"] for r in rows] == ["1", "2", "3", "4"]
    assert {r["fts_optimizer"] for r in rows} == {"adamw"} and {r["fts_retain_steps"] for r in rows} <= {"0", "2", "3"}
    assert all(math.isfinite(float(r["fts_loss"])) and float(r["ntr_loss"]) > 0 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["loops_completed"] == 4 and (out / "checkpoints" / "final.pt").is_file()
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["preset"] == "tar" and config["fts_retain_steps"] == [2, 3] and config["ntr_rep_weight"] == 1.0
    stage3 = tmp_path / "stage3"
    assert load_script("stage3").main(["--path", str(out), "--epochs", "1", "--bs", "16", "--data_root",
                                       str(data_root), "--out_dir", str(stage3)]) == 0
    results = json.loads((stage3 / "summary.json").read_text())["results"]
    assert sorted(r["start"] for r in results) == ["normal", "scratch", "sophon"]
