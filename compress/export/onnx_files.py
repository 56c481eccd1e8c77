"""The ONNX files of this pipeline: what they say of themselves, and running them.

- `describe()` / `set_metadata()` / `parse_description()`: the self-description an
  exported file carries in its metadata (classes, image size, normalisation, widths,
  the source checkpoint's SHA-256; an int8 file also how it was quantised, and for
  which CPU class), read back as a checkpoint-like dict.
- `load_onnx()`: (description, OnnxModel) of such a file; `OnnxModel` is a
  torch.nn.Module that runs it in onnxruntime (`session()`), so evaluate(), the
  timing and test.py use it like a PyTorch model.
- `written_by_export()`: whether a file is one of ours (export.py never overwrites
  another); `exported_earlier_note()` / `other_cpu_note()`: what test.py says of a
  file exported from an earlier checkpoint, or quantised for another CPU class.
"""
from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import torch

from compress.checkpoints import Checkpoint, file_sha256
from compress.cli import UserError
from compress.machine.cpu import cpu_class, saturates

if TYPE_CHECKING:
    import onnx

ONNX_FORMAT = "vgg-prune-distill-onnx/1"
INPUT, OUTPUT = "images", "logits"
# what an ONNX file of this pipeline says of itself, beside its graph: plain strings
TEXT_FIELDS = ("format", "kind", "precision", "source", "source_sha256")
JSON_FIELDS = ("class_names", "image_size", "normalization", "architecture")
# int8 files only: how they were quantised, and for which CPU class (files written
# before it was kept have none)
OPTIONAL_JSON_FIELDS = ("quantization",)


def describe(checkpoint: Checkpoint, source: str, source_sha256: str,
             precision: str = "fp32") -> dict:
    """The metadata of an ONNX file exported from `checkpoint` (read from file `source`)."""
    return {"format": ONNX_FORMAT, "kind": checkpoint["kind"], "precision": precision,
            "source": os.path.basename(source), "source_sha256": source_sha256,
            **{field: checkpoint[field] for field in JSON_FIELDS}}


def set_metadata(proto: onnx.ModelProto, description: dict) -> None:
    """Write `description` into an onnx.ModelProto's metadata (replacing our own keys)."""
    ours = set(TEXT_FIELDS + JSON_FIELDS + OPTIONAL_JSON_FIELDS)
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key not in ours]
    del proto.metadata_props[:]
    for key, value in kept + [(k, description[k]) for k in TEXT_FIELDS] + [
            (k, json.dumps(description[k])) for k in JSON_FIELDS + OPTIONAL_JSON_FIELDS
            if k in description]:
        proto.metadata_props.add(key=key, value=str(value))


def parse_description(props: dict, path: str) -> dict:
    """The description an ONNX file's metadata holds (dict of strings), or a UserError."""
    what = "an .onnx file written by export.py"
    if props.get("format") != ONNX_FORMAT:
        raise UserError(f"{path}: an ONNX file without this pipeline's description (not written "
                        f"by export.py); {what} expected")
    try:
        return {**{k: props[k] for k in TEXT_FIELDS},
                **{k: json.loads(props[k]) for k in JSON_FIELDS},
                **{k: json.loads(props[k]) for k in OPTIONAL_JSON_FIELDS if k in props}}
    except (KeyError, ValueError):
        raise UserError(f"{path}: its description is incomplete or damaged; {what} "
                        "expected") from None


def session(path: str, device: torch.device = torch.device("cpu"), spinning: bool = False,
            profile_prefix: str | None = None):
    """An onnxruntime session of `path` on the CPU, or on CUDA when `device` is a CUDA
    device, with PyTorch's number of threads, so the two are compared like for like.

    `spinning`: onnxruntime's default, its threads keep spinning on the cores after
    each run, ready for the next. Off here: timed interleaved with PyTorch models
    (test.py --compare), the spinning slowed the model timed next, up to 25% apart
    between identical networks with IQRs half their medians (1% apart without it).
    Alone it answers faster with it (the demo's int8 model: 3.1 vs 4.1 ms at batch 1),
    so tools/benchmark.py, which times one model at a time, keeps it on.

    `profile_prefix`: onnxruntime records every operator's time of every run, into a JSON
    file whose name starts with it (`end_profiling()` names it).
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.add_session_config_entry("session.intra_op.allow_spinning", str(int(spinning)))
    options.log_severity_level = 3  # errors only
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    if device.type != "cuda":
        return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        raise UserError(f"{path}: this onnxruntime has no CUDA provider (replace the onnxruntime "
                        "package with onnxruntime-gpu), or use --device cpu")
    runner = onnxruntime.InferenceSession(
        path, options, providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
        provider_options=[{"device_id": device.index or 0}, {}])
    if runner.get_providers()[0] != "CUDAExecutionProvider":  # onnxruntime fell back quietly
        raise UserError(f"{path}: onnxruntime could not start CUDA here; use --device cpu")
    return runner


def load_onnx(path: str, device: torch.device = torch.device("cpu")) -> tuple[dict, OnnxModel]:
    """(description, OnnxModel) of an ONNX file written by export.py; UserError otherwise."""
    what = "an .onnx file written by export.py"
    if not os.path.isfile(path):
        raise UserError(f"{path}: file not found ({what} expected)")
    if os.path.getsize(path) == 0:
        raise UserError(f"{path}: file is empty ({what} expected)")
    try:
        runner = session(path, device)
    except UserError:
        raise
    except Exception as error:  # onnxruntime's InvalidProtobuf, Fail, ...
        raise UserError(f"{path}: not a readable ONNX file, truncated or corrupt "
                        f"({type(error).__name__}); {what} expected") from None
    description = parse_description(runner.get_modelmeta().custom_metadata_map, path)
    return dict(description, metrics={}), OnnxModel(runner)


class OnnxModel(torch.nn.Module):
    """An onnxruntime session behind PyTorch's calling convention: a batch in, logits out."""

    def __init__(self, runner):
        super().__init__()
        self.runner = runner

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.runner.run([OUTPUT], {INPUT: images.detach().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(logits).to(images.device)


def zero_weight_share(path: str) -> float:
    """The share of zeros among the weights (initializers of 2 or more dimensions) of the
    .onnx file at `path`: single weights pruned (pruning/weights.py) stay zero in int8."""
    import onnx
    from onnx import numpy_helper

    zeros = total = 0
    for initializer in onnx.load(path).graph.initializer:
        if len(initializer.dims) >= 2:
            values = numpy_helper.to_array(initializer)
            zeros, total = zeros + int((values == 0).sum()), total + values.size
    return zeros / max(total, 1)


def read_description(path: str) -> dict:
    """The description in an ONNX file's metadata, read without building a session;
    raises (onnx's errors, or a UserError) for a file that is not export.py's."""
    import onnx

    proto = onnx.load(path, load_external_data=False)
    return parse_description({p.key: p.value for p in proto.metadata_props}, path)


def written_by_export(path: str) -> bool:
    """Whether `path` is an ONNX file with this pipeline's description (written by export.py)."""
    try:
        read_description(path)
        return True
    except Exception:  # not ONNX, or ONNX without our description
        return False


def exported_earlier_note(path: str, description: dict) -> str | None:
    """A note if the checkpoint beside an .onnx file has changed since it was exported."""
    source = os.path.join(os.path.dirname(path), description["source"])
    if os.path.isfile(source) and file_sha256(source) != description["source_sha256"]:
        return (f"note: {path} was exported from an earlier {source}; run export.py again to "
                "measure the current one")
    return None


def other_cpu_note(path: str, description: dict) -> str | None:
    """A note if an int8 file was made for another CPU class than this one, saying whether its
    accuracy may suffer here (8-bit weights where u8 x s8 products saturate)."""
    if description["precision"] != "int8":
        return None
    # (files written before export.py recorded it: 8-bit weights, for no CPU in particular)
    quantization = description.get("quantization", {"cpu": None, "reduce_range": False})
    made_for, here = quantization["cpu"], cpu_class()
    if made_for == here:
        return None
    line = (f"note: {path} was quantised for {made_for} CPUs" if made_for else
            f"note: {path} records no CPU class (exported by an earlier export.py)")
    line += f", this one is {here}"
    if saturates(here) and not quantization.get("reduce_range"):
        line += ("; its 8-bit weights can saturate here (u8 x s8 products summed in int16), "
                 "so its accuracy may be below what export.py measured: export it again here, "
                 f"or with --int8-for {here}")
    return line
