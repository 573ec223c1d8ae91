"""Stage 2's speed paths change nothing but speed: data gathered on the device, the compiled learner and
model, the inner optimisers' launch options."""
import pytest
import torch
import torch.nn.functional as F

from common.data import DEVICE_DATA_SHARE, Gather, resolve_data_on_device
from common.fts import FTS, FineTuner, IndexedBatches
from common.sophon import Sophon
from common.stage2 import Stage2Settings
from common.train import Precision, launch_options
from helpers import TinyNet, outer_loop, tiny_domain

CPU = torch.device("cpu")
EAGER = Precision(CPU)
MIXED = dict(lr=1e-3, bs=20, adaptation_steps=3, fts_envs=2, fts_optimizers=("sgd", "momentum", "adam", "rmsprop"),
             fts_lrs=(1e-3, 1e-2), fts_head=("reinit", "keep"), fts_scope=("all", "head"))


def _algo(precision=EAGER, data_on_device="auto", **config):
    torch.manual_seed(0)
    restricted, orig = tiny_domain("MNIST", 1), tiny_domain("FashionMNIST", 2)

    def kl(net, x, y):
        log_p = F.log_softmax(net(restricted.to_input(x, precision.device)).float(), dim=1)
        return -log_p.mean()

    return Sophon(TinyNet(), kl, restricted, orig, Stage2Settings(**config), precision, data_on_device=data_on_device)


def _record_fts_gradients(algo):
    grads, step = [], algo.fts_opt.step

    def recording_step(*args, **kwargs):
        grads.append(torch.cat([p.grad.reshape(-1) for p in algo.model.parameters()]))
        return step(*args, **kwargs)

    algo.fts_opt.step = recording_step
    return grads


# ---- data on the device -----------------------------------------------------------------------------

def test_data_on_device_takes_the_same_batches_bit_for_bit():
    # on CPU 'on' runs the device path (tensors indexed where the model is, indices moved through Gather.indices)
    host, device = _algo(data_on_device="off", **MIXED), _algo(data_on_device="on", **MIXED)
    assert not host.data_on_device and device.data_on_device and device.restricted_gather.on_device
    for _ in range(3):
        a, b = outer_loop(host), outer_loop(device)
        assert (a.fts_loss, a.ntr_loss, a.finetuners) == (b.fts_loss, b.ntr_loss, b.finetuners)
    for (k, v), w in zip(host.model.state_dict().items(), device.model.state_dict().values()):
        assert torch.equal(v, w), k


@pytest.mark.parametrize("on_device", [False, True])
def test_indexed_batches_are_the_pairs_path_one_gather_each(on_device):
    """An episode over index rows gives the gradient of the (images[idx], labels[idx]) pairs it replaces:
    the same samples, the same support/query split drawn from the episode's generator."""
    domain = tiny_domain("MNIST", 3)
    indices = [torch.randperm(len(domain), generator=torch.Generator().manual_seed(s))[:20] for s in range(3)]
    grads = []
    for batches in ([(domain.images[i], domain.labels[i]) for i in indices],
                    IndexedBatches(indices, Gather(domain, CPU, on_device))):
        torch.manual_seed(0)
        model = TinyNet()
        fts = FTS(model, lambda net, x, y: F.cross_entropy(net(domain.to_input(x, CPU)), y),
                  lambda x: domain.to_input(x, CPU), EAGER)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        loss, _ = fts.episode(model, batches, FineTuner("adam", 1e-2, "reinit", "all"), 0.5,
                              torch.Generator().manual_seed(7))
        grads.append((loss, [p.grad for p in model.parameters()]))
    assert torch.equal(grads[0][0], grads[1][0])
    assert all(torch.equal(a, b) for a, b in zip(grads[0][1], grads[1][1]))


def test_auto_puts_data_on_the_device_only_on_cuda_and_when_it_fits(monkeypatch):
    domain = tiny_domain("MNIST", 1)  # 40 images of 8x8 plus labels
    need = domain.images.nbytes + domain.labels.nbytes
    assert resolve_data_on_device("auto", [domain], CPU) is False
    assert resolve_data_on_device("on", [domain], CPU) is True
    assert resolve_data_on_device("off", [domain], CPU) is False
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (need / DEVICE_DATA_SHARE, 10 * need))
    assert resolve_data_on_device("auto", [domain, domain], cuda) is True, "a domain counted once"
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (need / DEVICE_DATA_SHARE - 1, 10 * need))
    assert resolve_data_on_device("auto", [domain], cuda) is False
    with pytest.raises(ValueError):
        resolve_data_on_device("yes", [domain], CPU)


# ---- launch options and the compile switches ---------------------------------------------------------------

def test_inner_optimizers_fused_on_cuda_foreach_elsewhere():
    cuda, sgd_fused = torch.device("cuda"), "fused" in torch.optim.SGD.__init__.__code__.co_varnames
    assert launch_options(torch.optim.Adam, cuda) == {"fused": True}
    assert launch_options(torch.optim.AdamW, cuda) == {"fused": True}
    assert launch_options(torch.optim.SGD, cuda) == ({"fused": True} if sgd_fused else {"foreach": True})
    assert launch_options(torch.optim.RMSprop, cuda) == {"foreach": True}
    assert launch_options(torch.optim.Adam, CPU) == {"foreach": True}
    # a compiled backward lays convolution gradients out its own way, which fused kernels refuse (H200, torch 2.11)
    assert launch_options(torch.optim.Adam, cuda, compiled=True) == {"foreach": True}
    assert launch_options(torch.optim.SGD, cuda, compiled=True) == {"foreach": True}


def test_compile_switches():
    cuda = torch.device("cuda")
    assert Precision(CPU, compile=True).compile is False, "--compile alone stays a CUDA option"
    assert Precision(CPU, compile="always").compile is True
    assert Precision(cuda, channels_last=True).channels_last is True
    both = Precision(cuda, channels_last=True, compile=True)
    assert both.compile and not both.channels_last, "channels_last is left to inductor under compile"


# ---- the compiled learner and model (inductor on CPU) -----------------------------------------------------

@pytest.mark.slow
def test_compiled_loop_matches_eager_and_compiles_three_graphs_once(monkeypatch):
    dynamo = pytest.importorskip("torch._dynamo")
    from torch._dynamo.utils import counters
    import common.train
    dynamo.reset()
    counters.clear()
    config = dict(lr=1e-3, bs=20, adaptation_steps=3, fts_optimizers=("sgd", "adam"), fts_lrs=(1e-2,))
    eager, compiled = _algo(**config), _algo(Precision(CPU, compile="always"), **config)
    eager_grads, compiled_grads = _record_fts_gradients(eager), _record_fts_gradients(compiled)
    inner_compiled = []
    monkeypatch.setattr(common.train, "launch_options",
                        lambda cls, device, compiled=False: inner_compiled.append(compiled) or {})
    a = outer_loop(eager)
    assert inner_compiled and not any(inner_compiled)
    inner_compiled.clear()
    b = outer_loop(compiled)
    assert inner_compiled and all(inner_compiled), "a compiled learner's inner optimisers are told so (no fused)"
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 3, "support (18), query (2) and NTR (20): three fixed shapes, one graph each"
    # the same model gradient as eager from the same weights, to fp32 rounding (inductor fuses differently)
    torch.testing.assert_close(compiled_grads[0], eager_grads[0], rtol=1e-4, atol=1e-6)
    assert b.fts_loss == pytest.approx(a.fts_loss, rel=1e-5) and b.ntr_loss == pytest.approx(a.ntr_loss, rel=1e-5)
    with dynamo.config.patch(error_on_recompile=True):  # any new graph after the first loop raises
        for _ in range(3):
            a, b = outer_loop(eager), outer_loop(compiled)
            assert a.finetuners == b.finetuners
    assert counters["stats"]["unique_graphs"] == graphs
    torch.testing.assert_close(compiled_grads[-1], eager_grads[-1], rtol=1e-3, atol=1e-5)
    dynamo.reset()
