"""Dataset readers: every layout's splits, counts, label mapping and class lists; every bad input's message."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from fakes import (
    ADE_COUNTS, ADE_RAW, CAMVID_COUNTS, CAMVID_RAW, CITYSCAPES_FILES, CITYSCAPES_RAW, COCO_COUNTS, COCO_RAW, FOLDER_CLASSES,
    FOLDER_RAW, FOLDER_SPLITS, H, VOC_IDS, W, build_folder, stripes, voc_mask, write_json, write_mask,
)
from segsynth.data import DATASET_KINDS, open_dataset
from segsynth.data.base import Split
from segsynth.io import SegsynthError


def all_labels(split) -> list[np.ndarray]:
    return [split[i].label for i in range(len(split))]


def assert_sample_shapes(split) -> None:
    for i in range(len(split)):
        sample = split[i]
        assert sample.image.shape == (H, W, 3) and sample.image.dtype == np.uint8
        assert sample.label.shape == (H, W) and sample.label.dtype == np.uint8
        assert sample.id == split.ids[i]


def mapped(raw, mapping) -> np.ndarray:
    return stripes([mapping(v) for v in raw])


# --- the public layouts ----------------------------------------------------------


def test_camvid_layout(camvid_root):
    dataset = open_dataset(f"camvid:{camvid_root}")
    assert {name: len(split) for name, split in dataset.splits.items()} == CAMVID_COUNTS
    assert dataset.num_classes == 11 and len(dataset.palette) == 11
    assert dataset.classes[0] == "sky" and dataset.classes[-1] == "bicyclist"
    expected = mapped(CAMVID_RAW, lambda v: 255 if v == 11 else v)  # void (11) -> ignore
    for name in dataset.splits:
        assert_sample_shapes(dataset.split(name))
        for label in all_labels(dataset.split(name)):
            np.testing.assert_array_equal(label, expected)
    assert dataset.split("train").ids == ["0001TP_train_000", "0001TP_train_001", "0001TP_train_002"]


def test_camvid_split_without_annotations_is_unlabeled(camvid_root):
    shutil.rmtree(camvid_root / "testannot")
    test = open_dataset(f"camvid:{camvid_root}").split("test")
    assert len(test) == 2
    assert (test[0].label == 255).all()


def test_ade20k_layout_reduces_zero_label(ade20k_root):
    dataset = open_dataset(f"ade20k:{ade20k_root}")
    assert {name: len(split) for name, split in dataset.splits.items()} == ADE_COUNTS
    assert dataset.num_classes == 150 and len(dataset.palette) == 150
    assert dataset.classes[0] == "wall"
    expected = mapped(ADE_RAW, lambda v: 255 if v == 0 else v - 1)  # raw 0 -> 255, raw k -> k - 1
    for name in dataset.splits:
        assert_sample_shapes(dataset.split(name))
        for label in all_labels(dataset.split(name)):
            np.testing.assert_array_equal(label, expected)
    assert 149 in expected and 255 in expected and 150 not in expected


def test_ade20k_raw_value_above_150_is_refused(ade20k_root):
    mask = ade20k_root / "annotations" / "training" / "ADE_training_00000002.png"
    write_mask(mask, stripes([0, 151]))
    split = open_dataset(f"ade20k:{ade20k_root}").split("train")
    with pytest.raises(SegsynthError, match=r"\[151\] are outside the 150 classes") as error:
        split[1]
    assert str(mask) in str(error.value)


def test_cityscapes_layout(cityscapes_root):
    dataset = open_dataset(f"cityscapes:{cityscapes_root}")
    assert {name: len(split) for name, split in dataset.splits.items()} == {
        name: len(files) for name, files in CITYSCAPES_FILES.items()}
    assert dataset.num_classes == 19 and len(dataset.palette) == 19
    assert dataset.classes[:3] == ("road", "sidewalk", "building")
    # ids drop the _leftImg8bit suffix; cities are read recursively in sorted order
    assert dataset.split("train").ids == [stem for _, stem in CITYSCAPES_FILES["train"]]
    expected = stripes(CITYSCAPES_RAW)  # train ids are already canonical; 255 stays ignore
    for name in dataset.splits:
        assert_sample_shapes(dataset.split(name))
        for label in all_labels(dataset.split(name)):
            np.testing.assert_array_equal(label, expected)


def test_cityscapes_finds_masks_without_images(cityscapes_root):
    orphan = cityscapes_root / "gtFine" / "train" / "aachen" / "aachen_000099_000019_gtFine_labelTrainIds.png"
    write_mask(orphan, stripes([0]))
    with pytest.raises(SegsynthError, match="mask without image") as error:
        open_dataset(f"cityscapes:{cityscapes_root}")
    assert str(orphan) in str(error.value)


def test_cityscapes_label_above_18_is_refused(cityscapes_root):
    mask = cityscapes_root / "gtFine" / "val" / "lindau" / "lindau_000000_000019_gtFine_labelTrainIds.png"
    write_mask(mask, stripes([0, 19]))
    split = open_dataset(f"cityscapes:{cityscapes_root}").split("val")
    with pytest.raises(SegsynthError, match=r"\[19\] are outside the 19 classes") as error:
        split[1]
    assert str(mask) in str(error.value)


def test_voc_layout(voc_root):
    dataset = open_dataset(f"voc:{voc_root}")  # finds VOCdevkit/VOC2012 inside
    assert {name: len(split) for name, split in dataset.splits.items()} == {k: len(v) for k, v in VOC_IDS.items()}
    assert dataset.split("train").ids == VOC_IDS["train"]
    assert dataset.num_classes == 21 and len(dataset.palette) == 21
    assert dataset.classes[0] == "background" and dataset.palette[1] == (128, 0, 0)
    expected = voc_mask()  # palette PNG indices are the classes; the 255 border stays ignore
    for name in dataset.splits:
        assert_sample_shapes(dataset.split(name))
        for label in all_labels(dataset.split(name)):
            np.testing.assert_array_equal(label, expected)
    assert (expected[0] == 255).all() and 20 in expected
    # Pointing straight at VOC2012 works too.
    assert len(open_dataset(f"voc:{voc_root / 'VOCdevkit' / 'VOC2012'}").split("val")) == 2


def test_voc_listed_file_missing(voc_root):
    missing = voc_root / "VOCdevkit" / "VOC2012" / "SegmentationClass" / "2007_000033.png"
    missing.unlink()
    with pytest.raises(SegsynthError, match="fix the list or add the files") as error:
        open_dataset(f"voc:{voc_root}")
    message = str(error.value)
    assert str(missing) in message and "val.txt" in message


def test_voc_without_lists(voc_root):
    shutil.rmtree(voc_root / "VOCdevkit" / "VOC2012" / "ImageSets")
    with pytest.raises(SegsynthError, match="ImageSets/Segmentation: no train.txt or val.txt"):
        open_dataset(f"voc:{voc_root}")


def test_coco_stuff_layout(coco_stuff_root):
    dataset = open_dataset(f"coco-stuff:{coco_stuff_root}")
    assert {name: len(split) for name, split in dataset.splits.items()} == COCO_COUNTS
    assert dataset.split("train").ids == ["000000000009", "000000000010", "000000000011"]
    assert dataset.num_classes == 171 and len(dataset.palette) == 171
    assert dataset.classes[0] == "person"
    expected = stripes(COCO_RAW)
    for name in dataset.splits:
        assert_sample_shapes(dataset.split(name))
        for label in all_labels(dataset.split(name)):
            np.testing.assert_array_equal(label, expected)


def test_coco_stuff_finds_masks_without_images(coco_stuff_root):
    orphan = coco_stuff_root / "annotations" / "val2017" / "000000999999_labelTrainIds.png"
    write_mask(orphan, stripes([0]))
    with pytest.raises(SegsynthError, match="mask without image") as error:
        open_dataset(f"coco-stuff:{coco_stuff_root}")
    assert str(orphan) in str(error.value)


def test_folder_layout_with_splits(folder_root):
    dataset = open_dataset(f"folder:{folder_root}")
    assert dataset.classes == tuple(FOLDER_CLASSES)
    assert len(dataset.palette) == 3 and dataset.palette[0] == (0, 0, 0)  # default (VOC-style) palette
    assert {name: split.ids for name, split in dataset.splits.items()} == FOLDER_SPLITS
    for name in dataset.splits:
        assert_sample_shapes(dataset.split(name))
        for label in all_labels(dataset.split(name)):
            np.testing.assert_array_equal(label, stripes(FOLDER_RAW))


def test_folder_without_splits_is_all_train(tmp_path):
    root = build_folder(tmp_path / "f", n=4)
    dataset = open_dataset(f"folder:{root}")
    assert list(dataset.splits) == ["train"] and len(dataset.split("train")) == 4


def test_folder_palette_and_ignore_index(tmp_path):
    palette = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    root = build_folder(tmp_path / "f", n=2, palette=palette, ignore_index=[7, 254])
    write_mask(root / "masks" / "img_0.png", stripes([0, 1, 7, 254]))
    dataset = open_dataset(f"folder:{root}")
    assert dataset.palette == tuple(map(tuple, palette))
    # raw 7 and 254 are declared ignore; 255 stays ignore as well
    np.testing.assert_array_equal(dataset.split("train")[0].label, stripes([0, 1, 255, 255]))
    np.testing.assert_array_equal(dataset.split("train")[1].label, stripes([0, 1, 2, 255]))


def test_split_lookup_by_id(folder_root):
    dataset = open_dataset(f"folder:{folder_root}")
    val = dataset.split("val")
    assert val.index_of("img_4") == 1 and val.has("img_3") and not val.has("img_0")
    with pytest.raises(SegsynthError, match="no sample with id 'nope'"):
        val.index_of("nope")
    with pytest.raises(SegsynthError, match="has no split 'test'; it has: train, val"):
        dataset.split("test")


def test_jpeg_and_grayscale_images_read_as_rgb(tmp_path):
    root = build_folder(tmp_path / "f", n=2)
    Image.fromarray(np.full((H, W), 77, np.uint8)).save(root / "images" / "img_1.png")
    sample = open_dataset(f"folder:{root}").split("train")[1]
    assert sample.image.shape == (H, W, 3) and (sample.image == 77).all()


# --- bad inputs: a SegsynthError naming the file and the fix -------------------------


def test_missing_mask_for_image(camvid_root):
    (camvid_root / "trainannot" / "0001TP_train_001.png").unlink()
    with pytest.raises(SegsynthError) as error:
        open_dataset(f"camvid:{camvid_root}")
    message = str(error.value)
    assert "image without mask" in message
    assert str(camvid_root / "train" / "0001TP_train_001.png") in message
    assert str(camvid_root / "trainannot" / "0001TP_train_001.png") in message  # where the mask was expected
    assert "add the missing files or remove the unpaired ones" in message


def test_mask_without_image(camvid_root):
    (camvid_root / "val" / "0001TP_val_000.png").unlink()
    with pytest.raises(SegsynthError) as error:
        open_dataset(f"camvid:{camvid_root}")
    message = str(error.value)
    assert f"mask without image: {camvid_root / 'valannot' / '0001TP_val_000.png'}" in message
    assert "add the missing files or remove the unpaired ones" in message


def test_folder_mask_without_image(folder_root):
    write_mask(folder_root / "masks" / "stray.png", stripes([0]))
    with pytest.raises(SegsynthError, match="mask without image: .*stray.png"):
        open_dataset(f"folder:{folder_root}")


def test_image_mask_size_mismatch(camvid_root):
    mask = camvid_root / "trainannot" / "0001TP_train_002.png"
    write_mask(mask, stripes([1, 2], size=(H, W + 8)))
    split = open_dataset(f"camvid:{camvid_root}").split("train")
    split[0]  # the good ones still load
    with pytest.raises(SegsynthError) as error:
        split[2]
    message = str(error.value)
    assert str(mask) in message and str(camvid_root / "train" / "0001TP_train_002.png") in message
    assert f"mask is {W + 8}x{H}" in message and f"is {W}x{H}" in message
    assert "masks must match their images" in message


def test_label_outside_class_range(folder_root):
    mask = folder_root / "masks" / "img_2.png"
    write_mask(mask, stripes([0, 1, 7, 9]))
    split = open_dataset(f"folder:{folder_root}").split("train")
    with pytest.raises(SegsynthError) as error:
        split[2]
    message = str(error.value)
    assert str(mask) in message
    assert "[7, 9] are outside the 3 classes" in message and "valid: 0..2" in message
    assert "fix the mask or the dataset's classes.json" in message


def test_rgb_colour_mask_where_indices_expected(camvid_root):
    mask = camvid_root / "trainannot" / "0001TP_train_000.png"
    colours = np.zeros((H, W, 3), np.uint8)
    colours[:, : W // 2] = (128, 64, 128)
    colours[:, W // 2:] = (128, 128, 128)
    Image.fromarray(colours, mode="RGB").save(mask)
    split = open_dataset(f"camvid:{camvid_root}").split("train")
    with pytest.raises(SegsynthError) as error:
        split[0]
    message = str(error.value)
    assert str(mask) in message and "RGB colour image" in message
    assert "convert colour masks to index masks" in message


def test_grey_rgb_mask_is_accepted(camvid_root):
    """An RGB file whose three channels agree is an index mask saved as RGB: read it."""
    mask = camvid_root / "trainannot" / "0001TP_train_000.png"
    raw = stripes([0, 3, 11])
    Image.fromarray(np.repeat(raw[..., None], 3, axis=2), mode="RGB").save(mask)
    label = open_dataset(f"camvid:{camvid_root}").split("train")[0].label
    np.testing.assert_array_equal(label, stripes([0, 3, 255]))


def test_16_bit_masks(folder_root):
    """16-bit index PNGs are read when their values fit in 8 bits, refused with the fix when they do not."""
    mask = folder_root / "masks" / "img_0.png"
    Image.fromarray(stripes(FOLDER_RAW).astype(np.uint16)).save(mask)
    split = open_dataset(f"folder:{folder_root}").split("train")
    np.testing.assert_array_equal(split[0].label, stripes(FOLDER_RAW))
    big = stripes([0, 1, 2]).astype(np.uint16)
    big[:, -1] = 300
    Image.fromarray(big).save(mask)
    with pytest.raises(SegsynthError, match="mask values exceed 0..255 \\(0..300\\); use 8-bit masks") as error:
        split[0]
    assert str(mask) in str(error.value)


@pytest.mark.parametrize("which", ["image", "mask"])
def test_corrupt_file(camvid_root, which):
    path = camvid_root / ("train" if which == "image" else "trainannot") / "0001TP_train_001.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    split = open_dataset(f"camvid:{camvid_root}").split("train")
    with pytest.raises(SegsynthError) as error:
        split[1]
    message = str(error.value)
    assert str(path) in message and f"cannot read {which}" in message
    assert "replace or remove the file" in message


def test_truncated_jpeg(ade20k_root):
    path = ade20k_root / "images" / "validation" / "ADE_validation_00000001.jpg"
    path.write_bytes(path.read_bytes()[:200])
    split = open_dataset(f"ade20k:{ade20k_root}").split("val")
    with pytest.raises(SegsynthError, match="cannot read image") as error:
        split[0]
    assert str(path) in str(error.value)


def test_empty_split_folder(camvid_root):
    for folder in ("val", "valannot"):
        shutil.rmtree(camvid_root / folder)
        (camvid_root / folder).mkdir()
    with pytest.raises(SegsynthError) as error:
        open_dataset(f"camvid:{camvid_root}")
    message = str(error.value)
    assert f"camvid:{camvid_root}" in message and "split 'val' is empty" in message
    assert "add samples or remove its folder/list" in message


def test_empty_split_list(folder_root):
    (folder_root / "splits" / "val.txt").write_text("\n")
    with pytest.raises(SegsynthError, match="split 'val' is empty"):
        open_dataset(f"folder:{folder_root}")


def test_split_list_with_unknown_ids(folder_root):
    (folder_root / "splits" / "val.txt").write_text("img_3\nimg_77\n")
    with pytest.raises(SegsynthError, match=r"val.txt: ids without an image/mask pair: \['img_77'\]"):
        open_dataset(f"folder:{folder_root}")


def test_unknown_dataset_kind():
    with pytest.raises(SegsynthError) as error:
        open_dataset("kitti:/data/kitti")
    message = str(error.value)
    assert "unknown dataset kind 'kitti'" in message
    for kind in DATASET_KINDS:
        assert kind in message


def test_spec_without_path():
    with pytest.raises(SegsynthError, match=r"needs a path: camvid:PATH"):
        open_dataset("camvid")


@pytest.mark.parametrize("kind", ["camvid", "ade20k", "cityscapes", "voc", "coco-stuff", "folder"])
def test_missing_root(tmp_path, kind):
    with pytest.raises(SegsynthError, match=str(tmp_path / "absent")):
        open_dataset(f"{kind}:{tmp_path / 'absent'}")


@pytest.mark.parametrize("info", [{}, {"classes": []}, {"classes": "cat"}, {"classes": [1, 2]}, ["cat", "dog"]],
                         ids=["no-classes", "empty", "string", "numbers", "bare-list"])
def test_folder_classes_json_without_classes(folder_root, info):
    write_json(folder_root / "classes.json", info)
    with pytest.raises(SegsynthError) as error:
        open_dataset(f"folder:{folder_root}")
    message = str(error.value)
    assert str(folder_root / "classes.json") in message
    assert 'needs "classes": a non-empty list of class names' in message


def test_folder_classes_json_missing_or_invalid(folder_root):
    info = folder_root / "classes.json"
    info.write_text("{not json")
    with pytest.raises(SegsynthError, match="not valid JSON") as error:
        open_dataset(f"folder:{folder_root}")
    assert str(info) in str(error.value)
    info.unlink()
    with pytest.raises(SegsynthError, match=r'classes.json: missing; write \{"classes"'):
        open_dataset(f"folder:{folder_root}")


def test_folder_palette_too_short(folder_root):
    write_json(folder_root / "classes.json", {"classes": FOLDER_CLASSES, "palette": [[0, 0, 0]]})
    with pytest.raises(SegsynthError, match=r'"palette" has 1 colour\(s\) for 3 classes; give exactly one \[r, g, b\] '
                                            r'per class, in the order of "classes"'):
        open_dataset(f"folder:{folder_root}")


def test_folder_without_masks_folder(folder_root):
    shutil.rmtree(folder_root / "masks")
    with pytest.raises(SegsynthError, match="masks folder not found; put the index masks in masks/"):
        open_dataset(f"folder:{folder_root}")


def test_split_object_is_lazy_and_indexable():
    calls = []
    split = Split("s", ["a", "b"], lambda i: calls.append(i) or i)
    assert len(split) == 2 and calls == []
    assert split[1] == 1 and calls == [1]


def test_dataset_kinds_registry():
    assert {"camvid", "ade20k", "cityscapes", "voc", "coco-stuff", "folder", "toy"} <= set(DATASET_KINDS)
    assert all(kind == kind.lower() and ":" not in kind for kind in DATASET_KINDS)
