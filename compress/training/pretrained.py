"""Starting from weights trained elsewhere: torchvision's ImageNet files, or a file of yours.

- `pretrained_weights()`: (state dict, normalisation, where from) of train.py's
  --pretrained imagenet|PATH. ImageNet's weights come through torchvision's weights
  API into torch's cache (downloaded once, the hash in the name checked), or from a
  file put there by hand where there is no network.
- `load_pretrained_weights()`: load them into a model.py VGG; classifier layers that
  do not fit start new, anything else that does not fit is named in one line.
"""
from __future__ import annotations

import http.client
import os
from collections.abc import Callable

import torch
import torchvision

import model as vgg
from compress.checkpoints import guess_normalization, is_state_dict, safe_load
from compress.cli import UserError
from compress.data.images import ORIGINAL_NORMALIZATION


def pretrained_weights(source: str, arch: str, batch_norm: bool) -> tuple[dict, dict, str]:
    """(state dict, normalisation, where from) of --pretrained imagenet|PATH."""
    if source != "imagenet":
        loaded = safe_load(source, "a torchvision VGG state dict or a checkpoint of this pipeline")
        if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):  # ours
            return (loaded["state_dict"], loaded.get("normalization", ORIGINAL_NORMALIZATION),
                    source)
        if not is_state_dict(loaded):
            raise UserError(f"{source}: not a state dict of tensors (a torchvision VGG .pth)")
        final = loaded.get("classifier.6.weight")
        return loaded, guess_normalization(len(final) if final is not None else 0), source
    # torchvision's weights API, and the folder torchvision caches its downloads in
    weights = torchvision.models.get_weight(
        f"{arch.upper()}{'_BN' if batch_norm else ''}_Weights.IMAGENET1K_V1")
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    if not os.path.isfile(cached):
        download(weights.url, cached)
    state_dict = safe_load(cached, f"torchvision's {weights}; delete it to download it again")
    if not is_state_dict(state_dict):
        raise UserError(f"{cached}: not a state dict of tensors; delete it to download it again")
    mean_std = weights.transforms()
    return (state_dict, {"mean": list(mean_std.mean), "std": list(mean_std.std)},
            f"torchvision's {weights}")


def download(url: str, path: str) -> None:
    """Fetch `url` into `path` as torch.hub does (checking the hash in its name), or say why not."""
    print(f"Downloading {url} into {path} ...", flush=True)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    prefix = torch.hub.HASH_REGEX.search(os.path.basename(path))
    try:
        torch.hub.download_url_to_file(url, path, hash_prefix=prefix and prefix.group(1))
    except (OSError, RuntimeError, http.client.HTTPException) as error:
        # no network (URLError), a page instead of the file (a hash mismatch), a cut download
        reason = getattr(error, "reason", None) or error
        raise UserError(f"--pretrained imagenet: {os.path.basename(path)} is not in torch's "
                        f"cache and could not be downloaded ({reason}); put {url} into "
                        f"{os.path.dirname(path)}, or give --pretrained PATH") from None


def load_pretrained_weights(model: torch.nn.Module, state_dict: dict, source: str, arch: str,
                            batch_norm: bool, say: Callable = print) -> None:
    """Load `state_dict` (from `source`) into `model`: a UserError naming what does not fit,
    else one line to `say` on what starts new."""
    try:
        new = vgg.load_pretrained(model, state_dict)
    except (ValueError, AttributeError) as error:
        raise UserError(f"{source}: {error}{architecture_hint(state_dict, arch, batch_norm)}") \
            from None
    layers = sorted({name.rsplit(".", 1)[0] for name in new})
    say(f"Starting from {source}" + (f"; new {', '.join(layers)} (not in those weights, or "
                                       "of another shape)" if layers else ""))


def architecture_hint(state_dict: dict, arch: str, batch_norm: bool) -> str:
    """' (they are a vgg19 with batch norm: ...)' when the weights are of another VGG."""
    try:
        theirs = vgg.architecture_from_state_dict(state_dict)
    except (ValueError, AttributeError, TypeError):
        return ""
    if (theirs["arch"], theirs["batch_norm"]) == (arch, batch_norm):
        return ""
    flags = f"--arch {theirs['arch']}" + (" --batch-norm" if theirs["batch_norm"] else "")
    return f" (they are a {theirs['arch']}{' with batch norm' if theirs['batch_norm'] else ''}: " \
           f"add {flags})"
