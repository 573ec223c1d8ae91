"""Model registry and the one way to reach a classifier head."""
import torch
from torch import nn

from common.cli import UsageError

HEAD_PATHS = {"ResNet": "fc", "MetaFormer": "head.fc.fc2"}


def build_model(arch, num_classes=10, init="scratch"):
    """A 10-way (or `num_classes`) classifier; `init='imagenet'` loads pretrained weights."""
    pretrained = init == "imagenet"
    try:
        if arch in ("resnet18", "resnet34", "resnet50"):
            import torchvision
            model = getattr(torchvision.models, arch)(weights="IMAGENET1K_V1" if pretrained else None)
            model.fc = nn.Linear(model.fc.in_features, num_classes)
            return model
        if arch == "caformer":
            import timm
            return timm.create_model("caformer_m36", pretrained=pretrained, num_classes=num_classes)
    except (OSError, RuntimeError, ValueError) as err:
        if pretrained:
            raise UsageError(f"ImageNet weights for {arch} could not be had ({type(err).__name__}); "
                             f"connect once to cache them, or pass --init scratch") from None
        raise
    raise UsageError(f"unknown arch {arch!r}")


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


@torch.no_grad()
def reinit_head(model, generator=None):
    """Fresh head as attackers and simulated fine-tuners make it: Xavier-uniform weights, zero bias."""
    head = classifier_head(model)
    fan_in, fan_out = head.weight.shape[1], head.weight.shape[0]
    bound = (6.0 / (fan_in + fan_out)) ** 0.5
    w = torch.rand(head.weight.shape, generator=generator) * (2 * bound) - bound
    head.weight.copy_(w.to(head.weight.device, head.weight.dtype))
    if head.bias is not None:
        head.bias.zero_()
