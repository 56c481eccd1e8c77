"""Specification of what a user coming from the original demo, or from ImageNet, tries first.

A folder is laid out as the original demo leaves it, made here the way the original
made it: vgg16Net.pth a bare state dict (torch.save(net.state_dict())),
pruned_vgg16_net.pth a whole NNI-sped-up module and finetuned_vgg16_net.pth a whole
module (torch.save(model)), class_indices.json as its train.py wrote it, and a
dataset/ split without this pipeline's marker. (The weights are the pipeline
fixture's: VGG16's convolutions under a narrow head, to stay small.)
"""
import json
import re
import shutil
import urllib.error

import pytest
import torch

import model as vgg
from compress.checkpoints import load_checkpoint
from compress.cli import UserError
from compress.data import images, pictures
from compress.pruning import channels
from compress.training import pretrained
from helpers import (IMAGE_SIZE, CreatesFileWhenUnpickled, assert_clean_error, files_under,
                     generate_demo, load_script, run_in_process, run_script, small_checkpoint,
                     tree_digest)

train = load_script("train")
pruner = load_script("pruner")
import_original = load_script("tools/import_original")


def whole_module_as_the_original_saved_it(checkpoint_path, folder, name):
    """torch.save(model) of our VGG class with no avgpool: like the original's model.VGG."""
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    module = vgg.from_architecture(checkpoint["architecture"])
    module.load_state_dict(checkpoint["state_dict"])
    del module.avgpool  # the original's VGG flattened the features directly
    torch.save(module, folder / name)


@pytest.fixture(scope="module")
def original(pipeline, tmp_path_factory):
    folder = tmp_path_factory.mktemp("original")
    dense = torch.load(pipeline.path("vgg16Net.pth"), weights_only=True)
    torch.save(dense["state_dict"], folder / "vgg16Net.pth")  # the original train.py's save
    # the original pruner.py: NNI L1 0.5 + ModelSpeedup on the dense model, then torch.save
    module = vgg.from_architecture(dense["architecture"])
    module.load_state_dict(dense["state_dict"])
    channels.prune(module, 0.5, IMAGE_SIZE)
    torch.save(module, folder / "pruned_vgg16_net.pth")
    whole_module_as_the_original_saved_it(pipeline.path("finetuned_vgg16_net.pth"), folder,
                                          "finetuned_vgg16_net.pth")
    (folder / "class_indices.json").write_text(json.dumps({0: "cat", 1: "dog"}, indent=4))
    shutil.copytree(pipeline.path("dataset"), folder / "dataset",
                    ignore=shutil.ignore_patterns(".split_dataset.json"))
    return folder


# --- the original's bare state dict is read as a dense checkpoint ---------------------

def test_a_bare_state_dict_is_read_with_its_architecture_classes_and_size(original, capsys):
    checkpoint = load_checkpoint(str(original / "vgg16Net.pth"), kinds=("dense",))
    assert checkpoint["kind"] == "dense" and checkpoint["class_names"] == ["cat", "dog"]
    assert checkpoint["image_size"] == 224
    assert checkpoint["architecture"]["features"] == vgg.CONV_WIDTHS["vgg16"]
    assert checkpoint["normalization"] == images.ORIGINAL_NORMALIZATION
    line = capsys.readouterr().out.strip()
    assert "a bare vgg16 state dict" in line and "class_indices.json" in line
    assert len(line.splitlines()) == 1


def test_without_a_class_index_the_classes_are_numbered_and_that_is_said(original, tmp_path,
                                                                       capsys):
    shutil.copy(original / "vgg16Net.pth", tmp_path / "vgg16Net.pth")
    checkpoint = load_checkpoint(str(tmp_path / "vgg16Net.pth"), image_size=64)
    assert checkpoint["class_names"] == ["class_0", "class_1"] and checkpoint["image_size"] == 64
    assert "no class_indices.json beside it" in capsys.readouterr().out


def test_bare_state_dicts_of_every_vgg_are_understood():
    for arch in vgg.CONV_WIDTHS:
        for batch_norm in (False, True):
            with torch.device("meta"):
                model = vgg.build_model(arch, 7, batch_norm, classifier_width=16)
            assert (vgg.architecture_from_state_dict(model.state_dict())
                    == vgg.architecture_of(model, arch))


def without_batch_counters(state_dict):
    """As torchvision's vgg*_bn ImageNet files are: saved before BatchNorm counted batches."""
    return {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}


def test_a_batch_norm_state_dict_without_batch_counters_is_read_and_loads(tmp_path, capsys):
    torch.manual_seed(0)
    model = vgg.build_model("vgg11", 2, batch_norm=True, classifier_width=8)
    torch.save(without_batch_counters(model.state_dict()), tmp_path / "old_bn.pth")
    checkpoint = load_checkpoint(str(tmp_path / "old_bn.pth"), image_size=IMAGE_SIZE)
    assert checkpoint["architecture"] == vgg.architecture_of(model, "vgg11")
    rebuilt = vgg.from_architecture(checkpoint["architecture"])
    rebuilt.load_state_dict(checkpoint["state_dict"])  # strict: the counters were filled in
    fresh = vgg.build_model("vgg11", 2, batch_norm=True, classifier_width=8)
    assert vgg.load_pretrained(fresh, without_batch_counters(model.state_dict())) == []


def test_a_vgg_state_dict_with_a_tensor_missing_is_refused_naming_it(tmp_path):
    state_dict = vgg.build_model("vgg11", 2, classifier_width=8).state_dict()
    del state_dict["features.3.bias"]
    torch.save(state_dict, tmp_path / "vgg16Net.pth")
    proc = run_in_process(pruner, cwd=tmp_path)
    assert_clean_error(proc, "vgg16Net.pth", "features.3.bias is missing")


def test_a_broken_class_index_beside_a_bare_state_dict_is_a_one_line_error(original, tmp_path):
    shutil.copy(original / "vgg16Net.pth", tmp_path)
    (tmp_path / "class_indices.json").write_text('{"0": "cat", ')
    proc = run_in_process(pruner, cwd=tmp_path)
    assert_clean_error(proc, "class_indices.json", "fix it or remove it")
    assert not (tmp_path / "pruned_vgg16_net.pth").exists()


def test_the_bare_state_dict_computes_what_the_checkpoint_it_came_from_computes(original,
                                                                                pipeline):
    bare = load_checkpoint(str(original / "vgg16Net.pth"), image_size=IMAGE_SIZE)
    ours = load_checkpoint(str(pipeline.path("vgg16Net.pth")))
    files = sorted((original / "dataset" / "val").rglob("*.jpg"))
    outputs = []
    for checkpoint in (bare, ours):
        model = vgg.from_architecture(checkpoint["architecture"]).eval()
        model.load_state_dict(checkpoint["state_dict"])
        transform = images.eval_transform(checkpoint["image_size"], checkpoint["normalization"])
        with torch.no_grad():
            outputs.append(model(torch.stack([transform(pictures.load_rgb(p)) for p in files])))
    assert bare["class_names"] == ours["class_names"]
    assert torch.equal(*outputs)


def test_test_py_measures_the_bare_state_dict_like_the_checkpoint_it_came_from(original,
                                                                              pipeline):
    proc = run_script("test.py", "--weights", "vgg16Net.pth", "--image-size", IMAGE_SIZE,
                      "--workers", 0, cwd=original)
    assert proc.returncode == 0, proc.stderr
    accuracy = re.search(r"vgg16Net.pth: accuracy ([\d.]+)%", proc.stdout).group(1)
    recorded = torch.load(pipeline.path("vgg16Net.pth"), weights_only=True)["metrics"]
    assert float(accuracy) == pytest.approx(100 * recorded["val_accuracy"])


def test_pruner_prunes_the_bare_state_dict(original, tmp_path):
    shutil.copy(original / "vgg16Net.pth", tmp_path)
    shutil.copy(original / "class_indices.json", tmp_path)
    proc = run_in_process(pruner, "--image-size", IMAGE_SIZE, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    pruned = torch.load(tmp_path / "pruned_vgg16_net.pth", weights_only=True)
    assert pruned["kind"] == "pruned" and pruned["class_names"] == ["cat", "dog"]
    assert pruned["image_size"] == IMAGE_SIZE and pruned["architecture"]["features"][0] == 32


def test_a_state_dict_of_something_else_is_refused_in_one_line(tmp_path):
    torch.save({"conv.weight": torch.zeros(4, 3, 3, 3), "fc.weight": torch.zeros(2, 4)},
               tmp_path / "resnet.pth")
    proc = run_in_process(load_script("test"), "--weights", tmp_path / "resnet.pth", cwd=tmp_path)
    assert_clean_error(proc, "resnet.pth", "not of a VGG", "0 convolution weights")


# --- the original's pickled modules: refused, with the way across --------------------

def test_a_pickled_module_is_refused_with_the_command_that_converts_it(original, tmp_path):
    shutil.copy(original / "finetuned_vgg16_net.pth", tmp_path)
    proc = run_in_process(load_script("test"), "--weights", "finetuned_vgg16_net.pth",
                          cwd=tmp_path)
    assert_clean_error(proc, "finetuned_vgg16_net.pth", "python tools/import_original.py "
                       "finetuned_vgg16_net.pth --trust --kind finetuned")


def test_after_the_conversion_the_refusal_names_the_converted_file(original, converted):
    proc = run_in_process(load_script("test"), "--pruned", cwd=original)
    assert_clean_error(proc, "finetuned_vgg16_net.pth",
                       "its conversion finetuned_vgg16_net.plain.pth is there")


def test_import_of_a_missing_file_says_so_first(tmp_path):
    proc = run_script("tools/import_original.py", "nowhere.pth", cwd=tmp_path)
    assert_clean_error(proc, "nowhere.pth", "file not found")


def test_import_of_a_file_that_cannot_be_unpickled_is_refused_in_one_line(tmp_path):
    (tmp_path / "garbage.pth").write_bytes(b"\x80\x02 this is no pickle")
    proc = run_in_process(import_original, "garbage.pth", "--trust", cwd=tmp_path)
    assert_clean_error(proc, "garbage.pth", "could not be unpickled")
    assert files_under(tmp_path) == ["garbage.pth"]


def test_import_never_overwrites_a_file_that_is_not_a_pipeline_checkpoint(original, tmp_path):
    for name in ("pruned_vgg16_net.pth", "vgg16Net.pth"):
        shutil.copy(original / name, tmp_path)
    before = (tmp_path / "vgg16Net.pth").read_bytes()
    proc = run_in_process(import_original, "pruned_vgg16_net.pth", "--trust", "--output",
                          "vgg16Net.pth", cwd=tmp_path)
    assert_clean_error(proc, "vgg16Net.pth", "refusing to overwrite")
    assert (tmp_path / "vgg16Net.pth").read_bytes() == before


def test_import_without_trust_refuses_and_runs_nothing(tmp_path):
    torch.save(CreatesFileWhenUnpickled(tmp_path / "pwned"), tmp_path / "model.pth")
    proc = run_script("tools/import_original.py", "model.pth", cwd=tmp_path)
    assert_clean_error(proc, "model.pth", "runs any code", "--trust")
    assert files_under(tmp_path) == ["model.pth"]


def test_import_of_a_pickle_that_is_not_a_model_is_refused_in_one_line(tmp_path):
    torch.save(["not", "a", "model"], tmp_path / "list.pth")
    proc = run_in_process(import_original, "list.pth", "--trust", cwd=tmp_path)
    assert_clean_error(proc, "list.pth", "holds a list, not a VGG module")
    assert files_under(tmp_path) == ["list.pth"]


@pytest.fixture(scope="module")
def converted(original):
    """The original's two pickled modules through tools/import_original.py --trust."""
    procs = [run_script("tools/import_original.py", name, "--trust", "--image-size", IMAGE_SIZE,
                        *extra, cwd=original)
             for name, extra in (("pruned_vgg16_net.pth", []),
                                 ("finetuned_vgg16_net.pth", ["--kind", "finetuned"]))]
    return procs


def test_import_with_trust_writes_plain_checkpoints_of_the_same_weights(original, converted):
    for proc in converted:
        assert proc.returncode == 0, proc.stderr
        assert "weights_only=False" in proc.stdout  # it says what --trust did
    for name, kind in (("pruned_vgg16_net", "pruned"), ("finetuned_vgg16_net", "finetuned")):
        plain = torch.load(original / f"{name}.plain.pth", weights_only=True)
        module = torch.load(original / f"{name}.pth", weights_only=False)
        assert plain["kind"] == kind and plain["class_names"] == ["cat", "dog"]
        assert plain["image_size"] == IMAGE_SIZE
        assert plain["architecture"] == vgg.architecture_of(module, "vgg16")
        for key, tensor in module.state_dict().items():
            assert torch.equal(plain["state_dict"][key], tensor), key


def test_the_original_folder_runs_through_distillation_and_compare(original, converted):
    """The "done when" of the issue: after the documented conversion, every stage runs."""
    flags = ["--student", "pruned_vgg16_net.plain.pth", "--epochs", 1, "--batch-size", 8,
             "--workers", 0]
    before = (original / "finetuned_vgg16_net.pth").read_bytes()
    refused = run_script("knowledge_distillation.py", *flags, cwd=original)
    assert_clean_error(refused, "finetuned_vgg16_net.pth", "refusing to overwrite", "--output")
    assert (original / "finetuned_vgg16_net.pth").read_bytes() == before  # the original's own
    distill = run_script("knowledge_distillation.py", *flags, "--output", "distilled.pth",
                         cwd=original)
    assert distill.returncode == 0, distill.stderr
    assert "a bare vgg16 state dict" in distill.stdout  # the teacher, read as it is
    assert torch.load(original / "distilled.pth", weights_only=True)["kind"] == "finetuned"
    compare = run_script("test.py", "--compare", "vgg16Net.pth", "pruned_vgg16_net.plain.pth",
                         "finetuned_vgg16_net.plain.pth", "--image-size", IMAGE_SIZE,
                         "--repeats", 1, "--max-repeats", 2, "--warmup", 0, "--workers", 0,
                         cwd=original)
    assert compare.returncode == 0, compare.stderr
    rows = json.loads((original / "compare.json").read_text())
    assert [row["path"] for row in rows] == ["vgg16Net.pth", "pruned_vgg16_net.plain.pth",
                                             "finetuned_vgg16_net.plain.pth"]
    assert rows[1]["params"] == rows[2]["params"] < 0.3 * rows[0]["params"]


def test_training_beside_the_original_refuses_to_rewrite_its_class_index(original, tmp_path):
    shutil.copytree(original / "dataset", tmp_path / "dataset")
    (tmp_path / "class_indices.json").write_text(json.dumps({0: "bird", 1: "fish"}))
    before = (tmp_path / "class_indices.json").read_bytes()
    proc = run_in_process(train, "--output", "mine.pth", "--image-size", IMAGE_SIZE,
                          "--epochs", 1, cwd=tmp_path)
    assert_clean_error(proc, "class_indices.json", "['bird', 'fish']", "refusing to overwrite",
                       "--class-index")
    assert (tmp_path / "class_indices.json").read_bytes() == before
    assert not (tmp_path / "mine.pth").exists()


# --- the original's dataset/ ---------------------------------------------------------

def test_split_over_the_originals_dataset_names_the_choices_and_replace_replaces_it(
        original, tmp_path):
    shutil.copytree(original / "dataset", tmp_path / "dataset")
    generate_demo(tmp_path / "photos", per_class=5)
    before_source = tree_digest(tmp_path / "photos")
    refused = run_script("split_dataset.py", "--source", "photos", cwd=tmp_path)
    assert_clean_error(refused, "dataset", "not made by split_dataset.py", "--dest", "--replace")
    replaced = run_script("split_dataset.py", "--source", "photos", "--replace", cwd=tmp_path)
    assert replaced.returncode == 0, replaced.stderr
    assert len(list((tmp_path / "dataset").rglob("*.jpg"))) == 10
    assert (tmp_path / "dataset" / ".split_dataset.json").exists()
    assert tree_digest(tmp_path / "photos") == before_source


def test_replace_never_replaces_a_folder_holding_more_than_a_split(tmp_path, demo_animals):
    (tmp_path / "mine" / "train").mkdir(parents=True)
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    before = tree_digest(tmp_path / "mine")
    proc = run_in_process(load_script("split_dataset"), "--source", demo_animals, "--dest",
                          "mine", "--replace", cwd=tmp_path)
    assert_clean_error(proc, "mine", "thesis.tex", "even with --replace")
    assert tree_digest(tmp_path / "mine") == before


def test_replace_never_replaces_the_source(tmp_path, demo_animals):
    before = tree_digest(demo_animals)
    proc = run_in_process(load_script("split_dataset"), "--source", demo_animals, "--dest",
                          demo_animals, "--replace", cwd=tmp_path)
    assert_clean_error(proc, "overlaps")
    assert tree_digest(demo_animals) == before


# --- --pretrained imagenet -----------------------------------------------------------

def imagenet_file(hub, classifier_width=8):
    """torchvision's VGG11 ImageNet file as torch's cache would hold it, but small: the real
    convolutions' shapes (random values) under a narrow classifier with 1000 outputs."""
    torch.manual_seed(3)
    state_dict = vgg.build_model("vgg11", 1000, classifier_width=classifier_width).state_dict()
    path = hub / "checkpoints" / "vgg11-8a719046.pth"
    path.parent.mkdir(parents=True)
    torch.save(state_dict, path)
    return state_dict


def test_imagenet_weights_come_from_torchs_cache_with_their_normalisation(tmp_path,
                                                                          monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    cached = imagenet_file(tmp_path / "hub")
    state_dict, normalization, source = pretrained.pretrained_weights("imagenet", "vgg11", False)
    assert normalization == images.IMAGENET_NORMALIZATION
    assert "VGG11_Weights.IMAGENET1K_V1" in source
    model = vgg.build_model("vgg11", 2, classifier_width=64)
    new = vgg.load_pretrained(model, state_dict)
    assert sorted({name.rsplit(".", 1)[0] for name in new}) == ["classifier.0", "classifier.3",
                                                                "classifier.6"]
    for name, tensor in model.state_dict().items():
        if name.startswith("features."):
            assert torch.equal(tensor, cached[name]), name


def test_imagenet_weights_neither_cached_nor_downloadable_are_a_one_line_error(tmp_path,
                                                                               monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def no_network(url, destination, *args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    generate_demo(tmp_path / "dataset" / "train", per_class=2)
    generate_demo(tmp_path / "dataset" / "val", per_class=1)
    proc = run_in_process(train, "--pretrained", "imagenet", "--image-size", IMAGE_SIZE,
                          cwd=tmp_path)
    assert_clean_error(proc, "--pretrained imagenet", "vgg16-397923af.pth",
                       "name resolution", str(tmp_path / "hub" / "checkpoints"))
    assert not (tmp_path / "vgg16Net.pth").exists()


@pytest.mark.parametrize("failure", [urllib.error.URLError("no route to host"),
                                     RuntimeError('invalid hash value (expected "8a719046")')],
                         ids=["no network", "not the file"])
def test_a_failed_download_is_a_one_line_error(tmp_path, monkeypatch, failure):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def fails(url, destination, *args, **kwargs):
        raise failure

    monkeypatch.setattr(torch.hub, "download_url_to_file", fails)
    with pytest.raises(UserError, match="could not be downloaded") as error:
        pretrained.pretrained_weights("imagenet", "vgg11", False)
    assert "https://download.pytorch.org/models/vgg11-8a719046.pth" in str(error.value)


def test_a_garbage_file_in_the_cache_says_to_delete_it(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    cached = tmp_path / "hub" / "checkpoints" / "vgg11-8a719046.pth"
    cached.parent.mkdir(parents=True)
    torch.save(torch.zeros(3), cached)  # a tensor, not a state dict
    with pytest.raises(UserError, match="delete it to download it again"):
        pretrained.pretrained_weights("imagenet", "vgg11", False)


def test_pretrained_from_a_file_follows_its_normalisation_and_names_its_architecture(
        tmp_path):
    path = small_checkpoint(tmp_path / "ours.pth")  # one of ours: its normalisation
    normalization = pretrained.pretrained_weights(str(path), "vgg16", False)[1]
    assert normalization == images.ORIGINAL_NORMALIZATION
    torch.save(vgg.build_model("vgg11", 1000, classifier_width=8).state_dict(),
               tmp_path / "imagenet.pth")  # torchvision-like: 1000 classes
    state_dict, normalization, _ = pretrained.pretrained_weights(str(tmp_path / "imagenet.pth"),
                                                            "vgg16", False)
    assert normalization == images.IMAGENET_NORMALIZATION
    with pytest.raises(UserError, match=r"they are a vgg11: add --arch vgg11\)"):
        pretrained.load_pretrained_weights(vgg.build_model("vgg16", 2), state_dict,
                                      "imagenet.pth", "vgg16", False)


def test_training_from_imagenet_records_its_normalisation_for_every_later_stage(original,
                                                                                 tmp_path):
    shutil.copytree(original / "dataset", tmp_path / "dataset")
    imagenet_file(tmp_path / "torch" / "hub")
    env_flags = ["--arch", "vgg11", "--pretrained", "imagenet", "--classifier-width", 8,
                 "--image-size", IMAGE_SIZE, "--epochs", 1, "--batch-size", 8, "--workers", 0]
    proc = run_script("train.py", *env_flags, cwd=tmp_path, env={"TORCH_HOME": tmp_path / "torch"})
    assert proc.returncode == 0, proc.stderr
    assert "Starting from torchvision's VGG11_Weights.IMAGENET1K_V1; new classifier.6" \
        in proc.stdout
    dense = torch.load(tmp_path / "vgg16Net.pth", weights_only=True)
    assert dense["normalization"] == images.IMAGENET_NORMALIZATION

    assert run_in_process(pruner, cwd=tmp_path).returncode == 0
    pruned = torch.load(tmp_path / "pruned_vgg16_net.pth", weights_only=True)
    assert pruned["normalization"] == images.IMAGENET_NORMALIZATION

    # test.py --image normalises the picture as the checkpoint says; the model's last layer
    # is sharpened, so that the two normalisations give visibly different probabilities
    dense["state_dict"]["classifier.6.weight"] *= 1e4
    torch.save(dense, tmp_path / "sharp.pth")
    model = vgg.from_architecture(dense["architecture"]).eval()
    model.load_state_dict(dense["state_dict"])
    picture = sorted((tmp_path / "dataset" / "val" / "dog").glob("*.jpg"))[0]
    dog = {}
    for name, normalization in (("imagenet", images.IMAGENET_NORMALIZATION),
                                ("original", images.ORIGINAL_NORMALIZATION)):
        batch = images.eval_transform(IMAGE_SIZE, normalization)(pictures.load_rgb(picture))
        with torch.no_grad():
            dog[name] = f"{100 * torch.softmax(model(batch[None]), dim=1)[0, 1].item():.1f}%"
    assert dog["imagenet"] != dog["original"]  # the control: the test can tell them apart
    proc = run_in_process(load_script("test"), "--weights", "sharp.pth", "--image", picture,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert re.search(rf"^\s+dog\s+{re.escape(dog['imagenet'])}$", proc.stdout, re.MULTILINE), \
        (proc.stdout, dog)
