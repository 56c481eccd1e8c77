"""Feature distillation: the student's intermediate feature maps matched to the teacher's.

The seed material's "feature distillation" beside logit distillation (FitNets, Romero
et al. 2015): at the end of each of VGG's five blocks (its max-pools) the student's
feature map, widened to the teacher's channels by a 1x1 convolution (an adapter,
trained with the student and then dropped), should equal the teacher's there:

    feature loss = mean over the blocks of MSE(adapter(student block), teacher block)

- `Hints`: forward hooks that keep a network's block outputs as it runs.
- `WithAdapters`: the student and its adapters as one module, so that the training
  loop (optimizer, Ctrl-C state, DistributedDataParallel) sees every parameter; in
  training mode it returns (logits, adapted block outputs), else the logits.
- `feature_loss()`: the loss above.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compress.cli import UserError


def block_ends(network: nn.Module) -> list[int]:
    """Indices in `network.features` of its max-pools: where each VGG block ends."""
    if not isinstance(getattr(network, "features", None), nn.Sequential):
        raise UserError("--feature-weight: needs a VGG student and teacher (their blocks are "
                        "matched), not a MobileNetV2")
    return [index for index, module in enumerate(network.features)
            if isinstance(module, nn.MaxPool2d)]


class Hints:
    """The outputs of `network`'s blocks in its last forward pass (`self.outputs`)."""

    def __init__(self, network: nn.Module):
        self.outputs: dict[int, torch.Tensor] = {}
        self.handles = [network.features[index].register_forward_hook(self._keeper(index))
                        for index in block_ends(network)]

    def _keeper(self, index):
        def keep(module, inputs, output):
            self.outputs[index] = output
        return keep

    def taken(self) -> list[torch.Tensor]:
        """The block outputs of the last pass, in order; forgotten here."""
        outputs = [self.outputs[index] for index in sorted(self.outputs)]
        self.outputs = {}
        return outputs

    def remove(self) -> None:
        """Stop keeping them."""
        for handle in self.handles:
            handle.remove()


class WithAdapters(nn.Module):
    """A VGG student with a 1x1 convolution per block from its widths to the teacher's."""

    def __init__(self, student: nn.Module, teacher: nn.Module):
        super().__init__()
        if len(block_ends(student)) != len(block_ends(teacher)):
            raise UserError("--feature-weight: the student and the teacher have different "
                            "numbers of blocks")
        self.student = student
        self.adapters = nn.ModuleList(
            nn.Conv2d(widths(student, index), widths(teacher, other), kernel_size=1)
            for index, other in zip(block_ends(student), block_ends(teacher)))
        self.hints = Hints(student)

    def forward(self, images: torch.Tensor):
        """Logits; in training mode also the adapted block outputs (see the module)."""
        logits = self.student(images)
        outputs = self.hints.taken()
        if not self.training:
            return logits
        return logits, [adapter(output) for adapter, output in zip(self.adapters, outputs)]


def widths(network: nn.Module, block_end: int) -> int:
    """The channels of `network`'s feature map at its max-pool `block_end`."""
    convolutions = [module for module in list(network.features)[:block_end]
                    if isinstance(module, nn.Conv2d)]
    return convolutions[-1].out_channels


def feature_loss(student_blocks: list[torch.Tensor],
                 teacher_blocks: list[torch.Tensor]) -> torch.Tensor:
    """The mean over the blocks of each one's mean squared difference."""
    return torch.stack([F.mse_loss(student.float(), teacher.float())
                        for student, teacher in zip(student_blocks, teacher_blocks)]).mean()
