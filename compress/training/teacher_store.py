"""The teacher's answers, kept: its logits for each training picture of each epoch, computed once.

A distillation's training pictures are drawn per (seed, epoch, index)
(data.ImageFolder, EpochSampler): epoch e of one student shows the teacher exactly the
crop that epoch e of another student does. So the teacher's logits are computed once
and read back, with no approximation (the teacher runs in eval mode, so a picture's
logits do not depend on the batch around it).

- `store_key()`: everything that decides the logits -- the teacher file's SHA-256, the
  training pictures (each file's name, size and modification time), the seed, image
  size, crop scale, --mix, normalisation, --cache, --amp and the kind of device.
- `TeacherStore`: the logits of one key, in a file written atomically (4 bytes a class
  per picture and epoch: 29 KB for the demo's 5 epochs); `logits()` answers a batch,
  running the teacher only on the pictures it has not seen. A file of another key is
  refused in one line (never used for another teacher or other pictures); a file that
  cannot be read (cut short by a kill, or damaged) is said in one line and rebuilt, not
  trusted; a file that is not a store at all (a checkpoint given by mistake) is refused,
  never overwritten. Under torchrun each process keeps its own shard (PATH.rankN).
  Safe to delete.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable

import torch

from compress.checkpoints import atomic_write
from compress.cli import UserError
from compress.machine.distributed import distributed
from compress.training.recipe import Recipe

STORE_FORMAT = "vgg-prune-distill-teacher-logits/1"
MAGIC = (STORE_FORMAT + "\n").encode()  # the file's first bytes: a store, even cut short


def pictures_fingerprint(samples: list[tuple[str, int]]) -> str:
    """A SHA-256 of the training pictures: each file's path (relative to the data's
    class folders), class, size and modification time."""
    digest = hashlib.sha256()
    for path, label in samples:
        status = os.stat(path)
        parts = os.path.normpath(path).split(os.sep)[-2:]
        digest.update(json.dumps([parts, label, status.st_size, status.st_mtime_ns]).encode())
    return digest.hexdigest()


def store_key(teacher_sha256: str, dataset: torch.utils.data.Dataset, recipe: Recipe, *,
              image_size: int, normalization: dict, device: torch.device) -> dict:
    """Everything that decides the teacher's logits of a distillation's training pictures
    (`dataset`: its data.ImageFolder) with `recipe` (its seed, crop scale, --mix, --cache
    and --amp), the kind of device too (its kernels round differently; --amp acts on CUDA
    alone)."""
    return {"teacher_sha256": teacher_sha256, "pictures": pictures_fingerprint(dataset.samples),
            "count": len(dataset), "class_names": list(dataset.class_names),
            "seed": recipe.seed, "image_size": image_size, "crop_scale": recipe.crop_scale,
            "normalization": normalization, "cache": recipe.cache, "amp": recipe.amp,
            "device": torch.device(device).type,
            **({"mix": recipe.mix} if recipe.mix != "none" else {})}


def key_name(key: dict) -> str:
    """A short name for a key (the sweep names its stores by it)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def check_store_file(path: str) -> None:
    """Refuse, before any work, a `path` that holds something else than a store (a
    checkpoint given by mistake, a folder): saving the store would overwrite it."""
    if not os.path.exists(path):
        return
    try:
        with open(path, "rb") as file:
            ours = file.read(len(MAGIC)) == MAGIC
    except OSError as error:  # a folder, a file we may not read
        raise UserError(f"--teacher-cache {path}: cannot be read ({error.strerror})") from None
    if not ours:
        raise UserError(f"--teacher-cache {path}: exists and is not a store of the teacher's "
                        "logits (a checkpoint?); refusing to overwrite it: give another path, "
                        "or move it first")


class TeacherStore:
    """The teacher's logits for `key`, kept in the file `path` (this process's shard of it
    under torchrun). `say` is told when a file is rebuilt. A file at `path` that is not a
    store (a checkpoint given by mistake, a folder) is refused before any work: it would
    be overwritten."""

    def __init__(self, path: str, key: dict, say: Callable = print):
        rank, world = distributed()
        self.path = path if world == 1 else f"{path}.rank{rank}"
        self.key, self.say = key, say
        self.epochs: dict[int, dict[str, torch.Tensor]] = {}
        self.computed = self.read = 0  # pictures the teacher ran on, and pictures read back
        check_store_file(self.path)
        if os.path.exists(self.path):
            self.epochs = self._load()

    def _load(self) -> dict:
        try:
            with open(self.path, "rb") as file:
                content = file.read()
            if not content.startswith(MAGIC):
                raise ValueError("not a store of the teacher's logits")
            stored = torch.load(io.BytesIO(content[len(MAGIC):]), map_location="cpu",
                                weights_only=True)
            if not isinstance(stored, dict) or stored.get("format") != STORE_FORMAT:
                raise ValueError("not a store of the teacher's logits")
        except Exception as error:  # truncated, damaged, foreign
            self.say(f"note: {self.path}: cannot be read ({type(error).__name__}); the "
                     "teacher's logits are computed again and the store rebuilt", flush=True)
            return {}
        if stored["key"] != self.key:
            changed = [name for name in self.key if stored["key"].get(name) != self.key[name]]
            raise UserError(f"{self.path}: holds the logits of another teacher or other "
                            f"pictures ({', '.join(changed)} differ); delete it (it is only a "
                            "store, rebuilt when missing) or give another --teacher-cache")
        count = self.key["count"]
        epochs = {}
        for epoch, entry in stored["epochs"].items():
            logits, filled = entry["logits"], entry["filled"]
            if logits.shape[0] != count or filled.shape != (count,):
                self.say(f"note: {self.path}: damaged; the store is rebuilt", flush=True)
                return {}
            epochs[int(epoch)] = {"logits": logits, "filled": filled}
        return epochs

    def logits(self, images: torch.Tensor, keys: torch.Tensor,
               teacher: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The teacher's logits of `images` (on their device), `keys` their (epoch, index)
        pairs: read back where stored, computed by `teacher` (and stored) elsewhere."""
        epochs, indices = keys[:, 0].tolist(), keys[:, 1]
        missing = torch.tensor([not self._filled(epoch, index)
                                for epoch, index in zip(epochs, indices.tolist())])
        answers = None
        if missing.any():
            computed = teacher(images[missing.to(images.device)]).float()
            answers = torch.empty(len(keys), computed.shape[1], device=computed.device)
            answers[missing.to(computed.device)] = computed
            self._put(keys[missing], computed.detach().cpu())
            self.computed += int(missing.sum())
        if not missing.all():
            stored = torch.stack([self.epochs[epoch]["logits"][index] for epoch, index, absent
                                  in zip(epochs, indices.tolist(), missing.tolist())
                                  if not absent])
            if answers is None:
                answers = torch.empty(len(keys), stored.shape[1], device=images.device)
            answers[~missing.to(answers.device)] = stored.to(answers.device)
            self.read += int((~missing).sum())
        return answers

    def _filled(self, epoch: int, index: int) -> bool:
        entry = self.epochs.get(epoch)
        return entry is not None and bool(entry["filled"][index])

    def _put(self, keys: torch.Tensor, logits: torch.Tensor) -> None:
        for (epoch, index), row in zip(keys.tolist(), logits):
            entry = self.epochs.get(epoch)
            if entry is None:
                entry = self.epochs[epoch] = {
                    "logits": torch.zeros(self.key["count"], len(row)),
                    "filled": torch.zeros(self.key["count"], dtype=torch.bool)}
            entry["logits"][index] = row
            entry["filled"][index] = True

    def save(self) -> None:
        """Write the store, atomically, merged with what another process sharing the file
        (an NNI trial beside this one) wrote meanwhile."""
        if os.path.exists(self.path):
            theirs = TeacherStore.__new__(TeacherStore)
            theirs.path, theirs.key, theirs.say = self.path, self.key, lambda *a, **k: None
            try:
                for epoch, entry in theirs._load().items():
                    ours = self.epochs.setdefault(epoch, entry)
                    if ours is not entry:
                        new = entry["filled"] & ~ours["filled"]
                        ours["logits"][new] = entry["logits"][new]
                        ours["filled"] |= new
            except UserError:
                pass  # another key's file at our path: ours replaces it
        stored = {"format": STORE_FORMAT, "key": self.key,
                  "epochs": {str(epoch): entry for epoch, entry in self.epochs.items()}}

        def write(file):
            file.write(MAGIC)
            torch.save(stored, file)
        atomic_write(self.path, write)
