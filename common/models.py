"""Model registry and the one way to reach a classifier head."""
import torch
from torch import nn

from common.settings import UsageError

HEAD_PATHS = {"ResNet": "fc", "MetaFormer": "head.fc.fc2"}


def _torchvision_resnet(name):
    def build(num_classes, pretrained):
        import torchvision
        model = getattr(torchvision.models, name)(weights="IMAGENET1K_V1" if pretrained else None)
        model.fc = nn.Linear(model.fc.in_features, num_classes)
        return model
    return build


def _caformer(num_classes, pretrained):
    import timm
    return timm.create_model("caformer_m36", pretrained=pretrained, num_classes=num_classes)


# --arch name -> build(num_classes, pretrained): a classifier whose Linear head `head_path` finds (by its class in
# HEAD_PATHS, or its own `head_path` attribute). The one place an architecture is registered: --arch's choices,
# checkpoints and foreign weights' key checks all build from here.
ARCHS = {"resnet18": _torchvision_resnet("resnet18"), "resnet34": _torchvision_resnet("resnet34"),
         "resnet50": _torchvision_resnet("resnet50"), "caformer": _caformer}


def build_model(arch, num_classes=10, init="scratch"):
    """A 10-way (or `num_classes`) classifier; `init='imagenet'` loads pretrained weights."""
    if arch not in ARCHS:
        raise UsageError(f"unknown arch {arch!r}")
    pretrained = init == "imagenet"
    try:
        return ARCHS[arch](num_classes, pretrained)
    except (OSError, RuntimeError, ValueError) as err:
        if pretrained:
            raise UsageError(f"ImageNet weights for {arch} could not be had ({type(err).__name__}); "
                             f"connect once to cache them, or pass --init scratch") from None
        raise


def head_path(model):
    """Dotted name of the classifier head; a model may name its own with a `head_path` attribute."""
    path = getattr(model, "head_path", None) or HEAD_PATHS.get(type(model).__name__)
    if path is None:
        raise TypeError(f"no known classifier head for {type(model).__name__}")
    return path


def classifier_head(model):
    head = model.get_submodule(head_path(model))
    if not isinstance(head, nn.Linear):
        raise TypeError(f"{head_path(model)} of {type(model).__name__} is not a Linear layer")
    return head


def head_param_names(model):
    prefix = head_path(model) + "."
    return {name for name, _ in model.named_parameters() if name.startswith(prefix)}


def reinit_head(model, generator=None):
    """Fresh head as attackers and simulated fine-tuners make it: Xavier-uniform weights, zero bias."""
    fresh_linear_(classifier_head(model), generator)


@torch.no_grad()
def fresh_linear_(head, generator=None):
    """`head` (a Linear) drawn afresh in place: Xavier-uniform weights, zero bias."""
    fan_in, fan_out = head.weight.shape[1], head.weight.shape[0]
    bound = (6.0 / (fan_in + fan_out)) ** 0.5
    w = torch.rand(head.weight.shape, generator=generator) * (2 * bound) - bound
    head.weight.copy_(w.to(head.weight.device, head.weight.dtype))
    if head.bias is not None:
        head.bias.zero_()


@torch.no_grad()
def batchnorm_fed_layers(model, image_size):
    """[(layer, batchnorm)]: every BatchNorm whose input is the output of one convolution or linear layer,
    found by one forward pass (eval mode, zeros) rather than by module names, so a user's own model is read
    the same way. Scaling such a layer's weight and bias by f, and its BatchNorm's running mean by f and
    running variance by f^2, leaves the model's function unchanged (up to the BatchNorm's eps)."""
    produced, pairs = {}, []

    def record_output(layer, inputs, output):
        produced[id(output)] = (layer, output)  # the tensor is held, so its id is not reused during the pass

    def record_input(bn, inputs):
        if id(inputs[0]) in produced:
            pairs.append((produced[id(inputs[0])][0], bn))

    hooks = []
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            hooks.append(m.register_forward_hook(record_output))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            hooks.append(m.register_forward_pre_hook(record_input))
    was_training = model.training
    param = next(model.parameters())
    try:
        model.eval()
        model(torch.zeros(2, 3, image_size, image_size, device=param.device, dtype=param.dtype))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return pairs


@torch.no_grad()
def rescale_batchnorm_fed(model, image_size, factor=None, reference=None):
    """Rescale every BatchNorm-fed layer without changing what the model computes; returns the factors used.

    `factor`: every such layer's weight times `factor`. `reference` (a model of the same architecture)
    instead: each layer's weight brought to the root-mean-square of the reference's same layer, which undoes
    any earlier rescale (an attacker who renormalises before fine-tuning). The scale matters to fine-tuning
    though not to the function: an optimiser's step moves a weight k times larger k times less, relatively
    (SGD's, whose gradient also shrinks by k, k^2 times less)."""
    if (factor is None) == (reference is None):
        raise ValueError("give factor or reference, not both")
    pairs = batchnorm_fed_layers(model, image_size)
    if not pairs:
        raise UsageError(f"{type(model).__name__} has no layer that feeds a BatchNorm: nothing to rescale")
    if reference is None:
        factors = [float(factor)] * len(pairs)
    else:
        ref_pairs = batchnorm_fed_layers(reference, image_size)
        if [tuple(l.weight.shape) for l, _ in ref_pairs] != [tuple(l.weight.shape) for l, _ in pairs]:
            raise ValueError("the reference's BatchNorm-fed layers differ from the model's")
        factors = [(r.weight.pow(2).mean().sqrt() / l.weight.pow(2).mean().sqrt()).item()
                   for (l, _), (r, _) in zip(pairs, ref_pairs)]
    for (layer, bn), f in zip(pairs, factors):
        layer.weight.mul_(f)
        if layer.bias is not None:
            layer.bias.mul_(f)
        if bn.running_mean is not None:
            bn.running_mean.mul_(f)
            bn.running_var.mul_(f * f)
    return factors


def renormalized(state, arch, num_classes, image_size):
    """`state` (a state_dict of `arch`) with every BatchNorm-fed layer brought to the weight scale of a freshly
    built `arch`, the function unchanged: a step an attacker who knows the architecture can take before
    fine-tuning, so that a protection resting on an unusual weight scale is measured without it."""
    model = build_model(arch, num_classes)
    model.load_state_dict(state)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        reference = build_model(arch, num_classes)
    rescale_batchnorm_fed(model, image_size, reference=reference)
    return model.state_dict()
