"""What the pipeline keeps on disk, and how it is written and read back safely.

A checkpoint is a plain dict (`Checkpoint`) -- `format`, `kind` (dense, pruned or
finetuned), `architecture` (model.py's widths), `state_dict`, `class_names`,
`image_size`, `normalization`, `metrics` -- written atomically (`atomic_save`) and read with
`torch.load(weights_only=True)` (`safe_load`), so loading never runs code. A bare
VGG state dict (the original demo's vgg16Net.pth, torchvision's ImageNet files)
is read as one (`checkpoint_from_state_dict`), torch.nn.utils.prune's masks applied if it
was saved with them (`fold_masks`). `check_made_for()` refuses a
checkpoint used with other pictures than it was made for. JSON reports are
written atomically too (`write_json`).
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import typing
from collections.abc import Callable

import torch

import model as vgg
from compress.cli import UserError
from compress.data.images import IMAGENET_NORMALIZATION, ORIGINAL_NORMALIZATION
from compress.machine.resources import disk_full, free_bytes

CHECKPOINT_FORMAT = "vgg-prune-distill/1"


class Checkpoint(typing.TypedDict):
    """A checkpoint as it is on disk and in memory: plain data and tensors, no pickled code.

    Args:
        format: CHECKPOINT_FORMAT.
        kind: "dense" (train.py), "pruned" (pruner.py), "finetuned" (distilled), or "new"
            (a MobileNetV2 student before its distillation).
        architecture: model.py's description: arch, batch_norm, num_classes, and for a VGG
            its layer widths (features, classifier); model.from_architecture() rebuilds it.
        state_dict: the weights, on the CPU.
        class_names: by output index.
        image_size: the square size the model was made for.
        normalization: {"mean": [...], "std": [...]} the pictures are normalised with.
        metrics: what made it: figures, the recipe and distillation settings (saved whole).
    """
    format: str
    kind: str
    architecture: vgg.Architecture
    state_dict: dict[str, torch.Tensor]
    class_names: list[str]
    image_size: int
    normalization: dict[str, list[float]]
    metrics: dict


def atomic_write(path: str, write: Callable, mode: str = "wb",
                 needed: float | None = None) -> None:
    """Call `write(file)` on a temporary file beside `path`, then rename it to `path`:
    neither a reader nor a crash ever sees half a file, and a failed write leaves the
    previous file as it was. A full disk is a DiskFull naming `path`, what it needed
    (`needed` bytes if known) and what was free."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temporary = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    kept = "the file there is as it was" if os.path.exists(path) else "no file was left there"
    free = free_bytes(path)
    try:
        with disk_full(path, needed, kept, written=temporary, free=free):
            with open(temporary, mode) as file:
                write(file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def atomic_save(obj: object, path: str) -> None:
    """torch.save, atomically (see atomic_write)."""
    atomic_write(path, lambda file: torch.save(obj, file), needed=saved_bytes(obj))


def saved_bytes(obj: object) -> int:
    """About how many bytes torch.save writes for `obj`: its tensors' (each storage once),
    plus a little for the rest."""
    storages = {}

    def visit(value):
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)
    visit(obj)
    return sum(storages.values()) + 64 * 1024 + 1024 * len(storages)


def write_json(obj: object, path: str) -> None:
    """JSON (a history, a report), atomically (see atomic_write)."""
    atomic_write(path, lambda file: json.dump(obj, file, indent=1), mode="w")


def output_path(checkpoint_path: str, suffix: str) -> str:
    """Files that belong to a checkpoint sit beside it: vgg16Net.pth -> vgg16Net.<suffix>
    (an exported model keeps its extension, x.onnx -> x.onnx.<suffix>: x.pth has x.<suffix>)."""
    stem = checkpoint_path if checkpoint_path.endswith(".onnx") else \
        os.path.splitext(checkpoint_path)[0]
    return stem + "." + suffix


def file_sha256(path: str) -> str:
    """The hex SHA-256 of a file's bytes (read in 1 MB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(2 ** 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_checkpoint_file(path: str) -> bool:
    """Whether `path` holds a checkpoint of this pipeline (read memory-mapped: the format
    field, without reading the weights)."""
    try:
        existing = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return isinstance(existing, dict) and existing.get("format") == CHECKPOINT_FORMAT
    except Exception:  # a pickle, another format, garbage: not ours either way
        return False


def check_replaceable(path: str, flag: str = "--output",
                      ours: Callable[[str], bool] = is_checkpoint_file,
                      what: str = "is not a checkpoint of this pipeline (the original demo's "
                                  "model?)") -> None:
    """Refuse, before any work, to overwrite a file the pipeline did not write (the original
    demo's model of the same name, say): `ours(path)` tells, `what` says what it is not."""
    if os.path.exists(path) and not ours(path):
        raise UserError(f"{path}: exists and {what}; refusing to overwrite it: give another "
                        f"{flag}, or move it first")


def make_checkpoint(model: torch.nn.Module, kind: str, arch: str, class_names: list[str],
                    image_size: int, normalization: dict, metrics: dict) -> Checkpoint:
    """The plain dict a checkpoint is (see the module's docstring)."""
    return {"format": CHECKPOINT_FORMAT, "kind": kind,
            "architecture": vgg.architecture_of(model, arch),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "class_names": list(class_names), "image_size": int(image_size),
            "normalization": normalization, "metrics": metrics}


def safe_load(path: str, what: str) -> object:
    """torch.load with weights_only=True, turning every failure into a UserError."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: file not found ({what} expected)")
    if os.path.getsize(path) == 0:
        raise UserError(f"{path}: file is empty ({what} expected)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Unsupported global" in str(error) or "GLOBAL" in str(error):
            raise UserError(f"{path}: refused to load: it holds pickled Python objects (for "
                            "example a whole saved nn.Module), and unpickling them can run code; "
                            "only plain tensors and data are loaded (weights_only=True); "
                            f"{what} expected ({conversion_hint(path)})") from None
        raise UserError(f"{path}: not a readable PyTorch file, truncated or corrupt; "
                        f"{what} expected") from None
    except Exception as error:  # torch's unpickler raises many types on garbage bytes
        raise UserError(f"{path}: not a readable PyTorch file, truncated or corrupt "
                        f"({type(error).__name__}); {what} expected") from None


def conversion_hint(path: str) -> str:
    """What to type for a whole pickled model, such as the original demo saved."""
    plain = output_path(path, "plain.pth")
    if os.path.isfile(plain):
        return f"its conversion {plain} is there: give that file instead"
    kind = " --kind finetuned" if "finetuned" in os.path.basename(path) else ""
    return (f"a model the original demo saved converts with: python tools/import_original.py "
            f"{path} --trust{kind}")


def load_checkpoint(path: str, kinds: tuple[str, ...] = ("dense", "pruned", "finetuned"),
                    image_size: int | None = None) -> Checkpoint:
    """Load and check a pipeline checkpoint; `kinds` are the kinds this stage accepts.

    A bare VGG state dict is read as a checkpoint for `image_size` px (224 if None).
    torch.nn.utils.prune's `NAME_orig` / `NAME_mask` pairs, in a bare state dict or in
    one of our checkpoints, are folded into their weights (fold_masks), and the metrics
    say the weights were pruned one by one ("unstructured"), so a distillation keeps the
    zeros.
    """
    what = f"a {' or '.join(kinds)} checkpoint written by this pipeline"
    checkpoint = safe_load(path, what)
    if is_state_dict(checkpoint):
        checkpoint = checkpoint_from_state_dict(checkpoint, path, image_size)
    elif not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: not a checkpoint of this pipeline; {what} expected")
    if checkpoint["kind"] not in kinds:
        raise UserError(f"{path}: is a {checkpoint['kind']} checkpoint; {what} expected")
    checkpoint.setdefault("normalization", ORIGINAL_NORMALIZATION)  # written before it was kept
    masks = [value for key, value in checkpoint["state_dict"].items() if key.endswith("_mask")]
    if masks:  # (our checkpoint, its model pruned by someone's own torch.nn.utils.prune code)
        checkpoint["state_dict"] = fold_masks(checkpoint["state_dict"], path)
        zeros = sum(int((mask == 0).sum()) for mask in masks) / sum(m.numel() for m in masks)
        checkpoint["metrics"].setdefault("unstructured", {
            "method": "torch.nn.utils.prune masks", "sparsity": None, "global": None,
            "zeros": {"all": zeros}})
    return checkpoint


def is_state_dict(obj: object) -> bool:
    """Whether `obj` is a bare state dict (names to tensors)."""
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in obj.items())


def fold_masks(state_dict: dict, path: str) -> dict:
    """`state_dict` with each `NAME_orig` / `NAME_mask` pair (torch.nn.utils.prune's, before
    prune.remove) replaced by `NAME` = orig x mask; a mask without its weight, or of
    another shape, or not of 0s and 1s, is a UserError naming it."""
    folded = {}
    for key, value in state_dict.items():
        if key.endswith("_orig"):
            continue
        if not key.endswith("_mask"):
            folded[key] = value
            continue
        name = key[:-len("_mask")]
        original = state_dict.get(name + "_orig")
        if original is None:
            raise UserError(f"{path}: {key} is a torch.nn.utils.prune mask without its "
                            f"{name}_orig")
        if original.shape != value.shape:
            raise UserError(f"{path}: {key} has shape {list(value.shape)}, but {name}_orig "
                            f"has {list(original.shape)}; the mask must match its weights")
        if not bool(((value == 0) | (value == 1)).all()):
            raise UserError(f"{path}: {key} holds values other than 0 and 1: not a pruning mask")
        folded[name] = original * value
    for key in state_dict:
        if key.endswith("_orig") and key[:-len("_orig")] not in folded:
            raise UserError(f"{path}: {key} has no {key[:-len('_orig')]}_mask beside it")
    return folded


def checkpoint_from_state_dict(state_dict: dict, path: str, image_size: int | None = None,
                               say: Callable = print) -> Checkpoint:
    """A bare VGG state dict (torchvision's keys) as a checkpoint of this pipeline.

    The architecture is read from its tensor shapes (dense if its convolutions have
    the standard widths, else pruned), the classes from class_indices.json beside
    it (else class_0..N), the image size is `image_size` or 224. Normalised as the
    original demo did, or as ImageNet for torchvision's 1000-class weights. How it
    was read is told in one line, to `say`. Saved with torch.nn.utils.prune's masks, it is
    a pruned model: the masks applied (fold_masks), its metrics' "unstructured" says so,
    and a distillation keeps its zeros (pruning/weights.py).
    """
    masks = [value for key, value in state_dict.items() if key.endswith("_mask")]
    state_dict = fold_masks(state_dict, path)
    try:
        architecture = vgg.architecture_from_state_dict(state_dict)
    except ValueError as error:
        raise UserError(f"{path}: a bare state dict, but not of a VGG this pipeline can "
                        f"rebuild: {error}") from None
    state_dict = vgg.with_batch_counters(state_dict)
    count = architecture["num_classes"]
    index = os.path.join(os.path.dirname(path), "class_indices.json")
    class_names = read_class_index(index)
    if class_names is not None and len(class_names) == count:
        classes = f"from {index}"
    else:
        classes = (f"named class_0..class_{count - 1} ("
                   + ("no class_indices.json beside it)" if class_names is None else
                      f"{index} names {len(class_names)} classes, the model has {count})"))
        class_names = [f"class_{i}" for i in range(count)]
    normalization = guess_normalization(count)
    dense = architecture["features"] == vgg.CONV_WIDTHS[architecture["arch"]] and not masks
    metrics = {}
    if masks:
        zeros = sum(int((mask == 0).sum()) for mask in masks) / sum(m.numel() for m in masks)
        metrics["unstructured"] = {"method": "torch.nn.utils.prune masks", "sparsity": None,
                                   "global": None, "zeros": {"all": zeros}}
    image_size = image_size or 224
    say(f"{path}: a bare {architecture['arch']}{'_bn' if architecture['batch_norm'] else ''} "
          "state dict" + (f" with torch.nn.utils.prune's masks (applied: {zeros:.1%} of the "
                          "masked weights zero)" if masks else "")
          + f", read as a {'dense' if dense else 'pruned'} model for {image_size} px "
          f"with {'ImageNet' if normalization == IMAGENET_NORMALIZATION else 'the original demo'}"
          f"'s normalisation; classes {classes}")
    return {"format": CHECKPOINT_FORMAT, "kind": "dense" if dense else "pruned",
            "architecture": architecture, "state_dict": state_dict, "class_names": class_names,
            "image_size": image_size, "normalization": normalization, "metrics": metrics}


def guess_normalization(num_classes: int) -> dict:
    """A bare state dict does not say how its pictures were normalised: as for ImageNet
    if it has ImageNet's 1000 classes (torchvision's weights), else as the original demo."""
    return IMAGENET_NORMALIZATION if num_classes == 1000 else ORIGINAL_NORMALIZATION


def read_class_index(path: str) -> list[str] | None:
    """The class names of class_indices.json ({"0": "cat", "1": "dog", ...}) in index order;
    None if there is no such file."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as file:
            index = json.load(file)
        return [str(index[str(i)]) for i in range(len(index))]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f'{path}: expected {{"0": name, "1": name, ...}}, one entry per '
                        "class; fix it or remove it") from None


def check_class_index(path: str, class_names: list[str]) -> None:
    """Refuse, before training, to overwrite a class index that names other classes (the
    one beside the original demo's model, say)."""
    existing = read_class_index(path)
    if existing is not None and existing != list(class_names):
        raise UserError(f"{path}: exists and names other classes {existing} than "
                        f"{list(class_names)}; refusing to overwrite it: give another "
                        "--class-index, or move it first")


def model_from_checkpoint(checkpoint: Checkpoint, path: str) -> torch.nn.Module:
    """The model a checkpoint describes, rebuilt by model.py with its weights loaded."""
    model = vgg.from_architecture(checkpoint["architecture"])
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError:
        raise UserError(f"{path}: weights do not match the architecture stored with them") from None
    return model


def check_made_for(checkpoint: Checkpoint, path: str, asked_by: str, image_size: int | None = None,
                   class_names: list[str] | None = None, normalization: dict | None = None) -> None:
    """Refuse to use a checkpoint at another image size, on other classes or with other
    normalisation than its own.

    `asked_by` names what asks for them (a flag, another checkpoint, a data folder);
    None leaves that property unchecked.
    """
    if image_size and image_size != checkpoint["image_size"]:
        hint = (" (leave --image-size out to use the checkpoint's)"
                if asked_by.startswith("--") else "")
        raise UserError(f"{path}: made for {checkpoint['image_size']} px images, but {asked_by} "
                        f"asks for {image_size} px{hint}")
    if class_names is not None and list(class_names) != list(checkpoint["class_names"]):
        raise UserError(f"{path}: made for classes {list(checkpoint['class_names'])}, but "
                        f"{asked_by} has {list(class_names)}")
    if normalization is not None and normalization != checkpoint["normalization"]:
        raise UserError(f"{path}: made for pictures normalised with {checkpoint['normalization']}, "
                        f"but {asked_by} uses {normalization}")
