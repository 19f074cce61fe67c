"""SegGen colour coding: palettes, encode/decode round trips, speckle removal, colour-map files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from segsynth.data import open_dataset
from segsynth.io import SegsynthError
from segsynth.methods.seggen.colour import (
    ColourCodingConfig,
    check_colour_image,
    colour_distance,
    connected_components,
    decode_colour_mask,
    decode_colour_masks,
    encode_mask,
    load_colour_map,
    remove_speckles,
    resolve_palette,
    separated_palette,
)

TOY = "toy:n=16,n_val=4,size=64x80"
REPO_ROOT = Path(__file__).resolve().parents[3]
# The shared CamVid copy, as the benchmarks name it: beside the checkout, or at its usual absolute place.
CAMVID_ROOTS = [REPO_ROOT.parent / "shared" / "datasets" / "camvid", Path("/work/shared/datasets/camvid")]


@pytest.fixture(scope="module")
def toy():
    return open_dataset(TOY)


def toy_labels(dataset):
    split = dataset.split("train")
    return [split[i].label for i in range(len(split))]


# --- palettes ------------------------------------------------------------------


def pairwise_rgb(palette: np.ndarray) -> np.ndarray:
    colours = palette.astype(float)
    distances = np.linalg.norm(colours[:, None] - colours[None], axis=-1)
    np.fill_diagonal(distances, np.inf)
    return distances


def test_separated_palette_is_deterministic_distinct_and_far_apart():
    palette = separated_palette(9)
    assert palette.shape == (10, 3) and palette.dtype == np.uint8
    assert np.array_equal(palette, separated_palette(9))
    assert palette[-1].tolist() == [0, 0, 0]  # ignore
    assert pairwise_rgb(palette).min() > 100  # ignore included
    # Greedy order: the palette for fewer classes is the start of the one for more.
    assert np.array_equal(separated_palette(150)[:9], palette[:9])
    big = separated_palette(150)
    assert len({tuple(c) for c in big.tolist()}) == 151
    assert pairwise_rgb(big).min() > 35  # still far beyond 8-level noise at ADE20K's class count
    # ... and perceptually apart too (3 x Lab distance enters the greedy distance).
    assert min(colour_distance(np.delete(big, i, 0), big[i]).min() for i in range(len(big))) > 35
    other = separated_palette(9, seed=3)
    assert pairwise_rgb(other).min() > 100 and other[-1].tolist() == [0, 0, 0]


def test_dataset_palette_gets_an_ignore_colour_apart_from_its_classes():
    classes = ("background", "cat", "dog")
    palette = resolve_palette(ColourCodingConfig(palette="dataset"), classes, [(0, 0, 0), (128, 0, 0), (0, 128, 0)])
    assert palette[:3].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0]]
    assert pairwise_rgb(palette)[-1].min() > 100  # black is taken by a class, so ignore moved away from all


def test_dataset_palette_with_shared_colours_is_refused():
    with pytest.raises(SegsynthError, match="'a' and 'c' share the colour \\[1, 2, 3\\].*separated palette"):
        resolve_palette(ColourCodingConfig(palette="dataset"), ("a", "b", "c"), [(1, 2, 3), (9, 9, 9), (1, 2, 3)])


def test_unknown_palette_choice_lists_the_options(tmp_path):
    with pytest.raises(SegsynthError, match="neither separated nor dataset nor an existing JSON"):
        resolve_palette(ColourCodingConfig(palette=str(tmp_path / "nope.json")), ("a",), [(0, 0, 0)])


# --- round trips ---------------------------------------------------------------------


def test_every_toy_mask_round_trips_exactly(toy):
    palette = separated_palette(toy.num_classes)
    for label in toy_labels(toy):
        colour = encode_mask(label, palette)
        assert colour.shape == label.shape + (3,) and colour.dtype == np.uint8
        assert np.array_equal(decode_colour_mask(colour, palette, min_component=0), label)


def test_ignore_pixels_round_trip_as_ignore(toy):
    palette = separated_palette(toy.num_classes)
    label = toy_labels(toy)[0].copy()
    label[10:20, 5:30] = 255
    colour = encode_mask(label, palette)
    assert (colour[10:20, 5:30] == palette[-1]).all()
    assert np.array_equal(decode_colour_mask(colour, palette), label)


def test_gaussian_noise_of_8_levels_decodes_almost_perfectly(toy):
    palette = separated_palette(toy.num_classes)
    rng = np.random.default_rng(0)
    right = total = 0
    for label in toy_labels(toy):
        noisy = encode_mask(label, palette) + rng.normal(0.0, 8.0, label.shape + (3,))
        decoded = decode_colour_mask(np.clip(noisy.round(), 0, 255).astype(np.uint8), palette)
        right += int((decoded == label).sum())
        total += label.size
    assert right / total >= 0.995


def test_speckle_removal_repairs_pixels_painted_in_wrong_colours(toy):
    """Salt noise: 3% of pixels in a random class colour. Nearest-colour decoding keeps them; speckle removal doesn't."""
    palette = separated_palette(toy.num_classes)
    rng = np.random.default_rng(1)
    raw_right = cleaned_right = total = 0
    for label in toy_labels(toy):
        colour = encode_mask(label, palette)
        salt = rng.random(label.shape) < 0.03
        colour[salt] = palette[rng.integers(0, toy.num_classes, int(salt.sum()))]
        raw_right += int((decode_colour_mask(colour, palette, min_component=0) == label).sum())
        cleaned_right += int((decode_colour_mask(colour, palette) == label).sum())
        total += label.size
    assert raw_right / total < 0.985
    assert cleaned_right / total >= 0.995


def test_colours_far_from_every_class_become_ignore():
    palette = separated_palette(3)
    colour = encode_mask(np.zeros((8, 8), np.uint8), palette)
    far = np.linalg.norm(palette.astype(float) - [128, 128, 128], axis=1).min()
    colour[2, 2] = (128, 128, 128)
    decoded = decode_colour_mask(colour, palette, max_distance=far - 1, min_component=0)
    assert decoded[2, 2] == 255 and (np.delete(decoded.ravel(), 2 * 8 + 2) == 0).all()
    assert decode_colour_mask(colour, palette, max_distance=far + 1, min_component=0)[2, 2] != 255


def test_camvid_masks_round_trip():
    root = next((path for path in CAMVID_ROOTS if path.is_dir()), None)
    if root is None:
        pytest.skip(f"no CamVid copy at {' or '.join(str(p) for p in CAMVID_ROOTS)}")
    dataset = open_dataset(f"camvid:{root}")
    split = dataset.split("train")
    for choice in ("separated", "dataset"):
        palette = resolve_palette(ColourCodingConfig(palette=choice), dataset.classes, dataset.palette)
        for index in (0, len(split) // 2, len(split) - 1):
            label = split.label(index)
            assert np.array_equal(decode_colour_mask(encode_mask(label, palette), palette, min_component=0), label)


def test_encode_refuses_labels_outside_the_classes():
    with pytest.raises(SegsynthError, match=r"label value\(s\) \[3, 7\] are not classes 0..2"):
        encode_mask(np.array([[0, 3], [7, 255]], np.uint8), separated_palette(3))


# --- connected components and speckles -----------------------------------------------------


def flood_fill_components(label: np.ndarray, connectivity: int) -> tuple[np.ndarray, int]:
    """The obvious reference: depth-first flood fill from each unvisited pixel in row-major order."""
    steps = [(1, 0), (-1, 0), (0, 1), (0, -1)] + ([(1, 1), (1, -1), (-1, 1), (-1, -1)] if connectivity == 8 else [])
    height, width = label.shape
    out = np.full(label.shape, -1)
    count = 0
    for y in range(height):
        for x in range(width):
            if out[y, x] >= 0:
                continue
            out[y, x], stack = count, [(y, x)]
            while stack:
                cy, cx = stack.pop()
                for dy, dx in steps:
                    ny, nx = cy + dy, cx + dx
                    if 0 <= ny < height and 0 <= nx < width and out[ny, nx] < 0 and label[ny, nx] == label[cy, cx]:
                        out[ny, nx] = count
                        stack.append((ny, nx))
            count += 1
    return out, count


@pytest.mark.parametrize("connectivity", [4, 8])
def test_connected_components_match_flood_fill(connectivity):
    rng = np.random.default_rng(connectivity)
    for _ in range(60):
        height, width = rng.integers(1, 14, 2)
        label = rng.integers(0, rng.integers(1, 4), (height, width)).astype(np.uint8)
        components, count = connected_components(label, connectivity)
        expected, expected_count = flood_fill_components(label, connectivity)
        assert count == expected_count and np.array_equal(components, expected)


def test_connected_components_follow_a_long_snake():
    label = np.zeros((64, 64), np.uint8)
    label[::2] = 1  # rows of 1 joined alternately at the right and the left end: one snake
    label[1::4, -1] = 1
    label[3::4, 0] = 1
    components, count = connected_components(label, 4)
    assert count == 1 + 32  # the snake plus 32 separate rows of zeros
    assert len(np.unique(components[label == 1])) == 1


def test_speckles_take_the_majority_label_around_them():
    label = np.zeros((12, 12), np.uint8)
    label[:, 6:] = 2
    label[3, 2] = 1  # a lone pixel inside class 0
    label[6:9, 8:11] = [[1, 3, 1], [3, 4, 3], [1, 3, 1]]  # noise inside class 2; the 4 touches only noise
    label[2, 6] = 1  # a pixel on the border, with five neighbours of class 2 and three of class 0
    cleaned = remove_speckles(label, min_component=5)
    expected = np.zeros((12, 12), np.uint8)
    expected[:, 6:] = 2
    assert np.array_equal(cleaned, expected)
    assert np.array_equal(remove_speckles(label, min_component=4)[6:9, 8:11],  # the ring of 3s (4 pixels) stays
                          [[2, 3, 2], [3, 3, 3], [2, 3, 2]])
    assert np.array_equal(remove_speckles(label, min_component=1), label)  # nothing is smaller than 1 pixel


def test_a_map_smaller_than_min_component_becomes_ignore():
    assert (remove_speckles(np.ones((2, 3), np.uint8), min_component=8) == 255).all()


# --- colour map files --------------------------------------------------------------------

CLASSES = ("road", "sky", "traffic_sign")


def write(tmp_path: Path, content, name="colours.json") -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_colour_map_file_gives_the_palette(tmp_path):
    path = write(tmp_path, {"Road": [128, 64, 128], "sky": [70, 130, 180], "traffic sign": [220, 220, 0]})
    palette = load_colour_map(path, CLASSES)
    assert palette.tolist() == [[128, 64, 128], [70, 130, 180], [220, 220, 0], [0, 0, 0]]
    with_ignore = write(tmp_path, {"road": [1, 1, 1], "sky": [2, 2, 2], "traffic_sign": [3, 3, 3],
                                   "ignore": [255, 255, 255]}, "b.json")
    assert load_colour_map(with_ignore, CLASSES)[-1].tolist() == [255, 255, 255]
    assert np.array_equal(resolve_palette(ColourCodingConfig(palette=str(path)), CLASSES, []), palette)


@pytest.mark.parametrize("content, message", [
    ({"road": [1, 2, 3], "sky": [1, 2, 3], "traffic_sign": [0, 9, 9]}, "'road' and 'sky' share the colour \\[1, 2, 3\\]"),
    ({"road": [1, 2, 3], "sky": [4, 5, 6], "traffic_sign": [7, 8, 9], "ignore": [4, 5, 6]},
     "'sky' and 'ignore' share the colour"),
    ({"road": [1, 2, 3], "sky": [4, 5, 6], "traffic_sign": [7, 8, 9], "ignore": [0, 0, 0], "sky ": [0, 0, 1]},
     "'sky' and 'sky ' name the same class"),
    ({"road": [1, 2, 3], "traffic_sign": [7, 8, 9]}, "no colour for class\\(es\\) sky"),
    ({"road": [1, 2, 3], "sky": [4, 5, 6], "traffic_sign": [7, 8, 9], "cat": [1, 1, 1]},
     "'cat' is not a class of this dataset; classes: road, sky, traffic_sign"),
    ({"road": [1, 2], "sky": [4, 5, 6], "traffic_sign": [7, 8, 9]}, "'road' must be \\[r, g, b\\] .*got \\[1, 2\\]"),
    ({"road": [1, 2, 256], "sky": [4, 5, 6], "traffic_sign": [7, 8, 9]}, "'road' must be \\[r, g, b\\]"),
    ({"road": [1, 2, 3.5], "sky": [4, 5, 6], "traffic_sign": [7, 8, 9]}, "'road' must be \\[r, g, b\\]"),
    ({"road": [1, 2, True], "sky": [4, 5, 6], "traffic_sign": [7, 8, 9]}, "'road' must be \\[r, g, b\\]"),
    ({"road": "#ff0000", "sky": [4, 5, 6], "traffic_sign": [7, 8, 9]}, "'road' must be \\[r, g, b\\]"),
    ('{"road": [1, 2, 3],\n "sky": [4, 5, 6]\n "traffic_sign": [7, 8, 9]}', "not valid JSON at line 3"),
    ('{"road": [1, 2, 3], "road": [4, 5, 6]}', "'road' appears twice"),
    ([[1, 2, 3]], "must be a JSON object"),
    (b'{"road": [1, 2, 3],\n "sk\xff": [4, 5, 6]}', "line 2 is not UTF-8"),
])
def test_bad_colour_maps_are_refused_naming_the_file(tmp_path, content, message):
    path = write(tmp_path, content)
    with pytest.raises(SegsynthError, match=message) as error:
        load_colour_map(path, CLASSES)
    assert str(path) in str(error.value)


def test_missing_colour_map_file(tmp_path):
    with pytest.raises(SegsynthError, match="file not found"):
        load_colour_map(tmp_path / "none.json", CLASSES)


# --- generated images ----------------------------------------------------------------------


def test_check_colour_image_refuses_wrong_sizes_and_formats():
    good = np.zeros((32, 48, 3), np.uint8)
    assert check_colour_image(good, (32, 48), "gen/0001.png") is good
    with pytest.raises(SegsynthError, match="gen/0001.png: colour-coded mask is 48x32 \\(WxH\\) but 64x32 was expected"):
        check_colour_image(good, (32, 64), "gen/0001.png")
    with pytest.raises(SegsynthError, match="gen/0002.png: .* H x W x 3 RGB image, got shape \\(32, 48, 4\\)"):
        check_colour_image(np.zeros((32, 48, 4), np.uint8), (32, 48), "gen/0002.png")
    with pytest.raises(SegsynthError, match="gen/0003.png: .* 8-bit"):
        check_colour_image(np.zeros((32, 48, 3), np.float32), (32, 48), "gen/0003.png")


def test_decoding_a_batch_gives_each_picture_its_own_decoding(toy):
    """Stacked with separator rows, pictures decode exactly as one by one: noisy, speckled, tiny (smaller than
    min_component: all ignore), of two sizes, and colours far from every class."""
    palette = separated_palette(len(toy.classes))
    rng = np.random.default_rng(3)
    pictures = []
    for label in toy_labels(toy)[:6]:
        colours = encode_mask(label, palette).astype(int)
        pictures.append(np.clip(colours + rng.normal(0, 40, colours.shape), 0, 255).astype(np.uint8))
    pictures += [rng.integers(0, 256, (64, 80, 3), dtype=np.uint8),  # noise: speckles everywhere, every round
                 rng.integers(0, 256, (2, 3, 3), dtype=np.uint8),  # a map smaller than min_component
                 np.broadcast_to(palette[0], (2, 3, 3)).copy(),  # ... of one colour: one small component -> ignore
                 np.kron(rng.integers(0, 256, (8, 10, 3)), np.ones((4, 4, 1))).astype(np.uint8)]
    for settings in ((64.0, 8), (100.0, 20), (30.0, 1)):
        alone = [decode_colour_mask(picture, palette, *settings) for picture in pictures]
        together = decode_colour_masks(pictures, palette, *settings)
        assert [label.shape for label in together] == [picture.shape[:2] for picture in pictures]
        assert all(np.array_equal(a, b) for a, b in zip(alone, together)), settings
    assert (decode_colour_masks(pictures[-2:-1], palette)[0] == 255).all()
