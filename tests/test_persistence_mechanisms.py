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
