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
"""
import http.client
import os

import torch
import torch.nn.functional as F
import torchvision

import model as vgg
from checkpoints import (atomic_save, check_replaceable, guess_normalization, is_state_dict,
                         make_checkpoint, read_class_index, safe_load, write_json)
from cli import UserError, add_data_args, make_parser, positive_float, positive_int, run_cli
from data import ORIGINAL_NORMALIZATION, training_loaders
from distributed import distributed, init_distributed
from training import MEMORY_FORMAT, fit

NEAR_ZERO = 1e-2  # a batch-norm scale this small all but switches its channel off


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
    parser.add_argument("--bn-sparsity", type=positive_float, metavar="LAMBDA",
                        help="network slimming's sparsity training: add LAMBDA * sum(|gamma|) "
                             "over the batch-norm scales to the loss, so the scales of channels "
                             "that matter little approach zero and pruner.py --method slim "
                             "--global removes them; needs --batch-norm. The history records "
                             f"the penalty and the scales below {NEAR_ZERO:g}")
    parser.add_argument("--bn-lr", type=positive_float,
                        help="Adam learning rate of the batch-norm scales (default: --lr). Adam "
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
    parser.add_argument("--output", default="vgg16Net.pth", help="best checkpoint")
    parser.add_argument("--class-index", default="class_indices.json",
                        help="where to write the class names by index")
    parser.add_argument("--resume", metavar="STATE", help="continue an interrupted run")
    return parser


def pretrained_weights(source, arch, batch_norm):
    """(state dict, normalisation, where from) of --pretrained imagenet|PATH."""
    if source != "imagenet":
        loaded = safe_load(source, "a torchvision VGG state dict or a checkpoint of this pipeline")
        if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):  # ours
            return (loaded["state_dict"], loaded.get("normalization", ORIGINAL_NORMALIZATION),
                    source)
        if not is_state_dict(loaded):
            raise UserError(f"{source}: not a state dict of tensors (a torchvision VGG .pth)")
        final = loaded.get("classifier.6.weight")
        return loaded, guess_normalization(len(final) if final is not None else 0), source
    # torchvision's weights API, and the folder torchvision caches its downloads in
    weights = torchvision.models.get_weight(
        f"{arch.upper()}{'_BN' if batch_norm else ''}_Weights.IMAGENET1K_V1")
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    if not os.path.isfile(cached):
        download(weights.url, cached)
    state_dict = safe_load(cached, f"torchvision's {weights}; delete it to download it again")
    if not is_state_dict(state_dict):
        raise UserError(f"{cached}: not a state dict of tensors; delete it to download it again")
    mean_std = weights.transforms()
    return (state_dict, {"mean": list(mean_std.mean), "std": list(mean_std.std)},
            f"torchvision's {weights}")


def download(url, path):
    """Fetch `url` into `path` as torch.hub does (checking the hash in its name), or say why not."""
    print(f"Downloading {url} into {path} ...", flush=True)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    prefix = torch.hub.HASH_REGEX.search(os.path.basename(path))
    try:
        torch.hub.download_url_to_file(url, path, hash_prefix=prefix and prefix.group(1))
    except (OSError, RuntimeError, http.client.HTTPException) as error:
        # no network (URLError), a page instead of the file (a hash mismatch), a cut download
        reason = getattr(error, "reason", None) or error
        raise UserError(f"--pretrained imagenet: {os.path.basename(path)} is not in torch's "
                        f"cache and could not be downloaded ({reason}); put {url} into "
                        f"{os.path.dirname(path)}, or give --pretrained PATH") from None


def load_pretrained_weights(model, state_dict, source, arch, batch_norm):
    try:
        new = vgg.load_pretrained(model, state_dict)
    except (ValueError, AttributeError) as error:
        raise UserError(f"{source}: {error}{architecture_hint(state_dict, arch, batch_norm)}") \
            from None
    layers = sorted({name.rsplit(".", 1)[0] for name in new})
    print(f"Starting from {source}" + (f"; new {', '.join(layers)} (not in those weights, or "
                                       "of another shape)" if layers else ""))


def architecture_hint(state_dict, arch, batch_norm):
    """' (they are a vgg19 with batch norm: ...)' when the weights are of another VGG."""
    try:
        theirs = vgg.architecture_from_state_dict(state_dict)
    except (ValueError, AttributeError, TypeError):
        return ""
    if (theirs["arch"], theirs["batch_norm"]) == (arch, batch_norm):
        return ""
    flags = f"--arch {theirs['arch']}" + (" --batch-norm" if theirs["batch_norm"] else "")
    return f" (they are a {theirs['arch']}{' with batch norm' if theirs['batch_norm'] else ''}: " \
           f"add {flags})"


def check_class_index(path, class_names):
    """Refuse, before training, to overwrite a class index that names other classes (the
    one beside the original demo's model, say)."""
    existing = read_class_index(path)
    if existing is not None and existing != list(class_names):
        raise UserError(f"{path}: exists and names other classes {existing} than "
                        f"{list(class_names)}; refusing to overwrite it: give another "
                        "--class-index, or move it first")


def batch_norm_scales(model):
    return [m.weight for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]


def scale_sparsity(scales, bn_sparsity):
    """The sparsity penalty now and how many of the scales are near zero."""
    magnitudes = torch.cat([scale.detach().abs().flatten() for scale in scales])
    return {"bn_penalty": bn_sparsity * magnitudes.sum().item(),
            "bn_scales_near_zero": int((magnitudes < NEAR_ZERO).sum())}


def main(args):
    for flag, value in (("--bn-sparsity", args.bn_sparsity), ("--bn-lr", args.bn_lr)):
        if value and not args.batch_norm:
            raise UserError(f"{flag}: needs --batch-norm (it is about the batch-norm scales)")
    check_replaceable(args.output)
    torch.manual_seed(args.seed)
    device = init_distributed(args.device)
    normalization = ORIGINAL_NORMALIZATION
    if args.pretrained:
        pretrained, normalization, source = pretrained_weights(args.pretrained, args.arch,
                                                               args.batch_norm)
    train_loader, val_loader = training_loaders(args, args.image_size, device, normalization)
    class_names = train_loader.dataset.class_names
    print(f"Training {args.arch}{' with batch norm' if args.batch_norm else ''} on {device}: "
          f"{len(train_loader.dataset)} train / {len(val_loader.dataset)} val images, "
          f"classes {class_names}, {args.image_size} px")
    check_class_index(args.class_index, class_names)
    if distributed()[0] == 0:
        write_json({str(i): name for i, name in enumerate(class_names)}, args.class_index)

    model = vgg.build_model(args.arch, len(class_names), args.batch_norm, args.classifier_width)
    if args.pretrained:
        load_pretrained_weights(model, pretrained, source, args.arch, args.batch_norm)
    model.to(device, memory_format=MEMORY_FORMAT)
    scales = batch_norm_scales(model)
    groups = model.parameters()
    if args.bn_lr:  # the scales in a group of their own
        groups = [{"params": [p for p in model.parameters() if all(p is not s for s in scales)]},
                  {"params": scales, "lr": args.bn_lr}]
    # fused: one kernel updates all parameters; the step is ~3x faster on CPU
    optimizer = torch.optim.Adam(groups, lr=args.lr, fused=True)
    # what a resumed run must keep, or it would not continue exactly
    settings = {"batch_size": args.batch_size, "seed": args.seed, "crop_scale": args.crop_scale,
                "cache": args.cache, "lr": args.lr, "image_size": args.image_size,
                "amp": args.amp}
    if args.pretrained:  # it sets how pictures are normalised
        settings["pretrained"] = args.pretrained
    if args.bn_sparsity or args.bn_lr:
        settings.update(bn_sparsity=args.bn_sparsity, bn_lr=args.bn_lr)

    def compute_loss(net, images, labels):
        logits = net(images)
        loss = F.cross_entropy(logits, labels)
        if args.bn_sparsity:
            loss = loss + args.bn_sparsity * sum(scale.abs().sum() for scale in scales)
        return loss, logits

    def save_best(metrics):
        metrics.update(lr=args.lr, epochs=args.epochs, seed=args.seed, pretrained=args.pretrained,
                       bn_sparsity=args.bn_sparsity, bn_lr=args.bn_lr)
        atomic_save(make_checkpoint(model, "dense", args.arch, class_names, args.image_size,
                                    normalization, metrics), args.output)

    history = fit(model, optimizer, compute_loss, train_loader, val_loader, device,
                  epochs=args.epochs, output=args.output, settings=settings, on_best=save_best,
                  title="train", resume=args.resume, amp=args.amp, memory_format=MEMORY_FORMAT,
                  epoch_metrics=(lambda: scale_sparsity(scales, args.bn_sparsity))
                  if args.bn_sparsity else None)
    best = max(history, key=lambda r: r["val_accuracy"])
    print(f"Best validation accuracy {best['val_accuracy']:.1%} at epoch {best['epoch']}; "
          f"saved {args.output}")


if __name__ == "__main__":
    raise SystemExit(run_cli(main, get_args_parser()))
