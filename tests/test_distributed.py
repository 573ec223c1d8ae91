"""Several processes through torch.distributed (gloo on CPU): the stage-2 algorithm's environments dealt
to ranks give the same result as one process, and the ranks hold identical weights after every step."""
import os
import signal
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from common import dist
from common.sophon import Sophon
from common.stage2 import Stage2Settings
from common.train import Precision
from helpers import TinyNet, interrupted_run, outer_loop, popen_script, read_rows, run_script, tiny_domain

CPU = Precision(torch.device("cpu"))
CONFIG = dict(lr=1e-3, bs=20, adaptation_steps=2, fts_envs=4, fts_optimizers=("sgd", "adam"),
              fts_lrs=(1e-3, 1e-2), fts_head=("reinit", "keep"), clean_loop=1, sam_rho=0.05, mask_share=0.2,
              mask_every=2)
LOOPS = 3
LEARNED_LR = dict(CONFIG, fts_lrs=None, fts_lr_range=(1e-3, 1e-2), fts_lr_adapt=0.3)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(world_size, rank=0, config=CONFIG):
    """LOOPS outer loops on a TinyNet; returns per loop (flat weights, fts loss, fine-tuners)."""
    torch.manual_seed(0)
    restricted, orig = tiny_domain("MNIST", 1), tiny_domain("FashionMNIST", 2)

    def ce(net, x, y):
        return F.cross_entropy(net(restricted.to_input(x, CPU.device)), y)

    algo = Sophon(TinyNet(), ce, restricted, orig, Stage2Settings(**config), CPU, world=dist.world())
    fts_grads, adam_step = [], algo.fts_opt.step

    def recording_step(*args, **kwargs):  # the (summed, clipped) FTS gradient the Adam step receives
        fts_grads.append(torch.cat([p.grad.reshape(-1) for p in algo.model.parameters()]))
        return adam_step(*args, **kwargs)

    algo.fts_opt.step = recording_step
    trace = []
    for _ in range(LOOPS):
        result = outer_loop(algo)
        trained = [*algo.model.state_dict().values(),
                   *(algo.separate.head.state_dict().values() if algo.separate else ())]
        state = torch.cat([v.detach().float().reshape(-1) for v in trained])
        trace.append((state, fts_grads[-1], result.fts_loss, result.finetuners))
    return trace


def _rank_main(rank, world_size, port, out, config):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    world = dist.init_from_env("cpu")
    try:
        trace = _run(world_size, rank, config)
        torch.save([(s, g, loss, [t.__dict__ for t in tuners]) for s, g, loss, tuners in trace],
                   f"{out}.rank{world.rank}")
    finally:
        dist.shutdown()


def _two_ranks(tmp_path_factory, config):
    out = tmp_path_factory.mktemp("dist") / "trace"
    mp.spawn(_rank_main, args=(2, _free_port(), str(out), config), nprocs=2, join=True)
    return [torch.load(f"{out}.rank{r}", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return _two_ranks(tmp_path_factory, CONFIG)


def test_ranks_hold_identical_weights_after_every_step(two_ranks):
    for loop, (a, b) in enumerate(zip(*two_ranks)):
        assert torch.equal(a[0], b[0]), f"ranks differ after loop {loop + 1}"
        assert torch.equal(a[1], b[1]) and a[2] == b[2] and a[3] == b[3]


def test_ranks_hold_identical_weights_with_a_separate_clean_head(tmp_path_factory):
    """The separate head's and the body's clean gradients are averaged over the ranks like the model's."""
    ranks = _two_ranks(tmp_path_factory, dict(CONFIG, clean_head="separate", clean_head_reset=2))
    for loop, (a, b) in enumerate(zip(*ranks)):
        assert torch.equal(a[0], b[0]), f"ranks differ after loop {loop + 1}"


def _adam_reach(config, loops):
    """How far one coordinate's weight can move in `loops` outer loops: each loop takes one Adam step per FTS,
    NTR and clean step, and an Adam step moves a coordinate by about its lr whatever the gradient's size."""
    c = Stage2Settings(**config)
    per_loop = c.lr * (c.alpha * c.fts_loop + c.beta * (c.ntr_loop + c.clean_loop))
    return 2 * loops * per_loop  # the step may go the other way in the other layout


def test_two_ranks_equal_one_process(two_ranks):
    single = _run(1)
    first_grad = two_ranks[0][0][1]
    # from the same weights, the FTS gradient of 4 environments over 2 ranks is the 1-process one up to the
    # order of the float additions
    assert torch.allclose(first_grad, single[0][1], rtol=1e-5, atol=1e-8)
    # Weights: a coordinate with a real gradient takes the same Adam steps in both layouts. One whose gradient is
    # zero but for rounding (a conv bias before BatchNorm, whose running mean follows it) takes steps of either
    # sign, each about the lr whatever the gradient's size, so there the two layouts may differ by up to that.
    grads = torch.stack([g.abs() for _, g, _, _ in single])
    # (exactly 0 is no rounding: the model's own head gets no FTS gradient when the fine-tuner takes a new one)
    real = ~((grads > 0) & (grads < 1e-6 * grads.amax(dim=1, keepdim=True))).any(dim=0)
    net = TinyNet()
    params = dict(net.named_parameters())
    is_param = torch.cat([torch.full((v.numel(),), k in params) for k, v in net.state_dict().items()])
    tight = torch.zeros_like(is_param)
    tight[is_param] = real
    assert real.sum() > 0.9 * real.numel(), "rounding-only gradients are the exception"
    for loop, ((state, _, loss, tuners), (s1, _, l1, t1)) in enumerate(zip(two_ranks[0], single)):
        assert tuners == [t.__dict__ for t in t1], "environment e draws the same fine-tuner on any world size"
        assert loss == pytest.approx(l1, rel=1e-5)
        gap = (state - s1).abs()
        assert gap[tight].max().item() < 1e-4, f"loop {loop + 1}: a coordinate with a real gradient moved apart"
        assert gap.max().item() <= _adam_reach(CONFIG, loop + 1), f"loop {loop + 1}"


def test_learned_lr_is_the_same_on_every_rank_and_world_size(tmp_path_factory):
    """Each environment's slope is computed on the rank that ran it and summed: every rank, and one process,
    then step the attacker's lr the same way."""
    ranks = _two_ranks(tmp_path_factory, LEARNED_LR)
    single = [[t.__dict__ for t in tuners] for *_, tuners in _run(1, config=LEARNED_LR)]
    assert [tuners for *_, tuners in ranks[0]] == [tuners for *_, tuners in ranks[1]] == single
    assert len({t["lr"] for tuners in single for t in tuners}) > 1, "the lr moved"


# ---- the stage script under torchrun ----------------------------------------------------------------------

STAGE2 = ["--dataset", "MNIST", "--bs", "20", "--total_loop", "4", "--adaptation_steps", "2", "--fts_envs", "2",
          "--fts_optimizers", "sgd,adam", "--test_interval", "3", "--finetune_epochs", "1",
          "--final_finetune_epochs", "1", "--eval_interval", "2", "--save_every", "1"]


@pytest.mark.slow
def test_stage2_under_torchrun_sigterm_resume_and_one_process_agree(tmp_path, data_root, stage1_run):
    args = [*STAGE2, "--model_path", stage1_run, "--data_root", data_root]
    single = popen_script("stage2", *args, "--out_dir", tmp_path / "one", log_path=tmp_path / "one.txt")
    # SIGTERM to the launcher: torchrun passes it on, every rank stops at the same loop, rank 0 saves
    out, output = interrupted_run("stage2", args, tmp_path, after_rows=2, sig=signal.SIGTERM, nproc=2, expect_rc=1)
    log = (out / "log.txt").read_text()
    assert log.count("interrupted at loop") == 1 and log.count("run folder") == 1, "rank 0 alone writes"
    assert (out / "checkpoints" / "last.pt").is_file() and not (out / "summary.json").exists()
    proc = run_script("stage2", "--resume", out, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert single[0].wait(timeout=300) == 0, (tmp_path / "one.txt").read_text()[-3000:]
    single[1].close()

    rows, one = read_rows(out / "metrics.csv"), read_rows(tmp_path / "one" / "metrics.csv")
    assert [int(r["loop"]) for r in rows] == [1, 2, 3, 4], "every loop once, written by one rank"
    assert [(r["fts_optimizer"], r["fts_lr"]) for r in rows] == [(o["fts_optimizer"], o["fts_lr"]) for o in one]
    # the first loop starts from the same weights: equal up to the order of float additions. Later loops are
    # compared in test_two_ranks_equal_one_process: this toy setting (16 px, 2-image queries, BatchNorm)
    # turns Adam's rounding-level differences into visibly different losses within a loop or two.
    assert float(rows[0]["fts_loss"]) == pytest.approx(float(one[0]["fts_loss"]), rel=1e-4)
    assert float(rows[0]["ntr_loss"]) == pytest.approx(float(one[0]["ntr_loss"]), rel=1e-4)
    assert len(read_rows(out / "finetune_tests.csv")) == len(read_rows(tmp_path / "one" / "finetune_tests.csv"))
