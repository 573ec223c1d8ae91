"""Function-preserving rescale of BatchNorm-fed layers (common.models) and stage 2's --rescale."""
import pytest
import torch
from torch import nn

from common.checkpoints import load_parent, resolve_checkpoint
from common.cli import UsageError
from common.models import batchnorm_fed_layers, build_model, renormalized, rescale_batchnorm_fed
from common.sophon import Sophon, outer_lr_scale, outer_param_groups
from common.stage2 import Stage2Settings, setup_stage2
from common.train import Precision
from helpers import TinyNet, load_script, tiny_domain


class Mixed(nn.Module):
    """conv -> bn, conv -> relu -> bn (not fed by the conv directly), linear(bias) -> bn1d, and a head."""

    def __init__(self):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.b, self.bn_b = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c, self.bn_c = nn.Linear(4, 6), nn.BatchNorm1d(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = self.bn_a(self.a(x)).relu()
        x = self.bn_b(self.b(x).relu())
        x = x.mean((2, 3))
        return self.fc(self.bn_c(self.c(x)).relu())


def trained_stats(model, size, seed=0):
    gen = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, size, size, generator=gen) * 2 + 0.5)
    return model.eval()


def test_pairs_are_found_by_data_flow_not_by_names():
    model = Mixed()
    assert [(layer, bn) for layer, bn in batchnorm_fed_layers(model, 8)] == [(model.a, model.bn_a),
                                                                              (model.c, model.bn_c)]
    resnet = build_model("resnet18")
    pairs = batchnorm_fed_layers(resnet, 32)
    assert len(pairs) == 20  # the stem, two per basic block (8 blocks), three downsample convs
    assert all(isinstance(layer, nn.Conv2d) for layer, _ in pairs)
    assert resnet.training  # the probing pass leaves the mode as it found it


@pytest.mark.parametrize("make, size", [(Mixed, 8), (lambda: build_model("resnet18"), 32)])
def test_rescale_keeps_the_function_and_scales_the_weights(make, size):
    torch.manual_seed(0)
    model = trained_stats(make(), size)
    x = torch.randn(8, 3, size, size)
    before = model(x).detach()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    fed = {id(layer) for layer, _ in batchnorm_fed_layers(model, size)}
    assert rescale_batchnorm_fed(model, size, factor=10) == [10.0] * len(fed)
    assert torch.allclose(model(x), before, atol=1e-4, rtol=1e-4)
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            expected = weights[f"{name}.{pname}" if name else pname] * (10 if id(module) in fed else 1)
            assert torch.allclose(p, expected), (name, pname)


def test_reference_undoes_a_rescale():
    torch.manual_seed(0)
    model = trained_stats(build_model("resnet18"), 32)
    x = torch.randn(4, 3, 32, 32)
    before = model(x).detach()
    rms = [layer.weight.pow(2).mean().sqrt().item() for layer, _ in batchnorm_fed_layers(model, 32)]
    rescale_batchnorm_fed(model, 32, factor=7)
    reference = trained_stats(build_model("resnet18"), 32)
    reference.load_state_dict(model.state_dict())
    rescale_batchnorm_fed(reference, 32, factor=1 / 7)  # the model as it was, built independently
    factors = rescale_batchnorm_fed(model, 32, reference=reference)
    assert factors == pytest.approx([1 / 7] * 20, rel=1e-5)
    assert [layer.weight.pow(2).mean().sqrt().item() for layer, _ in batchnorm_fed_layers(model, 32)] == \
        pytest.approx(rms, rel=1e-5)
    assert torch.allclose(model(x), before, atol=1e-4, rtol=1e-4)


def test_renormalized_brings_a_rescaled_state_to_a_fresh_models_scale():
    torch.manual_seed(1)
    model = trained_stats(build_model("resnet18"), 32)
    x = torch.randn(4, 3, 32, 32)
    before = model(x).detach()
    rescale_batchnorm_fed(model, 32, factor=10)
    state = renormalized(model.state_dict(), "resnet18", 10, 32)
    fresh = [layer.weight.pow(2).mean().sqrt().item() for layer, _ in batchnorm_fed_layers(build_model("resnet18"), 32)]
    model.load_state_dict(state)
    got = [layer.weight.pow(2).mean().sqrt().item() for layer, _ in batchnorm_fed_layers(model, 32)]
    assert got == pytest.approx(fresh, rel=0.05)  # another fresh draw: the same scale, to sampling noise
    assert torch.allclose(model(x), before, atol=1e-4, rtol=1e-4)


def test_a_model_without_batchnorm_is_refused_and_arguments_checked():
    with pytest.raises(UsageError, match="nothing to rescale"):
        rescale_batchnorm_fed(nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten(), nn.LazyLinear(2)), 8, factor=2)
    with pytest.raises(ValueError, match="not both"):
        rescale_batchnorm_fed(Mixed(), 8)
    with pytest.raises(ValueError, match="differ"):
        rescale_batchnorm_fed(build_model("resnet18"), 32, reference=build_model("resnet34"))


def ntr_trained(factor, lr_scale, steps=4):
    """A TinyNet with its conv rescaled by `factor`, after `steps` NTR-only outer loops at outer lr scale `lr_scale`."""
    torch.manual_seed(0)
    model = trained_stats(TinyNet(), 8)
    rescale_batchnorm_fed(model, 8, factor=factor)
    cpu = Precision(torch.device("cpu"))
    restricted, orig = tiny_domain("MNIST", 1), tiny_domain("FashionMNIST", 2)
    ce = lambda net, x, y: torch.nn.functional.cross_entropy(net(restricted.to_input(x, cpu.device)), y)
    algo = Sophon(model, ce, restricted, orig, Stage2Settings(lr=1e-2, bs=20, fts_loop=0), cpu, lr_scale=lr_scale)
    for _ in range(steps):
        algo.step()
    return dict(model.named_parameters())


def test_outer_lr_following_the_rescale_moves_the_rescaled_layer_as_at_scale_one():
    plain, start = ntr_trained(1, None), ntr_trained(1, None, steps=0)
    followed = ntr_trained(10, {"conv.weight": 10, "conv.bias": 10})
    fixed = ntr_trained(10, None)
    # Adam's step is scale-free: x10 the lr is the same relative step. (The conv's bias, right before a
    # BatchNorm, has no gradient but rounding noise, which Adam normalises: it is not compared.)
    target = plain["conv.weight"] * 10
    assert (followed["conv.weight"] - target).norm() < 1e-3 * target.norm()
    moved = (plain["conv.weight"] - start["conv.weight"]).norm()
    assert (fixed["conv.weight"] / 10 - start["conv.weight"]).norm() < 0.2 * moved
    for name in ("bn.weight", "bn.bias", "fc.weight", "fc.bias"):
        assert torch.allclose(followed[name], plain[name], rtol=1e-3, atol=1e-5), name


def test_outer_param_groups():
    model = TinyNet()
    groups = outer_param_groups(model, 1e-3, {"conv.weight": 10, "conv.bias": 10})
    assert sorted((g["lr"], len(g["params"])) for g in groups) == [(1e-3, 4), (pytest.approx(1e-2), 2)]
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in model.parameters()}
    assert [g["lr"] for g in outer_param_groups(model, 1e-3, {})] == [1e-3]
    with pytest.raises(ValueError, match="conv.wieght"):
        outer_param_groups(model, 1e-3, {"conv.wieght": 10})


@pytest.mark.slow
def test_stage2_rescale_starts_from_the_rescaled_parent(stage1_run, data_root):
    module = load_script("stage2")
    stem = "conv1.weight"
    _, plain = module.parse_args(["--model_path", str(stage1_run), "--dataset", "MNIST", "--data_root", str(data_root)])
    _, scaled = module.parse_args(["--model_path", str(stage1_run), "--dataset", "MNIST", "--data_root",
                                   str(data_root), "--rescale", "10"])
    assert plain.rescale is None
    parent = load_parent(resolve_checkpoint(stage1_run, "sophon_orig", "stage1_pretrain"), plain)["model"]
    as_parent = setup_stage2(plain, "sophon_orig", module.STAGE).model.state_dict()
    setup = setup_stage2(scaled, "sophon_orig", module.STAGE)
    assert torch.equal(as_parent[stem], parent[stem])
    assert torch.allclose(setup.model.state_dict()[stem], parent[stem] * 10)
    assert torch.allclose(setup.model.state_dict()["fc.weight"], parent["fc.weight"])  # the head feeds no BatchNorm
    assert setup.config["rescale"] == 10
    assert outer_lr_scale(setup.model, scaled) is None
    scaled.rescale_outer_lr = True
    assert outer_lr_scale(setup.model, scaled) == {f"{n}.weight": 10 for n, m in setup.model.named_modules()
                                                   if isinstance(m, nn.Conv2d)}
