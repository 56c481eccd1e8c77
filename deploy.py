"""The model outside PyTorch: ONNX export, int8 quantisation, and running it in onnxruntime.

- `export_onnx()`: an fp32 ONNX file (torch.onnx's dynamo exporter) that takes any
  batch size, described by the checkpoint it came from (`describe()`: classes,
  image size, normalisation, widths, the source's SHA-256) in its metadata.
- `quantize_int8()`: static post-training int8 (QDQ: uint8 activations, int8
  weights) of such a file, calibrated on real pictures, for a CPU class (cpu.py):
  7-bit weights where u8 x s8 products can saturate.
- `load_onnx()`: (description, OnnxModel) of such a file: the metadata read back as
  a checkpoint-like dict, and a torch.nn.Module that runs the file in onnxruntime,
  so evaluate(), measure_latency() and test.py use it like a PyTorch model.
"""
import contextlib
import io
import json
import logging
import os
import warnings

import torch

from cli import UserError
from cpu import saturates

ONNX_FORMAT = "vgg-prune-distill-onnx/1"
INPUT, OUTPUT = "images", "logits"
# what an ONNX file of this pipeline says of itself, beside its graph: plain strings
TEXT_FIELDS = ("format", "kind", "precision", "source", "source_sha256")
JSON_FIELDS = ("class_names", "image_size", "normalization", "architecture")
# int8 files only: how they were quantised, and for which CPU class (files written
# before it was kept have none)
OPTIONAL_JSON_FIELDS = ("quantization",)


def describe(checkpoint, source, source_sha256, precision="fp32"):
    """The metadata of an ONNX file exported from `checkpoint` (read from file `source`)."""
    return {"format": ONNX_FORMAT, "kind": checkpoint["kind"], "precision": precision,
            "source": os.path.basename(source), "source_sha256": source_sha256,
            **{field: checkpoint[field] for field in JSON_FIELDS}}


def set_metadata(proto, description):
    """Write `description` into an onnx.ModelProto's metadata (replacing our own keys)."""
    ours = set(TEXT_FIELDS + JSON_FIELDS + OPTIONAL_JSON_FIELDS)
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key not in ours]
    del proto.metadata_props[:]
    for key, value in kept + [(k, description[k]) for k in TEXT_FIELDS] + [
            (k, json.dumps(description[k])) for k in JSON_FIELDS + OPTIONAL_JSON_FIELDS
            if k in description]:
        proto.metadata_props.add(key=key, value=str(value))


@contextlib.contextmanager
def quiet(verbose):
    """The exporter and the quantiser print progress, warnings and log lines (the quantiser's
    advice to pre-process: measured on the demo's model, it changed neither accuracy nor
    speed); hide them unless asked."""
    if verbose:
        yield
        return
    disabled = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(disabled)


def export_onnx(model, path, description, verbose=False):
    """Write `model` (on the CPU) as fp32 ONNX to `path`, with `description` in its metadata.

    The batch dimension is declared dynamic: torch.export otherwise fixes every
    dimension to the example's (a batch of one gave a file that takes only one).
    (The caller makes the write atomic: export.py writes into a folder of its own.)
    """
    size = description["image_size"]
    example = torch.zeros(1, 3, size, size)
    with quiet(verbose):
        program = torch.onnx.export(model.eval(), (example,), dynamo=True, input_names=[INPUT],
                                    output_names=[OUTPUT],
                                    dynamic_shapes=({0: torch.export.Dim("batch")},))
    proto = program.model_proto
    set_metadata(proto, description)
    with open(path, "wb") as file:
        file.write(proto.SerializeToString())


class Batches:
    """onnxruntime's CalibrationDataReader protocol over an iterable of image tensors."""

    def __init__(self, batches):
        self.batches = iter(batches)

    def get_next(self):
        batch = next(self.batches, None)
        return None if batch is None else {INPUT: batch.contiguous().numpy()}


def int8_settings(cpu):
    """How an int8 file for CPU class `cpu` is quantised.

    `reduce_range` (7-bit weights) where u8 x s8 products can saturate (cpu.py), else
    8-bit. Weights per output channel: measured on the demo's distilled model (fp32
    95.4%, 240 pictures), per channel / per tensor gave 96.7% / 95.8% with 8-bit
    weights on an AMX CPU, and 96.25% / 94.6% with 7-bit ones on AVX2 (where 8-bit
    per channel gave 88.75%); README.md, "Shipping it", has the whole table.
    """
    return {"cpu": cpu, "reduce_range": saturates(cpu), "per_channel": True}


def quantize_int8(fp32_path, path, calibration, cpu, verbose=False):
    """Static int8 of the fp32 ONNX file at `fp32_path` for CPU class `cpu`, written to
    `path`; returns its settings (`int8_settings`), also recorded in its metadata.

    `calibration` yields batches of pictures as the model sees them (normalised);
    activation ranges are set from them. QDQ format, uint8 activations and int8
    weights, as onnxruntime recommends for x86 CPUs.
    """
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    settings = int8_settings(cpu)
    with quiet(verbose):
        quantize_static(fp32_path, path, Batches(calibration), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        per_channel=settings["per_channel"],
                        reduce_range=settings["reduce_range"])
    proto = onnx.load(path)
    props = {p.key: p.value for p in proto.metadata_props}
    set_metadata(proto, dict(parse_description(props, path), precision="int8",
                             quantization=settings))
    onnx.save(proto, path)
    return settings


def parse_description(props, path):
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


def session(path, device=torch.device("cpu"), spinning=False):
    """An onnxruntime session of `path` on the CPU, or on CUDA when `device` is a CUDA
    device, with PyTorch's number of threads, so the two are compared like for like.

    `spinning`: onnxruntime's default, its threads keep spinning on the cores after
    each run, ready for the next. Off here: timed interleaved with PyTorch models
    (test.py --compare), the spinning slowed the model timed next, up to 25% apart
    between identical networks with IQRs half their medians (1% apart without it).
    Alone it answers faster with it (the demo's int8 model: 3.1 vs 4.1 ms at batch 1),
    so tools/benchmark.py, which times one model at a time, keeps it on.
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.add_session_config_entry("session.intra_op.allow_spinning", str(int(spinning)))
    options.log_severity_level = 3  # errors only
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


def load_onnx(path, device=torch.device("cpu")):
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

    def forward(self, images):
        logits = self.runner.run([OUTPUT], {INPUT: images.detach().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(logits).to(images.device)


def check_replaceable(path):
    """Refuse, before any work, to overwrite an .onnx file that export.py did not write."""
    if not os.path.exists(path):
        return
    try:
        import onnx

        proto = onnx.load(path, load_external_data=False)
        parse_description({p.key: p.value for p in proto.metadata_props}, path)
    except Exception:  # not ONNX, or ONNX without our description
        raise UserError(f"{path}: exists and was not written by export.py; refusing to "
                        "overwrite it: give another --output, or move it first") from None
