"""Images in, tensors out: the one place pictures are transformed and batched (each read
by pictures.load_rgb()).

- `train_transform()` / `eval_transform()` are the transforms of every stage.
- `ImageFolder` reads `<root>/<class>/<image>`; `make_loader()` batches it;
  `training_loaders()` gives the two loaders both training stages use.
- `Mixed`: each training picture mixed with another of the same epoch (mixup or cutmix),
  the pair and the share drawn per (seed, epoch, index): a distillation's teacher and
  student see the same mixed picture, and the teacher's store answers it by its key.
"""
from __future__ import annotations

import os
import signal
import warnings
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from torchvision import transforms
from tqdm import tqdm

from compress.cli import MIXES, UserError
from compress.data.pictures import find_classes, is_image_name, load_rgb
from compress.machine.distributed import distributed
from compress.machine.resources import check_memory

# How pixel values (0..1) are shifted and scaled before the network sees them. Each
# checkpoint records its own; the original demo's, and the default:
ORIGINAL_NORMALIZATION = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
# what torchvision's ImageNet weights were trained with (their weights.transforms())
IMAGENET_NORMALIZATION = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def train_transform(image_size: int, crop_scale: float = 0.08,
                    normalization: dict = ORIGINAL_NORMALIZATION) -> transforms.Compose:
    """Random crop, flip, tensor, normalisation. `crop_scale`: the smallest crop, as a
    fraction of the picture (torchvision's 0.08)."""
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=(crop_scale, 1.0)),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(normalization["mean"], normalization["std"]),
    ])


def eval_transform(image_size: int,
                   normalization: dict = ORIGINAL_NORMALIZATION) -> transforms.Compose:
    """Resize to `image_size` square, tensor, normalisation."""
    return transforms.Compose([
        transforms.Resize((image_size, image_size)),
        transforms.ToTensor(),
        transforms.Normalize(normalization["mean"], normalization["std"]),
    ])


class ImageFolder(torch.utils.data.Dataset):
    """`<root>/<class>/<image>` as (tensor, class index) pairs.

    Random augmentation is seeded per (seed, epoch, index), so an epoch gives the
    same pictures whatever the number of workers or processes, and a run resumed
    in the middle of an epoch continues exactly where it stopped.
    """

    def __init__(self, root, transform, class_names=None, seed=0, cache_size=None):
        found = find_classes(root)
        if class_names is None:
            class_names = found
        elif found != list(class_names):
            raise UserError(f"{root}: has classes {found}, expected {list(class_names)}")
        self.root, self.transform, self.seed = root, transform, seed
        self.class_names = list(class_names)
        self.samples = []
        for index, name in enumerate(self.class_names):
            folder = os.path.join(root, name)
            files = sorted(f for f in os.listdir(folder) if is_image_name(f))
            self.samples += [(os.path.join(folder, f), index) for f in files]
        if not self.samples:
            raise UserError(f"{root}: no images found in {self.class_names or 'any class folder'}")
        self.bad_files = set()
        if cache_size:  # refused before decoding, if it cannot fit
            height, width = (cache_size, cache_size) if isinstance(cache_size, int) else cache_size
            check_memory(len(self.samples) * 3 * height * width,
                         f"{len(self.samples)} pictures of {root} kept at {height}x{width} px "
                         "(or more)", "--cache")
        self.cache = self._decode_all(cache_size) if cache_size else None

    def _decode_all(self, size):
        """Every picture decoded and resized once, kept as uint8 arrays (--cache).

        `size` as for transforms.Resize: an int resizes the shorter side, (h, w)
        exactly. Later epochs then skip JPEG decoding; augmentation stays random.
        """
        resize = transforms.Resize(size)

        def decode(path):
            try:
                return np.asarray(resize(load_rgb(path)))
            except (OSError, ValueError):
                return None  # reported when the sample is first used

        paths = [path for path, _ in self.samples]
        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # PIL decodes without the GIL
            return list(tqdm(pool.map(decode, paths), total=len(paths), leave=False,
                             desc=f"caching {self.root}", disable=None))

    def _load(self, index):
        if self.cache is None or self.cache[index] is None:  # uncached, or raise why it failed
            return load_rgb(self.samples[index][0])
        return Image.fromarray(self.cache[index])

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        # One unreadable file must not end a long run: use the next readable one instead.
        for offset in range(len(self)):
            path, label = self.samples[(index + offset) % len(self)]
            try:
                image = self._load((index + offset) % len(self))
                break
            except (OSError, ValueError) as error:
                if path not in self.bad_files:
                    self.bad_files.add(path)
                    warnings.warn(f"skipping unreadable image {path}: {error}", stacklevel=2)
        else:
            raise UserError(f"{self.root}: none of the {len(self)} images can be read")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, epoch, index)) & 0xFFFF_FFFF)
            return self.transform(image), label

    def labels(self) -> list[int]:
        """The class index of each picture, in order."""
        return [label for _, label in self.samples]


class Keyed(torch.utils.data.Dataset):
    """An ImageFolder (or a Mixed one) whose items carry the (epoch, index) key they were
    drawn for: (image, label, key[, mix]), so a batch says which pictures it holds (the
    teacher's store reads by it)."""

    def __init__(self, dataset: ImageFolder | Mixed):
        self.dataset = dataset
        self.class_names, self.samples = dataset.class_names, dataset.samples

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        image, label, *mix = self.dataset[key]
        return image, label, torch.tensor([epoch, index]), *mix


class Mixed(torch.utils.data.Dataset):
    """An ImageFolder whose training pictures are each mixed with a partner of the same
    epoch: (image, label, mix), `label` the class of the larger share and `mix` the tensor
    [the other class, the share of `label`'s picture]. mixup blends the two pictures,
    the share drawn uniformly; cutmix pastes a box of the partner, of a uniformly drawn
    area (the share is what is left). The partner, the share and the box are drawn per
    (seed, epoch, index), as the crops are: the same key always gives the same picture."""

    def __init__(self, dataset: ImageFolder, kind: str):
        if kind not in MIXES[1:]:
            raise ValueError(f"mix {kind!r}: one of {MIXES[1:]}")
        self.dataset, self.kind = dataset, kind
        self.class_names, self.samples = dataset.class_names, dataset.samples

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        image, label = self.dataset[(epoch, index)]
        draws = torch.Generator().manual_seed(hash((self.dataset.seed, epoch, index, 1))
                                              & 0xFFFF_FFFF)
        partner = int(torch.randint(len(self.dataset), (1,), generator=draws))
        other, other_label = self.dataset[(epoch, partner)]
        share = float(torch.rand(1, generator=draws))
        if self.kind == "mixup":
            image = share * image + (1 - share) * other
        else:  # a box of the partner, (1 - share) of the area, anywhere on the picture
            height, width = image.shape[1:]
            box_h, box_w = round(height * (1 - share) ** 0.5), round(width * (1 - share) ** 0.5)
            top = int(torch.randint(height - box_h + 1, (1,), generator=draws))
            left = int(torch.randint(width - box_w + 1, (1,), generator=draws))
            image = image.clone()
            image[:, top:top + box_h, left:left + box_w] = \
                other[:, top:top + box_h, left:left + box_w]
            share = 1 - box_h * box_w / (height * width)
        if share < 0.5:
            label, other_label, share = other_label, label, 1 - share
        return image, label, torch.tensor([other_label, share])


def training_loaders(data: str, image_size: int, device: torch.device, *, batch_size: int,
                     workers: int | None = None, seed: int = 0, crop_scale: float = 0.08,
                     cache: bool = False, normalization: dict = ORIGINAL_NORMALIZATION,
                     keyed: bool = False, mix: str = "none", first_epoch: int = 0):
    """(train loader, val loader) of the split in `data`, as both training stages use them.

    The training order comes from an EpochSampler (seeded by `seed`, each process its
    share under torchrun; its epochs counted from `first_epoch`, so that a run continuing
    another sees the pictures of the epochs after it). With `cache`, training pictures
    are kept a little above the training size, so random crops still have room. `keyed`
    (implied by a `mix`): training batches are (images, labels, keys), each key the
    (epoch, index) its picture was drawn for; `mix` (mixup, cutmix): each picture mixed
    with another (Mixed), the batches (images, labels, keys, mixes).
    """
    train_set = ImageFolder(os.path.join(data, "train"),
                            train_transform(image_size, crop_scale, normalization), seed=seed,
                            cache_size=round(image_size * 1.15) if cache else None)
    rank, world = distributed()
    sampler = EpochSampler(len(train_set), seed, rank=rank, world=world, first_epoch=first_epoch)
    validation = val_set(data, image_size, train_set.class_names, cache, normalization)
    training = Keyed(Mixed(train_set, mix)) if mix != "none" else \
        Keyed(train_set) if keyed else train_set
    return (make_loader(training, batch_size, workers, device, sampler),
            make_loader(validation, batch_size, workers, device, sampler=None))


def report_split(data: str) -> str:
    """The split figures are reported on: test (held out, never chosen on) where DATA/test
    exists, else val (on which checkpoints were chosen: it flatters them)."""
    return "test" if os.path.isdir(os.path.join(data, "test")) else "val"


def val_set(data: str, image_size: int, class_names: list[str] | None = None, cache: bool = False,
            normalization: dict = ORIGINAL_NORMALIZATION, split: str = "val") -> ImageFolder:
    """DATA/val (or DATA/`split`) as every stage evaluates it.

    With `cache`, pictures are kept at exactly the size the evaluation transform
    resizes them to, so results equal those without a cache.
    """
    return ImageFolder(os.path.join(data, split), eval_transform(image_size, normalization),
                       class_names,
                       cache_size=(image_size, image_size) if cache else None)


class EpochSampler(torch.utils.data.Sampler):
    """Yields (epoch, index) keys in an order fixed by (seed, epoch).

    With several processes each rank takes every world-th index of the same
    order (padded so all ranks see as many batches). `set_epoch(epoch, skip)`
    starts an epoch, skipping the first `skip` samples of a resumed one; the keys' epochs
    are counted from `first_epoch` (a run continuing another's first_epoch epochs).
    """

    def __init__(self, size, seed, shuffle=True, rank=0, world=1, first_epoch=0):
        self.size, self.seed, self.shuffle, self.rank, self.world = size, seed, shuffle, rank, world
        self.first_epoch, self.epoch, self.skip = first_epoch, first_epoch, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = self.first_epoch + epoch, skip

    def _order(self):
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        order += order[:(-len(order)) % self.world]
        return order[self.rank::self.world]

    def __iter__(self):
        return iter([(self.epoch, index) for index in self._order()[self.skip:]])

    def __len__(self):
        return len(self._order()) - self.skip


def default_workers(device: torch.device) -> int:
    """No workers on the CPU: training VGG16 on 2 cores with 2 loader workers measured 1.25x
    slower at 224 px and no faster at 48 px; they take the cores the model computes on.
    On a GPU up to 8 for each process, the machine's cores shared between them.
    """
    if device.type == "cpu":
        return 0
    return min(8, max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def make_loader(dataset: torch.utils.data.Dataset, batch_size: int, workers: int | None,
                device: torch.device, sampler: Iterable | None) -> torch.utils.data.DataLoader:
    """Batches of `dataset`; with no sampler, in order (each process its share under torchrun).

    `workers` None: `default_workers(device)`.
    """
    if workers is None:
        workers = default_workers(device)
    rank, world = distributed()
    if sampler is None and world > 1:
        sampler = range(rank, len(dataset), world)
    # its own generator: creating an iterator must not draw from the global RNG that
    # dropout uses, or a resumed run would not continue exactly
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
        pin_memory=device.type == "cuda", persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(0), worker_init_fn=ignore_ctrl_c)


def ignore_ctrl_c(worker_id: int) -> None:
    """Ctrl-C reaches every process of the terminal; the main process alone handles it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
