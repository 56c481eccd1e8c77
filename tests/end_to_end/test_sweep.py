"""Specification of sweep.py (stage 7) and of timing.interleaved_seconds.

- A sweep prunes and distils each setting, times all students and the dense model
  together, and writes sweep.json (a dense row, then one row per setting) and
  sweep.png beside the students.
- It resumes: a setting already distilled with the same training flags is not run
  again; adding a sparsity runs only the new setting; timings are always redone.
- --max-drop picks the fastest row within the budget (sweep.pick); sweep.pareto marks
  the rows no other row beats; --search bisects the sparsity (plain.bisect_sparsity).
- Bad values are one-line errors.
- timing.interleaved_seconds times its runs interleaved, each round in a new order,
  and stops as soon as every run's median is known well enough (else at max_repeats).

The real sweep runs once per module from conftest's narrow_teacher (l1 at 0.5, 1
distillation epoch, 2 to 3 timed runs), as its own process, then twice more to resume it;
the later sweeps run through sweep.py's CLI edge in this process (a fresh interpreter spends
seconds importing torch, NNI and the ONNX exporter).
"""
import itertools
import json
import os
import re
import shutil
import sys
import types

import pytest
import torch
import torchvision

from compress.export import onnx_files
from compress.measure import timing
from compress.measure.evaluation import count_flops
from compress.sweep import decision, plain, rules
from helpers import (MEDIUM, assert_clean_error, files_under, load_script, run_in_process,
                     run_script, small_checkpoint)

sweep = load_script("sweep")
UNBUDGETED = ["sweep.py", "--methods", "l1", "--kd-epochs", 1, "--batch-size", 8,
              "--workers", 0, "--max-repeats", 3, "--repeats", 2]
SWEEP = [*UNBUDGETED, "--max-drop", 100]
MEASURED = ["accuracy", "params", "flops", "file_bytes", "latency_ms", "latency_iqr_ms",
            "throughput_ips", "path"]


def run_sweep(folder, *sparsities, more=(), own_process=False):
    """sweep.py through its CLI edge in this process (or in a process of its own, as a user
    runs it: the module's first sweep)."""
    flags = [*SWEEP[1:], "--sparsities", *sparsities, *more]
    proc = (run_script("sweep.py", *flags, cwd=folder) if own_process
            else run_in_process(sweep, *flags, cwd=folder))
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    return proc


def read_rows(folder, report="sweep.json"):
    return json.loads((folder / "sweep" / report).read_text())


def stamp(path):
    status = path.stat()
    return status.st_mtime_ns, status.st_size


def settings_of(rows):
    return [row for row in rows if row["name"] != "dense"]


def assert_picked_is_fastest_within(rows, max_drop):
    """The pick: the fastest in the runtime that decided, within the budget counted from the
    dense model's accuracy in PyTorch."""
    dense, settings = rows[0], settings_of(rows)
    reference = dense.get("pytorch", dense)["accuracy"]
    within = [r for r in settings if 100 * (reference - r["accuracy"]) <= max_drop]
    picked = [r for r in settings if r["picked"]]
    assert len(picked) == 1
    assert picked[0]["latency_ms"] == min(r["latency_ms"] for r in within)


@pytest.fixture(scope="module")
def swept(narrow_teacher, tmp_path_factory):
    """A sweep of l1 at 0.5 in a folder holding the narrow teacher's dataset and dense model;
    its rows and the student's file stamp as they were right after it."""
    folder = tmp_path_factory.mktemp("sweep")
    shutil.copytree(narrow_teacher / "dataset", folder / "dataset")
    shutil.copy2(narrow_teacher / "vgg16Net.pth", folder / "vgg16Net.pth")
    proc = run_sweep(folder, 0.5, more=["--tensorboard", "board"], own_process=True)
    return types.SimpleNamespace(folder=folder, proc=proc, rows=read_rows(folder),
                                 compared=read_rows(folder, "compare.json"),
                                 student=stamp(folder / "sweep" / "l1-0.5.pth"))


@pytest.fixture(scope="module")
def resumed(swept):
    """The same sweep run again, then once more with sparsity 0.7 added."""
    folder = swept.folder
    again = run_sweep(folder, 0.5)
    student_after_again = stamp(folder / "sweep" / "l1-0.5.pth")
    more = run_sweep(folder, 0.5, 0.7)
    return types.SimpleNamespace(again=again, student_after_again=student_after_again,
                                 more=more, student_after_more=stamp(folder / "sweep" /
                                                                     "l1-0.5.pth"),
                                 rows=read_rows(folder), compared=read_rows(folder, "compare.json"))


# --- one sweep --------------------------------------------------------------------------

def test_sweep_json_has_the_dense_row_then_one_row_per_setting(swept):
    assert [row["name"] for row in swept.rows] == ["dense", "l1-0.5"]
    dense, setting = swept.rows
    assert dense["path"] == "vgg16Net.pth" and dense["kind"] == "dense"
    for key in MEASURED:
        assert key in dense, key
    for key in ["method", "sparsity", *MEASURED]:
        assert key in setting, key
    assert (setting["method"], setting["global"], setting["sparsity"]) == ("l1", False, 0.5)


def test_every_row_names_an_existing_file_of_the_size_it_reports(swept):
    for row in swept.rows:
        assert (swept.folder / row["path"]).is_file(), row["path"]
        assert row["file_bytes"] == (swept.folder / row["file"]).stat().st_size
        assert row["pytorch"]["file_bytes"] == (swept.folder / row["path"]).stat().st_size
    assert [(row["path"], row["file"]) for row in swept.rows] == [
        ("vgg16Net.pth", "sweep/dense.int8.onnx"), ("sweep/l1-0.5.pth", "sweep/l1-0.5.int8.onnx")]
    assert (swept.folder / "sweep" / "l1-0.5.pruned.pth").is_file()


def test_by_default_the_sweep_decides_by_the_int8_files_it_would_ship(swept):
    """Every candidate and the dense model exported as export.py does (fp32 and int8 ONNX,
    beside the .pth; the dense one's in the sweep's folder), measured in onnxruntime, with
    the PyTorch figures of the same run kept beside them."""
    for stem in ("sweep/dense", "sweep/l1-0.5"):
        for suffix, precision in ((".onnx", "fp32"), (".int8.onnx", "int8")):
            description, _ = onnx_files.load_onnx(str(swept.folder / (stem + suffix)))
            assert description["precision"] == precision
    pytorch = read_rows(swept.folder, "compare.pytorch.json")
    for row, int8, in_pytorch in zip(swept.rows, swept.compared, pytorch):
        assert (row["target"], int8["runtime"], int8["precision"]) == (
            "int8", "onnxruntime", "int8")
        assert in_pytorch["runtime"] == "torch" and in_pytorch["path"] == row["path"]
        assert row["pytorch"]["latency_ms"] == in_pytorch["latency_ms"]
        assert (row["accuracy_by_runtime"]["int8"], row["accuracy_by_runtime"]["pytorch"]) == (
            int8["accuracy"], in_pytorch["accuracy"])
    assert "Decided by int8 ONNX in onnxruntime" in swept.proc.stdout
    assert "CPU: " in swept.proc.stdout and "int8 class" in swept.proc.stdout


def test_tensorboard_shows_each_settings_distillation_and_its_measured_figures(swept):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(swept.folder / "board" / "l1-0.5"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"loss/train", "accuracy/val", "teacher's share of the time"} <= set(tags)
    row = swept.rows[1]
    accuracy, = events.Scalars("hparam/accuracy")  # (the HParams tab's figures)
    assert accuracy.value == pytest.approx(row["accuracy"])
    assert events.Scalars("hparam/speedup")[0].value == \
        pytest.approx(swept.rows[0]["pytorch"]["latency_ms"] / row["latency_ms"])
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")


def test_a_swept_student_is_the_one_knowledge_distillation_py_makes(swept, tmp_path):
    """The sweep distils as the script does: the same pruned model, flags and seed give the
    same weights, bit for bit (the random stream dropout draws from included)."""
    proc = run_script("knowledge_distillation.py", "--teacher", swept.folder / "vgg16Net.pth",
                      "--student", swept.folder / "sweep" / "l1-0.5.pruned.pth",
                      "--data", swept.folder / "dataset", "--epochs", 1, "--batch-size", 8,
                      "--workers", 0, "--output", tmp_path / "by_hand.pth", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    by_hand, swept_student = (torch.load(path, weights_only=True)["state_dict"] for path in
                              (tmp_path / "by_hand.pth", swept.folder / "sweep" / "l1-0.5.pth"))
    assert by_hand.keys() == swept_student.keys()
    assert all(torch.equal(by_hand[name], swept_student[name]) for name in by_hand)


def test_the_pruned_student_is_smaller_and_faster_to_compute(swept):
    dense, setting = swept.rows
    assert 0.2 < setting["params"] / dense["params"] < 0.3  # half the channels: ~a quarter
    assert 0.2 < setting["flops"] / dense["flops"] < 0.3


def test_the_rows_hold_the_numbers_test_py_compare_measured_in_the_same_run(swept):
    assert len(swept.compared) == len(swept.rows)
    for row, measured in zip(swept.rows, swept.compared):
        assert row["file"] == measured["path"]
        for key in ("accuracy", "params", "flops", "latency_ms", "latency_iqr_ms",
                    "throughput_ips"):
            assert row[key] == measured[key], (row["name"], key)
        assert 2 <= row["latency_runs"] <= 3  # --repeats 2 --max-repeats 3
        assert row["latency_ms"] > 0 and row["latency_iqr_ms"] >= 0


def test_the_picked_row_is_the_fastest_within_the_budget(swept):
    assert_picked_is_fastest_within(swept.rows, 100)
    assert "--max-drop 100 (decided on val): l1-0.5 (sweep/l1-0.5.int8.onnx)" in swept.proc.stdout


def test_the_sweep_draws_its_chart(swept):
    assert (swept.folder / "sweep" / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Saved sweep/sweep.json and sweep/sweep.png" in swept.proc.stdout


# --- resuming ---------------------------------------------------------------------------

def test_the_same_command_again_does_not_run_the_setting_again(swept, resumed):
    assert "l1-0.5: done before (" in resumed.again.stdout
    assert "not run again" in resumed.again.stdout
    assert "=== l1-0.5" not in resumed.again.stdout
    assert resumed.student_after_again == swept.student


def test_adding_a_sparsity_runs_only_the_new_setting(swept, resumed):
    assert "l1-0.5: done before (" in resumed.more.stdout
    assert "=== l1-0.5" not in resumed.more.stdout
    assert "=== l1-0.7 (setting 2 of 2) ===" in resumed.more.stdout
    assert resumed.student_after_more == swept.student


def test_a_resumed_sweep_reports_every_setting_timed_anew(swept, resumed):
    assert [row["name"] for row in resumed.rows] == ["dense", "l1-0.5", "l1-0.7"]
    assert (swept.folder / "sweep" / "l1-0.7.pth").is_file()
    for row, measured in zip(resumed.rows, resumed.compared):
        assert row["latency_ms"] == measured["latency_ms"], row["name"]
    old = {row["name"]: row["latency_ms"] for row in swept.rows}
    assert all(row["latency_ms"] != old[row["name"]] for row in resumed.rows if row["name"] in old)


def test_a_resumed_sweep_picks_the_fastest_of_all_its_settings(resumed):
    """Two settings, each measured as its int8 file: the pick is the one those numbers say."""
    assert [row["file"] for row in settings_of(resumed.rows)] == [
        "sweep/l1-0.5.int8.onnx", "sweep/l1-0.7.int8.onnx"]
    assert_picked_is_fastest_within(resumed.rows, 100)
    assert resumed.rows[2]["params"] < resumed.rows[1]["params"]  # 0.7 is smaller than 0.5


@pytest.fixture(scope="module")
def extended(swept, resumed):
    """After those: a MobileNetV2 student and a one-step search of l1 added; then, with
    l1-0.7's student deleted, a run without --max-drop."""
    folder = swept.folder
    more = run_sweep(folder, 0.5, more=["--mobilenet-v2", "--search", "l1", "--search-steps", 1])
    rows = read_rows(folder)
    (folder / "sweep" / "l1-0.7.pth").unlink()
    unbudgeted = run_in_process(sweep, *UNBUDGETED[1:], "--sparsities", 0.5, cwd=folder)
    assert unbudgeted.returncode == 0, f"{unbudgeted.stdout}\n{unbudgeted.stderr}"
    return types.SimpleNamespace(more=more, rows=rows, unbudgeted=unbudgeted,
                                 rows_unbudgeted=read_rows(folder))


def test_a_mobilenet_v2_student_joins_the_sweep(extended):
    student = {row["name"]: row for row in extended.rows}["mobilenet_v2"]
    assert (student["method"], student["arch"], student["sparsity"]) == \
        ("mobilenet_v2", "mobilenet_v2", None)
    # the parameters of torchvision's MobileNetV2 for the teacher's two classes
    mobilenet = torchvision.models.mobilenet_v2(num_classes=2)
    assert student["params"] == count_flops(mobilenet, 32)[1]
    assert student["latency_ms"] > 0


def test_the_search_reuses_a_setting_already_distilled(extended):
    assert "search: sparsity 0.5 is within the 100-point budget" in extended.more.stdout
    assert "=== l1-0.5" not in extended.more.stdout
    assert "search: the largest l1 sparsity within 100 points is 0.5" in extended.more.stdout


def test_a_setting_whose_student_is_gone_is_left_out(extended):
    assert "Left out (distilled with other settings, or their file is gone): l1-0.7" in \
        extended.unbudgeted.stdout
    assert [row["name"] for row in extended.rows_unbudgeted] == \
        ["dense", "l1-0.5", "mobilenet_v2"]


def test_without_max_drop_no_row_stays_picked(extended):
    assert any(row.get("picked") for row in extended.rows)
    assert not any(row["picked"] for row in settings_of(extended.rows_unbudgeted))
    assert "picked by" in extended.unbudgeted.stdout and " * " not in extended.unbudgeted.stdout


def test_target_pytorch_decides_by_the_checkpoints_and_exports_only_the_pick(narrow_teacher,
                                                                             tmp_path):
    shutil.copytree(narrow_teacher / "dataset", tmp_path / "dataset")
    shutil.copy2(narrow_teacher / "vgg16Net.pth", tmp_path / "vgg16Net.pth")
    proc = run_sweep(tmp_path, 0.5, 0.7, more=["--target", "pytorch"])
    rows = read_rows(tmp_path)
    assert all(row["file"] == row["path"] and row["target"] == "pytorch" for row in rows)
    assert "pytorch" not in rows[0] and "Decided by PyTorch" in proc.stdout
    assert_picked_is_fastest_within(rows, 100)
    picked = [row for row in rows if row.get("picked")][0]
    stem = picked["path"][:-len(".pth")]
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.onnx")) == [
        f"{stem}.int8.onnx", f"{stem}.onnx"]
    assert f"the pick ships as {stem}.onnx and .int8.onnx" in proc.stdout
    # the same settings again, deciding by int8: nothing distilled, every student shipped
    proc = run_sweep(tmp_path, 0.5, 0.7)
    assert proc.stdout.count("done before") == 2 and "Decided by int8" in proc.stdout
    assert all(row["file"].endswith(".int8.onnx") for row in read_rows(tmp_path))
    assert len(list(tmp_path.glob("sweep/*.int8.onnx"))) == 3  # two students and the dense


# --- pick, pareto, search on hand-made rows ------------------------------------------

def row(name, latency_ms, accuracy, params):
    return {"name": name, "latency_ms": latency_ms, "accuracy": accuracy, "params": params}


ROWS = [row("fast", 1.0, 0.50, 10), row("mid", 2.0, 0.88, 20), row("slow", 5.0, 0.90, 40),
        row("beaten", 6.0, 0.86, 5)]
DENSE = {"name": "dense", "accuracy": 0.90}


@pytest.mark.parametrize("max_drop, name", [(100, "fast"), (50, "fast"), (39, "mid"),
                                            (2.5, "mid"), (1, "slow"), (0, "slow")])
def test_pick_takes_the_fastest_row_within_max_drop_points(max_drop, name):
    assert decision.pick(ROWS, DENSE, max_drop)["name"] == name


def test_pick_prefers_fewer_parameters_between_equally_fast_rows():
    rows = [row("big", 2.0, 0.9, 40), row("small", 2.0, 0.9, 20), row("slower", 3.0, 0.9, 1)]
    assert decision.pick(rows, DENSE, 1)["name"] == "small"


def test_pick_takes_the_most_accurate_of_rows_of_one_architecture():
    """l1-0.9 and taylor-0.9 have the same widths: 0.68 against 0.69 ms is timing noise."""
    rows = [row("l1", 0.68, 0.962, 10), row("taylor", 0.69, 0.992, 10), row("other", 1.0, 1, 20)]
    assert decision.pick(rows, DENSE, 5)["name"] == "taylor"
    assert decision.pick(rows, DENSE, 5) is rows[1]
    assert decision.pick(rows[:1] + rows[2:], DENSE, 5)["name"] == "l1"  # still the fastest


def test_pick_gives_none_when_no_row_is_within_the_budget():
    assert decision.pick(ROWS, {"accuracy": 1.0}, 5) is None


def test_a_row_exactly_max_drop_points_below_the_dense_model_is_within_the_budget():
    assert decision.pick([row("edge", 1.0, 17 / 20, 10)], {"accuracy": 18 / 20}, 5) is not None


def test_the_budget_counts_from_the_dense_models_accuracy_in_pytorch():
    """With an int8 target, a dense int8 file that lost points must not widen the budget."""
    dense = dict(DENSE, accuracy=0.5, pytorch={"accuracy": 0.9})
    assert decision.pick(ROWS, dense, 1)["name"] == "slow"  # ("fast", counted from 0.5)


def test_pareto_keeps_the_rows_no_other_row_beats_in_both_measures():
    # beaten: slower and worse than mid; fast: bigger than beaten
    assert rules.pareto(ROWS, "latency_ms") == {"fast", "mid", "slow"}
    assert rules.pareto(ROWS, "params") == {"beaten", "mid", "slow"}


class Prober:
    """Stands in for Sweep: a student's accuracy falls from 0.9 to 0.5 above sparsity 0.6."""

    def __init__(self):
        self.tried = []

    def run(self, setting, position=""):
        self.tried.append(setting.name)
        return {"name": setting.name, "accuracy": 0.9 if setting.sparsity <= 0.6 else 0.5}


def test_search_bisects_to_the_largest_sparsity_within_the_budget():
    prober = Prober()
    assert plain.bisect_sparsity(prober, "l1", False, 0.9, 1, 4) == 0.5625
    assert prober.tried == ["l1-0.5", "l1-0.75", "l1-0.625", "l1-0.5625"]
    prober = Prober()
    assert plain.bisect_sparsity(prober, "slim", True, 0.9, 1, 2) == 0.5
    assert prober.tried == ["slim-global-0.5", "slim-global-0.75"]


# --- the teacher, once -------------------------------------------------------------------

def test_a_sweep_of_two_settings_loads_and_hashes_the_teacher_once(narrow_teacher, tmp_path,
                                                                     monkeypatch):
    """Every setting is pruned from, distilled by and measured beside the teacher in memory:
    its file is read twice in the whole run (torch.load once, its SHA-256 once)."""
    shutil.copytree(narrow_teacher / "dataset", tmp_path / "dataset")
    shutil.copy2(narrow_teacher / "vgg16Net.pth", tmp_path / "vgg16Net.pth")
    teacher = str(tmp_path / "vgg16Net.pth")
    loads, opens = [], []
    load = torch.load

    def counting_load(source, *args, **kwargs):
        if isinstance(source, (str, os.PathLike)) and os.path.abspath(source) == teacher:
            loads.append(source)
        return load(source, *args, **kwargs)

    def opening(event, arguments):
        if event == "open" and isinstance(arguments[0], str) and opens is not None and \
                os.path.abspath(arguments[0]) == teacher:
            opens.append(arguments[1])

    monkeypatch.setattr(torch, "load", counting_load)
    sys.addaudithook(opening)  # every open() of the teacher's file, whoever opens it
    try:
        proc = run_in_process(sweep, *SWEEP[1:], "--sparsities", 0.5, 0.7, cwd=tmp_path)
    finally:
        counted, opens = list(opens), None  # (an audit hook cannot be removed: it goes quiet)
    assert proc.returncode == 0, proc.stderr
    assert "=== l1-0.5 (setting 1 of 2) ===" in proc.stdout
    assert "=== l1-0.7 (setting 2 of 2) ===" in proc.stdout
    assert len(loads) == 1
    assert len(counted) == 2, counted  # torch.load's, and file_sha256's
    # the teacher answered the first setting's pictures; the second read them back
    ran = re.findall(r"^The teacher ran on (\d+) pictures.*; (\d+) of its answers read back",
                     proc.stdout, re.MULTILINE)
    assert len(ran) == 2 and int(ran[0][0]) > 0 and ran[1] == ("0", ran[0][0]), ran
    assert len(list(tmp_path.glob("sweep/teacher_logits.*.pt"))) == 1


# --- bad values -----------------------------------------------------------------------

@pytest.mark.parametrize("flags, named", [(["--sparsities"], "--sparsities"),
                                          (["--sparsities", 1], "--sparsities"),
                                          (["--methods", "nope"], "--methods"),
                                          (["--methods", "l1:local"], "--methods"),
                                          (["--search", "l1"], "--max-drop"),
                                          (["--search-steps", 11], "--search-steps")])
def test_bad_sweep_values_are_one_line_errors_before_any_work(tmp_path, flags, named):
    proc = run_in_process(sweep, *flags, cwd=tmp_path)
    assert_clean_error(proc, named)
    assert list(tmp_path.iterdir()) == []


def test_what_a_stage_would_refuse_later_is_refused_before_any_work(tmp_path):
    small_checkpoint(tmp_path / "dense.pth")  # no batch norm, 32 px, no recorded accuracy
    for flags, named in [(["--methods", "l1", "slim"], "batch norm"),
                         (["--image-size", 64], "--image-size")]:
        proc = run_in_process(sweep, "--weights", "dense.pth", *flags, cwd=tmp_path)
        assert_clean_error(proc, "dense.pth", named)
    assert [p.name for p in tmp_path.iterdir()] == ["dense.pth"]


def test_a_file_of_someone_elses_where_a_student_goes_is_refused_before_any_work(tmp_path):
    small_checkpoint(tmp_path / "dense.pth")
    for part in ("train", "val"):
        (tmp_path / "dataset" / part / "cat").mkdir(parents=True)
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "l1-0.7.pth").write_bytes(b"my own model")
    proc = run_in_process(sweep, "--weights", "dense.pth", "--sparsities", 0.5, 0.7,
                          cwd=tmp_path)
    assert_clean_error(proc, "sweep/l1-0.7.pth", "refusing to overwrite it", "--output-dir")
    assert files_under(tmp_path) == ["dense.pth", "sweep/l1-0.7.pth"]
    assert (tmp_path / "sweep" / "l1-0.7.pth").read_bytes() == b"my own model"


def test_an_onnx_file_of_someone_elses_where_a_student_ships_is_refused_before_any_work(
        tmp_path):
    small_checkpoint(tmp_path / "dense.pth")
    for part in ("train", "val"):
        (tmp_path / "dataset" / part / "cat").mkdir(parents=True)
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "l1-0.7.int8.onnx").write_bytes(b"my own export")
    proc = run_in_process(sweep, "--weights", "dense.pth", "--sparsities", 0.5, 0.7,
                          cwd=tmp_path)
    assert_clean_error(proc, "sweep/l1-0.7.int8.onnx", "refusing to overwrite it",
                       "--output-dir")
    assert files_under(tmp_path) == ["dense.pth", "sweep/l1-0.7.int8.onnx"]


# --- timing.interleaved_seconds ------------------------------------------------------

class FakeDevice:
    """A clock and an accelerator: a run queues its seconds of work, sync() waits for it."""

    def __init__(self):
        self.now, self.queued, self.calls, self.syncs = 0.0, 0.0, [], 0

    def perf_counter(self):
        return self.now

    def sync(self):
        self.syncs += 1
        self.now += self.queued
        self.queued = 0.0

    def runs(self, *seconds):
        """One run per iterable of durations (a number: that many seconds every call)."""
        def make(index, durations):
            durations = itertools.repeat(durations) if isinstance(durations, float) \
                else itertools.cycle(durations)

            def run():
                self.calls.append(index)
                self.queued += next(durations)
            return run
        return [make(index, durations) for index, durations in enumerate(seconds)]


@pytest.fixture
def device(monkeypatch):
    fake = FakeDevice()
    monkeypatch.setattr(timing, "time", fake)
    return fake


def test_each_round_calls_every_run_once_in_a_new_order(device):
    timing.interleaved_seconds(device.runs(1.0, 1.0, 1.0), device.sync, warmup=1, repeats=11,
                                max_repeats=11)
    rounds = [tuple(device.calls[i:i + 3]) for i in range(0, len(device.calls), 3)]
    assert len(rounds) == 12 and all(sorted(order) == [0, 1, 2] for order in rounds)
    # no run always follows the same one: each is timed after each of the others
    followers = {(order[i], order[i + 1]) for order in rounds for i in range(2)}
    assert followers == {(a, b) for a in range(3) for b in range(3) if a != b}


def test_each_run_is_timed_alone_with_its_queued_work_and_warmup_left_out(device):
    runs = device.runs([50.0] + [1.0] * 9, 2.0, 0.5)  # the first call of run 0 is slow
    timings = timing.interleaved_seconds(runs, device.sync, warmup=1, repeats=3, max_repeats=3)
    assert [t.median for t in timings] == [1.0, 2.0, 0.5]
    assert [t.iqr for t in timings] == [0.0, 0.0, 0.0]
    assert device.syncs == 2 * len(device.calls)  # before starting and before stopping


def test_tight_timings_stop_after_repeats_rounds(device):
    timings = timing.interleaved_seconds(device.runs(1.0, 3.0), device.sync, warmup=2,
                                          repeats=4, max_repeats=50)
    assert [t.runs for t in timings] == [4, 4]
    assert len(device.calls) == (2 + 4) * 2


def test_one_loose_run_keeps_all_of_them_going_to_max_repeats(device):
    timings = timing.interleaved_seconds(device.runs(1.0, [1.0, 3.0]), device.sync, warmup=0,
                                          repeats=4, max_repeats=20, precision=0.02)
    assert [t.runs for t in timings] == [20, 20]
    assert timings[0].uncertainty == 0 and timings[1].uncertainty > 0.02
    assert len(device.calls) == 40


# --- iterative pruning and latency targets, in one real sweep ---------------------------

@pytest.fixture(scope="module")
def stepped(narrow_teacher, tmp_path_factory):
    """l1 at 0.5 in one cut and in 2 steps, and l1 pruned to the latency the latency model
    predicts for uniform 0.5 (PyTorch, batch 1; the model built into a cache of its own),
    from an untrained helpers.MEDIUM."""
    folder = tmp_path_factory.mktemp("stepped")
    shutil.copytree(narrow_teacher / "dataset", folder / "dataset")
    small_checkpoint(folder / "vgg16Net.pth", architecture=MEDIUM)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(folder / "cache"))
        proc = run_in_process(sweep, *UNBUDGETED[1:], "--max-drop", 100, "--sparsities", 0.5,
                              "--prune-steps", 1, 2, "--match-latency", "--kd-epochs", 2,
                              "--target", "pytorch", cwd=folder)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    return types.SimpleNamespace(folder=folder, proc=proc, rows=read_rows(folder))


def test_a_setting_in_steps_ends_on_the_one_cuts_widths_after_as_many_epochs(stepped):
    rows = {row["name"]: row for row in stepped.rows}
    one_cut, in_steps = rows["l1-0.5"], rows["l1-0.5-2steps"]
    assert in_steps["steps"] == 2 and in_steps["params"] == one_cut["params"]
    first = torch.load(stepped.folder / "sweep" / "l1-0.5-2steps.step1.pth", weights_only=True)
    final = torch.load(stepped.folder / "sweep" / "l1-0.5-2steps.pth", weights_only=True)
    assert final["architecture"] == torch.load(stepped.folder / "sweep" / "l1-0.5.pth",
                                               weights_only=True)["architecture"]
    # the first step kept more channels, each step distilled one epoch (2 in all)
    assert sum(w for w in first["architecture"]["features"] if w != "M") > \
        sum(w for w in final["architecture"]["features"] if w != "M")
    assert len(json.loads((stepped.folder / "sweep" /
                           "l1-0.5-2steps.history.json").read_text())) == 1
    assert "step 2 of 2" in stepped.proc.stdout


def test_a_latency_setting_is_pruned_to_the_uniform_ones_predicted_time(stepped):
    latency_rows = [row for row in stepped.rows if row.get("latency_target_ms")]
    assert len(latency_rows) == 1 and latency_rows[0]["name"].endswith("ms")
    row = latency_rows[0]
    assert row["predicted_ms"] <= row["latency_target_ms"] * 1.001
    assert all("predicted_ms" in r for r in stepped.rows)  # every VGG row, dense too
    assert "The latency model's batch-1 predictions against the measured latency" in \
        stepped.proc.stdout
    assert list((stepped.folder / "cache" / "vgg-prune-distill" / "latency").glob("pytorch-b1-*"))


@pytest.mark.parametrize("part", ["train", "val"])
def test_a_split_without_train_or_val_is_one_line_before_anything_is_pruned(tmp_path, part):
    small_checkpoint(tmp_path / "vgg16Net.pth")
    for made in {"train", "val"} - {part}:
        (tmp_path / "dataset" / made / "cat").mkdir(parents=True)
    proc = run_in_process(sweep, "--sparsities", 0.5, cwd=tmp_path)
    assert_clean_error(proc, f"dataset/{part}: folder not found")
    assert not (tmp_path / "sweep").exists() or files_under(tmp_path / "sweep") == []


@pytest.mark.parametrize("flags, named", [
    (["--latencies", 2, "--target", "onnx"], "--target onnx"),
    (["--latencies", 2, "--engine", "nni", "--max-drop", 1], "--latencies"),
    (["--prune-steps", 3, "--kd-epochs", 2], "--prune-steps 3"),
    (["--prune-steps", 2, "--methods", "l1:global"], "--prune-steps")])
def test_latency_and_step_flags_that_cannot_run_are_one_line(tmp_path, flags, named):
    small_checkpoint(tmp_path / "vgg16Net.pth")
    for part in ("train", "val"):
        (tmp_path / "dataset" / part / "cat").mkdir(parents=True)
    proc = run_in_process(sweep, *flags, cwd=tmp_path)
    assert_clean_error(proc, named)
