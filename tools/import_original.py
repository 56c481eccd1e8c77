"""Convert a model the original demo saved whole (torch.save(model)) into a plain checkpoint.

The original's pruner.py and "knowledge distillation.py" pickled whole nn.Modules
(pruned_vgg16_net.pth, finetuned_vgg16_net.pth). Unpickling runs whatever code the
file names, so the stages refuse such files. This tool loads one only when you
add --trust (because you made it yourself, or trust where it came from), keeps
nothing of it but its tensors and the layer widths they show, and writes a
checkpoint of this pipeline, which loads with torch.load(weights_only=True).

Reads  PATH                 a whole pickled VGG (an NNI-pruned one too), or a bare state dict
       class_indices.json   beside PATH, for the class names (else class_0..class_N)
Writes OUTPUT (PATH with .plain.pth: pruned_vgg16_net.plain.pth)

    python tools/import_original.py pruned_vgg16_net.pth --trust
    python tools/import_original.py finetuned_vgg16_net.pth --trust --kind finetuned
"""
import os

import torch

from compress.checkpoints import (atomic_save, check_replaceable, checkpoint_from_state_dict,
                                  is_state_dict, make_checkpoint, model_from_checkpoint,
                                  output_path)
from compress.cli import UserError, image_size_type, make_parser, run_cli


def get_args_parser():
    parser = make_parser(__doc__)
    parser.add_argument("path", metavar="PATH", help="the pickled model to convert")
    parser.add_argument("--trust", action="store_true",
                        help="load PATH with torch.load(weights_only=False), which runs any "
                             "code the file names: only for a file you trust")
    parser.add_argument("--output", help="the checkpoint to write (default: PATH with .plain.pth)")
    parser.add_argument("--kind", choices=("dense", "pruned", "finetuned"),
                        help="what the model is (default: dense if its convolutions have "
                             "VGG's standard widths, else pruned)")
    parser.add_argument("--image-size", type=image_size_type, default=224,
                        help="the input size it was trained at (the original's was 224)")
    return parser


def load_trusted(path):
    """What the pickle at `path` holds, loaded with weights_only=False (it may run code)."""
    print(f"Loading {path} with torch.load(weights_only=False), as --trust allows ...", flush=True)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # whatever unpickling raises: a missing class, a broken file
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise UserError(f"{path}: could not be unpickled ({type(error).__name__}"
                        f"{': ' + message if message else ''})") from None


def main(args):
    if not os.path.isfile(args.path):
        raise UserError(f"{args.path}: file not found")
    if not args.trust:
        raise UserError(f"{args.path}: not loaded: unpickling a whole saved model runs any code "
                        "the file names; if you made it (or trust where it came from), add "
                        "--trust")
    output = args.output or output_path(args.path, "plain.pth")
    if os.path.abspath(output) == os.path.abspath(args.path):
        raise UserError(f"--output {output}: would replace the file being converted")
    check_replaceable(output)
    loaded = load_trusted(args.path)
    if isinstance(loaded, torch.nn.Module):
        loaded = loaded.state_dict()
    if not is_state_dict(loaded):
        raise UserError(f"{args.path}: holds a {type(loaded).__name__}, not a VGG module or "
                        "state dict")
    # tensors only, copied out of whatever the pickle built
    state_dict = {name: tensor.detach().clone() for name, tensor in loaded.items()}
    checkpoint = checkpoint_from_state_dict(state_dict, args.path, args.image_size,
                                            say=lambda line: None)  # told below
    model = model_from_checkpoint(checkpoint, args.path)
    kind = args.kind or checkpoint["kind"]
    atomic_save(make_checkpoint(model, kind, checkpoint["architecture"]["arch"],
                                checkpoint["class_names"], checkpoint["image_size"],
                                checkpoint["normalization"],
                                {"imported_from": os.path.basename(args.path)}), output)
    architecture = checkpoint["architecture"]
    params = sum(tensor.numel() for tensor in model.parameters())
    print(f"Wrote {output}: a {kind} {architecture['arch']}"
          f"{' with batch norm' if architecture['batch_norm'] else ''} of {params / 1e6:.1f}M "
          f"parameters for {checkpoint['image_size']} px, classes {checkpoint['class_names']}; "
          "it loads with weights_only=True. Give it to the stages in place of the pickled file "
          f"(--weights, --student, --compare {output}).")


if __name__ == "__main__":
    raise SystemExit(run_cli(main, get_args_parser()))
