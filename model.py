"""The one VGG definition every stage uses (and the light student it is weighed against).

A VGG is described by plain data -- its architecture dict:

    {"arch": "vgg16", "batch_norm": False, "num_classes": 2,
     "features": [64, 64, "M", 128, ...],   # conv widths, "M" = max-pool
     "classifier": [4096, 4096]}             # hidden Linear widths

A pruned VGG is the same class built from narrower widths, so every checkpoint
stores this dict beside its state dict and is rebuilt with `from_architecture()`;
no module is ever pickled. Parameter names match torchvision's VGG
(`features.N.*`, `classifier.0/3/6.*`), so ImageNet weights saved by torchvision
load from a local file with `load_pretrained()`.

knowledge_distillation.py --student-arch mobilenet_v2 distils into torchvision's
MobileNetV2 instead, described as {"arch": "mobilenet_v2", "batch_norm": True,
"num_classes": 2}: it has no widths to store, as it is never pruned.
"""
import re
import typing

import torch
import torchvision
from torch import nn

MOBILENET_V2 = "mobilenet_v2"


class Architecture(typing.TypedDict, total=False):
    """A model as plain data (what a checkpoint stores beside its weights): "arch" (vgg11..19
    or mobilenet_v2), "batch_norm", "num_classes", and for a VGG its widths: "features"
    (each convolution's output channels, "M" a max-pool) and "classifier" (the two hidden
    Linear layers'). A plain dict, so that torch.load(weights_only=True) reads it."""
    arch: str
    batch_norm: bool
    num_classes: int
    features: list
    classifier: list

CONV_WIDTHS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
}
POOLED_SIZE = 7  # adaptive pooling to 7x7 lets any input size reach the classifier


class VGG(nn.Module):
    def __init__(self, features, classifier, num_classes, batch_norm=False, dropout=0.5):
        super().__init__()
        layers, in_channels = [], 3
        for width in features:
            if width == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            layers.append(nn.Conv2d(in_channels, width, kernel_size=3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(width))
            layers.append(nn.ReLU(inplace=True))
            in_channels = width
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((POOLED_SIZE, POOLED_SIZE))
        hidden1, hidden2 = classifier
        self.classifier = nn.Sequential(
            nn.Linear(in_channels * POOLED_SIZE * POOLED_SIZE, hidden1),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden1, hidden2),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden2, num_classes),
        )
        self._init_weights()

    def _init_weights(self):
        # torchvision's initialisation, so a model trained here behaves like theirs
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x):
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def build_model(arch="vgg16", num_classes=2, batch_norm=False, classifier_width=4096):
    """A dense VGG of the standard conv widths.

    `classifier_width`: units of each hidden Linear layer (VGG's 4096). The first
    takes 512*7*7 inputs, so at 4096 it holds 103M of VGG16's 134M parameters; a
    narrower head (CIFAR-style VGGs use 512) suits small pictures and few classes.
    """
    if arch not in CONV_WIDTHS:
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(CONV_WIDTHS)}")
    return from_architecture({"arch": arch, "batch_norm": batch_norm, "num_classes": num_classes,
                              "features": CONV_WIDTHS[arch],
                              "classifier": [classifier_width, classifier_width]})


def from_architecture(architecture: Architecture) -> nn.Module:
    if architecture["arch"] == MOBILENET_V2:
        return torchvision.models.mobilenet_v2(num_classes=architecture["num_classes"])
    return VGG(list(architecture["features"]), list(architecture["classifier"]),
               architecture["num_classes"], architecture["batch_norm"])


def architecture_of(model, arch):
    """Read the widths a (possibly pruned) model really has, as plain data."""
    if arch == MOBILENET_V2:
        return {"arch": arch, "batch_norm": True,
                "num_classes": model.classifier[-1].out_features}
    features = []
    for module in model.features:
        if isinstance(module, nn.MaxPool2d):
            features.append("M")
        elif isinstance(module, nn.Conv2d):
            features.append(module.out_channels)
    linears = [m for m in model.classifier if isinstance(m, nn.Linear)]
    return {"arch": arch,
            "batch_norm": any(isinstance(m, nn.BatchNorm2d) for m in model.features),
            "num_classes": linears[-1].out_features,
            "features": features,
            "classifier": [linears[0].out_features, linears[1].out_features]}


# BatchNorm's count of batches seen: missing from state dicts saved before PyTorch 0.4,
# such as torchvision's vgg*_bn ImageNet files; it plays no part in the outputs
BATCH_COUNTER = ".num_batches_tracked"


def architecture_from_state_dict(state_dict):
    """The architecture of a bare VGG state dict (torchvision's keys), read from its tensor
    shapes: which VGG by its number of convolutions, batch norm by its running means, the
    widths of every layer. ValueError, naming a tensor, if it is not such a state dict."""
    conv_widths = sorted((int(match[1]), tensor.shape[0]) for key, tensor in state_dict.items()
                         if (match := re.fullmatch(r"features\.(\d+)\.weight", key))
                         and tensor.dim() == 4)
    by_depth = {len([w for w in widths if w != "M"]): name for name, widths in CONV_WIDTHS.items()}
    arch = by_depth.get(len(conv_widths))
    if arch is None:
        raise ValueError(f"{len(conv_widths)} convolution weights under features.*, where "
                         "VGG11/13/16/19 have 8/10/13/16")
    try:
        hidden1, hidden2, num_classes = (state_dict[f"classifier.{i}.weight"].shape[0]
                                         for i in (0, 3, 6))
    except (KeyError, AttributeError, IndexError):
        raise ValueError("no classifier.0/3/6.weight (VGG's three Linear layers)") from None
    widths = iter(width for _, width in conv_widths)
    architecture = {"arch": arch,
                    "batch_norm": any(key.endswith("running_mean") for key in state_dict),
                    "num_classes": num_classes,
                    "features": [w if w == "M" else next(widths) for w in CONV_WIDTHS[arch]],
                    "classifier": [hidden1, hidden2]}
    with torch.device("meta"):  # shapes only
        expected = from_architecture(architecture).state_dict()
    problems = [f"{name} is missing" for name in expected
                if name not in state_dict and not name.endswith(BATCH_COUNTER)]
    problems += [f"{name} is not a VGG tensor" for name in state_dict if name not in expected]
    problems += [f"{name} has shape {tuple(state_dict[name].shape)}, not {tuple(tensor.shape)}"
                 for name, tensor in expected.items()
                 if name in state_dict and state_dict[name].shape != tensor.shape]
    if problems:
        raise ValueError(f"its tensors do not fit a {arch} of the widths they suggest "
                         f"({problems[0]})")
    return architecture


def with_batch_counters(state_dict):
    """`state_dict` with a zero BatchNorm batch counter wherever an old file has none."""
    counters = {key[:-len("running_mean")] + BATCH_COUNTER[1:]: torch.tensor(0)
                for key in state_dict if key.endswith(".running_mean")}
    return {**counters, **state_dict}


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def load_pretrained(model, state_dict):
    """Load torchvision VGG weights (e.g. ImageNet) into `model`.

    Every features.* tensor must be there, of the same shape. A classifier tensor
    that is missing or of another shape (the final layer for another number of
    classes, hidden layers of another classifier width) keeps `model`'s own
    initialisation. Returns the names of the tensors that were not loaded.
    """
    own = model.state_dict()

    def fits(name):
        return name in state_dict and tuple(state_dict[name].shape) == tuple(own[name].shape)

    unfit = [name for name in own if not name.startswith("classifier.")
             and not name.endswith(BATCH_COUNTER) and not fits(name)]
    if unfit:
        raise ValueError(f"weights do not fit this {len(own)}-tensor model "
                         f"(e.g. {', '.join(unfit[:3])})")
    model.load_state_dict({name: state_dict[name] if fits(name) else tensor
                           for name, tensor in own.items()})
    return [name for name in own if not fits(name) and not name.endswith(BATCH_COUNTER)]
