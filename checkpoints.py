"""What the pipeline keeps on disk, and how it is written and read back safely.

A checkpoint is a plain dict -- `format`, `kind` (dense, pruned or finetuned),
`architecture` (model.py's widths), `state_dict`, `class_names`, `image_size`,
`metrics` -- written atomically (`atomic_save`) and read with
`torch.load(weights_only=True)` (`safe_load`), so loading never runs code.
`check_made_for()` refuses a checkpoint used with other pictures than it was
made for. JSON reports are written atomically too (`write_json`).
"""
import hashlib
import json
import os
import pickle

import torch

import model as vgg
from cli import UserError

CHECKPOINT_FORMAT = "vgg-prune-distill/1"


def atomic_write(path, write, mode="wb"):
    """Call `write(file)` on a temporary file beside `path`, then rename it to `path`:
    neither a reader nor a crash ever sees half a file, and a failed write leaves the
    previous file as it was."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temporary = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(temporary, mode) as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def atomic_save(obj, path):
    """torch.save, atomically (see atomic_write)."""
    atomic_write(path, lambda file: torch.save(obj, file))


def write_json(obj, path):
    """JSON (a history, a report), atomically (see atomic_write)."""
    atomic_write(path, lambda file: json.dump(obj, file, indent=1), mode="w")


def output_path(checkpoint_path, suffix):
    """Files that belong to a checkpoint sit beside it: vgg16Net.pth -> vgg16Net.<suffix>."""
    return os.path.splitext(checkpoint_path)[0] + "." + suffix


def file_sha256(path):
    """The hex SHA-256 of a file's bytes (read in 1 MB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(2 ** 20), b""):
            digest.update(block)
    return digest.hexdigest()


def make_checkpoint(model, kind, arch, class_names, image_size, metrics):
    return {"format": CHECKPOINT_FORMAT, "kind": kind,
            "architecture": vgg.architecture_of(model, arch),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "class_names": list(class_names), "image_size": int(image_size),
            "metrics": metrics}


def safe_load(path, what):
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
                            f"{what} expected") from None
        raise UserError(f"{path}: not a readable PyTorch file, truncated or corrupt; "
                        f"{what} expected") from None
    except Exception as error:  # torch's unpickler raises many types on garbage bytes
        raise UserError(f"{path}: not a readable PyTorch file, truncated or corrupt "
                        f"({type(error).__name__}); {what} expected") from None


def load_checkpoint(path, kinds=("dense", "pruned", "finetuned")):
    """Load and check a pipeline checkpoint; `kinds` are the kinds this stage accepts."""
    what = f"a {' or '.join(kinds)} checkpoint written by this pipeline"
    checkpoint = safe_load(path, what)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        hint = " (it looks like a bare state dict)" if isinstance(checkpoint, dict) else ""
        raise UserError(f"{path}: not a checkpoint of this pipeline{hint}; {what} expected")
    if checkpoint["kind"] not in kinds:
        raise UserError(f"{path}: is a {checkpoint['kind']} checkpoint; {what} expected")
    return checkpoint


def model_from_checkpoint(checkpoint, path):
    """The model a checkpoint describes, rebuilt by model.py with its weights loaded."""
    model = vgg.from_architecture(checkpoint["architecture"])
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError:
        raise UserError(f"{path}: weights do not match the architecture stored with them") from None
    return model


def check_made_for(checkpoint, path, asked_by, image_size=None, class_names=None):
    """Refuse to use a checkpoint at another image size or on other classes than its own.

    `asked_by` names what asks for them (a flag, another checkpoint, a data folder);
    None leaves that property unchecked.
    """
    if image_size and image_size != checkpoint["image_size"]:
        hint = " (leave --image-size out to use the checkpoint's)" if asked_by.startswith("--") else ""
        raise UserError(f"{path}: made for {checkpoint['image_size']} px images, but {asked_by} "
                        f"asks for {image_size} px{hint}")
    if class_names is not None and list(class_names) != list(checkpoint["class_names"]):
        raise UserError(f"{path}: made for classes {list(checkpoint['class_names'])}, but "
                        f"{asked_by} has {list(class_names)}")
