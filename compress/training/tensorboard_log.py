"""TensorBoard: a run's figures epoch by epoch, and a sweep's settings beside their results.

`--tensorboard DIR` (train.py, knowledge_distillation.py, sweep.py) writes event files
that `tensorboard --logdir DIR` shows:

- `EpochLog(folder, first_epoch)`: one run's scalars, an epoch a step -- loss and
  accuracy (train and val), the learning rate, images per second, the teacher's share
  of a distillation's time -- in `folder` (DIR/NAME: NAME the output's file name).
  A resumed run continues the same curves: what the stopped run wrote after the epoch
  it resumes from is dropped (SummaryWriter's purge_step). Under torchrun only rank 0
  writes (training.fit opens it there alone).
- `log_settings(folder, rows)`: each setting of a sweep as a run of TensorBoard's
  HParams tab (method, sparsity, the distillation's settings; the measured accuracy,
  its difference from the dense model's, latency, speed-up over the dense model in
  PyTorch and file size), in the folder its distillation's curves are in.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

# an EpochRecord's figures and their tags: loss/train and loss/val share one chart
TAGS = {"train_loss": "loss/train", "val_loss": "loss/val",
        "train_accuracy": "accuracy/train", "val_accuracy": "accuracy/val",
        "lr": "learning rate", "images_per_second": "images per second",
        "teacher_share": "teacher's share of the time"}

# what of a row's training settings the HParams tab shows (not the data's path, the
# teacher's checksum, --cache or --amp: the same for every setting of a sweep)
TRAINING_HPARAMS = ("epochs", "lr", "batch_size", "optimizer", "weight_decay", "schedule",
                    "warmup_epochs", "label_smoothing", "temperature", "alpha", "kd_loss",
                    "feature_weight", "seed")


def run_folder(tensorboard: str, output: str) -> str:
    """DIR/NAME: the run of `output` (a checkpoint's path) under --tensorboard DIR."""
    return os.path.join(tensorboard, os.path.splitext(os.path.basename(output))[0])


class EpochLog:
    """The scalars of one training or distillation run, from `first_epoch` + 1 on (0: from
    the start; a resumed run's epoch)."""

    def __init__(self, folder: str, first_epoch: int = 0):
        from torch.utils.tensorboard import SummaryWriter  # (imports tensorboard: only here)

        self.writer = SummaryWriter(folder, purge_step=first_epoch + 1 if first_epoch else None)

    def log(self, record: dict) -> None:
        """One epoch's record (training.loop's EpochRecord) as scalars at step `epoch`."""
        for key, tag in TAGS.items():
            if record.get(key) is not None:
                self.writer.add_scalar(tag, record[key], record["epoch"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def log_settings(tensorboard: str, rows: Sequence[dict]) -> None:
    """Each swept setting of `rows` (sweep.json's rows; the dense row first) as a run of
    TensorBoard's HParams tab, in DIR/NAME beside its distillation's curves."""
    from torch.utils.tensorboard import SummaryWriter

    dense = rows[0]
    reference = dense.get("pytorch", dense)
    for row in rows[1:]:
        training = row.get("training") or {}
        settings = {"method": row.get("method") or row["name"],
                    "global": bool(row.get("global")), "sparsity": row.get("sparsity") or 0.0,
                    "steps": row.get("steps") or 1,
                    "latency_target_ms": row.get("latency_target_ms") or 0.0,
                    **{key: training[key] for key in TRAINING_HPARAMS if key in training}}
        # against the dense model as the user has it, in PyTorch (as the sweep's table)
        difference = (row.get("difference") or {}).get("difference",
                                                        row["accuracy"] - dense["accuracy"])
        results = {"hparam/accuracy": row["accuracy"], "hparam/difference": difference,
                   "hparam/latency_ms": row["latency_ms"],
                   "hparam/speedup": reference["latency_ms"] / row["latency_ms"],
                   "hparam/file_mb": row["file_bytes"] / 2 ** 20}
        with SummaryWriter(os.path.join(tensorboard, row["name"])) as writer:
            writer.add_hparams(settings, results, run_name=".")  # (beside its curves)
