"""SegGen's colour coding: segmentation maps drawn as colour images, and read back.

SegGen (Ye et al., "SegGen: Supercharging Segmentation Models with Text2Mask
and Mask2Img Synthesis", 2023) trains a text -> mask diffusion model (MaskSyn)
whose "images" are segmentation maps with every class painted in its own
colour. A generated map is read back to class ids by nearest palette colour;
what the model smears between colours, or paints in no class's colour, is
thrown away. This module holds the three parts of that round trip:

1. The palette (`separated_palette`): the class colours should be as far apart
   as possible, so that the small colour errors of the VAE and the sampler
   never move a pixel to another class. Colours are picked greedily (farthest
   point first) from an RGB grid. Distance is the smaller of the RGB distance
   (what decoding measures) and 3x the CIELAB distance (what a model trained on
   natural images tells apart; one Lab unit is worth about 3 RGB units since
   their ranges are ~150 and ~441), so neighbours are far apart in both. The
   ignore colour (black) is placed first, so every class is far from it too.
   A user's own colours come from a JSON file (`load_colour_map`).
2. `encode_mask`: label map -> colour image (ignore -> the ignore colour).
3. `decode_colour_mask`: colour image -> label map. Each pixel takes its
   nearest palette colour (Euclidean RGB); pixels farther than `max_distance`
   from every colour become ignore. Then speckles (connected components of
   one label smaller than `min_component` pixels) take the majority label of
   the pixels around them, which removes the isolated wrong pixels that
   nearest-colour decoding leaves at colour edges and in noise.

Connected components are computed here in numpy (no scipy): equal-label runs
along each row, joined across rows by a vectorised union-find
(`connected_components`); captions and the mask-quality report reuse it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from segsynth import IGNORE_INDEX
from segsynth.config import field
from segsynth.io import SegsynthError

IGNORE_COLOUR = (0, 0, 0)
LAB_WEIGHT = 3.0  # RGB units per CIELAB unit in the palette's distance (RGB range ~441 / Lab range ~150)
GRID_LEVELS = 18  # candidate colours per channel (0, 15, 30, ..., 255): 5832 candidates
DECODE_CHUNK_VALUES = 1 << 22  # pixels x palette colours per distance block (16 MiB of float32)
MAX_DISTANCE = 64.0  # default: farther than this from every colour is ignore (nearest colours of 150 are ~40 apart)
MIN_COMPONENT = 8  # default: smaller regions are decoding speckles (a few pixels where colours meet or noise)
SEPARATOR = 254  # a value no label takes (classes < 254, ignore 255): the rows between stacked pictures
STACK_PIXELS = 1 << 14  # pictures decoded together up to this many pixels (decode_colour_masks)


@dataclass
class ColourCodingConfig:
    palette: str = field("separated", help="class colours of the colour-coded masks: separated (maximally far "
                                           "apart), dataset (the dataset's own palette) or a JSON file "
                                           "{class: [r, g, b], optional \"ignore\": [r, g, b]}")
    max_distance: float = field(MAX_DISTANCE, help="a decoded pixel farther than this (Euclidean RGB, 0..441) "
                                                   "from every palette colour becomes ignore (255)")
    min_component: int = field(MIN_COMPONENT, help="decoded connected regions smaller than this many pixels take "
                                                   "the majority label around them (0 keeps every pixel's "
                                                   "nearest colour)")


# --- palettes -------------------------------------------------------------------


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB (0..255, ... x 3) -> CIELAB under D65: the standard formulas (IEC 61966-2-1, CIE 1976)."""
    c = np.asarray(rgb, np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    to_xyz = np.array([[0.4124564, 0.3575761, 0.1804375],
                       [0.2126729, 0.7151522, 0.0721750],
                       [0.0193339, 0.1191920, 0.9503041]])
    xyz = linear @ to_xyz.T / np.array([0.95047, 1.0, 1.08883])  # relative to the D65 white point
    delta = 6 / 29
    f = np.where(xyz > delta ** 3, np.cbrt(xyz), xyz / (3 * delta * delta) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def colour_distance(colours: np.ndarray, to: np.ndarray) -> np.ndarray:
    """The palette's dissimilarity of each of `colours` (N x 3) to one colour `to`: min(RGB, 3 x Lab distance)."""
    rgb = np.linalg.norm(colours.astype(np.float64) - to.astype(np.float64), axis=-1)
    lab = np.linalg.norm(srgb_to_lab(colours) - srgb_to_lab(to), axis=-1)
    return np.minimum(rgb, LAB_WEIGHT * lab)


def _candidate_colours(seed: int) -> np.ndarray:
    levels = np.linspace(0, 255, GRID_LEVELS).round().astype(np.int64)
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), axis=-1).reshape(-1, 3)
    # The seed only reorders the grid, which decides between equally far candidates (there are many on a grid).
    return grid[np.random.default_rng(seed).permutation(len(grid))] if seed else grid


def _farthest_points(candidates: np.ndarray, fixed: np.ndarray, count: int) -> np.ndarray:
    """Greedy farthest-point sampling: `count` candidates, each the farthest from everything chosen so far."""
    nearest = np.full(len(candidates), np.inf)  # each candidate's distance to its nearest chosen colour
    for colour in fixed:
        np.minimum(nearest, colour_distance(candidates, colour), out=nearest)
    chosen = []
    for _ in range(count):
        index = int(np.argmax(nearest))  # the first of equally far candidates, in the (seeded) grid order
        chosen.append(candidates[index])
        np.minimum(nearest, colour_distance(candidates, candidates[index]), out=nearest)
    return np.asarray(chosen, np.uint8).reshape(count, 3)


def separated_palette(num_classes: int, seed: int = 0) -> np.ndarray:
    """(num_classes + 1) x 3 uint8: class colours as far apart as possible; the last row is the ignore colour.

    Deterministic: the same (num_classes, seed) always gives the same palette, and a palette for fewer classes
    is the start of the one for more (greedy order), so adding classes keeps the old colours.
    """
    if not 1 <= num_classes < IGNORE_INDEX:
        raise SegsynthError(f"separated_palette: num_classes must be in 1..{IGNORE_INDEX - 1} (uint8 labels, "
                            f"{IGNORE_INDEX} = ignore), got {num_classes}")
    ignore = np.asarray([IGNORE_COLOUR], np.uint8)
    classes = _farthest_points(_candidate_colours(seed), ignore, num_classes)
    return np.concatenate([classes, ignore])


def dataset_palette(colours: Sequence[Sequence[int]], class_names: Sequence[str]) -> np.ndarray:
    """A dataset's own class colours plus an ignore colour far from all of them (black when nothing is near it)."""
    num_classes = len(class_names)
    classes = np.asarray(colours, np.int64)[:num_classes]
    if classes.shape != (num_classes, 3):
        raise SegsynthError(f"the dataset palette has {len(classes)} colours for {num_classes} classes; "
                            "use the separated palette or a JSON colour map")
    _refuse_shared_colours(classes, class_names, "the dataset palette",
                           "use the separated palette or a JSON colour map instead")
    black = np.asarray(IGNORE_COLOUR, np.int64)
    if colour_distance(classes, black).min() >= 100:
        ignore = black
    else:
        ignore = _farthest_points(_candidate_colours(0), classes, 1)[0]
    return np.concatenate([classes, ignore[None]]).astype(np.uint8)


def load_colour_map(path: str | Path, classes: Sequence[str]) -> np.ndarray:
    """A user's colour map: JSON {class name: [r, g, b], ..., optional "ignore": [r, g, b]} -> palette.

    Names match case-insensitively with '_' / '-' as spaces. Every class needs a colour, no two entries
    (ignore included) may share one; the errors name the file and the entries.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SegsynthError(f"colour map {path}: file not found") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise SegsynthError(f"colour map {path}: line {line} is not UTF-8 text (byte {error.start}); "
                            "save the file as UTF-8") from None
    try:
        entries = json.loads(text, object_pairs_hook=_refuse_duplicate_keys(path))
    except json.JSONDecodeError as error:
        raise SegsynthError(f"colour map {path}: not valid JSON at line {error.lineno} ({error.msg})") from None
    if not isinstance(entries, dict):
        raise SegsynthError(f"colour map {path}: must be a JSON object {{class name: [r, g, b]}}, "
                            f"got {type(entries).__name__}")
    by_name = {_normalise(name): index for index, name in enumerate(classes)}
    palette = np.zeros((len(classes) + 1, 3), np.int64)
    palette[-1] = IGNORE_COLOUR
    given: dict[int, str] = {}
    for key, value in entries.items():
        name = _normalise(key)
        if name != "ignore" and name not in by_name:
            raise SegsynthError(f"colour map {path}: {key!r} is not a class of this dataset; "
                                f"classes: {', '.join(classes)} (and \"ignore\")")
        if not (isinstance(value, list) and len(value) == 3
                and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in value)):
            raise SegsynthError(f"colour map {path}: {key!r} must be [r, g, b] with three integers 0..255, "
                                f"got {json.dumps(value)}")
        row = len(classes) if name == "ignore" else by_name[name]
        if row in given:
            raise SegsynthError(f"colour map {path}: {given[row]!r} and {key!r} name the same class")
        given[row] = key
        palette[row] = value
    missing = [name for index, name in enumerate(classes) if index not in given]
    if missing:
        raise SegsynthError(f"colour map {path}: no colour for class(es) {', '.join(missing)}; "
                            "every class needs one")
    _refuse_shared_colours(palette, list(classes) + ["ignore"], f"colour map {path}",
                           "give each class (and ignore) its own colour")
    return palette.astype(np.uint8)


def _normalise(name: str) -> str:
    return " ".join(str(name).lower().replace("_", " ").replace("-", " ").split())


def _refuse_duplicate_keys(path: Path):
    def build(pairs: list[tuple[str, object]]) -> dict:
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise SegsynthError(f"colour map {path}: {key!r} appears twice")
            seen.add(key)
        return dict(pairs)

    return build


def _refuse_shared_colours(palette: np.ndarray, names: Sequence[str], where: str, fix: str) -> None:
    packed = (palette[:, 0] << 16) | (palette[:, 1] << 8) | palette[:, 2]
    values, counts = np.unique(packed, return_counts=True)
    if (counts > 1).any():
        shared = values[counts > 1][0]
        owners = [names[i] for i in np.flatnonzero(packed == shared)]
        colour = palette[np.flatnonzero(packed == shared)[0]].tolist()
        raise SegsynthError(f"{where}: {' and '.join(repr(o) for o in owners)} share the colour {colour}, so "
                            f"decoding could not tell them apart; {fix}")


# Palette choice -> builder(classes, the dataset's own palette). A path to a JSON file is the third option.
PALETTES = {
    "separated": lambda classes, colours: separated_palette(len(classes)),
    "dataset": lambda classes, colours: dataset_palette(colours, classes),
}


def resolve_palette(config: ColourCodingConfig, classes: Sequence[str],
                    dataset_colours: Sequence[Sequence[int]]) -> np.ndarray:
    """The palette a ColourCodingConfig names: 'separated', 'dataset' or a JSON colour map file."""
    if config.palette in PALETTES:
        return PALETTES[config.palette](classes, dataset_colours)
    if not Path(config.palette).is_file():
        raise SegsynthError(f"palette {config.palette!r}: neither {' nor '.join(PALETTES)} nor an existing "
                            "JSON colour map file")
    return load_colour_map(config.palette, classes)


# --- encode / decode --------------------------------------------------------------


def encode_mask(label: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """H x W label map (classes 0..C-1, 255 = ignore) -> H x W x 3 uint8 colour image."""
    label = np.asarray(label)
    palette = np.asarray(palette, np.uint8)
    num_classes = len(palette) - 1
    if label.ndim != 2:
        raise SegsynthError(f"encode_mask: expected an H x W label map, got shape {label.shape}")
    lookup = np.zeros((256, 3), np.uint8)
    lookup[:num_classes] = palette[:num_classes]
    lookup[IGNORE_INDEX] = palette[-1]
    valid = np.zeros(256, bool)
    valid[:num_classes] = valid[IGNORE_INDEX] = True
    if not np.issubdtype(label.dtype, np.integer):
        raise SegsynthError(f"encode_mask: label map must hold integers, got {label.dtype}")
    if label.dtype != np.uint8:
        if label.size and (label.min() < 0 or label.max() > 255):
            raise SegsynthError(f"encode_mask: label values {label.min()}..{label.max()} exceed 0..255")
        label = label.astype(np.uint8)
    unknown = ~valid[label]
    if unknown.any():
        raise SegsynthError(f"encode_mask: label value(s) {np.unique(label[unknown])[:10].tolist()} are not "
                            f"classes 0..{num_classes - 1} or ignore ({IGNORE_INDEX})")
    return lookup[label]


def nearest_colours(rgb: np.ndarray, palette: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each pixel of H x W x 3 `rgb`: the index of its nearest palette colour and the Euclidean distance.

    ||x - p||^2 = ||x||^2 - 2 x.p + ||p||^2 in float32: every term is an integer below 2^24, so it is exact and
    ties break the same way on every machine. Blocks of pixels bound the memory (pixels x colours floats).
    """
    height, width = rgb.shape[:2]
    pixels = rgb.reshape(-1, 3).astype(np.float32)
    colours = np.asarray(palette, np.float32)
    colour_norms = (colours * colours).sum(axis=1)
    index = np.empty(len(pixels), np.int64)
    squared = np.empty(len(pixels), np.float32)
    block = max(1, DECODE_CHUNK_VALUES // len(colours))
    for start in range(0, len(pixels), block):
        chunk = pixels[start:start + block]
        partial = colour_norms[None, :] - 2.0 * (chunk @ colours.T)  # ||p||^2 - 2 x.p, pixels x colours
        nearest = partial.argmin(axis=1)
        index[start:start + block] = nearest
        squared[start:start + block] = partial[np.arange(len(chunk)), nearest] + (chunk * chunk).sum(axis=1)
    return index.reshape(height, width), np.sqrt(np.maximum(squared, 0)).reshape(height, width)


def decode_colour_mask(rgb: np.ndarray, palette: np.ndarray, max_distance: float = MAX_DISTANCE,
                       min_component: int = MIN_COMPONENT, connectivity: int = 8) -> np.ndarray:
    """H x W x 3 colour image -> H x W uint8 label map (255 = ignore), the inverse of `encode_mask`.

    1. each pixel takes its nearest palette colour (the last palette row means ignore);
    2. pixels farther than `max_distance` from every colour become ignore;
    3. components smaller than `min_component` pixels take the majority label around them (`remove_speckles`).
    """
    rgb = np.asarray(rgb)
    palette = np.asarray(palette, np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise SegsynthError(f"decode_colour_mask: expected an H x W x 3 colour image, got shape {rgb.shape}")
    index, distance = nearest_colours(rgb, palette)
    lookup = np.arange(len(palette), dtype=np.int64)
    lookup[-1] = IGNORE_INDEX
    label = lookup[index].astype(np.uint8)
    label[distance > max_distance] = IGNORE_INDEX
    if min_component > 1:
        label = remove_speckles(label, min_component, connectivity)
    return label


def decode_colour_masks(pictures: Sequence[np.ndarray], palette: np.ndarray, max_distance: float = MAX_DISTANCE,
                        min_component: int = MIN_COMPONENT, connectivity: int = 8) -> list[np.ndarray]:
    """`decode_colour_mask` of several colour images at once, with the same result for each.

    On small maps numpy's per-call overhead, not arithmetic, is much of the cost of speckle removal (tens of
    calls per round, each little work on a 32x40 map). So pictures of one size are stacked into tall maps of
    up to STACK_PIXELS pixels, each picture followed by a separator row of a value no label takes:
    components never cross it, it never votes and it is never relabelled (`remove_speckles(...,
    separator=)`), so every picture decodes as alone while a stack pays the calls once. (A stack runs as many
    rounds as its slowest picture needs, which is why stacks stay small: large pictures go one by one.)
    """
    pictures = [np.asarray(picture) for picture in pictures]
    palette = np.asarray(palette, np.uint8)
    for picture in pictures:
        if picture.ndim != 3 or picture.shape[2] != 3:
            raise SegsynthError(f"decode_colour_mask: expected an H x W x 3 colour image, got shape {picture.shape}")
    labels: list[np.ndarray | None] = [None] * len(pictures)
    by_shape: dict[tuple, list[int]] = {}
    for index, picture in enumerate(pictures):
        by_shape.setdefault(picture.shape, []).append(index)
    lookup = np.arange(len(palette), dtype=np.int64)
    lookup[-1] = IGNORE_INDEX
    stacks = [(shape, indices[start:start + max(1, STACK_PIXELS // (shape[0] * shape[1]))])
              for shape, indices in by_shape.items()
              for start in range(0, len(indices), max(1, STACK_PIXELS // max(1, shape[0] * shape[1])))]
    for (height, width, _), indices in stacks:
        index, distance = nearest_colours(np.concatenate([pictures[i] for i in indices]), palette)
        decoded = lookup[index].astype(np.uint8)
        decoded[distance > max_distance] = IGNORE_INDEX
        if min_component > 1:
            stacked = np.full((len(indices), height + 1, width), SEPARATOR, np.uint8)
            stacked[:, :height] = decoded.reshape(len(indices), height, width)
            stacked = remove_speckles(stacked.reshape(-1, width), min_component, connectivity, separator=SEPARATOR)
            decoded = stacked.reshape(len(indices), height + 1, width)[:, :height].reshape(-1, width)
        for position, i in enumerate(indices):
            labels[i] = decoded[position * height:(position + 1) * height].copy()
    return labels


def check_colour_image(rgb: np.ndarray, expected_hw: tuple[int, int], path: str | Path) -> np.ndarray:
    """Refuse a generated colour mask that is not H x W x 3 uint8 of the expected size (the error names `path`)."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise SegsynthError(f"{path}: a colour-coded mask must be an H x W x 3 RGB image, got shape {rgb.shape}")
    if rgb.dtype != np.uint8:
        raise SegsynthError(f"{path}: a colour-coded mask must be 8-bit (uint8), got {rgb.dtype}")
    height, width = expected_hw
    if rgb.shape[:2] != (height, width):
        raise SegsynthError(f"{path}: colour-coded mask is {rgb.shape[1]}x{rgb.shape[0]} (WxH) but {width}x{height} "
                            "was expected; generate at the mask size, or resize with nearest-neighbour before "
                            "decoding (interpolation mixes class colours)")
    return rgb


# --- connected components -----------------------------------------------------------


def connected_components(label: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """Components of equal-valued pixels: (H x W int64 component ids 0..n-1, n).

    Every pixel belongs to exactly one component (ignore pixels included). Ids follow the first pixel of each
    component in row-major order.

    1. runs: maximal stretches of one value along a row;
    2. edges: runs in consecutive rows that touch (4: same column; 8: also diagonal) and hold the same value;
    3. union-find over runs, vectorised: every root hooks onto the smallest root it shares an edge with,
       then pointer jumping flattens the trees; edges whose ends agree are dropped; repeat until none are left.
    """
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"connected_components: expected an H x W map, got shape {label.shape}")
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    height, width = label.shape
    if label.size == 0:
        return np.zeros(label.shape, np.int64), 0
    # 1. runs (a run starts at column 0 and wherever the value changes along the row)
    starts = np.ones(label.shape, bool)
    starts[:, 1:] = label[:, 1:] != label[:, :-1]
    run = np.cumsum(starts.ravel()).reshape(height, width) - 1
    num_runs = int(run[-1, -1]) + 1
    # 2. edges between runs of consecutive rows (pixel pairs first, then unique run pairs)
    pairs = [(label[1:] == label[:-1], run[:-1], run[1:])]
    if connectivity == 8:
        pairs.append((label[1:, 1:] == label[:-1, :-1], run[:-1, :-1], run[1:, 1:]))  # down-right
        pairs.append((label[1:, :-1] == label[:-1, 1:], run[:-1, 1:], run[1:, :-1]))  # down-left
    upper = np.concatenate([above[same] for same, above, _ in pairs])
    lower = np.concatenate([below[same] for same, _, below in pairs])
    keys = np.unique(upper * num_runs + lower)
    upper, lower = keys // num_runs, keys % num_runs
    # 3. union-find: parent[r] <= r always, so hooking never makes a cycle
    parent = np.arange(num_runs)
    while upper.size:
        root_upper, root_lower = parent[upper], parent[lower]
        open_edges = root_upper != root_lower
        upper, lower = upper[open_edges], lower[open_edges]
        if not upper.size:
            break
        root_upper, root_lower = root_upper[open_edges], root_lower[open_edges]
        high, low = np.maximum(root_upper, root_lower), np.minimum(root_upper, root_lower)
        np.minimum.at(parent, high, low)
        while True:  # pointer jumping until every run points at its root
            grandparent = parent[parent]
            if np.array_equal(grandparent, parent):
                break
            parent = grandparent
    # Each root is the smallest run of its component (roots only ever hook onto smaller ones), so numbering
    # the roots in run order numbers components by their first pixel, without a sort.
    is_root = parent == np.arange(num_runs)
    component_of_root = np.cumsum(is_root) - 1
    return component_of_root[parent][run], int(is_root.sum())


def remove_speckles(label: np.ndarray, min_component: int, connectivity: int = 8, max_rounds: int = 8,
                    separator: int | None = None) -> np.ndarray:
    """Relabel components smaller than `min_component` pixels by the majority label of their neighbours.

    A speckle votes with the pixels just outside it (one vote per touching pixel pair). Neighbours that are
    themselves speckles do not vote while the speckle has a big neighbour, so a cluster of noise is eaten
    from its border inwards, one layer per round. Speckles with no big neighbour (and every speckle in the
    last round) count all their neighbours. A map that is one small component becomes ignore. Ties go to
    the smaller label. Returns a new uint8 map.

    `separator`: a value that splits the map into independent maps (`decode_colour_masks` stacks pictures
    with separator rows between them): its pixels are never speckles, never vote and keep their value, and a
    speckle with no other neighbour (a whole map smaller than `min_component`) becomes ignore, as when alone.
    """
    label = np.asarray(label, np.uint8).copy()
    for round_number in range(max_rounds):
        components, count = connected_components(label, connectivity)
        component_label = np.zeros(count, np.uint8)
        component_label[components.ravel()] = label.ravel()
        sizes = np.bincount(components.ravel(), minlength=count)
        small = sizes < min_component
        if separator is not None:
            small &= component_label != separator
        if not small.any():
            break
        if count == 1:  # nothing around it to vote
            return np.full_like(label, IGNORE_INDEX)
        near, far_label, far_small = _touching_pairs(components, label, small, connectivity)
        speckle_side = np.ones(len(near), bool) if separator is None else far_label != separator
        from_big = speckle_side & ~far_small
        has_big = np.zeros(count, bool)
        has_big[near[from_big]] = True
        last_round = round_number == max_rounds - 1
        voting = speckle_side if last_round else (from_big | (speckle_side & ~has_big[near]))
        # Majority per speckle without a components x 256 table: unique (component, label) pairs and their
        # counts, sorted by component, then most votes, then smaller label; the first of each component wins.
        keys, votes = np.unique(near[voting] * 256 + far_label[voting], return_counts=True)
        component, candidate = keys // 256, keys % 256
        order = np.lexsort((candidate, -votes, component))
        component, candidate = component[order], candidate[order]
        first = np.ones(len(component), bool)
        first[1:] = component[1:] != component[:-1]
        if separator is not None:  # speckles touching only separators: whole maps too small to have a neighbour
            voted = np.zeros(count, bool)
            voted[component] = True
            component_label[small & ~voted] = IGNORE_INDEX
        component_label[component[first]] = candidate[first]
        label = component_label[components]
    return label


def _touching_pairs(components: np.ndarray, label: np.ndarray, small: np.ndarray, connectivity: int):
    """Every ordered pair of touching pixels in different components whose first pixel is in a small component:
    (this component, other label, other small). Pairs are kept only around speckles, so a round costs a few
    full-map comparisons and gathers only where speckles are."""
    everything, head, tail = slice(None), slice(1, None), slice(None, -1)
    offsets = [((head, everything), (tail, everything)), ((everything, head), (everything, tail))]
    if connectivity == 8:
        offsets += [((head, head), (tail, tail)), ((head, tail), (tail, head))]
    in_speckle = small[components]
    near, far_label, far_small = [], [], []
    for a, b in offsets:
        for this, other in ((a, b), (b, a)):
            keep = in_speckle[this] & (components[this] != components[other])
            others = components[other][keep]
            near.append(components[this][keep])
            far_label.append(label[other][keep].astype(np.int64))
            far_small.append(small[others])
    return np.concatenate(near), np.concatenate(far_label), np.concatenate(far_small)
