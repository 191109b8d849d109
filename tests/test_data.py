"""Tests for minifcn.data: the synthetic and VOC datasets, transforms and the loader."""

import hashlib
import re

import numpy as np
import pytest
from PIL import Image

from minifcn.data import DatasetError
from minifcn.data.loader import DataLoader
from minifcn.data.synthetic import CLASS_NAMES, SyntheticShapes
from minifcn.data.transforms import (Compose, Normalize, RandomCrop, RandomHorizontalFlip,
                                     RandomScale)
from minifcn.data.voc import VOC_CLASSES, VOCSegmentation, voc_palette


def window_any(mask, radius):
    """True where a (2r+1)^2 window around the pixel holds a True (binary dilation)."""
    padded = np.pad(mask, radius)
    h, w = mask.shape
    out = np.zeros_like(mask)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out |= padded[dy:dy + h, dx:dx + w]
    return out


def erode(mask, radius):
    return ~window_any(~mask, radius)


# ---------------------------------------------------------------- SyntheticShapes

def test_synthetic_sample_types_shapes_and_size_range():
    ds = SyntheticShapes("train", size=30, image_size=(64, 112))
    sizes = set()
    for i in range(len(ds)):
        image, label = ds[i]
        assert image.dtype == np.uint8 and label.dtype == np.uint8
        assert image.ndim == 3 and image.shape[2] == 3 and label.shape == image.shape[:2]
        assert 64 <= label.shape[0] <= 112 and 64 <= label.shape[1] <= 112
        sizes.add(label.shape)
    assert len(sizes) > 20, "image sizes should vary"
    assert any(h != w for h, w in sizes), "some images should be non-square"


def test_synthetic_fixed_image_size():
    image, label = SyntheticShapes(size=3, image_size=80)[2]
    assert image.shape == (80, 80, 3) and label.shape == (80, 80)


def test_synthetic_is_deterministic_and_random_access():
    a = SyntheticShapes("train", size=10, seed=3)
    b = SyntheticShapes("train", size=10, seed=3)
    later_first = a[7]
    for i in range(10):
        for x, y in zip(a[i], b[i]):
            np.testing.assert_array_equal(x, y)
    for x, y in zip(later_first, a[7]):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(a[-1], a[9]):
        np.testing.assert_array_equal(x, y)


def digest(image):
    return hashlib.sha1(image.tobytes() + str(image.shape).encode()).hexdigest()


def test_synthetic_splits_and_seeds_are_disjoint():
    train = {digest(SyntheticShapes("train", size=40)[i][0]) for i in range(40)}
    val = {digest(SyntheticShapes("val", size=40)[i][0]) for i in range(40)}
    other_seed = {digest(SyntheticShapes("train", size=40, seed=1)[i][0]) for i in range(40)}
    assert len(train) == 40 and len(val) == 40
    assert not train & val
    assert not train & other_seed


def test_synthetic_all_classes_and_ignore_band_present():
    ds = SyntheticShapes("train", size=40)
    counts = np.zeros(256, dtype=np.int64)
    for i in range(len(ds)):
        counts += np.bincount(ds[i][1].ravel(), minlength=256)
    present = set(np.flatnonzero(counts).tolist())
    assert present == {0, 1, 2, 3, 4, 255}
    assert len(CLASS_NAMES) == ds.num_classes == 5
    assert 0.005 < counts[255] / counts.sum() < 0.1, "the ignore band should be thin"


def test_synthetic_ignore_band_hugs_object_borders():
    with_band = SyntheticShapes("val", size=15, border=1)
    no_band = SyntheticShapes("val", size=15, border=0)
    for i in range(len(with_band)):
        image, label = with_band[i]
        image0, label0 = no_band[i]
        np.testing.assert_array_equal(image, image0)       # the band changes labels, never the image
        assert not (label0 == 255).any()
        void = label == 255
        assert void.any()
        np.testing.assert_array_equal(label[~void], label0[~void])
        # every void pixel lies next to (within 2 px of: triangle corners reach 2) a foreground pixel
        foreground = (label0 != 0)
        assert window_any(foreground, 2)[void].all()


def test_synthetic_thin_class_is_thin_and_others_are_not():
    ds = SyntheticShapes("train", size=60, border=0)
    thin_checked = thick_checked = 0
    for i in range(len(ds)):
        _, label = ds[i]
        bar = label == 4
        if bar.any():
            # no 5x5 square fits inside a bar: it is at most ~3 px wide
            assert not erode(bar, 2).any()
            thin_checked += 1
        disc = label == 1
        if disc.sum() > 200:
            assert erode(disc, 2).any()
            thick_checked += 1
    assert thin_checked > 5 and thick_checked > 5


def test_synthetic_palette_and_names():
    ds = SyntheticShapes(size=1)
    assert ds.palette.shape == (256, 3) and ds.palette.dtype == np.uint8
    assert ds.class_names[0] == "background" and "bar" in ds.class_names
    assert ds.ignore_index == 255 and ds.thin_classes == (4,)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(split="trainval"), "split must be one of"),
    (dict(size=0), "size must be a positive int"),
    (dict(seed=-1), "seed must be a non-negative int"),
    (dict(image_size=(80, 64)), "image_size"),
    (dict(image_size=8), "image_size"),
    (dict(image_size=(64, 80, 96)), "image_size"),
    (dict(max_objects=0), "max_objects"),
    (dict(border=-1), "border"),
], ids=["bad-split", "size-0", "negative-seed", "min>max", "too-small", "triple", "no-objects",
        "negative-border"])
def test_synthetic_rejects_bad_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        SyntheticShapes(**kwargs)


def test_synthetic_index_errors():
    ds = SyntheticShapes(size=3)
    with pytest.raises(IndexError, match="index 3 out of range"):
        ds[3]
    with pytest.raises(IndexError):
        ds[-4]
    with pytest.raises(TypeError, match="index must be an int"):
        ds[1.0]


# ---------------------------------------------------------------- VOC

def test_voc_palette_known_colours():
    palette = voc_palette()
    assert palette.shape == (256, 3) and palette.dtype == np.uint8
    expected = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 4: (0, 0, 128),
                8: (64, 0, 0), 15: (192, 128, 128), 20: (0, 64, 128), 255: (224, 224, 192)}
    for index, colour in expected.items():
        assert tuple(palette[index]) == colour, index
    assert len({tuple(c) for c in palette}) == 256
    assert voc_palette(21).shape == (21, 3)
    with pytest.raises(ValueError, match="num_entries"):
        voc_palette(0)


def test_voc_class_names():
    assert len(VOC_CLASSES) == 21 and VOC_CLASSES[0] == "background" and VOC_CLASSES[15] == "person"


def write_label_png(path, label):
    image = Image.fromarray(label.astype(np.uint8))      # mode "L" ...
    image.putpalette(voc_palette().ravel().tolist())     # ... becomes "P" with the VOC colours
    image.save(path)


def make_voc(root, splits=None, size=(40, 56)):
    """A tiny VOC tree: smooth JPEGs and palette PNG labels. Returns {id: label}."""
    splits = splits or {"train": ["2007_000001", "2007_000002", "2007_000003"], "val": ["2007_000004"]}
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    labels = {}
    h, w = size
    for split, ids in splits.items():
        (root / "ImageSets/Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        for image_id in ids:
            ramp = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))
            Image.fromarray((ramp * rng.uniform(0.3, 1, 3)).astype(np.uint8)).save(
                root / "JPEGImages" / f"{image_id}.jpg", quality=95)
            label = np.zeros((h, w), dtype=np.uint8)
            label[5:20, 10:30] = rng.integers(1, 21)
            label[4, 10:30] = 255
            write_label_png(root / "SegmentationClass" / f"{image_id}.png", label)
            labels[image_id] = label
    return labels


def test_voc_reads_images_and_palette_indices(tmp_path):
    labels = make_voc(tmp_path)
    ds = VOCSegmentation(tmp_path, split="train")
    assert len(ds) == 3 and ds.num_classes == 21 and ds.ids[0] == "2007_000001"
    with Image.open(ds.label_path(ds.ids[0])) as raw:
        assert raw.mode == "P"
    for i, image_id in enumerate(ds.ids):
        image, label = ds[i]
        assert image.dtype == np.uint8 and image.shape == (40, 56, 3)
        assert label.dtype == np.uint8
        np.testing.assert_array_equal(label, labels[image_id])    # indices, not palette colours
    assert len(VOCSegmentation(tmp_path, split="val")) == 1
    with pytest.raises(IndexError):
        ds[3]


def test_voc_accepts_greyscale_label_png(tmp_path):
    labels = make_voc(tmp_path)
    Image.fromarray(labels["2007_000002"]).save(tmp_path / "SegmentationClass" / "2007_000002.png")
    np.testing.assert_array_equal(VOCSegmentation(tmp_path)[1][1], labels["2007_000002"])


def test_voc_missing_root_and_folders(tmp_path):
    with pytest.raises(DatasetError, match="is not a directory"):
        VOCSegmentation(tmp_path / "nowhere")
    make_voc(tmp_path)
    for path in (tmp_path / "JPEGImages").iterdir():
        path.unlink()
    (tmp_path / "JPEGImages").rmdir()
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "JPEGImages"))):
        VOCSegmentation(tmp_path)


def test_voc_missing_or_empty_split(tmp_path):
    make_voc(tmp_path)
    with pytest.raises(DatasetError, match=r"split='test'.*available splits: \['train', 'val'\]"):
        VOCSegmentation(tmp_path, split="test")
    (tmp_path / "ImageSets/Segmentation/val.txt").write_text("\n  \n")
    with pytest.raises(DatasetError, match="lists no image ids"):
        VOCSegmentation(tmp_path, split="val")


@pytest.mark.parametrize("folder, suffix", [("JPEGImages", ".jpg"), ("SegmentationClass", ".png")],
                         ids=["image-missing", "label-missing"])
def test_voc_listed_file_missing(tmp_path, folder, suffix):
    make_voc(tmp_path)
    missing = tmp_path / folder / f"2007_000002{suffix}"
    missing.unlink()
    with pytest.raises(DatasetError, match=r"1 file\(s\).*" + re.escape(str(missing))):
        VOCSegmentation(tmp_path)


def test_voc_label_size_mismatch(tmp_path):
    make_voc(tmp_path)
    path = tmp_path / "SegmentationClass" / "2007_000003.png"
    write_label_png(path, np.zeros((41, 56), dtype=np.uint8))
    ds = VOCSegmentation(tmp_path)
    ds[0]
    with pytest.raises(DatasetError, match=re.escape(str(path)) + ".*must match"):
        ds[2]


def test_voc_corrupt_and_truncated_files(tmp_path):
    make_voc(tmp_path)
    bad_jpeg = tmp_path / "JPEGImages" / "2007_000001.jpg"
    bad_jpeg.write_bytes(b"this is not a jpeg")
    png = tmp_path / "SegmentationClass" / "2007_000002.png"
    png.write_bytes(png.read_bytes()[:60])
    ds = VOCSegmentation(tmp_path)
    with pytest.raises(DatasetError, match="cannot read image file " + re.escape(str(bad_jpeg))):
        ds[0]
    with pytest.raises(DatasetError, match="cannot read image file " + re.escape(str(png))):
        ds[1]


def test_voc_rgb_label_and_bad_class_value(tmp_path):
    labels = make_voc(tmp_path)
    rgb = tmp_path / "SegmentationClass" / "2007_000001.png"
    Image.fromarray(voc_palette()[labels["2007_000001"]]).save(rgb)
    bad = tmp_path / "SegmentationClass" / "2007_000002.png"
    label = labels["2007_000002"].copy()
    label[0, 0] = 30
    write_label_png(bad, label)
    ds = VOCSegmentation(tmp_path)
    with pytest.raises(DatasetError, match=re.escape(str(rgb)) + ".*mode 'RGB'"):
        ds[0]
    with pytest.raises(DatasetError, match=re.escape(str(bad)) + r".*\[30\]"):
        ds[1]


def test_dataset_error_is_a_value_error():
    assert issubclass(DatasetError, ValueError)


# ---------------------------------------------------------------- transforms

def encoded_pair(rng, height=50, width=70, block=8):
    """A label of random blocks (classes 0-4 and some 255) and an image whose pixels equal it."""
    grid = rng.choice([0, 1, 2, 3, 4, 255], size=(height // block + 1, width // block + 1))
    label = grid.repeat(block, axis=0).repeat(block, axis=1)[:height, :width].astype(np.uint8)
    return np.repeat(label[..., None], 3, axis=2), label


def test_normalize_caffe_values():
    image = np.array([[[10, 20, 30]]], dtype=np.uint8)
    x, label = Normalize("caffe")(image, np.zeros((1, 1), np.uint8))
    assert x.dtype == np.float32 and x.shape == (3, 1, 1) and x.flags.c_contiguous
    expected = [30 - 104.00698793, 20 - 116.66876762, 10 - 122.67891434]   # B, G, R minus the BGR mean
    np.testing.assert_allclose(x[:, 0, 0], expected, rtol=1e-6)
    assert label.shape == (1, 1)


def test_normalize_torchvision_unit_none_values():
    image = np.array([[[10, 20, 30]]], dtype=np.uint8)
    label = np.zeros((1, 1), np.uint8)
    expected = (np.array([10, 20, 30]) / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    np.testing.assert_allclose(Normalize("torchvision")(image, label)[0][:, 0, 0], expected, rtol=1e-5)
    np.testing.assert_allclose(Normalize("unit")(image, label)[0][:, 0, 0], [10 / 255, 20 / 255, 30 / 255],
                               rtol=1e-6)
    np.testing.assert_array_equal(Normalize("none")(image, label)[0][:, 0, 0], [10, 20, 30])


@pytest.mark.parametrize("mode", Normalize.MODES)
def test_normalize_denormalize_round_trip(mode):
    image = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    normalize = Normalize(mode)
    x, _ = normalize(image, np.zeros((7, 9), np.uint8))
    assert x.shape == (3, 7, 9)
    np.testing.assert_array_equal(normalize.denormalize(x), image)


def test_normalize_errors():
    with pytest.raises(ValueError, match="mode must be one of"):
        Normalize("imagenet")
    with pytest.raises(ValueError, match=r"\(H, W, 3\) RGB image, got shape \(3, 4, 4\)"):
        Normalize()(np.zeros((3, 4, 4), np.uint8), np.zeros((4, 4), np.uint8))


@pytest.mark.parametrize("seed", range(5))
def test_random_scale_nearest_keeps_alignment_exactly(seed):
    rng = np.random.default_rng(seed)
    image, label = encoded_pair(rng)
    out_image, out_label = RandomScale((0.5, 2.0), image_interpolation="nearest")(image, label, rng)
    assert out_image.shape[:2] == out_label.shape and out_label.dtype == np.uint8
    np.testing.assert_array_equal(out_image[..., 0], out_label)


@pytest.mark.parametrize("scale", [0.5, 0.75, 1.5, 2.0], ids=lambda s: f"x{s}")
def test_random_scale_bilinear_aligned_away_from_edges(scale):
    rng = np.random.default_rng(1)
    image, label = encoded_pair(rng, 64, 96, block=16)
    out_image, out_label = RandomScale((scale, scale))(image, label, rng)
    assert out_label.shape == (round(64 * scale), round(96 * scale))
    assert set(np.unique(out_label)) <= set(np.unique(label))    # nearest: no invented classes
    # where the label is constant over a 5x5 window, bilinear mixing has nothing to mix
    constant = np.zeros_like(out_label, dtype=bool)
    for value in np.unique(out_label):
        constant |= erode(out_label == value, 2)
    assert constant.sum() > 0.3 * constant.size
    np.testing.assert_array_equal(out_image[constant][:, 0], out_label[constant])


def test_random_scale_float_image_matches_uint8():
    rng = np.random.default_rng(3)
    image, label = encoded_pair(rng, 32, 48, block=16)
    as_uint8, uint8_label = RandomScale((1.5, 1.5))(image, label, np.random.default_rng(0))
    as_float, float_label = RandomScale((1.5, 1.5))(image.astype(np.float32), label, np.random.default_rng(0))
    assert as_float.dtype == np.float32 and as_float.shape == as_uint8.shape == (48, 72, 3)
    np.testing.assert_allclose(as_float, as_uint8, atol=1.0)      # uint8 rounds, float does not
    np.testing.assert_array_equal(float_label, uint8_label)


def test_random_crop_pads_with_fill_and_ignore():
    rng = np.random.default_rng(0)
    image, label = encoded_pair(rng, 30, 40)
    out_image, out_label = RandomCrop((48, 50))(image, label, rng)
    assert out_image.shape == (48, 50, 3) and out_label.shape == (48, 50)
    padded = out_image[..., 0] == 123            # round(122.68): the mean red, never a label value
    assert padded.sum() == 48 * 50 - 30 * 40
    assert (out_label[padded] == 255).all()
    assert tuple(out_image[padded][0]) == (123, 117, 104)
    np.testing.assert_array_equal(out_image[~padded][:, 0], out_label[~padded])


def test_random_crop_window_is_a_real_sub_image():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    label = rng.integers(0, 5, (40, 60), dtype=np.uint8)
    out_image, out_label = RandomCrop(24)(image, label, np.random.default_rng(7))
    windows = np.lib.stride_tricks.sliding_window_view(label, (24, 24))     # every 24x24 window of the label
    top, left = np.argwhere((windows == out_label).all(axis=(2, 3)))[0]
    np.testing.assert_array_equal(out_image, image[top:top + 24, left:left + 24])


def test_random_crop_float_image_padding():
    image = np.full((4, 4, 3), 7.5, dtype=np.float32)
    out_image, out_label = RandomCrop(6, fill=0.0)(image, np.ones((4, 4), np.uint8), np.random.default_rng(0))
    assert out_image.dtype == np.float32 and (out_image[4:] == 0).all() and (out_label[4:] == 255).all()


def test_random_horizontal_flip():
    rng = np.random.default_rng(0)
    image, label = encoded_pair(rng)
    flipped_image, flipped_label = RandomHorizontalFlip(p=1.0)(image, label, rng)
    np.testing.assert_array_equal(flipped_label, label[:, ::-1])
    np.testing.assert_array_equal(flipped_image[..., 0], flipped_label)
    same_image, same_label = RandomHorizontalFlip(p=0.0)(image, label, rng)
    np.testing.assert_array_equal(same_label, label)
    flips = sum(not np.array_equal(RandomHorizontalFlip()(image, label, np.random.default_rng(s))[1], label)
                for s in range(40))
    assert 5 < flips < 35


@pytest.mark.parametrize("seed", range(8))
def test_compose_keeps_image_and_label_aligned(seed):
    rng = np.random.default_rng(seed)
    image, label = encoded_pair(rng, 45, 66)
    augment = Compose([RandomScale((0.5, 1.5), image_interpolation="nearest"), RandomCrop(56),
                       RandomHorizontalFlip()])
    out_image, out_label = augment(image, label, rng)
    assert out_label.shape == (56, 56)
    padded = out_image[..., 0] == 123
    assert (out_label[padded] == 255).all()
    np.testing.assert_array_equal(out_image[~padded][:, 0], out_label[~padded])


def test_compose_is_deterministic_given_the_rng():
    image, label = SyntheticShapes(size=1)[0]
    augment = Compose([RandomScale(), RandomCrop(64), RandomHorizontalFlip(), Normalize("caffe")])
    a = augment(image, label, np.random.default_rng(5))
    b = augment(image, label, np.random.default_rng(5))
    c = augment(image, label, np.random.default_rng(6))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[0].shape == (3, 64, 64) and a[0].dtype == np.float32
    assert not np.array_equal(a[0], c[0])


def test_transform_errors():
    image, label = np.zeros((10, 12, 3), np.uint8), np.zeros((10, 12), np.uint8)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="Normalize must be the last"):
        Compose([Normalize(), RandomCrop(8)])
    with pytest.raises(ValueError, match=r"same size, got image \(10, 12, 3\) and label \(10, 11\)"):
        RandomCrop(8)(image, label[:, :11], rng)
    chw, _ = Normalize()(image, label)
    with pytest.raises(ValueError, match="Normalize.*must come last"):
        RandomHorizontalFlip()(chw, label, rng)
    with pytest.raises(ValueError, match="uint8 label, got dtype int64"):
        RandomHorizontalFlip()(image, label.astype(np.int64), rng)
    with pytest.raises(TypeError, match="needs rng=numpy.random.Generator"):
        RandomScale()(image, label, None)
    with pytest.raises(TypeError, match="got int"):
        Compose([RandomCrop(8)])(image, label, 0)
    with pytest.raises(ValueError, match="p must be a probability"):
        RandomHorizontalFlip(1.5)
    with pytest.raises(ValueError, match="scale_range"):
        RandomScale((0.0, 1.0))
    with pytest.raises(ValueError, match="scale_range"):
        RandomScale((2.0, 1.0))
    with pytest.raises(ValueError, match="image_interpolation"):
        RandomScale(image_interpolation="cubic")
    with pytest.raises(ValueError, match="scale_range"):
        RandomScale(1.5)
    with pytest.raises(ValueError, match="size must be >= 1"):
        RandomCrop(0)
    with pytest.raises(TypeError, match=r"size must be an int or a pair of ints, got 1.5"):
        RandomCrop(1.5)
    with pytest.raises(ValueError, match="ignore_index"):
        RandomCrop(8, ignore_index=300)


# ---------------------------------------------------------------- DataLoader

class IndexDataset:
    """Sample i: a random 12x16 image whose first pixel is i, label all (i % 5)."""

    def __init__(self, size, height=12, width=16):
        self.size, self.height, self.width = size, height, width

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        image = np.random.default_rng(index).integers(0, 256, (self.height, self.width, 3), dtype=np.uint8)
        image[0, 0] = index
        return image, np.full((self.height, self.width), index % 5, dtype=np.uint8)


def served(loader):
    return [int(i) for images, _ in loader for i in images[:, 0, 0, 0]]


def test_loader_batches_have_the_contract_types():
    loader = DataLoader(SyntheticShapes(size=5), batch_size=1, transform=Normalize("caffe"))
    for images, labels in loader:
        assert images.dtype == np.float32 and images.ndim == 4 and images.shape[:2] == (1, 3)
        assert labels.dtype == np.int64 and labels.shape == (1,) + images.shape[2:]
    crop = Compose([RandomCrop(48), RandomHorizontalFlip(), Normalize("torchvision")])
    images, labels = next(iter(DataLoader(SyntheticShapes(size=8), batch_size=4, transform=crop)))
    assert images.shape == (4, 3, 48, 48) and labels.shape == (4, 48, 48)


def test_loader_default_transform_is_channels_first_float():
    images, labels = next(iter(DataLoader(IndexDataset(3), shuffle=False)))
    assert images.dtype == np.float32 and images.shape == (1, 3, 12, 16) and images.max() > 1


def test_loader_sequential_order_and_lengths():
    assert served(DataLoader(IndexDataset(10), batch_size=3, shuffle=False)) == list(range(10))
    loader = DataLoader(IndexDataset(10), batch_size=3, shuffle=False)
    assert len(loader) == 4 and [len(b[0]) for b in loader] == [3, 3, 3, 1]
    dropping = DataLoader(IndexDataset(10), batch_size=3, shuffle=False, drop_last=True)
    assert len(dropping) == 3 and served(dropping) == list(range(9))


def test_loader_shuffle_is_a_seeded_permutation_per_epoch():
    loader = DataLoader(IndexDataset(20), batch_size=4, seed=1)
    epoch0, epoch1 = served(loader), served(loader)
    assert sorted(epoch0) == sorted(epoch1) == list(range(20))
    assert epoch0 != epoch1 and epoch0 != list(range(20))
    twin = DataLoader(IndexDataset(20), batch_size=4, seed=1)
    assert served(twin) == epoch0 and served(twin) == epoch1
    assert served(DataLoader(IndexDataset(20), batch_size=4, seed=2)) != epoch0
    assert loader.epoch == 2 and loader.position == 0


def batches(loader, count):
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == count:
            break
    return out


def test_loader_resume_continues_with_identical_batches_and_augmentations():
    def make():
        augment = Compose([RandomCrop(10), RandomHorizontalFlip(), Normalize("unit")])
        return DataLoader(IndexDataset(11), batch_size=2, transform=augment, seed=4)

    reference = make()
    uninterrupted = [b for _ in range(3) for b in reference]     # 3 epochs of 6 batches

    first = make()
    seen = [b for b in first] + batches(first, 2)                 # 1 epoch + 2 batches, then "crash"
    state = first.state_dict()
    assert state["epoch"] == 1 and state["position"] == 2
    resumed = make()
    resumed.load_state_dict(state)
    seen += [b for b in resumed] + [b for b in resumed]
    assert len(seen) == len(uninterrupted) == 18
    for (images_a, labels_a), (images_b, labels_b) in zip(seen, uninterrupted):
        np.testing.assert_array_equal(images_a, images_b)
        np.testing.assert_array_equal(labels_a, labels_b)


def test_loader_early_break_keeps_position_and_state_at_epoch_end():
    loader = DataLoader(IndexDataset(6), batch_size=2, shuffle=False)
    assert [int(b[0][0, 0, 0, 0]) for b in batches(loader, 1)] == [0]
    assert served(loader) == [2, 3, 4, 5]                      # continues where the loop stopped
    loader = DataLoader(IndexDataset(6), batch_size=2, shuffle=False)
    batches(loader, 3)                                         # the last batch handed out
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["position"] == 0


def test_loader_errors():
    with pytest.raises(DatasetError, match="is empty"):
        DataLoader(IndexDataset(0))
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        DataLoader(IndexDataset(3), batch_size=0)
    with pytest.raises(ValueError, match="seed"):
        DataLoader(IndexDataset(3), seed=-1)
    with pytest.raises(DatasetError, match="no batches"):
        DataLoader(IndexDataset(3), batch_size=4, drop_last=True)
    with pytest.raises(DatasetError, match="different sizes.*batch_size=1"):
        next(iter(DataLoader(SyntheticShapes(size=4, seed=0), batch_size=4)))
    with pytest.raises(DatasetError, match="end with Normalize"):
        next(iter(DataLoader(IndexDataset(3), transform=RandomCrop(8))))


def test_loader_state_dict_validation():
    loader = DataLoader(IndexDataset(10), batch_size=2, seed=3)
    state = loader.state_dict()
    for key, value in (("batch_size", 4), ("seed", 0), ("dataset_size", 11)):
        with pytest.raises(ValueError, match=f"{key}="):
            loader.load_state_dict(dict(state, **{key: value}))
    with pytest.raises(ValueError, match="position"):
        loader.load_state_dict(dict(state, position=5))
    with pytest.raises(ValueError, match=r"missing \['position'\]"):
        loader.load_state_dict({k: v for k, v in state.items() if k != "position"})
    loader.load_state_dict(dict(state, epoch=np.int64(2), position=np.array(4)))   # as read back from .npz
    assert (loader.epoch, loader.position) == (2, 4)
