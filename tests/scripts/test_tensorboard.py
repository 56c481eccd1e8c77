"""Specification of --tensorboard DIR (compress/training/tensorboard_log.py) and of --amp on
the CPU: the event files hold each epoch's figures, read back with TensorBoard's own reader;
a resumed run continues its curves; --amp on a CPU without bfloat16 says so in one line
and trains in fp32, on one with it trains under bf16 autocast.
"""
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from compress.training import loop
from compress.training.tensorboard_log import EpochLog
from helpers import TRAIN_FLAGS, generate_demo, load_script, run_in_process

train = load_script("train")


def scalars(folder):
    """{tag: [(step, value), ...]} of the event files in `folder`, as TensorBoard reads them."""
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


@pytest.fixture
def split(tmp_path):
    generate_demo(tmp_path / "photos", per_class=6)
    assert run_in_process(load_script("split_dataset"), "--source", "photos",
                          cwd=tmp_path).returncode == 0
    return tmp_path


@pytest.mark.slow  # (trains)
def test_train_writes_each_epochs_figures_under_the_outputs_name(split):
    proc = run_in_process(train, *TRAIN_FLAGS, "--epochs", 2, "--batch-size", 4, "--workers", 0,
                          "--schedule", "cosine", "--tensorboard", "board", cwd=split)
    assert proc.returncode == 0, proc.stderr
    figures = scalars(split / "board" / "vgg16Net")
    for tag in ("loss/train", "loss/val", "accuracy/train", "accuracy/val", "learning rate",
                "images per second"):
        assert [step for step, _ in figures[tag]] == [1, 2], tag
    history = __import__("json").loads((split / "vgg16Net.history.json").read_text())
    assert [value for _, value in figures["accuracy/val"]] == \
        pytest.approx([record["val_accuracy"] for record in history])


def test_a_resumed_run_continues_the_same_curves(tmp_path):
    first = EpochLog(str(tmp_path), 0)
    for epoch in (1, 2, 3):  # stopped during epoch 4, its state saved after epoch 2's end
        first.log({"epoch": epoch, "val_accuracy": 0.1 * epoch})
    first.close()
    resumed = EpochLog(str(tmp_path), 2)  # resumed from epoch 3: the first run's 3 is dropped
    for epoch in (3, 4):
        resumed.log({"epoch": epoch, "val_accuracy": 0.5 + epoch})
    resumed.close()
    assert scalars(tmp_path)["accuracy/val"] == [(1, pytest.approx(0.1)), (2, pytest.approx(0.2)),
                                                 (3, 3.5), (4, 4.5)]


def test_amp_on_a_cpu_without_bfloat16_is_one_line_and_trains_in_fp32(monkeypatch, capsys):
    monkeypatch.setattr(loop, "native_bf16", lambda: None)
    autocast, scaler = loop.amp_context(torch.device("cpu"), True)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("--amp: ignored") and "bfloat16" in lines[0]
    with autocast:
        assert not torch.is_autocast_enabled("cpu")
    assert scaler is None


def test_amp_on_a_cpu_with_bfloat16_trains_under_bf16_autocast(monkeypatch, capsys):
    monkeypatch.setattr(loop, "native_bf16", lambda: "AMX (amx_bf16)")
    autocast, scaler = loop.amp_context(torch.device("cpu"), True)
    with autocast:
        product = torch.nn.Linear(4, 4)(torch.ones(2, 4))
    assert product.dtype == torch.bfloat16 and scaler is None
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("--amp: bf16 autocast") and "AMX" in lines[0]
