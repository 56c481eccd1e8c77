"""Specification of export.py and of .onnx files everywhere test.py takes a checkpoint.

The model is model.py's VGG16 built from narrow widths with batch norm, trained here
for a few epochs on a toy set it really learns (dark vs light noise pictures), so
that int8's agreement with fp32 means something.
"""
import json
import re
import shutil
import types

import pytest
import torch
import torch.nn.functional as F

import model as vgg
from compress import checkpoints
from compress.data.images import ORIGINAL_NORMALIZATION, training_loaders
from compress.export import convert, onnx_files
from compress.machine import cpu
from compress.training import loop
from helpers import (IMAGE_SIZE, NARROW, assert_clean_error, load_script, run_in_process,
                     toy_pictures)

pytestmark = pytest.mark.slow  # (real trainings and ONNX exports)

export = load_script("export")
test_py = load_script("test")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A trained toy checkpoint (finetuned_vgg16_net.pth) in a folder, exported once."""
    folder = tmp_path_factory.mktemp("export")
    toy_pictures(folder / "dataset" / "train", 24, seed=0)
    toy_pictures(folder / "dataset" / "val", 12, seed=1)
    torch.manual_seed(0)
    model = vgg.from_architecture(dict(NARROW, batch_norm=True))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    train_loader, _ = training_loaders(str(folder / "dataset"), IMAGE_SIZE, CPU, crop_scale=0.5,
                                       batch_size=8, workers=0)

    def cross_entropy(net, images, labels):
        logits = net(images)
        return F.cross_entropy(logits, labels), logits

    for epoch in range(4):
        train_loader.sampler.set_epoch(epoch)
        loop.train_one_epoch(model, optimizer, cross_entropy, train_loader, CPU)
    checkpoint = checkpoints.make_checkpoint(model.eval(), "finetuned", "vgg16", ["dark", "light"],
                                             IMAGE_SIZE, ORIGINAL_NORMALIZATION, {})
    checkpoints.atomic_save(checkpoint, str(folder / "finetuned_vgg16_net.pth"))
    proc = run_in_process(export, "--calibration", 16, cwd=folder)
    return types.SimpleNamespace(folder=folder, proc=proc, model=model.eval(),
                                 checkpoint=checkpoint)


def test_export_writes_an_fp32_and_an_int8_file_and_reports_its_checks(exported):
    assert exported.proc.returncode == 0, exported.proc.stderr
    assert sorted(p.name for p in exported.folder.iterdir()) == [  # no temporary folder left
        "dataset", "finetuned_vgg16_net.int8.onnx", "finetuned_vgg16_net.onnx",
        "finetuned_vgg16_net.pth"]
    out = exported.proc.stdout
    assert re.search(r"fp32 ONNX computes what PyTorch computes: max relative difference "
                     r"\d\.\de[-+]\d\d on 24 pictures", out), out
    accuracy = dict(re.findall(r"(PyTorch|fp32|int8) ([\d.]+)%", out))
    assert set(accuracy) == {"PyTorch", "fp32", "int8"}, out
    assert float(accuracy["PyTorch"]) >= 90  # the toy set was learnt
    assert float(accuracy["fp32"]) == float(accuracy["PyTorch"])
    agreement = float(re.search(r"int8 agrees with fp32 on ([\d.]+)%", out).group(1))
    assert agreement >= 90 and float(accuracy["int8"]) >= float(accuracy["fp32"]) - 10
    fp32 = (exported.folder / "finetuned_vgg16_net.onnx").stat().st_size
    int8 = (exported.folder / "finetuned_vgg16_net.int8.onnx").stat().st_size
    assert int8 < 0.4 * fp32


def test_the_onnx_files_describe_themselves(exported):
    source = exported.folder / "finetuned_vgg16_net.pth"
    for name, precision in (("finetuned_vgg16_net.onnx", "fp32"),
                            ("finetuned_vgg16_net.int8.onnx", "int8")):
        description, _ = onnx_files.load_onnx(str(exported.folder / name))
        assert description["precision"] == precision and description["kind"] == "finetuned"
        for field in ("class_names", "image_size", "normalization", "architecture"):
            assert description[field] == exported.checkpoint[field], field
        assert description["source_sha256"] == checkpoints.file_sha256(source)


def test_the_int8_file_records_the_cpu_class_it_was_quantised_for(exported):
    description, _ = onnx_files.load_onnx(str(exported.folder / "finetuned_vgg16_net.int8.onnx"))
    here = cpu.cpu_class()
    assert description["quantization"] == {"cpu": here, "reduce_range": cpu.saturates(here),
                                           "per_channel": True}
    assert f"Quantizing to int8 for {here} CPUs" in exported.proc.stdout
    assert ("7-bit" if cpu.saturates(here) else "8-bit") + " weights per channel" \
        in exported.proc.stdout


def export_copy(exported, folder, *flags):
    """export.py of the toy checkpoint in a copy of its folder."""
    shutil.copytree(exported.folder / "dataset", folder / "dataset")
    shutil.copy(exported.folder / "finetuned_vgg16_net.pth", folder)
    return run_in_process(export, "--calibration", 8, *flags, cwd=folder)


def test_int8_for_another_cpu_class_quantises_for_it_and_test_py_says_so(exported, tmp_path):
    # 7-bit weights for an AVX2 CPU, 8-bit ones for one with VNNI
    other = "avx2" if cpu.cpu_class() != "avx2" else "amx"
    proc = export_copy(exported, tmp_path, "--int8-for", other)
    assert proc.returncode == 0, proc.stderr
    description, _ = onnx_files.load_onnx(str(tmp_path / "finetuned_vgg16_net.int8.onnx"))
    assert description["quantization"]["cpu"] == other
    assert description["quantization"]["reduce_range"] == (other == "avx2")
    proc = run_in_process(test_py, "--weights", "finetuned_vgg16_net.int8.onnx", "--workers", 0,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (f"note: finetuned_vgg16_net.int8.onnx was quantised for {other} CPUs, this one is "
            f"{cpu.cpu_class()}") in proc.stdout


def test_test_py_notes_an_int8_file_that_records_no_cpu_class(exported, tmp_path):
    import onnx

    proto = onnx.load(str(exported.folder / "finetuned_vgg16_net.int8.onnx"))
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key != "quantization"]
    del proto.metadata_props[:]
    for key, value in kept:
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(tmp_path / "older.int8.onnx"))  # as export.py wrote it before
    shutil.copytree(exported.folder / "dataset", tmp_path / "dataset")
    proc = run_in_process(test_py, "--weights", "older.int8.onnx", "--workers", 0, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "note: older.int8.onnx records no CPU class (exported by an earlier export.py)" \
        in proc.stdout
    if cpu.saturates(cpu.cpu_class()):
        assert "can saturate here" in proc.stdout


def squeezed_calibration(monkeypatch):
    """Calibrate on pictures scaled down 100-fold: every activation range set far too
    narrow, so the int8 file clips what it sees and loses its accuracy."""
    batches = convert.calibration_batches
    monkeypatch.setattr(convert, "calibration_batches",
                        lambda *args, **kwargs: (images / 100
                                                 for images in batches(*args, **kwargs)))


def test_an_int8_file_that_lost_accuracy_is_not_saved(exported, tmp_path, monkeypatch):
    squeezed_calibration(monkeypatch)
    proc = export_copy(exported, tmp_path)
    line = assert_clean_error(proc, "finetuned_vgg16_net.int8.onnx", "--int8-max-drop 1",
                              "not saved", "--force-int8", status=1)
    lost = float(re.search(r"lost ([\d.]+) points", line).group(1))
    assert lost > 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [  # the fp32 file is saved
        "dataset", "finetuned_vgg16_net.onnx", "finetuned_vgg16_net.pth"]
    assert "Saved finetuned_vgg16_net.onnx" in proc.stdout


def test_force_int8_saves_it_with_a_warning(exported, tmp_path, monkeypatch):
    squeezed_calibration(monkeypatch)
    proc = export_copy(exported, tmp_path, "--force-int8")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^WARNING: finetuned_vgg16_net.int8.onnx lost [\d.]+ points .* saved "
                     r"anyway \(--force-int8\)$", proc.stderr, re.MULTILINE), proc.stderr
    assert (tmp_path / "finetuned_vgg16_net.int8.onnx").is_file()


def test_int8_max_drop_sets_how_much_int8_may_lose(exported, tmp_path, monkeypatch):
    squeezed_calibration(monkeypatch)
    proc = export_copy(exported, tmp_path, "--int8-max-drop", 100)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    assert (tmp_path / "finetuned_vgg16_net.int8.onnx").is_file()
    for bad in ("-1", "101", "many"):
        assert_clean_error(run_in_process(export, "--int8-max-drop", bad, cwd=tmp_path),
                           "--int8-max-drop")


@pytest.mark.parametrize("batch", [1, 3, 7])
def test_the_fp32_file_takes_any_batch_and_computes_what_pytorch_computes(exported, batch):
    _, runner = onnx_files.load_onnx(str(exported.folder / "finetuned_vgg16_net.onnx"))
    pictures = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator()
                           .manual_seed(batch))
    with torch.no_grad():
        expected = exported.model(pictures)
    got = runner(pictures)
    assert got.shape == (batch, 2)
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-4


def accuracy_of(path, folder):
    proc = run_in_process(test_py, "--weights", path, "--workers", 0, cwd=folder)
    assert proc.returncode == 0, proc.stderr
    line = re.search(rf"{re.escape(path)}: accuracy ([\d.]+)% on (\d+) images", proc.stdout)
    return line.groups()


def test_test_py_gives_the_onnx_file_the_accuracy_of_its_checkpoint(exported):
    assert (accuracy_of("finetuned_vgg16_net.onnx", exported.folder)
            == accuracy_of("finetuned_vgg16_net.pth", exported.folder))
    # each file's confusion matrix beside it, under its own name
    for name in ("finetuned_vgg16_net.confusion.png", "finetuned_vgg16_net.onnx.confusion.png"):
        assert (exported.folder / name).stat().st_size > 1000


def test_test_py_classifies_a_picture_with_the_int8_file(exported, tmp_path):
    picture = sorted((exported.folder / "dataset" / "val" / "light").glob("*.png"))[0]
    proc = run_in_process(test_py, "--weights", exported.folder / "finetuned_vgg16_net.int8.onnx",
                          "--image", picture, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"{picture}: light" in proc.stdout


def test_compare_ends_with_the_int8_row(exported, tmp_path):
    folder = tmp_path / "compare"
    shutil.copytree(exported.folder, folder)
    proc = run_in_process(test_py, "--compare", "--repeats", 1, "--max-repeats", 2, "--warmup", 0,
                          "--workers", 0,
                          cwd=folder)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((folder / "compare.json").read_text())
    assert [row["name"] for row in rows] == ["distilled", "int8"]
    distilled, int8 = rows
    assert (distilled["runtime"], int8["runtime"]) == ("torch", "onnxruntime")
    assert int8["precision"] == "int8" and int8["params"] == distilled["params"]
    assert int8["flops"] == distilled["flops"] and int8["file_bytes"] < distilled["file_bytes"]
    assert re.search(r"^int8 ", proc.stdout, re.MULTILINE)


# --- what export.py and test.py refuse -------------------------------------------------

def test_an_onnx_file_without_our_description_is_refused(exported, tmp_path):
    foreign = tmp_path / "foreign.onnx"
    torch.onnx.export(exported.model, (torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE),), str(foreign),
                      dynamo=True)
    proc = run_in_process(test_py, "--weights", foreign, cwd=tmp_path)
    assert_clean_error(proc, "foreign.onnx", "not written by export.py")


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_a_damaged_onnx_file_is_a_one_line_error(exported, tmp_path, damage):
    whole = (exported.folder / "finetuned_vgg16_net.int8.onnx").read_bytes()
    path = tmp_path / "damaged.onnx"
    path.write_bytes(b"" if damage == "empty" else whole[:len(whole) // 2])
    proc = run_in_process(test_py, "--weights", path, cwd=tmp_path)
    assert_clean_error(proc, "damaged.onnx", "empty" if damage == "empty" else "corrupt")


def test_an_onnx_file_for_other_classes_or_another_size_is_refused(exported, tmp_path):
    onnx_file = exported.folder / "finetuned_vgg16_net.onnx"
    proc = run_in_process(test_py, "--weights", onnx_file, "--image-size", 64, cwd=tmp_path)
    assert_clean_error(proc, "made for 32 px", "--image-size asks for 64 px")
    shutil.copytree(exported.folder / "dataset", tmp_path / "dataset")
    (tmp_path / "dataset" / "val" / "light").rename(tmp_path / "dataset" / "val" / "bright")
    proc = run_in_process(test_py, "--weights", onnx_file, "--workers", 0, cwd=tmp_path)
    assert_clean_error(proc, "made for classes ['dark', 'light']", "['bright', 'dark']")


def test_export_refuses_calibration_0_and_a_file_that_is_not_a_model(exported, tmp_path):
    shutil.copytree(exported.folder / "dataset", tmp_path / "dataset")
    proc = run_in_process(export, "--calibration", 0, cwd=tmp_path)
    assert_clean_error(proc, "--calibration", "positive integer")
    torch.save({"format": "vgg-prune-distill-state/2"}, tmp_path / "state.pth")
    proc = run_in_process(export, "--weights", "state.pth", cwd=tmp_path)
    assert_clean_error(proc, "state.pth", "not a checkpoint of this pipeline")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset", "state.pth"]


@pytest.mark.parametrize("problem", ["no dataset", "other classes", "an onnx as weights",
                                     "output not onnx"])
def test_export_refuses_in_one_line_before_any_work(exported, tmp_path, problem):
    shutil.copy(exported.folder / "finetuned_vgg16_net.pth", tmp_path)
    flags, named = {"no dataset": ([], "dataset/val: folder not found"),
                    "other classes": ([], "made for classes ['dark', 'light']"),
                    "an onnx as weights": (["--weights", "model.onnx"], "already an exported"),
                    "output not onnx": (["--output", "model.bin"], "must end in .onnx")}[problem]
    if problem == "other classes":
        shutil.copytree(exported.folder / "dataset", tmp_path / "dataset")
        (tmp_path / "dataset" / "train" / "dark").rename(tmp_path / "dataset" / "train" / "black")
    proc = run_in_process(export, *flags, cwd=tmp_path)
    assert_clean_error(proc, named)
    assert not [p for p in tmp_path.rglob("*") if p.suffix == ".onnx" or ".export-" in p.name]


def test_ctrl_c_during_export_leaves_nothing_behind(exported, tmp_path, monkeypatch):
    shutil.copytree(exported.folder / "dataset", tmp_path / "dataset")
    shutil.copy(exported.folder / "finetuned_vgg16_net.pth", tmp_path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert, "quantize_int8", interrupted)  # after the fp32 file was made
    proc = run_in_process(export, "--output", "new/model.onnx", cwd=tmp_path)
    assert proc.returncode == 130 and "nothing was saved" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset", "finetuned_vgg16_net.pth"]


def test_an_fp32_file_that_differs_from_pytorch_is_refused_and_nothing_saved(
        exported, tmp_path, monkeypatch):
    shutil.copytree(exported.folder / "dataset", tmp_path / "dataset")
    shutil.copy(exported.folder / "finetuned_vgg16_net.pth", tmp_path)
    forward = onnx_files.OnnxModel.forward
    monkeypatch.setattr(onnx_files.OnnxModel, "forward", lambda self, x: forward(self, x) * 1.01)
    proc = run_in_process(export, "--calibration", 8, cwd=tmp_path)
    assert_clean_error(proc, "differs from finetuned_vgg16_net.pth by 1.0e-02", "nothing was saved",
                       status=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset", "finetuned_vgg16_net.pth"]


def test_export_never_overwrites_an_onnx_file_it_did_not_write(exported, tmp_path):
    shutil.copytree(exported.folder / "dataset", tmp_path / "dataset")
    shutil.copy(exported.folder / "finetuned_vgg16_net.pth", tmp_path)
    (tmp_path / "finetuned_vgg16_net.int8.onnx").write_bytes(b"someone else's model")
    proc = run_in_process(export, cwd=tmp_path)
    assert_clean_error(proc, "finetuned_vgg16_net.int8.onnx", "refusing to overwrite")
    assert (tmp_path / "finetuned_vgg16_net.int8.onnx").read_bytes() == b"someone else's model"
    assert not (tmp_path / "finetuned_vgg16_net.onnx").exists()


def test_the_int8_check_decides_on_val_and_only_reports_test(exported, tmp_path):
    """The split that chooses decides whether the int8 file is saved; test is printed
    beside it, never decided on."""
    shutil.copytree(exported.folder / "dataset", tmp_path / "dataset")
    toy_pictures(tmp_path / "dataset" / "test", 6, seed=2)
    shutil.copy2(exported.folder / "finetuned_vgg16_net.pth", tmp_path)
    proc = run_in_process(export, "--calibration", 16, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    decided = [line for line in lines if "pictures of dataset/val, on this CPU" in line]
    reported = [line for line in lines if "dataset/test (reported, not decided on)" in line]
    assert len(decided) == 1 and len(reported) == 1
