"""Weight-level (unstructured) pruning with torch.nn.utils.prune: single weights set to zero.

Channel pruning (channels.py) removes whole filters, so the layers really get smaller.
Pruning single weights leaves every layer its shape and only zeroes values: dense
kernels do not run faster on zeros, but a file of zeros compresses (Deep Compression's
VGG-16: 552 MB to 11.3 MB by pruning, quantisation and coding).

- `UNSTRUCTURED`: the methods (torch.nn.utils.prune's L1Unstructured, RandomUnstructured).
- `prune_weights()`: zeroes that share of the weights of every convolution and hidden
  Linear layer (or, `global_ranking`, of them all together: global_unstructured), and
  makes the masks permanent (prune.remove), so the model holds plain weights again.
- `prune_weights_checkpoint()`: a checkpoint in (dense, or channel-pruned before), the
  same layers with zeros out; its metrics record how ("unstructured"), so that a
  distillation keeps them (distillation.py calls `keep_zeros()`).
- `zero_shares()`: the share of each of those layers' weights that is zero.
- `keep_zeros()`: a training run (distillation) that must not bring them back re-zeroes
  them after every optimizer step.
- A state dict saved by someone's own torch.nn.utils.prune code (`weight_orig` and
  `weight_mask`) is read as plain weights, the mask applied, by checkpoints.load_checkpoint
  (`fold_masks()`).
- `compressed_bytes()`: a file's size once compressed (zlib at zip's default level).
"""
from __future__ import annotations

import zlib

import torch
from torch.nn.utils import prune as torch_prune

from compress.checkpoints import Checkpoint, make_checkpoint, model_from_checkpoint

# a model with this share of zero weights or more had single weights pruned: its reports
# give its size compressed too. Measured on a trained dense VGG16-BN (the flowers teacher
# after 3 epochs): 0.0% of its fp32 weights are zero, 2.5% of its int8 file's (7-bit
# weights round the smallest to zero)
ZEROS_WORTH_ZIPPING = 0.10

UNSTRUCTURED = {
    "l1-unstructured": (torch_prune.L1Unstructured, "the weights of smallest magnitude, one by one "
                        "(torch.nn.utils.prune; layers keep their shape)"),
    "random-unstructured": (torch_prune.RandomUnstructured, "weights chosen at random, one by one "
                            "(a baseline for l1-unstructured)"),
}


def weight_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """{name: module} of the layers whose weights are pruned: every convolution and every
    Linear layer but the last (the classifier keeps each class's weights)."""
    layers = {name: module for name, module in model.named_modules()
              if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear))}
    linears = [name for name, module in layers.items() if isinstance(module, torch.nn.Linear)]
    del layers[linears[-1]]
    return layers


def prune_weights(model: torch.nn.Module, method: str, sparsity: float,
                  global_ranking: bool = False, seed: int = 0) -> dict[str, float]:
    """Zero `sparsity` of the weights of each layer of weight_layers() (or of all of them
    together) in place, by `method` (a key of UNSTRUCTURED); returns zero_shares()."""
    pruning_method = UNSTRUCTURED[method][0]
    layers = weight_layers(model)
    torch.manual_seed(seed)  # random-unstructured draws its weights from torch's stream
    if global_ranking:
        torch_prune.global_unstructured([(module, "weight") for module in layers.values()],
                                        pruning_method=pruning_method, amount=sparsity)
    else:
        for module in layers.values():
            pruning_method.apply(module, "weight", amount=sparsity)
    for module in layers.values():
        torch_prune.remove(module, "weight")
    return zero_shares(model)


def prune_weights_checkpoint(checkpoint: Checkpoint, path: str, *, method: str, sparsity: float,
                             global_ranking: bool = False, seed: int = 0) -> Checkpoint:
    """`checkpoint` (read from `path`) with single weights pruned by prune_weights(); kind
    "pruned", its metrics "unstructured" (the method, sparsity, global and the zero shares)
    beside, for a checkpoint pruned before, the metrics it had (a dense one's recipe and
    figures are not this model's: only its accuracy and path are kept, as channels.py does)."""
    model = model_from_checkpoint(checkpoint, path)
    zeros = prune_weights(model, method, sparsity, global_ranking, seed)
    unstructured = {"method": method, "sparsity": sparsity, "global": global_ranking,
                    "zeros": zeros}
    metrics = dict(checkpoint["metrics"]) if checkpoint["kind"] != "dense" else {
        "method": method, "global": global_ranking, "sparsity": sparsity,
        "dense_val_accuracy": checkpoint["metrics"].get("val_accuracy"), "dense_weights": path}
    metrics["unstructured"] = unstructured
    return make_checkpoint(model, "pruned", checkpoint["architecture"]["arch"],
                           checkpoint["class_names"], checkpoint["image_size"],
                           checkpoint["normalization"], metrics)


def zero_shares(model: torch.nn.Module) -> dict[str, float]:
    """{layer name: the share of its weights that is exactly zero} for weight_layers(), and
    "all": the share over them together."""
    shares, zeros, total = {}, 0, 0
    for name, module in weight_layers(model).items():
        weight = module.weight.detach()
        count = int((weight == 0).sum())
        shares[name] = count / weight.numel()
        zeros, total = zeros + count, total + weight.numel()
    shares["all"] = zeros / total
    return shares


def keep_zeros(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Keep the weights of `model` that are zero now at zero through training: after every
    step of `optimizer`, each is set to zero again (the plain weights stay what is saved)."""
    masks = [(module.weight, module.weight.detach() != 0)
             for module in weight_layers(model).values()]

    def re_zero(optimizer, args, kwargs):
        with torch.no_grad():
            for weight, kept in masks:
                weight.mul_(kept)
    optimizer.register_step_post_hook(re_zero)


def compressed_bytes(path: str) -> int:
    """The size of the file at `path` compressed by zlib at level 6 (what zip's deflate gives
    by default)."""
    compressor = zlib.compressobj(6)
    size = 0
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(2 ** 22), b""):
            size += len(compressor.compress(block))
    return size + len(compressor.flush())
