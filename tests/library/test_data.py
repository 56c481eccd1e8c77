"""Specification of data.py: picture loading, the dataset and the epoch sampler."""
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from compress.cli import UserError
from compress.data import images, pictures
from helpers import (IMAGE_SIZE, assert_clean_error, generate_demo, load_script, run_in_process,
                     small_checkpoint)


def save(image, path, **options):
    image.save(path, **options)
    return path


def pixels(image):
    return np.asarray(image)


# --- load_rgb: every kind of picture becomes upright 8-bit RGB ---------------

def test_greyscale_picture_loads_as_rgb_with_equal_channels(tmp_path):
    grey = Image.fromarray(np.arange(200, dtype=np.uint8).reshape(10, 20), "L")
    loaded = pictures.load_rgb(save(grey, tmp_path / "grey.png"))
    assert loaded.mode == "RGB" and loaded.size == (20, 10)
    array = pixels(loaded)
    for channel in range(3):
        np.testing.assert_array_equal(array[..., channel], pixels(grey))


def test_transparent_pixels_of_rgba_become_white(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (200, 10, 10, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))        # fully transparent black
    rgba.putpixel((1, 0), (0, 0, 255, 128))    # half transparent blue
    loaded = pictures.load_rgb(save(rgba, tmp_path / "rgba.png"))
    assert loaded.mode == "RGB"
    assert loaded.getpixel((0, 0)) == (255, 255, 255)
    assert loaded.getpixel((2, 2)) == (200, 10, 10)
    red, green, blue = loaded.getpixel((1, 0))
    assert abs(red - 127) <= 2 and abs(green - 127) <= 2 and blue == 255


def test_palette_picture_loads_as_rgb(tmp_path):
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * (3 * 254))
    loaded = pictures.load_rgb(save(palette, tmp_path / "palette.png"))
    assert loaded.mode == "RGB" and loaded.getpixel((3, 3)) == (10, 200, 30)


def test_palette_picture_with_transparency_has_white_where_transparent(tmp_path):
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * (3 * 254))
    palette.putpixel((0, 0), 0)
    path = save(palette, tmp_path / "palette.gif", transparency=0)
    loaded = pictures.load_rgb(path)
    assert loaded.mode == "RGB"
    assert loaded.getpixel((0, 0)) == (255, 255, 255)  # index 0 is transparent, not black
    assert loaded.getpixel((2, 2)) == (10, 200, 30)


def test_cmyk_jpeg_loads_as_rgb(tmp_path):
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    loaded = pictures.load_rgb(save(cmyk, tmp_path / "cmyk.jpg", quality=95))
    assert loaded.mode == "RGB"
    red, green, blue = loaded.getpixel((4, 4))
    assert red > 240 and green < 15 and blue < 15


def test_16_bit_greyscale_is_scaled_to_the_full_8_bit_range(tmp_path):
    values = (np.arange(200, dtype=np.uint16).reshape(10, 20) * 100 + 1000)  # 1000..20900
    path = save(Image.fromarray(values), tmp_path / "deep.png")
    assert Image.open(path).mode == "I;16"
    array = pixels(pictures.load_rgb(path))
    assert array.dtype == np.uint8 and array.shape == (10, 20, 3)
    assert array.min() == 0 and array.max() == 255
    expected = ((values - 1000) * (255.0 / 19900)).astype(np.uint8)
    np.testing.assert_array_equal(array[..., 0], expected)
    assert (np.diff(array[..., 0].ravel().astype(int)) >= 0).all()  # order kept


def test_exif_orientation_is_applied(tmp_path):
    picture = Image.new("RGB", (20, 10), (30, 60, 90))
    picture.paste((250, 0, 0), (0, 0, 5, 10))  # a red band on the left edge
    exif = picture.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = save(picture, tmp_path / "rotated.jpg", exif=exif, quality=95)
    loaded = pictures.load_rgb(path)
    assert loaded.size == (10, 20)
    # the left edge of the stored picture is the top of the upright one
    red, green, blue = loaded.getpixel((5, 1))
    assert red > 200 and green < 60 and blue < 60


def test_oversized_picture_is_refused(tmp_path, monkeypatch):
    path = save(Image.new("RGB", (200, 100)), tmp_path / "big.png")
    monkeypatch.setattr(pictures, "MAX_IMAGE_PIXELS", 200 * 100 - 1)
    with pytest.raises(ValueError, match="200x100"):
        pictures.load_rgb(path)
    monkeypatch.setattr(pictures, "MAX_IMAGE_PIXELS", 200 * 100)
    assert pictures.load_rgb(path).size == (200, 100)


# --- check_image: the split's verdict on a file -----------------------------

@pytest.fixture
def good_jpeg(tmp_path):
    folder = generate_demo(tmp_path / "demo", per_class=1)
    return folder / "cat" / "cat_0000.jpg"


def test_check_image_accepts_a_good_picture(good_jpeg):
    assert pictures.check_image(good_jpeg) is None


def test_check_image_names_an_empty_file(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert pictures.check_image(tmp_path / "empty.jpg") == "empty file"


def test_check_image_refuses_a_truncated_jpeg(tmp_path, good_jpeg):
    whole = good_jpeg.read_bytes()
    (tmp_path / "cut.jpg").write_bytes(whole[:len(whole) // 2])
    reason = pictures.check_image(tmp_path / "cut.jpg")
    assert reason is not None and reason.startswith("cannot be decoded")


def test_check_image_refuses_text_named_like_a_picture(tmp_path):
    (tmp_path / "notes.jpg").write_text("not a picture\n")
    assert pictures.check_image(tmp_path / "notes.jpg").startswith("cannot be decoded")


# --- ImageFolder --------------------------------------------------------------

def test_image_folder_reads_classes_in_sorted_order(tmp_path):
    root = generate_demo(tmp_path / "demo", per_class=2)
    (root / "cat" / "notes.txt").write_text("ignored")
    dataset = images.ImageFolder(root, images.eval_transform(IMAGE_SIZE))
    assert dataset.class_names == ["cat", "dog"]
    assert len(dataset) == 4 and dataset.labels() == [0, 0, 1, 1]
    image, label = dataset[3]
    assert image.shape == (3, IMAGE_SIZE, IMAGE_SIZE) and label == 1


def test_image_folder_with_other_class_names_raises_user_error(tmp_path):
    root = generate_demo(tmp_path / "demo", per_class=1)
    with pytest.raises(UserError, match=r"\['cat', 'dog'\].*\['cat', 'fox'\]"):
        images.ImageFolder(root, images.eval_transform(IMAGE_SIZE), class_names=["cat", "fox"])


def test_image_folder_of_missing_folder_raises_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        images.ImageFolder(tmp_path / "nowhere", images.eval_transform(IMAGE_SIZE))


def test_training_augmentation_depends_only_on_seed_epoch_and_index(tmp_path):
    root = generate_demo(tmp_path / "demo", per_class=2)
    transform = images.train_transform(IMAGE_SIZE)
    first = images.ImageFolder(root, transform, seed=5)
    again = images.ImageFolder(root, transform, seed=5)
    torch.manual_seed(123)
    a = first[1, 2][0]
    torch.manual_seed(999)  # the global RNG plays no part
    assert torch.equal(a, again[1, 2][0])
    assert not torch.equal(a, first[2, 2][0])


# --- EpochSampler -------------------------------------------------------------

def keys(sampler):
    return list(sampler)


def test_sampler_order_is_fixed_by_seed_and_epoch():
    sampler = images.EpochSampler(50, seed=7)
    sampler.set_epoch(3)
    order = keys(sampler)
    assert sorted(index for _, index in order) == list(range(50))
    assert all(epoch == 3 for epoch, _ in order)
    other = images.EpochSampler(50, seed=7)
    other.set_epoch(3)
    assert keys(other) == order
    other.set_epoch(4)
    assert [i for _, i in keys(other)] != [i for _, i in order]
    reseeded = images.EpochSampler(50, seed=8)
    reseeded.set_epoch(3)
    assert [i for _, i in keys(reseeded)] != [i for _, i in order]


def test_sampler_skip_drops_the_first_samples_of_the_epoch():
    sampler = images.EpochSampler(20, seed=1)
    sampler.set_epoch(2)
    full = keys(sampler)
    sampler.set_epoch(2, skip=6)
    assert keys(sampler) == full[6:]
    assert len(sampler) == 14


def test_sampler_without_shuffle_keeps_the_folder_order():
    sampler = images.EpochSampler(5, seed=1, shuffle=False)
    assert [i for _, i in keys(sampler)] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("size", [10, 11])
def test_two_ranks_together_cover_every_index_with_equal_lengths(size):
    ranks = [images.EpochSampler(size, seed=3, rank=rank, world=2) for rank in (0, 1)]
    for sampler in ranks:
        sampler.set_epoch(1)
    taken = [[i for _, i in keys(sampler)] for sampler in ranks]
    assert len(taken[0]) == len(taken[1]) == len(ranks[0]) == len(ranks[1]) == (size + 1) // 2
    assert set(taken[0]) | set(taken[1]) == set(range(size))
    if size % 2 == 0:
        assert not set(taken[0]) & set(taken[1])


# --- photos beyond the pixel limit (decompression bombs) -----------------------
# pictures.MAX_IMAGE_PIXELS (2**27, 134M) is refused before decoding, as a ValueError
# that every caller turns into a skipped file or a one-line error.

@pytest.fixture(scope="module")
def photo_over_limit(tmp_path_factory):
    """A 13000 x 11000 (143M pixel) PNG, over pictures.MAX_IMAGE_PIXELS, only kB on disk."""
    assert 13000 * 11000 > pictures.MAX_IMAGE_PIXELS
    path = tmp_path_factory.mktemp("big") / "panorama.png"
    Image.new("1", (13000, 11000)).save(path)
    return path


def test_photo_over_the_pixel_limit_is_refused_with_value_error(photo_over_limit):
    with pytest.raises(ValueError, match="too large"):
        pictures.load_rgb(photo_over_limit)


def test_split_check_names_a_photo_over_the_pixel_limit(photo_over_limit):
    assert pictures.check_image(photo_over_limit).startswith("cannot be decoded")


def test_image_folder_skips_a_photo_over_the_pixel_limit_instead_of_crashing(
        tmp_path, photo_over_limit):
    root = generate_demo(tmp_path / "demo", per_class=2)
    shutil.copy(photo_over_limit, root / "cat" / "cat_0000_panorama.png")  # sorts second in cat/
    dataset = images.ImageFolder(root, images.eval_transform(IMAGE_SIZE))
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        image, label = dataset[1]
    assert image.shape == (3, IMAGE_SIZE, IMAGE_SIZE) and label == 0  # its neighbour instead


def test_classifying_a_photo_over_the_pixel_limit_is_a_one_line_error(tmp_path, photo_over_limit):
    weights = small_checkpoint(tmp_path / "model.pth")
    proc = run_in_process(load_script("test"), "--weights", weights, "--image", photo_over_limit,
                          cwd=tmp_path)
    assert_clean_error(proc, photo_over_limit)


def test_cached_validation_pictures_equal_uncached_ones(tmp_path):
    root = generate_demo(tmp_path / "demo", per_class=3, size=64)
    plain = images.ImageFolder(root, images.eval_transform(IMAGE_SIZE))
    cached = images.ImageFolder(root, images.eval_transform(IMAGE_SIZE),
                              cache_size=(IMAGE_SIZE, IMAGE_SIZE))
    assert cached.cache is not None and len(cached.cache) == len(plain) == 6
    assert all(array.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) for array in cached.cache)
    for index in range(len(plain)):
        (a, label_a), (b, label_b) = plain[index], cached[index]
        assert label_a == label_b and torch.equal(a, b), index


def test_cached_training_pictures_keep_room_for_random_crops(tmp_path):
    root = generate_demo(tmp_path / "demo", per_class=2, size=64)
    cached = images.ImageFolder(root, images.train_transform(IMAGE_SIZE), cache_size=37)
    assert all(min(array.shape[:2]) == 37 for array in cached.cache)
    first, second = cached[0, 0][0], cached[1, 0][0]  # same picture, two epochs
    assert first.shape == (3, IMAGE_SIZE, IMAGE_SIZE) and not torch.equal(first, second)
