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
from data import make_loader, training_sets
from utils import (UserError, add_data_args, atomic_save, distributed, fit, init_distributed,
                   make_checkpoint, make_parser, positive_float, positive_int, run_cli, safe_load,
                   write_json)


def get_args_parser():
    parser = make_parser(__doc__)
    add_data_args(parser, image_size=224, training=True)
    parser.add_argument("--arch", default="vgg16", choices=sorted(vgg.CONV_WIDTHS))
    parser.add_argument("--batch-norm", action="store_true", help="VGG with batch normalisation")
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
        raise UserError(f"{path}: {error}") from None
    print(f"Loaded pretrained weights from {path}"
          + (f" (new final layer for {model.classifier[6].out_features} classes)" if replaced else ""))


def main(args):
    torch.manual_seed(args.seed)
    device = init_distributed(args.device)
    train_set, val_set = training_sets(args, args.image_size)
    class_names = train_set.class_names
    val_loader = make_loader(val_set, args.batch_size, args.workers, device, sampler=None)
    print(f"Training {args.arch}{' with batch norm' if args.batch_norm else ''} on {device}: "
          f"{len(train_set)} train / {len(val_set)} val images, classes {class_names}, "
          f"{args.image_size} px")
    if distributed()[0] == 0:
        write_json({str(i): name for i, name in enumerate(class_names)}, args.class_index)

    model = vgg.build_model(args.arch, len(class_names), args.batch_norm)
    if args.pretrained:
        load_pretrained_weights(model, args.pretrained)
    model.to(device)
    # fused: one kernel updates all parameters; the step is ~3x faster on CPU
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, fused=True)

    def compute_loss(net, images, labels):
        logits = net(images)
        return F.cross_entropy(logits, labels), logits

    def save_best(metrics):
        metrics.update(lr=args.lr, epochs=args.epochs, seed=args.seed)
        atomic_save(make_checkpoint(model, "dense", args.arch, class_names, args.image_size,
                                    metrics), args.output)

    history = fit(model, optimizer, compute_loss, train_set, val_loader, args, device,
                  on_best=save_best, title="train")
    best = max(history, key=lambda r: r["val_accuracy"])
    print(f"Best validation accuracy {best['val_accuracy']:.1%} at epoch {best['epoch']}; "
          f"saved {args.output}")


if __name__ == "__main__":
    raise SystemExit(run_cli(main, get_args_parser()))
