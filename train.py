"""Stage 2: train a dense VGG on the split dataset.

Reads  DATA/train/<class>/, DATA/val/<class>/       (made by split_dataset.py)
Writes OUTPUT (vgg16Net.pth)      the checkpoint with the best validation accuracy
       class_indices.json         {"0": "cat", "1": "dog", ...}
       vgg16Net.history.json/.png loss and accuracy per epoch (.json: also training images/s)
       vgg16Net.state.pth         only after Ctrl-C: continue with --resume

    python train.py                                   # VGG16, 224 px, Adam 1e-4, 30 epochs
    python train.py --image-size 64 --epochs 5 --batch-norm
    python train.py --pretrained imagenet --epochs 5   # from torchvision's ImageNet weights
    python train.py --batch-norm --bn-sparsity 1e-4    # for pruner.py --method slim
    python train.py --optimizer adamw --lr 1e-3 --weight-decay 0.05 --schedule cosine \
        --warmup-epochs 2 --label-smoothing 0.1        # a recipe for photographs
"""
import torch
import torch.nn.functional as F

import model as vgg
from compress.checkpoints import (atomic_save, check_class_index, check_replaceable,
                                  make_checkpoint, saved_bytes, write_json)
from compress.cli import (UserError, add_data_args, add_shared_flags, make_parser,
                          positive_float, positive_int, run_cli)
from compress.data.images import ORIGINAL_NORMALIZATION
from compress.machine.distributed import distributed, init_distributed
from compress.machine.resources import check_room, check_writable, output_lock
from compress.training.loop import MEMORY_FORMAT, fit
from compress.training.slimming import NEAR_ZERO, batch_norm_scales, scale_sparsity
from compress.training.pretrained import load_pretrained_weights, pretrained_weights
from compress.training.recipe import Recipe
from compress.training.tensorboard_log import run_folder


def get_args_parser():
    parser = make_parser(__doc__)
    add_data_args(parser, image_size=224, training=True)
    parser.add_argument("--arch", default="vgg16", choices=sorted(vgg.CONV_WIDTHS))
    parser.add_argument("--batch-norm", action="store_true", help="VGG with batch normalisation")
    parser.add_argument("--classifier-width", type=positive_int, default=4096,
                        help="units of each of the two hidden Linear layers; below VGG's 4096 the "
                             "model shrinks fast (the first takes 25088 inputs), which suits small "
                             "pictures and few classes")
    add_shared_flags(parser, "--epochs", "--lr", "--output", "--resume",
                     epochs={"default": 30}, lr={"default": 1e-4},
                     output={"default": "vgg16Net.pth", "help": "best checkpoint"})
    parser.add_argument("--bn-sparsity", type=positive_float, metavar="LAMBDA",
                        help="network slimming's sparsity training: add LAMBDA * sum(|gamma|) "
                             "over the batch-norm scales to the loss, so the scales of channels "
                             "that matter little approach zero and pruner.py --method slim "
                             "--global removes them; needs --batch-norm. The history records "
                             f"the penalty and the scales below {NEAR_ZERO:g}")
    parser.add_argument("--bn-lr", type=positive_float,
                        help="learning rate of the batch-norm scales (default: --lr). Adam "
                             "moves a weight by about its learning rate per step whatever the "
                             "gradient's size, so for --bn-sparsity to bring scales from 1 to "
                             "near zero, steps x BN_LR must reach about 1")
    parser.add_argument("--pretrained", metavar="imagenet|PATH",
                        help="start from weights: 'imagenet' takes torchvision's ImageNet "
                             "weights for --arch (and --batch-norm), downloaded once into "
                             "torch's cache; PATH a torchvision VGG state dict (.pth) or a "
                             "checkpoint of this pipeline. Pictures are then normalised as "
                             "those weights were trained; classifier layers that do not fit "
                             "(the last one for your classes, another --classifier-width) "
                             "start new")
    parser.add_argument("--class-index", default="class_indices.json",
                        help="where to write the class names by index")
    return parser


def main(args):
    for flag, value in (("--bn-sparsity", args.bn_sparsity), ("--bn-lr", args.bn_lr)):
        if value and not args.batch_norm:
            raise UserError(f"{flag}: needs --batch-norm (it is about the batch-norm scales)")
    check_replaceable(args.output)
    check_writable(args.output, "--output")
    check_writable(args.class_index, "--class-index")
    with output_lock(args.output, "--output"):
        train(args)


def train(args):
    """Train as the flags say, into args.output (main() has checked it can be written)."""
    torch.manual_seed(args.seed)
    device = init_distributed(args.device)
    recipe = Recipe.from_args(args)
    normalization = ORIGINAL_NORMALIZATION
    if args.pretrained:
        pretrained, normalization, source = pretrained_weights(args.pretrained, args.arch,
                                                               args.batch_norm)
    train_loader, val_loader = recipe.loaders(args.data, args.image_size, device, normalization)
    class_names = train_loader.dataset.class_names
    print(f"Training {args.arch}{' with batch norm' if args.batch_norm else ''} on {device}: "
          f"{len(train_loader.dataset)} train / {len(val_loader.dataset)} val images, "
          f"classes {class_names}, {args.image_size} px")
    check_class_index(args.class_index, class_names)
    model = vgg.build_model(args.arch, len(class_names), args.batch_norm, args.classifier_width)
    check_room(args.output, saved_bytes(model.state_dict()), "the best model's checkpoint")
    if distributed()[0] == 0:
        write_json({str(i): name for i, name in enumerate(class_names)}, args.class_index)

    if args.pretrained:
        load_pretrained_weights(model, pretrained, source, args.arch, args.batch_norm)
    model.to(device, memory_format=MEMORY_FORMAT)
    scales = batch_norm_scales(model)
    optimizer = recipe.make_optimizer(model, {id(scale): args.bn_lr for scale in scales}
                                      if args.bn_lr else None)
    scheduler = recipe.make_scheduler(optimizer, len(train_loader))
    # what a resumed run must keep, or it would not continue exactly
    settings = recipe.resume_settings(args.image_size)
    if args.pretrained:  # it sets how pictures are normalised
        settings["pretrained"] = args.pretrained
    if args.bn_sparsity or args.bn_lr:
        settings.update(bn_sparsity=args.bn_sparsity, bn_lr=args.bn_lr)

    def compute_loss(net, images, labels):
        logits = net(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=recipe.label_smoothing)
        if args.bn_sparsity:
            loss = loss + args.bn_sparsity * sum(scale.abs().sum() for scale in scales)
        return loss, logits

    def save_best(metrics):
        metrics.update(pretrained=args.pretrained, bn_sparsity=args.bn_sparsity,
                       bn_lr=args.bn_lr, recipe=recipe.settings())
        atomic_save(make_checkpoint(model, "dense", args.arch, class_names, args.image_size,
                                    normalization, metrics), args.output)

    history = fit(model, optimizer, compute_loss, train_loader, val_loader, device,
                  epochs=recipe.epochs, output=args.output, settings=settings, on_best=save_best,
                  title="train", resume=args.resume, amp=recipe.amp, memory_format=MEMORY_FORMAT,
                  epoch_metrics=(lambda: scale_sparsity(scales, args.bn_sparsity))
                  if args.bn_sparsity else None, scheduler=scheduler,
                  tensorboard=args.tensorboard and run_folder(args.tensorboard, args.output))
    best = max(history, key=lambda r: r["val_accuracy"])
    print(f"Best validation accuracy {best['val_accuracy']:.1%} at epoch {best['epoch']}; "
          f"saved {args.output}")


if __name__ == "__main__":
    raise SystemExit(run_cli(main, get_args_parser()))
