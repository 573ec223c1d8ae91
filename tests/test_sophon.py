"""The stage-2 algorithm object on its own: what `step()` does, the FTS clip, state and snapshots."""
import io

import pytest
import torch

from helpers import tiny_sophon

_algo = tiny_sophon


def _weights(algo):
    return {k: v.clone() for k, v in algo.model.state_dict().items()}


def test_step_samples_one_finetuner_per_environment_and_fts_step():
    algo = _algo(fts_loop=2, fts_envs=3, fts_optimizers=("sgd", "adam"), fts_head=("reinit", "keep"))
    before = _weights(algo)
    result = algo.step()
    assert len(result.finetuners) == 6
    assert {t.optimizer for t in result.finetuners} <= {"sgd", "adam"}
    assert result.fts_loss > 0 and result.ntr_loss > 0
    assert any(not torch.equal(v, before[k]) for k, v in algo.model.state_dict().items())


def test_no_ntr_loss_without_ntr_steps():
    assert _algo(ntr_loop=0).step().ntr_loss is None


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
    reference = _algo(fts_optimizers=("sgd", "adam"), fts_lrs=(1e-3, 1e-2))
    reference.step()
    buffer = io.BytesIO()
    torch.save(reference.state_dict(), buffer)  # as last.pt holds it: loadable weights_only
    expected = [reference.step().finetuners for _ in range(2)]

    resumed = _algo(fts_optimizers=("sgd", "adam"), fts_lrs=(1e-3, 1e-2))
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    got = [resumed.step().finetuners for _ in range(2)]
    assert got == expected
    for k, v in resumed.model.state_dict().items():
        assert torch.allclose(v.float(), reference.model.state_dict()[k].float(), atol=1e-6), k


def test_restore_brings_back_weights_and_optimisers_but_not_the_batches():
    algo = _algo()
    snap = algo.snapshot()
    weights = _weights(algo)
    algo.step()
    position = algo.restricted_stream.pos
    algo.restore(snap)
    assert all(torch.equal(v, weights[k]) for k, v in algo.model.state_dict().items())
    assert algo.fts_opt.state_dict()["state"] == {} and algo.ntr_opt.state_dict()["state"] == {}
    assert algo.restricted_stream.pos == position, "a rollback goes on with fresh batches"


def test_a_state_saved_before_clean_steps_and_the_mask_existed_still_resumes_exactly():
    reference = _algo()
    reference.step()
    state = reference.state_dict()
    for key in ("clean_opt", "clean_stream", "mask_stream", "mask", "steps"):
        del state[key]  # what last.pt held before SBL's clean steps and Neurotoxin's mask
    buffer = io.BytesIO()
    torch.save(state, buffer)
    expected = [reference.step() for _ in range(2)]
    resumed = _algo()
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    got = [resumed.step() for _ in range(2)]
    assert [r.fts_loss for r in got] == pytest.approx([r.fts_loss for r in expected], rel=1e-5)
    for k, v in resumed.model.state_dict().items():
        assert torch.allclose(v.float(), reference.model.state_dict()[k].float(), atol=1e-6), k
