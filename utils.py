"""What every stage needs, written once: the command-line edge, device choice,
checkpoints, evaluation, the training loop (with Ctrl-C and --resume), figures
and latency timing.
"""
import argparse
import contextlib
import json
import os
import pickle
import signal
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import model as vgg

CHECKPOINT_FORMAT = "vgg-prune-distill/1"
# /2: the model and Adam's moments in the channels-last layout
TRAINING_STATE_FORMAT = "vgg-prune-distill-state/2"


# --- the command-line edge -------------------------------------------------

class UserError(Exception):
    """A mistake the user can fix (bad path, wrong file, bad flag): one line, exit 2."""


class Interrupted(Exception):
    """Ctrl-C: the state was saved (or nothing was lost); exit 130."""


def run_cli(main, parser, argv=None):
    """Parse flags, run `main(args)`, and turn user mistakes into one-line errors."""
    args = parser.parse_args(argv)
    prog = parser.prog
    # under torchrun the processes of one machine read the same files and stop together:
    # the first of them speaks for all
    say = print if local_rank() == 0 else (lambda *args, **kwargs: None)
    try:
        main(args)
    except UserError as error:
        # raised in a data-loader worker, it arrives with that worker's traceback: keep the
        # last line, which is the message
        message = str(error).strip().splitlines()[-1].split("UserError: ", 1)[-1]
        say(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    except Interrupted as stop:
        say(f"{prog}: interrupted. {stop}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        say(f"{prog}: interrupted; nothing was saved by this step.", file=sys.stderr)
        return 130
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action):
        """Show a flag's default, unless it is 'off' or the help already says it."""
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        """A bad flag is one line too (argparse would print the whole usage first)."""
        # under torchrun every process parses the same flags: one line per machine
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n" if local_rank() == 0 else None)


def make_parser(doc):
    """A parser whose --help starts with the script's docstring and shows defaults."""
    return ArgumentParser(description=doc, formatter_class=HelpFormatter)


def add_data_args(parser, image_size=None, batch_size=32, training=False):
    """The flags every image-reading script shares, with one meaning everywhere."""
    parser.add_argument("--data", default="dataset",
                        help="split dataset folder holding train/<class>/ and val/<class>/")
    parser.add_argument("--image-size", type=image_size_type, default=image_size,
                        help="square input size in pixels"
                        + ("" if image_size else " (default: the one stored in the checkpoint)"))
    parser.add_argument("--batch-size", type=positive_int, default=batch_size,
                        help="images per batch (per process under torchrun)")
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA if available, else CPU), cpu, cuda or cuda:N")
    parser.add_argument("--workers", type=non_negative_int,
                        help="data-loading worker processes (0: load in the main process; "
                             "default: 0 on the CPU, where workers would compete with the "
                             "model for the cores, else up to 8 per GPU process)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    if training:
        parser.add_argument("--crop-scale", type=crop_fraction, default=0.08,
                            help="smallest random crop, as a fraction of the picture's area")
        parser.add_argument("--cache", action="store_true",
                            help="decode and resize every picture once and keep it in memory "
                                 "(uint8, about 3*(1.15*size)^2 bytes a picture): later epochs "
                                 "skip JPEG decoding; augmentation stays random")
        parser.add_argument("--amp", action="store_true",
                            help="mixed precision on CUDA (bf16 where supported, else fp16)")


def int_at_least(minimum, requirement):
    """An argparse type: an integer of at least `minimum`, else a one-line reason."""
    def integer(text):
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value
    return integer


def float_within(low, high, requirement, include_high=False):
    """An argparse type: a number above `low` and below `high` (or equal to it)."""
    def number(text):
        value = float(text)
        if not (low < value < high or include_high and value == high):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value
    return number


positive_int = int_at_least(1, "a positive integer")
non_negative_int = int_at_least(0, "0 or more")
image_size_type = int_at_least(32, "at least 32 (VGG halves it five times)")
fraction = float_within(0, 1, "between 0 and 1")  # a split ratio, a sparsity
crop_fraction = float_within(0, 1, "above 0 and at most 1", include_high=True)
positive_float = float_within(0, float("inf"), "a positive number")


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: this PyTorch sees no CUDA GPU on this machine; "
                            "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) "
                            "are visible")
    elif device.type != "cpu":
        raise UserError(f"--device {name}: expected auto, cpu, cuda or cuda:N")
    return device


# --- checkpoints -----------------------------------------------------------

def atomic_save(obj, path):
    """Write to a temporary file beside `path`, then rename: a crash never leaves half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temporary = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


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
    model = vgg.from_architecture(checkpoint["architecture"])
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError:
        raise UserError(f"{path}: weights do not match the architecture stored with them") from None
    return model


def check_classes(checkpoint, path, class_names):
    if list(checkpoint["class_names"]) != list(class_names):
        raise UserError(f"{path}: trained on classes {checkpoint['class_names']}, "
                        f"but the data has {list(class_names)}")


def check_image_size(checkpoint, path, image_size, asked_by):
    """A checkpoint is used at the size it was trained at; `image_size` None means that size."""
    if image_size and image_size != checkpoint["image_size"]:
        hint = " (leave --image-size out to use the checkpoint's)" if asked_by.startswith("--") else ""
        raise UserError(f"{path}: made for {checkpoint['image_size']} px images, but {asked_by} "
                        f"asks for {image_size} px{hint}")


def output_path(checkpoint_path, suffix):
    """Files that belong to a checkpoint sit beside it: vgg16Net.pth -> vgg16Net.<suffix>."""
    return os.path.splitext(checkpoint_path)[0] + "." + suffix


# --- evaluation ------------------------------------------------------------

def evaluate(model, loader, device, num_classes, progress=None):
    """Accuracy, mean cross-entropy and the confusion matrix (rows: true, cols: predicted)."""
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    total_loss, count = 0.0, 0
    with torch.inference_mode():
        for images, labels in tqdm(loader, desc=progress, leave=False,
                                   disable=True if progress is None else None):
            images, labels = images.to(device, non_blocking=True), labels.to(device)
            logits = model(images).float()
            total_loss += F.cross_entropy(logits, labels, reduction="sum").item()
            count += labels.numel()
            predictions = logits.argmax(1)
            confusion += torch.bincount(labels.cpu() * num_classes + predictions.cpu(),
                                        minlength=num_classes ** 2).view(num_classes, num_classes)
    # under torchrun each process saw its share of the images: add them up
    *flat, total_loss, count = all_reduce_sum(confusion.flatten().tolist() + [total_loss, count],
                                              device)
    confusion = torch.tensor(flat).round().long().view(num_classes, num_classes)
    return summarise(confusion, total_loss, int(count))


def summarise(confusion, total_loss, count):
    per_class_total = confusion.sum(1).clamp(min=1)
    return {"accuracy": confusion.diag().sum().item() / max(count, 1),
            "loss": total_loss / max(count, 1),
            "per_class_accuracy": (confusion.diag() / per_class_total).tolist(),
            "confusion": confusion.tolist(), "count": count}


# --- training --------------------------------------------------------------

class StopRequest:
    """First Ctrl-C asks the loop to stop after the current batch; a second one aborts.

    (Under torchrun the launcher gets the terminal's Ctrl-C and passes it on to
    each process once.)
    """

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.pid = os.getpid()
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if os.getpid() != self.pid:  # a data-loader worker: the main process decides
            return
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if local_rank() == 0:
            print("\nStopping after this batch and saving a resumable state "
                  "(Ctrl-C again to abort without saving)...", file=sys.stderr)

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


def amp_context(device, enabled):
    if not (enabled and device.type == "cuda"):
        return contextlib.nullcontext(), None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return torch.autocast("cuda", dtype=dtype), scaler


def local_rank():
    """This process's index on its machine under torchrun (0 otherwise)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0
    return int(os.environ.get("LOCAL_RANK", "0"))


def distributed():
    """(rank, world size): (0, 1) unless started by torchrun with several processes."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def init_distributed(device_name):
    """Join the torchrun process group if there is one; returns this process's device.

    One process per GPU (nccl) or per CPU share (gloo). Rank 0 alone writes files.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return resolve_device(device_name)
    device = resolve_device(device_name)
    if device.type == "cuda":
        if local_rank() >= torch.cuda.device_count():
            raise UserError(f"torchrun started {os.environ['LOCAL_WORLD_SIZE']} processes on this "
                            f"machine, which has {torch.cuda.device_count()} GPU(s); use "
                            f"--nproc_per_node={torch.cuda.device_count()}")
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    else:  # share the cores between the processes instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"])))
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if torch.distributed.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")  # one process reports; errors still reach stderr
    return device


def all_reduce_sum(values, device):
    """Sum a list of numbers over all processes (a no-op in a single process)."""
    if distributed()[1] == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def fit(model, optimizer, compute_loss, train_set, val_loader, args, device, on_best, title):
    """Train for `args.epochs`, validating after each, and call `on_best(metrics)` on a new best.

    `compute_loss(model, images, labels)` returns (loss, logits). The flags the
    training scripts share are read from `args` (epochs, batch_size, workers, seed,
    amp, output, resume). Ctrl-C saves the model, optimizer, position in the epoch
    and RNG state to <output>.state.pth and raises Interrupted; `--resume` continues
    from such a file exactly as if never stopped.
    Under torchrun the model is wrapped in DistributedDataParallel, each process
    takes its share of every batch order, and rank 0 alone writes files.
    The model is trained in the channels-last memory format.
    Returns the per-epoch history: losses, accuracies, training images per second
    (also written to <output>.history.json and drawn as <output>.history.png).
    """
    from data import EpochSampler, make_loader

    epochs, resume = args.epochs, args.resume
    state_path = output_path(args.output, "state.pth")
    history_path = output_path(args.output, "history.json")
    rank, world = distributed()
    num_classes = len(train_set.class_names)
    sampler = EpochSampler(len(train_set), args.seed, rank=rank, world=world)
    loader = make_loader(train_set, args.batch_size, args.workers, device, sampler)
    # channels-last: training VGG16 on a 2-core CPU measured 1.3x faster at 224 px (batch
    # 16) and no slower at 64 px; on CUDA it is the layout tensor cores want
    model.to(memory_format=torch.channels_last)
    network = model if world == 1 else torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    autocast, scaler = amp_context(device, args.amp)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed input size: pick fastest kernels
    start_epoch, skip, history, best, sums = 0, 0, [], -1.0, [0.0, 0, 0]
    # what must not change between a run and its resumption, or it would not continue exactly
    settings = {"batch_size": args.batch_size, "seed": args.seed, "crop_scale": args.crop_scale,
                "cache": args.cache, "lr": args.lr, "image_size": args.image_size, "amp": args.amp}
    # rank 0 writes the state: every process must agree to refuse, or the others would hang
    if not resume and all_reduce_sum([float(rank == 0 and os.path.exists(state_path))], device)[0]:
        raise UserError(f"{state_path}: an interrupted run left this; add --resume {state_path} "
                        "to continue it, or delete it to start over")
    if resume:
        state = safe_load(resume, "a training state saved by Ctrl-C")
        if not isinstance(state, dict) or state.get("format") != TRAINING_STATE_FORMAT:
            older = isinstance(state, dict) and str(state.get("format")).startswith(
                TRAINING_STATE_FORMAT.split("/")[0])
            raise UserError(f"{resume}: " + ("saved by an older version of this pipeline, "
                                             "which trained in another memory layout; start over"
                                             if older else
                                             "not a training state saved by this pipeline"))
        if state["world"] != world:
            raise UserError(f"{resume}: saved by {state['world']} process(es), resumed by {world}")
        changed = [f"--{k.replace('_', '-')} {state['settings'][k]}" for k in settings
                   if state["settings"].get(k) != settings[k]]
        if changed:
            raise UserError(f"{resume}: was saved with {', '.join(changed)}; resume with the "
                            "same flags")
        if state["epoch"] >= args.epochs:
            raise UserError(f"{resume}: stopped in epoch {state['epoch'] + 1}, but --epochs is "
                            f"{args.epochs}")
        try:
            model.load_state_dict(state["model"])
        except RuntimeError:
            raise UserError(f"{resume}: saved for a different model than the one given") from None
        optimizer.load_state_dict(state["optimizer"])
        if scaler and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        start_epoch, skip, history = state["epoch"], state["samples_done"], state["history"]
        best = state["best"]
        sums = state["sums"] if rank == 0 else [0.0, 0, 0]  # added up over ranks at epoch end
        if rank == 0:
            print(f"Resuming from {resume}: epoch {start_epoch + 1}, {skip * world} images done")

    def save_state(epoch, samples_done):
        if rank == 0:
            atomic_save({"format": TRAINING_STATE_FORMAT, "model": model.state_dict(),
                         "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
                         "scaler": scaler.state_dict() if scaler else None,
                         "cuda_rng": torch.cuda.get_rng_state(device)
                         if device.type == "cuda" else None, "world": world,
                         "settings": settings,
                         "epoch": epoch, "samples_done": samples_done, "history": history,
                         "best": best, "sums": sums}, state_path)

    with StopRequest() as stop:
        for epoch in range(start_epoch, epochs):
            started = time.perf_counter()
            sampler.set_epoch(epoch, skip)
            network.train()
            done = skip
            bar = tqdm(loader, desc=f"{title} epoch {epoch + 1}/{epochs}", leave=False,
                       disable=True if rank else None)
            with bar:
                for images, labels in bar:
                    images = images.to(device, non_blocking=True, memory_format=torch.channels_last)
                    labels = labels.to(device, non_blocking=True)
                    optimizer.zero_grad(set_to_none=True)
                    with autocast:
                        loss, logits = compute_loss(network, images, labels)
                    if scaler:
                        scaler.scale(loss).backward()
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        loss.backward()
                        optimizer.step()
                    done += labels.numel()
                    sums[0] += loss.item() * labels.numel()
                    sums[1] += (logits.argmax(1) == labels).sum().item()
                    sums[2] += labels.numel()
                    bar.set_postfix(loss=f"{sums[0] / sums[2]:.3f}")
                    # every process stops after the same batch, or collectives would hang
                    if all_reduce_sum([float(stop.requested)], device)[0]:
                        stop.requested = True
                        break
            if stop.requested:
                sums = all_reduce_sum(sums, device)  # the state holds every process's share
                save_state(epoch, done)
                raise Interrupted(f"Saved the state after {done * world} images of epoch "
                                  f"{epoch + 1} to {state_path}; add --resume {state_path} to "
                                  "the same command to continue.")
            # trained: the images of this epoch that this run trained (a resumed one skipped some)
            train_loss, train_correct, train_count, trained = all_reduce_sum(
                sums + [done - skip], device)
            train_seconds = time.perf_counter() - started  # the training part alone
            if world > 1:  # BatchNorm statistics drift apart per process: use rank 0's
                for buffer in model.buffers():
                    torch.distributed.broadcast(buffer, 0)
            # the bare model: shards of the val split may differ in length by one batch,
            # and DDP's forward would wait for a process that has finished
            val = evaluate(model, val_loader, device, num_classes)
            record = {"epoch": epoch + 1, "train_loss": train_loss / max(train_count, 1),
                      "train_accuracy": train_correct / max(train_count, 1),
                      "val_loss": val["loss"], "val_accuracy": val["accuracy"],
                      # all processes together (with the few repeated to even out their
                      # shares); validation not counted; None if a resumed epoch had none left
                      "images_per_second": round(trained / train_seconds, 3) if trained else None,
                      "seconds": round(time.perf_counter() - started, 2)}
            history.append(record)
            is_best = val["accuracy"] > best
            if is_best:
                best = val["accuracy"]
                if rank == 0:
                    on_best(dict(record, per_class_accuracy=val["per_class_accuracy"],
                                 confusion=val["confusion"]))
            if rank == 0:
                print(f"{title} epoch {epoch + 1}/{epochs}: train loss {record['train_loss']:.4f} "
                      f"acc {record['train_accuracy']:.1%} | val loss {val['loss']:.4f} "
                      f"acc {val['accuracy']:.1%}{'  (best, saved)' if is_best else ''} "
                      f"| {(record['images_per_second'] or 0):.1f} img/s, "
                      f"{record['seconds']:.0f}s", flush=True)
                save_history(history, history_path, title)
            skip, sums = 0, [0.0, 0, 0]
    if rank == 0 and os.path.exists(state_path):
        os.remove(state_path)
    return history


def save_history(history, path, title):
    write_json(history, path)
    plot_history(history, os.path.splitext(path)[0] + ".png", title)


def write_json(obj, path):
    """Write JSON through a temporary file, so readers never see half of it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as file:
        json.dump(obj, file, indent=1)
    os.replace(path + ".tmp", path)


# --- figures ---------------------------------------------------------------

def pyplot(show=False):
    """matplotlib, with a file-only backend unless a window was asked for (--show)."""
    import matplotlib
    if not show:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_history(history, path, title):
    plt = pyplot()
    epochs = [r["epoch"] for r in history]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [r["train_loss"] for r in history], "o-", label="train (objective)")
    left.plot(epochs, [r["val_loss"] for r in history], "o-", label="validation (cross-entropy)")
    left.set(title=f"{title}: loss", xlabel="epoch", ylabel="loss")
    right.plot(epochs, [100 * r["train_accuracy"] for r in history], "o-", label="train")
    right.plot(epochs, [100 * r["val_accuracy"] for r in history], "o-", label="validation")
    right.set(title=f"{title}: accuracy", xlabel="epoch", ylabel="accuracy (%)", ylim=(0, 100))
    for axis in (left, right):
        axis.legend()
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# --- timing ----------------------------------------------------------------

def measure_latency(model, inputs, device, warmup=3, repeats=10):
    """Median seconds of one forward pass of `model` on `inputs`, after warm-up runs.

    The same inputs every run, under inference_mode, CUDA synchronised before
    each clock read so queued kernels are counted.
    """
    model.eval()
    inputs = inputs.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        return median_seconds(lambda: model(inputs), sync, warmup, repeats)


def median_seconds(run, sync, warmup, repeats):
    """Call `run` warmup + repeats times; the median wall time of the timed calls.

    `sync()` is called before starting and before stopping each clock, so work
    queued on an accelerator is finished inside the measured interval.
    """
    times = []
    for index in range(warmup + repeats):
        sync()
        started = time.perf_counter()
        run()
        sync()
        if index >= warmup:
            times.append(time.perf_counter() - started)
    return statistics.median(times)
