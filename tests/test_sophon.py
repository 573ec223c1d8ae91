"""The stage-2 algorithm object on its own: what `step()` does, the FTS clip, state and snapshots."""

import pytest
import torch

from helpers import outer_loop, step_resumed, tiny_sophon

_algo = tiny_sophon


def _weights(algo):
    return {k: v.clone() for k, v in algo.model.state_dict().items()}


def test_step_samples_one_finetuner_per_environment_and_fts_step():
    algo = _algo(fts_loop=2, fts_envs=3, fts_optimizers=("sgd", "adam"), fts_head=("reinit", "keep"))
    before = _weights(algo)
    result = outer_loop(algo)
    assert len(result.finetuners) == 6
    assert {t.optimizer for t in result.finetuners} <= {"sgd", "adam"}
    assert result.fts_loss > 0 and result.ntr_loss > 0
    assert any(not torch.equal(v, before[k]) for k, v in algo.model.state_dict().items())


def test_no_ntr_loss_without_ntr_steps():
    assert outer_loop(_algo(ntr_loop=0)).ntr_loss is None


def _fts_gradient_norm(algo):
    """Norm of the gradient the FTS Adam step receives in the first outer loop."""
    norms, step = [], algo.fts_opt.step

    def recording_step(*args, **kwargs):
        norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in algo.model.parameters()])).item())
        return step(*args, **kwargs)

    algo.fts_opt.step = recording_step
    algo.step()
    return norms[0]


def test_fts_gradient_is_clipped_to_fts_clip():
    raw = _fts_gradient_norm(_algo(fts_clip=1e6))
    assert raw > 1e-2
    assert _fts_gradient_norm(_algo(fts_clip=1e-3)) == pytest.approx(1e-3, rel=1e-4)
    assert _fts_gradient_norm(_algo(fts_clip=raw * 2)) == pytest.approx(raw, rel=1e-5), "below the clip: untouched"


def test_state_dict_round_trip_reproduces_the_next_steps():
    config = dict(fts_optimizers=("sgd", "adam"), fts_lrs=(1e-3, 1e-2))
    reference = _algo(**config)
    reference.step()
    expected, got = step_resumed(reference, reference.state_dict(), lambda: _algo(**config), 2)
    assert [r.finetuners for r in got] == [r.finetuners for r in expected]


def test_restore_brings_back_weights_and_optimisers_but_not_the_batches():
    algo = _algo()
    snap = algo.snapshot()
    weights = _weights(algo)
    algo.step()
    position = algo.restricted_stream.pos
    algo.restore(snap)
    assert all(torch.equal(v, weights[k]) for k, v in algo.model.state_dict().items())
    assert algo.fts_opt.state_dict()["state"] == {} and algo.ntr.optimizer.state_dict()["state"] == {}
    assert algo.restricted_stream.pos == position, "a rollback goes on with fresh batches"


def test_a_state_saved_before_clean_steps_and_the_mask_existed_still_resumes_exactly():
    reference = _algo()
    reference.step()
    state = reference.state_dict()
    for key in ("clean_opt", "clean_stream", "mask_stream", "mask", "steps"):
        del state[key]  # what last.pt held before SBL's clean steps and Neurotoxin's mask
    expected, got = step_resumed(reference, state, _algo, 2)
    assert [r.fts_loss for r in got] == pytest.approx([r.fts_loss for r in expected], rel=1e-5)
