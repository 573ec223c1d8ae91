"""Stage 2's persistence mechanisms for the irreversible backdoor: SBL's clean steps with SAM (Pham et al.,
ECCV'24), Neurotoxin's mask of the clean gradient's largest coordinates (Zhang et al., ICML'22), the
restricted-domain hold-out, and stage 1's sharpness-aware training."""
import copy

import pytest
import torch
import torch.nn.functional as F

from common.data import BatchStream
from common.finetune import attack_subset, holdout, subset_indices
from common.persistence import MASK_BATCHES
from common.train import Precision, sam_step
from helpers import outer_loop, step_resumed, tiny_domain, tiny_sophon

CPU = Precision(torch.device("cpu"))


_algo = tiny_sophon


def _batch(domain, seed, bs=20):
    idx = BatchStream(len(domain), bs, seed).next()
    return domain.to_input(domain.images[idx], CPU.device), domain.labels[idx]


@pytest.mark.parametrize("sam_rho", [0.0, 0.3])
def test_clean_step_is_one_adam_step_on_a_clean_restricted_batch(sam_rho):
    algo = _algo(fts_loop=0, ntr_loop=0, clean_loop=1, sam_rho=sam_rho)
    reference = copy.deepcopy(algo.model)
    optimizer = torch.optim.Adam(reference.parameters(), lr=algo.config.beta * algo.config.lr)
    x, y = _batch(algo.restricted, algo.config.seed + 5)  # the clean stream's first batch
    reference.train()
    if sam_rho:
        sam_step(reference, x, y, optimizer, CPU, sam_rho)
    else:
        F.cross_entropy(reference(x), y).backward()
        optimizer.step()
    result = outer_loop(algo)
    assert result.fts_loss is None and result.ntr_loss is None and result.clean_loss > 0
    for (name, got), want in zip(algo.model.state_dict().items(), reference.state_dict().values()):
        assert torch.allclose(got.float(), want.float(), atol=1e-6), name


def test_sam_changes_the_ntr_step():
    plain, sam = _algo(fts_loop=0), _algo(fts_loop=0, sam_rho=0.5)
    plain.step(), sam.step()
    assert not torch.allclose(plain.model.conv.weight, sam.model.conv.weight, atol=1e-6)


def _clean_gradient(algo):
    model = copy.deepcopy(algo.model)
    model.train()
    stream = BatchStream(len(algo.restricted), algo.config.bs, algo.config.seed + 6)  # the mask's stream
    grads = [torch.zeros_like(p) for p in model.parameters()]
    for _ in range(MASK_BATCHES):
        idx = stream.next()
        loss = F.cross_entropy(model(algo.restricted.to_input(algo.restricted.images[idx], CPU.device)),
                               algo.restricted.labels[idx])
        grads = [g + d for g, d in zip(grads, torch.autograd.grad(loss, list(model.parameters())))]
    return torch.cat([g.abs().flatten() for g in grads])


def test_mask_freezes_the_coordinates_with_the_largest_clean_gradient_for_fts_and_ntr():
    algo = _algo(mask_share=0.25, fts_optimizers=("momentum",), fts_lrs=(1e-2,))
    magnitude = _clean_gradient(algo)
    before = torch.cat([p.detach().flatten() for p in algo.model.parameters()])
    algo.step()
    after = torch.cat([p.detach().flatten() for p in algo.model.parameters()])
    frozen = torch.cat([m.flatten() for m in algo.neurotoxin.mask])
    assert int(frozen.sum()) == round(0.25 * len(frozen))
    assert magnitude[frozen].min() >= magnitude[~frozen].max(), "not the largest clean-gradient coordinates"
    assert torch.equal(after[frozen], before[frozen])
    assert (after[~frozen] != before[~frozen]).float().mean() > 0.9, "the free coordinates move"


def test_computing_the_mask_leaves_weights_and_batchnorm_statistics_alone():
    algo = _algo(mask_share=0.1)
    state = {k: v.clone() for k, v in algo.model.state_dict().items()}
    algo.model.train()
    algo.neurotoxin.clean_gradient_mask()
    for k, v in algo.model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_clean_steps_are_not_masked_and_the_mask_is_recomputed_every_mask_every_loops(monkeypatch):
    algo = _algo(fts_loop=0, ntr_loop=0, clean_loop=1, mask_share=0.5, mask_every=2)
    calls = []
    mask = algo.neurotoxin
    real = mask.clean_gradient_mask
    monkeypatch.setattr(mask, "clean_gradient_mask", lambda: calls.append(mask.steps) or real())
    before = torch.cat([p.detach().flatten() for p in algo.model.parameters()])
    for _ in range(5):
        algo.step()
    assert calls == [0, 2, 4]
    after = torch.cat([p.detach().flatten() for p in algo.model.parameters()])
    frozen = torch.cat([m.flatten() for m in mask.mask])
    assert (after[frozen] != before[frozen]).any(), "clean steps are SBL's: they move every coordinate"


def test_state_round_trip_with_mask_clean_steps_and_sam():
    config = dict(clean_loop=1, sam_rho=0.2, mask_share=0.3, mask_every=2)
    reference = _algo(**config)
    reference.step()
    expected, got = step_resumed(reference, reference.state_dict(), lambda: _algo(**config), 3)
    assert [r.clean_loss for r in got] == pytest.approx([r.clean_loss for r in expected], rel=1e-5)


def test_holdout_is_the_complement_of_stage_3s_subset():
    domain = tiny_domain("MNIST", 3, n=200)
    kept = holdout(domain, 0.1)
    defender = attack_subset(domain, 0.1)
    assert len(kept) + len(defender) == len(domain)
    rows = lambda d: {(bytes(img.numpy()), int(label)) for img, label in zip(d.images, d.labels)}
    assert not rows(kept) & rows(defender)
    left_out = torch.ones(len(domain), dtype=torch.bool)
    left_out[subset_indices(domain.labels, 0.1)] = False
    assert torch.equal(kept.labels, domain.labels[left_out])


@pytest.mark.parametrize("rho", [0.0, 0.2])
def test_stage1_takes_sam_steps_when_sam_rho_is_set(monkeypatch, tmp_path, rho):
    from argparse import Namespace
    import common.stage1 as stage1
    from common.runs import CSVLog
    from helpers import TinyNet
    calls = []
    real = stage1.sam_step
    monkeypatch.setattr(stage1, "sam_step", lambda *a, **k: calls.append(k["rho"]) or real(*a, **k))
    monkeypatch.setattr(stage1, "atomic_save", lambda *a, **k: None)
    monkeypatch.setattr(stage1, "make_checkpoint", lambda *a, **k: {})

    class Run:
        ckpt_dir = tmp_path

        def csv(self, name, header):
            return CSVLog(tmp_path / name, header)

    class NoInterrupts:
        def due(self):
            return False

    args = Namespace(lr=1e-3, seed=0, epochs=1, bs=8, save_every=1, sam_rho=rho)
    stage1.run_stage1(args, Run(), TinyNet(), tiny_domain("FashionMNIST", 4, n=24), lambda m: {"test_acc": 0.0},
                      CPU.device, CPU, NoInterrupts(), meta={})
    assert calls == ([rho] * 3 if rho else [])  # 24 samples in batches of 8


# ---- the clean steps through a separate head (--clean_head separate) --------------------------------------

@pytest.mark.parametrize("sam_rho", [0.0, 0.3])
def test_separate_head_clean_step_leaves_the_models_head_and_trains_body_and_separate_head(sam_rho):
    algo = _algo(fts_loop=0, ntr_loop=0, clean_loop=1, sam_rho=sam_rho, clean_head="separate")
    model = {k: v.clone() for k, v in algo.model.named_parameters()}
    separate = {k: v.clone() for k, v in algo.separate.head.named_parameters()}
    assert algo.separate.head.out_features == algo.restricted.num_classes
    # the parameters the step trains, and averages the gradients of under torchrun: the body and the separate head
    body = [p for name, p in algo.model.named_parameters() if not name.startswith("fc.")]
    assert list(map(id, algo.clean.trained)) == list(map(id, [*body, *algo.separate.head.parameters()]))
    result = outer_loop(algo)
    assert result.clean_loss > 0
    for name, p in algo.model.named_parameters():
        assert torch.equal(p, model[name]) == name.startswith("fc."), name
    for name, p in algo.separate.head.named_parameters():
        assert not torch.equal(p, separate[name]), name


def test_separate_head_step_is_the_models_step_with_the_head_swapped():
    """One clean step equals, by hand, Adam over the body and a Linear that stands in for the model's head."""
    algo = _algo(fts_loop=0, ntr_loop=0, clean_loop=1, clean_head="separate")
    reference = copy.deepcopy(algo.model)
    reference.fc = copy.deepcopy(algo.separate.head)
    optimizer = torch.optim.Adam(reference.parameters(), lr=algo.config.beta * algo.config.lr)
    x, y = _batch(algo.restricted, algo.config.seed + 5)  # the clean stream's first batch
    reference.train()
    F.cross_entropy(reference(x), y).backward()
    optimizer.step()
    algo.step()
    for name, want in reference.state_dict().items():
        got = (algo.separate.head.state_dict()[name[3:]] if name.startswith("fc.") else algo.model.state_dict()[name])
        assert torch.allclose(got.float(), want.float(), atol=1e-6), name


def test_model_head_is_the_old_wiring_exactly():
    """--clean_head model (the default) is the clean step as wired before the separate head existed: a
    SupervisedSteps on the model's own forward with an outer Adam over every parameter."""
    from common.persistence import SupervisedSteps
    from common.sophon import outer_adam
    config = dict(fts_loop=0, clean_loop=1, sam_rho=0.05)
    new, old = _algo(**config, clean_head="model"), _algo(**config)
    old.clean = SupervisedSteps(old.model, old.model, old.restricted, old.restricted_gather,
                                BatchStream(len(old.restricted), old.config.bs, seed=old.config.seed + 5),
                                outer_adam(old.model, CPU, {})(old.config.beta * old.config.lr), CPU, old.world,
                                sam_rho=old.config.sam_rho)
    assert new.separate is None
    for _ in range(3):
        assert new.step() == old.step()
    for (name, got), want in zip(new.model.state_dict().items(), old.model.state_dict().values()):
        assert torch.equal(got, want), name
    assert set(new.state_dict()) == set(old.state_dict())


def test_separate_head_is_redrawn_every_clean_head_reset_loops_with_fresh_optimiser_state():
    from common.models import fresh_linear_
    algo = _algo(fts_loop=0, clean_loop=1, clean_head="separate", clean_head_reset=2)
    draws = copy.deepcopy(algo.separate.head)
    generator = torch.Generator().manual_seed(algo.config.seed + 7)
    fresh_linear_(draws, generator)
    assert torch.equal(draws.weight, algo.separate.head.weight)
    fresh_linear_(draws, generator)  # the second draw, due at the start of loop 3
    head, body = list(algo.separate.head.parameters()), algo.model.conv.weight
    algo.step(), algo.step()
    moved = algo.separate.head.weight.clone()
    assert not torch.equal(moved, draws.weight)
    algo.separate.update(algo.clean.optimizer)
    assert torch.equal(algo.separate.head.weight, draws.weight) and not algo.separate.head.bias.any()
    assert all(p not in algo.clean.optimizer.state for p in head) and body in algo.clean.optimizer.state


def test_separate_head_never_redrawn_at_reset_0():
    algo = _algo(fts_loop=0, ntr_loop=0, clean_loop=1, clean_head="separate", sam_rho=0.0)
    weights = []
    for _ in range(4):
        algo.step()
        weights.append(algo.separate.head.weight.clone())
    # an Adam step moves a coordinate by a few lr at most; a re-drawn head would jump by far more
    steps = [(b - a).abs().max().item() for a, b in zip(weights, weights[1:])]
    assert max(steps) <= 5 * algo.config.beta * algo.config.lr


def test_state_round_trip_with_a_separate_head():
    config = dict(fts_loop=0, clean_loop=2, sam_rho=0.2, clean_head="separate", clean_head_reset=2)
    reference = _algo(**config)
    reference.step()
    state = reference.state_dict()
    assert set(state["clean_head"]) == {"weight", "bias"}
    assert all(not k.startswith("clean_head") for k in reference.model.state_dict())
    resumed = []
    expected, got = step_resumed(reference, state, lambda: resumed.append(_algo(**config)) or resumed[-1], 3)
    assert [r.clean_loss for r in got] == pytest.approx([r.clean_loss for r in expected], rel=1e-5)
    for k, v in resumed[-1].separate.head.state_dict().items():
        assert torch.allclose(v, reference.separate.head.state_dict()[k], atol=1e-6), k
    assert resumed[-1].separate.loops == reference.separate.loops == 4


def test_rollback_restores_the_separate_head():
    algo = _algo(fts_loop=0, clean_loop=1, clean_head="separate")
    snapshot = algo.snapshot()
    before = algo.separate.head.weight.clone()
    algo.step()
    assert not torch.equal(algo.separate.head.weight, before)
    algo.restore(snapshot)
    assert torch.equal(algo.separate.head.weight, before)
