"""The command-line edge: what a user types and what they see.

- `run_cli()` runs a script's `main(args)` and turns the errors a user can cause
  (`UserError`), Ctrl-C (`Interrupted`) and a failed check of our own work
  (`CheckFailed`) into one line and an exit status, never a traceback.
- `make_parser()`, the shared flag groups (`add_data_args()`, `add_timing_args()`,
  `add_verbose_arg()`) and the flag types (`positive_int`, `fraction`, ...): one
  flag vocabulary and one error style for every script.
- `settings_from()`: a settings dataclass (training's Recipe, the timing plan, the
  sweep's setup, export's plan) built from parsed flags, each field from the flag of
  its name: the one place a flag becomes a setting.
- `resolve_device()`: --device auto|cpu|cuda[:N].
- `local_rank()`: under torchrun the first process of each machine speaks for it.
- `quiet_nni()`: NNI prints only what the user asked for.

Imports nothing of the pipeline's own: every other module may import it. Nor torch, until
a device is resolved: split_dataset.py runs without it.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import io
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class UserError(Exception):
    """A mistake the user can fix (bad path, wrong file, bad flag): one line, exit 2."""


class CheckFailed(Exception):
    """A check of the pipeline's own work failed, not the user's doing: one line, exit 1."""


class Interrupted(Exception):
    """Ctrl-C: the state was saved (or nothing was lost); exit 130."""


def is_disk_full(error: BaseException | None) -> bool:
    """Whether `error`, or an error it was raised from or during, is a full disk (torch's
    writer raises 'unexpected pos' during the OSError of the write it failed)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False


def local_rank() -> int:
    """This process's index on its machine under torchrun (0 otherwise)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0
    return int(os.environ.get("LOCAL_RANK", "0"))


def run_cli(main: Callable[[argparse.Namespace], object], parser: argparse.ArgumentParser,
            argv: Sequence[str] | None = None) -> int:
    """Parse flags, run `main(args)`, and turn user mistakes into one-line errors; returns the
    exit status."""
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
    except CheckFailed as error:
        say(f"{prog}: error: {error}", file=sys.stderr)
        return 1
    except Interrupted as stop:
        say(f"{prog}: interrupted. {stop}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        say(f"{prog}: interrupted; nothing was saved by this step.", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the output was piped into a reader that stopped (`| head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 1
    except Exception as error:
        if not is_disk_full(error):  # (a full disk where no DiskFull says more: still one line)
            raise
        where = getattr(error, "filename", None) or "a file"
        say(f"{prog}: error: {where}: cannot be written, the disk is full ({error})",
            file=sys.stderr)
        return 2
    finally:
        torch = sys.modules.get("torch")  # (a script that never imported it started no group)
        if torch and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help: the script's docstring as written, then each flag with its default."""

    def _get_help_string(self, action):
        """Show a flag's default, unless it is 'off' or the help already says it."""
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, with bad flags reported in one line."""

    def error(self, message: str):
        """A bad flag is one line too (argparse would print the whole usage first)."""
        # under torchrun every process parses the same flags: one line per machine
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n" if local_rank() == 0 else None)


def make_parser(doc: str) -> ArgumentParser:
    """A parser whose --help starts with the script's docstring and shows defaults."""
    return ArgumentParser(description=doc, formatter_class=HelpFormatter)


def add_timing_args(parser: argparse.ArgumentParser, precision: float) -> None:
    """How test.py --compare and sweep.py time models: interleaved, until each one's
    median is known within `precision` of itself."""
    parser.add_argument("--warmup", type=non_negative_int, default=3,
                        help="untimed runs of each model before timing")
    parser.add_argument("--repeats", type=positive_int, default=10,
                        help="the models are timed interleaved (each once a round, in a new "
                             "random order), at least this many runs each; the median is "
                             "reported with the interquartile range (IQR)")
    parser.add_argument("--max-repeats", type=positive_int, default=60,
                        help=f"... and more runs, up to this many, until every model's median "
                             f"is known within {precision * 100:g}%% (IQR / sqrt(runs); the "
                             "table says where it is not)")


def add_verbose_arg(parser: argparse.ArgumentParser, what: str = "NNI's warnings and logs") -> None:
    """--verbose: show what the libraries print (hidden by default)."""
    parser.add_argument("--verbose", action="store_true", help=f"show {what}")


def int_within(minimum: int, requirement: str, maximum: int | None = None):
    """An argparse type: an integer from `minimum` (to `maximum`), else a one-line reason."""
    def integer(text):
        value = int(text)
        if value < minimum or maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value
    return integer


def float_within(low: float, high: float, requirement: str, include_high: bool = False,
                 include_low: bool = False):
    """An argparse type: a number above `low` and below `high` (or equal to either)."""
    def number(text):
        value = float(text)
        if not (low < value < high or include_high and value == high
                or include_low and value == low):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value
    return number


positive_int = int_within(1, "a positive integer")
non_negative_int = int_within(0, "0 or more")
image_size_type = int_within(32, "at least 32 (VGG halves it five times)")
fraction = float_within(0, 1, "between 0 and 1")  # a split ratio, a sparsity
crop_fraction = float_within(0, 1, "above 0 and at most 1", include_high=True)
positive_float = float_within(0, float("inf"), "a positive number")
non_negative_float = float_within(0, float("inf"), "0 or more", include_low=True)
OPTIMIZERS = ("adam", "adamw", "sgd")
KD_LOSSES = ("kl", "mse")
TEMPERATURE, ALPHA = 8.0, 0.99  # the original demo's distillation
SCHEDULES = ("constant", "cosine")
MIXES = ("none", "mixup", "cutmix")  # a distillation's pictures mixed in pairs (data.Mixed)
# accuracy points, 0 to 100 (--max-drop, --int8-max-drop)
points = float_within(0, 100, "a number of accuracy points from 0 to 100", include_high=True,
                      include_low=True)

# The flags of one meaning in every script that takes them: their type, default and help
SHARED_FLAGS = {
    "--data": dict(default="dataset",
                   help="split dataset folder holding train/<class>/ and val/<class>/"),
    "--image-size": dict(type=image_size_type,
                         help="square input size in pixels (default: the one stored in the "
                              "checkpoint)"),
    "--batch-size": dict(type=positive_int, default=32,
                         help="images per batch (per process under torchrun)"),
    "--device": dict(default="auto",
                     help="auto (CUDA if available, else CPU), cpu, cuda or cuda:N"),
    "--workers": dict(type=non_negative_int,
                      help="data-loading worker processes (0: load in the main process; default: "
                           "0 on the CPU, where workers would compete with the model for the "
                           "cores, else up to 8 per GPU process)"),
    "--seed": dict(type=int, default=0, help="random seed"),
    "--crop-scale": dict(type=crop_fraction, default=0.08,
                         help="smallest random crop, as a fraction of the picture's area"),
    "--cache": dict(action="store_true",
                    help="decode and resize every picture once and keep it in memory (uint8, "
                         "about 3*(1.15*size)^2 bytes a picture; refused before decoding if "
                         "that exceeds the memory available): later epochs skip JPEG "
                         "decoding; augmentation stays random"),
    "--amp": dict(action="store_true",
                  help="mixed precision: on CUDA bf16 where supported, else fp16; on a CPU "
                       "that computes bfloat16 natively (AMX, AVX512-BF16) bf16, elsewhere "
                       "ignored (one line says so)"),
    "--tensorboard": dict(metavar="DIR",
                          help="write each epoch's loss, accuracy, learning rate and speed for "
                               "TensorBoard (tensorboard --logdir DIR), a run per output file "
                               "(DIR/NAME)"),
    "--epochs": dict(type=positive_int, help="passes over the training set"),
    "--lr": dict(type=positive_float,
                 help="learning rate (the peak one with --warmup-epochs or --schedule cosine)"),
    "--resume": dict(metavar="STATE",
                     help="continue an interrupted run from the state Ctrl-C saved "
                          "(OUTPUT.state.pth), exactly as if never stopped"),
    "--output": dict(help="the file written"),
    "--optimizer": dict(choices=OPTIMIZERS, default="adam",
                        help="adam (the original demo's), adamw (decoupled weight decay) or sgd "
                             "(momentum 0.9, Nesterov)"),
    "--weight-decay": dict(type=non_negative_float, default=0.0,
                           help="weight decay of the convolutions' and linear layers' weights "
                                "(not of biases or batch norm)"),
    "--schedule": dict(choices=SCHEDULES, default="constant",
                       help="learning rate over the run: constant (the original demo's) or "
                            "cosine (from --lr down to 0 at the last step, after the warm-up)"),
    "--warmup-epochs": dict(type=non_negative_float, default=0.0,
                            help="the learning rate rises linearly from near 0 to --lr over "
                                 "these epochs first"),
    "--temperature": dict(type=positive_float, default=TEMPERATURE,
                          help="softening temperature T"),
    "--alpha": dict(type=float_within(0, 1, "within 0..1", include_low=True, include_high=True),
                    default=ALPHA,
                    help="weight of the distillation term (1 - alpha: the label term)"),
    "--kd-loss": dict(choices=KD_LOSSES, default="kl",
                      help="the teacher's term: kl on the logits softened by T (the original "
                           "demo's), or mse on the logits themselves (T unused)"),
    "--feature-weight": dict(type=non_negative_float, default=0.0,
                             help="add this weight times the feature loss: the student's "
                                  "feature map at the end of each VGG block, through a 1x1 "
                                  "adapter, matched to the teacher's (MSE); the teacher then "
                                  "runs on every picture. 0: off"),
    "--mix": dict(choices=MIXES, default="none",
                  help="function matching (Beyer et al., 2022): each training picture mixed "
                       "with another of the epoch -- mixup blends the two, cutmix pastes a "
                       "box of one into the other, the share drawn uniformly -- and the "
                       "teacher answers the very picture the student sees (the labels' term "
                       "takes both classes by their shares)"),
    "--label-smoothing": dict(type=float_within(0, 1, "from 0 to below 1", include_low=True),
                              default=0.0, help="of the cross-entropy on the labels"),
}
# the flags of a training recipe (training.recipe.Recipe), after --lr and --epochs
RECIPE_FLAGS = ("--optimizer", "--weight-decay", "--schedule", "--warmup-epochs",
                "--label-smoothing")
# the flags of a distillation: its loss (training.distillation.Distillation), and --mix, the
# pairs of pictures the teacher and the student see (training.recipe.Recipe's mix)
DISTILLATION_FLAGS = ("--temperature", "--alpha", "--kd-loss", "--feature-weight", "--mix")


def add_shared_flags(parser: argparse.ArgumentParser, *names: str, **changes: dict) -> None:
    """Add the flags `names` (keys of SHARED_FLAGS) with their one meaning; `changes` alter a
    flag's default or help for one script, keyed by its name in Python
    (batch_size={"help": "pictures per batch when calibrating"})."""
    for name in names:
        parser.add_argument(name, **{**SHARED_FLAGS[name],
                                     **changes.get(name[2:].replace("-", "_"), {})})


def add_data_args(parser: argparse.ArgumentParser, image_size: int | None = None,
                  batch_size: int = 32, training: bool = False) -> None:
    """The flags every image-reading script shares (and with `training`, the training
    stages'): --data --image-size --batch-size --device --workers --seed."""
    size = {"default": image_size, "help": "square input size in pixels"} if image_size else {}
    add_shared_flags(parser, "--data", "--image-size", "--batch-size", "--device", "--workers",
                     "--seed", image_size=size, batch_size={"default": batch_size})
    if training:
        add_shared_flags(parser, "--crop-scale", "--cache", "--amp", "--tensorboard",
                         *RECIPE_FLAGS)


def settings_from(cls: type, args: argparse.Namespace, **given: object) -> object:
    """An instance of the dataclass `cls` from parsed flags: each field from the flag of its
    name (batch_size from --batch-size), those `given` instead (sweep.py's --kd-epochs as
    epochs), the others at their defaults."""
    values = {field.name: getattr(args, field.name) for field in dataclasses.fields(cls)
              if field.init and hasattr(args, field.name)}
    return cls(**{**values, **given})


def resolve_device(name: str) -> torch.device:
    """torch.device for --device auto|cpu|cuda|cuda:N, or a UserError saying what is wrong."""
    import torch

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


@contextlib.contextmanager
def quiet_nni(verbose: bool):
    """NNI 3.0 prints deprecation warnings, INFO logs and bare prints; hide them unless asked."""
    if verbose:
        yield
        return
    logger = logging.getLogger("nni")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", message=".*already registered as pytree node")
            yield
    finally:
        logger.setLevel(level)

