"""Network slimming's sparsity term (train.py --bn-sparsity): the batch-norm scales pushed
towards zero, so pruner.py --method slim --global removes the channels they switch off.
"""
from __future__ import annotations

import torch

NEAR_ZERO = 1e-2  # a batch-norm scale this small all but switches its channel off


def batch_norm_scales(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The scales (gamma) of every BatchNorm2d: network slimming's channel importances."""
    return [m.weight for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]


def scale_sparsity(scales: list[torch.Tensor], bn_sparsity: float) -> dict:
    """The sparsity penalty now and how many of the scales are near zero."""
    magnitudes = torch.cat([scale.detach().abs().flatten() for scale in scales])
    return {"bn_penalty": bn_sparsity * magnitudes.sum().item(),
            "bn_scales_near_zero": int((magnitudes < NEAR_ZERO).sum())}
