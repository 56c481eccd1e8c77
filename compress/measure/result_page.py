"""What a photo run bought, for a person: RESULT.md and result.png in its work folder.

`write_result()` reads what the stages left in the work folder (tools/demo.py --photos):
the split's marker (dataset/.split_dataset.json), the sweep's report (sweep/sweep.json,
decided on val), test.py --compare's report on the test split (compare.json: the dense
model, the chosen student in PyTorch, the shipped int8 file), the run's log (run.json:
each stage's minutes, the budget, the file shipped) and the teacher's history; it
writes a page that says what went in, what came out and whether it met the budget, how
long each stage took, and five lines of Python that run the shipped file on a photo.
"""
from __future__ import annotations

import json
import os

from compress.checkpoints import atomic_write
from compress.measure.intervals import budget_points, describe_difference
from compress.measure.reporting import pyplot, save_figure
from compress.sweep.rules import may_lose_more, reaches
from compress.sweep.report import epochs_cell


def read_json(path: str):
    with open(path) as file:
        return json.load(file)


def stage_minutes(workdir: str, log: dict) -> dict[str, float]:
    """Each stage's minutes as run.json has them; a teacher trained outside the photo
    command: its epochs' seconds added up (its history)."""
    minutes = dict(log["minutes"])
    history = os.path.join(workdir, "vgg16Net.history.json")
    if "train the dense teacher" not in minutes and os.path.isfile(history):
        minutes["train the dense teacher (its epochs)"] = round(
            sum(record["seconds"] for record in read_json(history)) / 60, 2)
    return minutes


def usage(shipped: str, picture: str) -> str:
    """Five lines of Python that classify `picture` with the int8 file `shipped`, as
    test.py does (the file says its size, normalisation and classes)."""
    return "\n".join([
        "import json, numpy as np, onnxruntime as ort; from PIL import Image",
        f'model = ort.InferenceSession("{shipped}"); '
        "about = model.get_modelmeta().custom_metadata_map",
        "size, norm, classes = (json.loads(about[key]) for key in "
        '("image_size", "normalization", "class_names"))',
        f'x = (np.asarray(Image.open("{picture}").convert("RGB").resize((size, size), '
        'Image.BILINEAR), np.float32) / 255 - norm["mean"]) / norm["std"]',
        'print(classes[model.run(None, {"images": x.transpose(2, 0, 1)[None].astype(np.float32)})'
        "[0].argmax()])"])


def write_result(workdir: str, photos: str, log: dict) -> str:
    """RESULT.md and result.png in `workdir` (see the module's docstring); returns the
    page's path."""
    split = read_json(os.path.join(workdir, "dataset", ".split_dataset.json"))
    sweep = read_json(os.path.join(workdir, "sweep", "sweep.json"))
    compared = read_json(os.path.join(workdir, "compare.json"))
    dense, student, shipped_row = compared
    sweep_dense = next(row for row in sweep if row.get("kind") == "dense")
    candidates = [row for row in sweep if row is not sweep_dense]
    chosen = next(row for row in candidates if row.get("shipped"))
    met, budget, shipped = chosen["picked"], log["max_drop"], log["shipped"]
    counts = {part: sum(classes.get(part, 0) for classes in split["classes"].values())
              for part in ("train", "val", "test")}
    faster = dense["latency_ms"] / shipped_row["latency_ms"]
    smaller = dense["file_bytes"] / shipped_row["file_bytes"]
    minutes = stage_minutes(workdir, log)
    total = sum(minutes.values())
    pictures = os.path.join("dataset", "test", sorted(split["classes"])[0])
    example = os.path.join(pictures, sorted(os.listdir(os.path.join(workdir, pictures)))[0])
    verdict = (f"it **met the budget**: at most {budget_points(budget)} below the dense model, "
               f"decided on the {counts['val']} val photos "
               f"({describe_difference(chosen['budget'])}"
               + ("; its interval reaches further: it may lose more"
                  if may_lose_more(chosen["budget"], budget) else "") + ")" if met else
               f"it **missed the budget** of {budget_points(budget)} (decided on the "
               f"{counts['val']} val photos: {describe_difference(chosen['budget'])}); no "
               "candidate met it, and this is "
               + ("the fastest whose interval still reaches the budget"
                  if reaches(chosen["budget"], budget) else "the most accurate candidate"))
    lines = [
        f"# Result: {os.path.basename(os.path.abspath(photos))}",
        "",
        f"**Shipped: `{shipped}`** (int8 ONNX, {shipped_row['file_bytes'] / 2**20:.1f} MB): "
        f"{shipped_row['accuracy']:.1%} [{100 * shipped_row['accuracy_low']:.1f}, "
        f"{100 * shipped_row['accuracy_high']:.1f}] on the {counts['test']} test photos, "
        f"{describe_difference(shipped_row['difference'])} against the dense model "
        f"({dense['accuracy']:.1%}); {faster:.1f}x faster at batch 1 and {smaller:.1f}x "
        f"smaller than the dense model in PyTorch. Chosen on val, {verdict}.",
        "",
        "## What went in",
        "",
        f"- Photos: `{split['source']}`, {sum(counts.values())} pictures of "
        f"{len(split['classes'])} classes ("
        + ", ".join(f"{name} {sum(parts.values())}" for name, parts in split["classes"].items())
        + f"), split {counts['train']} / {counts['val']} / {counts['test']} (train / val / test)"
        + (f"; {sum(map(len, split.get('copies', [])))} pictures were copies of another, each "
           "group kept in one part" if split.get("copies") else "") + ".",
        f"- Machine: {dense['cpu']}, {dense['threads']} threads, {dense['device']}.",
        "- Settings: l1 channel pruning at "
        + ", ".join(f"{row['sparsity']:g}" for row in candidates if row.get("sparsity"))
        + f", distilled {describe_training(candidates[0]['training'])}.",
        "",
        "## What came out (the test split, measured side by side by test.py --compare)",
        "",
        "| model | file | test accuracy [95%] | vs dense [95%] | latency b=1 | x faster | "
        "size | x smaller |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, row in (("dense", dense), (f"{chosen['name']}, PyTorch", student),
                       (f"{chosen['name']}, shipped", shipped_row)):
        lines.append(
            f"| {label} | `{row['path']}` | {row['accuracy']:.1%} "
            f"[{100 * row['accuracy_low']:.1f}, {100 * row['accuracy_high']:.1f}] | "
            + (describe_difference(row["difference"]) if row is not dense else "")
            + f" | {row['latency_ms']:.2f} ms | {dense['latency_ms'] / row['latency_ms']:.1f}x"
              f" | {row['file_bytes'] / 2**20:.1f} MB | "
              f"{dense['file_bytes'] / row['file_bytes']:.1f}x |")
    lines += [
        "",
        "## How it was chosen (the val split: each candidate as its int8 file, against the dense "
        "model in PyTorch)",
        "",
        "| candidate | epochs | val vs dense [95%] | latency b=1 | decision |",
        "|---|---|---|---|---|",
    ]
    for row in sorted(candidates, key=lambda r: r["latency_ms"]):
        decision = ("shipped, within the budget" if row["picked"] else
                    "shipped, over the budget" if row.get("shipped") else
                    "within the budget, slower" if 100 * row["budget"]["difference"] >= -budget
                    else "over the budget")
        lines.append(f"| {row['name']} | {epochs_cell(row)} | {describe_difference(row['budget'])} "
                     f"| {row['latency_ms']:.2f} ms | {decision} |")
    if shipped_row["latency_ms"] > 1.2 * chosen["latency_ms"]:
        lines += ["", "(Latency here: the candidates' int8 files timed interleaved with one "
                  "another, their caches warm; above, the shipped file timed interleaved with "
                  f"the dense model, whose {dense['file_bytes'] / 2**20:.0f} MB of weights "
                  "leave them cold: docs/photos.md measures the difference.)"]
    lines += [
        "",
        "## How long",
        "",
        "| stage | minutes |",
        "|---|---|",
        *(f"| {stage} | {value:.1f} |" for stage, value in minutes.items()),
        f"| **in all** | **{total:.1f}** |",
        "",
        f"The plan said about {log.get('estimate_minutes', 0):.0f} minutes.",
        "",
        "## Use it",
        "",
        "```python",
        usage(shipped, example),
        "```",
        "",
        "(run in this folder; the file carries its classes, picture size and normalisation; "
        "`python test.py --image PHOTO --weights FILE` says the same with the probabilities).",
        "",
        "![candidates](result.png)",
        "",
    ]
    page = os.path.join(workdir, "RESULT.md")
    atomic_write(page, lambda file: file.write("\n".join(lines)), mode="w")
    plot_result(candidates, sweep_dense, compared, budget, os.path.join(workdir, "result.png"))
    return page


def describe_training(training: dict) -> str:
    """The distillation of a sweep's rows, in a few words."""
    mix = training.get("mix", "none")
    return (f"at T={training['temperature']:g}, alpha={training['alpha']:g}, "
            f"{training['optimizer']} {training['lr']:g} {training['schedule']}"
            + (f", {mix} (the teacher answers the mixed picture the student sees)"
               if mix != "none" else ""))


def plot_result(candidates: list[dict], dense: dict, compared: list[dict], budget: float,
                path: str) -> None:
    """Two panels: each candidate's paired difference from the dense model on val against
    its latency, the budget drawn (the decision); the test accuracy of the dense model, the
    student in PyTorch and the shipped file (the report)."""
    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8),
                                         gridspec_kw={"width_ratios": [3, 2]})
    for row in candidates:
        difference = row["budget"]
        color = "C2" if row.get("shipped") else "C0"
        left.errorbar([row["latency_ms"]], [100 * difference["difference"]],
                      yerr=[[100 * (difference["difference"] - difference["low"])],
                            [100 * (difference["high"] - difference["difference"])]],
                      fmt="o", color=color, capsize=3)
        left.annotate(f"{row['name']} ({epochs_cell(row)} ep.)",
                      (row["latency_ms"], 100 * difference["difference"]), fontsize=8,
                      textcoords="offset points", xytext=(6, 4))
    left.margins(x=0.2)  # (room for the names beside the points)
    left.axhline(-budget, color="C3", linestyle=":", label=f"budget: -{budget_points(budget)}")
    left.axhline(0, color="0.6", linewidth=0.8)
    left.set(xlabel="latency at batch 1, int8 file (ms)",
             ylabel="val accuracy minus the dense model's (points)",
             title="How it was chosen (val, paired 95% intervals)")
    left.legend(loc="lower right", fontsize=8)
    names = ["dense", "student\n(PyTorch)", "shipped\n(int8)"]
    accuracies = [100 * row["accuracy"] for row in compared]
    errors = [[100 * (row["accuracy"] - row["accuracy_low"]) for row in compared],
              [100 * (row["accuracy_high"] - row["accuracy"]) for row in compared]]
    bars = right.bar(names, accuracies, yerr=errors, capsize=4, color=["C3", "C0", "C2"])
    speedups = [compared[0]["latency_ms"] / row["latency_ms"] for row in compared]
    right.bar_label(bars, labels=[f"{value:.1f}%\n{speedup:.1f}x"
                                  for value, speedup in zip(accuracies, speedups)],
                    label_type="center", fontsize=8, color="white")
    right.set(ylabel="test accuracy (%), 95% interval", ylim=(0, 100),
              title="What it is worth (test; x: faster than dense)")
    figure.suptitle(f"{dense['cpu']}, {dense['threads']} threads", fontsize=9)
    save_figure(figure, path)
