"""Stage 2: train a dense VGG on the split dataset.

Reads  DATA/train/<class>/, DATA/val/<class>/       (made by split_dataset.py)
Writes OUTPUT (vgg16Net.pth)      the checkpoint with the best validation accuracy
       class_indices.json         {"0": "cat", "1": "dog", ...}
       vgg16Net.history.json/.png loss and accuracy per epoch (.json: also training images/s)
       vgg16Net.state.pth         only after Ctrl-C: continue with --resume

    python train.py                                   # VGG16, 224 px, Adam 1e-4, 30 epochs
    python train.py --image-size 64 --epochs 5 --batch-norm
"""
import torch
import torch.nn.functional as F

import model as vgg
from checkpoints import atomic_save, make_checkpoint, safe_load, write_json
from cli import UserError, add_data_args, make_parser, positive_float, positive_int, run_cli
from data import training_loaders
from distributed import distributed, init_distributed
from training import MEMORY_FORMAT, fit


def get_args_parser():
    parser = make_parser(__doc__)
    add_data_args(parser, image_size=224, training=True)
    parser.add_argument("--arch", default="vgg16", choices=sorted(vgg.CONV_WIDTHS))
    parser.add_argument("--batch-norm", action="store_true", help="VGG with batch normalisation")
    parser.add_argument("--classifier-width", type=positive_int, default=4096,
                        help="units of each of the two hidden Linear layers; below VGG's 4096 the "
                             "model shrinks fast (the first takes 25088 inputs), which suits small "
                             "pictures and few classes")
    parser.add_argument("--epochs", type=positive_int, default=30,
                        help="passes over the training set")
    parser.add_argument("--lr", type=positive_float, default=1e-4, help="Adam learning rate")
    parser.add_argument("--pretrained", metavar="PATH",
                        help="torchvision VGG weights (a state dict .pth) to start from, "
                             "e.g. vgg16-397923af.pth downloaded beforehand")
    parser.add_argument("--output", default="vgg16Net.pth", help="best checkpoint")
    parser.add_argument("--class-index", default="class_indices.json",
                        help="where to write the class names by index")
    parser.add_argument("--resume", metavar="STATE", help="continue an interrupted run")
    return parser


def load_pretrained_weights(model, path):
    state_dict = safe_load(path, "a torchvision VGG state dict")
    if isinstance(state_dict, dict) and "state_dict" in state_dict:
        state_dict = state_dict["state_dict"]
    try:
        replaced = vgg.load_pretrained(model, state_dict)
    except (ValueError, AttributeError) as error:
        width = model.classifier[0].out_features
        hint = f" (torchvision's classifier is 4096 wide, this one {width}: leave " \
               "--classifier-width out)" if width != 4096 else ""
        raise UserError(f"{path}: {error}{hint}") from None
    print(f"Loaded pretrained weights from {path}"
          + (f" (new final layer for {model.classifier[6].out_features} classes)" if replaced else ""))


def main(args):
    torch.manual_seed(args.seed)
    device = init_distributed(args.device)
    train_loader, val_loader = training_loaders(args, args.image_size, device)
    class_names = train_loader.dataset.class_names
    print(f"Training {args.arch}{' with batch norm' if args.batch_norm else ''} on {device}: "
          f"{len(train_loader.dataset)} train / {len(val_loader.dataset)} val images, "
          f"classes {class_names}, {args.image_size} px")
    if distributed()[0] == 0:
        write_json({str(i): name for i, name in enumerate(class_names)}, args.class_index)

    model = vgg.build_model(args.arch, len(class_names), args.batch_norm, args.classifier_width)
    if args.pretrained:
        load_pretrained_weights(model, args.pretrained)
    model.to(device, memory_format=MEMORY_FORMAT)
    # fused: one kernel updates all parameters; the step is ~3x faster on CPU
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, fused=True)
    # what a resumed run must keep, or it would not continue exactly
    settings = {"batch_size": args.batch_size, "seed": args.seed, "crop_scale": args.crop_scale,
                "cache": args.cache, "lr": args.lr, "image_size": args.image_size,
                "amp": args.amp}

    def compute_loss(net, images, labels):
        logits = net(images)
        return F.cross_entropy(logits, labels), logits

    def save_best(metrics):
        metrics.update(lr=args.lr, epochs=args.epochs, seed=args.seed)
        atomic_save(make_checkpoint(model, "dense", args.arch, class_names, args.image_size,
                                    metrics), args.output)

    history = fit(model, optimizer, compute_loss, train_loader, val_loader, device,
                  epochs=args.epochs, output=args.output, settings=settings, on_best=save_best,
                  title="train", resume=args.resume, amp=args.amp, memory_format=MEMORY_FORMAT)
    best = max(history, key=lambda r: r["val_accuracy"])
    print(f"Best validation accuracy {best['val_accuracy']:.1%} at epoch {best['epoch']}; "
          f"saved {args.output}")


if __name__ == "__main__":
    raise SystemExit(run_cli(main, get_args_parser()))
