"""The embedded default dataset: procedural street scenes made on the fly.

Nothing is read from disk. Each sample is a pure function of (seed, split,
index), so every machine sees the same data. Scenes have sky, buildings,
road, sidewalk, trees, cars, people, poles and signs: large easy classes,
small rare ones (person, sign) and thin ones (pole), so hardness means
something. Appearance varies on purpose (car colours overlap trees, road and
buildings; global lighting, tint, contrast and noise change per image) so a
segmenter must learn texture and shape, not a colour lookup.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from segsynth.data.base import Dataset, Sample, Split
from segsynth.io import SegsynthError

TOY_CLASSES = ("sky", "building", "road", "sidewalk", "tree", "car", "person", "pole", "sign")
TOY_PALETTE = (
    (70, 130, 180), (70, 70, 70), (128, 64, 128), (244, 35, 232), (107, 142, 35),
    (0, 0, 142), (220, 20, 60), (153, 153, 153), (220, 220, 0),
)
SKY, BUILDING, ROAD, SIDEWALK, TREE, CAR, PERSON, POLE, SIGN = range(len(TOY_CLASSES))
_SPLIT_CODES = {"train": 1, "val": 2, "test": 3}


@dataclass(frozen=True)
class ToyOptions:
    n: int = 400  # training images; val and test get n_val each
    n_val: int = 100
    height: int = 96
    width: int = 128
    seed: int = 0


def parse_toy_options(text: str) -> ToyOptions:
    """Parse 'n=400,size=96' or 'size=96x128,n_val=50,seed=1'."""
    values: dict = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise SegsynthError(f"toy option {part!r} must be key=value (e.g. toy:n=400,size=96)")
        key, value = (s.strip() for s in part.split("=", 1))
        try:
            if key == "size":
                height, _, width = value.partition("x")
                values["height"], values["width"] = int(height), int(width or height)
            elif key in ("n", "n_val", "seed"):
                values[key] = int(value)
            else:
                raise SegsynthError(f"unknown toy option {key!r}; options: n, n_val, size (HxW or S), seed")
        except ValueError:
            raise SegsynthError(f"toy option {key}={value!r} is not a number") from None
    options = ToyOptions(**values)
    if options.n < 1 or options.n_val < 1 or min(options.height, options.width) < 16:
        raise SegsynthError(f"toy options {options} out of range: need n, n_val >= 1 and size >= 16")
    return options


def open_toy(options_text: str, spec: str) -> Dataset:
    options = parse_toy_options(options_text)
    counts = {"train": options.n, "val": options.n_val, "test": options.n_val}
    splits = {}
    for name, count in counts.items():
        ids = [f"toy_{name}_{i:05d}" for i in range(count)]
        splits[name] = Split(name, ids, _make_loader(options, name))
    return Dataset(spec=spec, classes=TOY_CLASSES, palette=TOY_PALETTE, splits=splits)


def _make_loader(options: ToyOptions, split: str):
    @lru_cache(maxsize=4096)  # scenes are cheap but not free; the cache makes epochs 2+ free
    def render(index: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([options.seed, _SPLIT_CODES[split], index])
        return render_scene(rng, options.height, options.width)

    def load(index: int) -> Sample:
        image, label = render(index)
        return Sample(f"toy_{split}_{index:05d}", image.copy(), label.copy())

    return load


# --- scene rendering ---------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cell: float) -> np.ndarray:
    """Value noise in [-1, 1]: random values on a coarse grid, bilinearly upsampled."""
    grid_h, grid_w = max(2, int(height / cell) + 2), max(2, int(width / cell) + 2)
    coarse = rng.uniform(-1, 1, (grid_h, grid_w)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((width, height), Image.BILINEAR))


def _jitter(rng: np.random.Generator, colour, amount: float) -> np.ndarray:
    return np.clip(np.asarray(colour, np.float32) + rng.uniform(-amount, amount, 3), 0, 255)


def _fill(image, label, region, colour_map, class_id):
    image[region] = colour_map[region]
    label[region] = class_id


def render_scene(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw one street scene; returns (RGB uint8 image, uint8 label)."""
    h, w = height, width
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    image = np.zeros((h, w, 3), np.float32)
    label = np.zeros((h, w), np.uint8)
    texture = lambda cell, amp: _smooth_noise(rng, h, w, cell)[..., None] * amp  # noqa: E731
    fine = rng.normal(0, 1, (h, w, 1)).astype(np.float32)

    # 1. Sky: a vertical gradient (clear or overcast) with soft clouds.
    horizon = int(h * rng.uniform(0.38, 0.55))
    overcast = rng.random() < 0.35
    top = _jitter(rng, (150, 155, 165) if overcast else (60, 120, 200), 20)
    bottom = _jitter(rng, (200, 200, 205) if overcast else (170, 200, 235), 15)
    t = (yy / max(horizon, 1)).clip(0, 1)[..., None]
    sky = top * (1 - t) + bottom * t + np.clip(texture(w / 4, 60), 0, None)
    _fill(image, label, np.ones((h, w), bool), sky, SKY)

    # 2. Buildings: blocks along the skyline with window grids; gaps show sky.
    x = int(rng.integers(-w // 8, 1))
    building_colours = [(150, 70, 60), (200, 190, 160), (120, 120, 125), (225, 220, 210), (110, 85, 65), (90, 100, 90)]
    while x < w:
        block_w = int(rng.uniform(0.15, 0.4) * w)
        if rng.random() < 0.15:  # a gap in the skyline
            x += block_w // 2
            continue
        roof = int(rng.uniform(0.03, 0.8) * horizon)
        region = (xx >= x) & (xx < x + block_w) & (yy >= roof) & (yy < horizon + 2)
        base = _jitter(rng, building_colours[rng.integers(len(building_colours))], 25)
        facade = base + texture(6, 12) + fine * 4
        win_w, win_h = rng.integers(3, 7), rng.integers(3, 7)
        gap_x, gap_y = win_w + rng.integers(2, 6), win_h + rng.integers(3, 7)
        windows = (((xx - x) % gap_x) < win_w) & (((yy - roof) % gap_y) < win_h) & ((xx - x) % gap_x > 0)
        window_colour = _jitter(rng, (40, 55, 75) if rng.random() < 0.7 else (200, 210, 220), 20)
        facade = np.where(windows[..., None], window_colour, facade)
        _fill(image, label, region, facade, BUILDING)
        x += block_w

    # 3. Ground: a perspective road trapezoid to a vanishing point; sidewalk beside it.
    vanish_x = w * rng.uniform(0.3, 0.7)
    half_bottom = w * rng.uniform(0.3, 0.6)
    depth = ((yy - horizon) / max(h - horizon, 1)).clip(0, 1)
    centre = vanish_x + (w / 2 - vanish_x) * depth
    road_half = half_bottom * depth + 1
    below = yy >= horizon
    road = below & (np.abs(xx - centre) < road_half)
    sidewalk = below & ~road
    asphalt = _jitter(rng, (85, 85, 90), 25) + texture(8, 10) + fine * 9
    dashes = (np.abs(xx - centre) < 0.03 * road_half + 0.5) & (((yy * 0.4 + depth * 20) % 6) < 3) & road
    asphalt = np.where(dashes[..., None], _jitter(rng, (225, 225, 215), 20), asphalt)
    tile = _jitter(rng, (170, 150, 135) if rng.random() < 0.5 else (150, 150, 155), 20)
    tiles = ((xx % 7 < 1) | (yy % 5 < 1))[..., None]
    paving = tile + texture(10, 10) + fine * 5 - tiles * 30
    _fill(image, label, road, asphalt, ROAD)
    _fill(image, label, sidewalk, paving, SIDEWALK)

    # 4. Objects, back to front: trees, poles with signs, people, cars.
    def on_ground_scale(y_foot):  # perspective: things nearer the bottom are bigger
        return 0.25 + 0.9 * (y_foot - horizon) / max(h - horizon, 1)

    for _ in range(rng.integers(0, 4)):  # trees on the sidewalk
        foot = horizon + rng.uniform(0.05, 0.5) * (h - horizon)
        side = rng.choice([-1, 1])
        cx = centre_at(foot, vanish_x, w, horizon, h) + side * (half_bottom * depth_at(foot, horizon, h) + rng.uniform(3, 0.25 * w))
        s = on_ground_scale(foot) * h
        crown_r = s * rng.uniform(0.18, 0.3)
        trunk = (np.abs(xx - cx) < max(1, s * 0.03)) & (yy <= foot) & (yy > foot - s * 0.45)
        blob = np.zeros((h, w), bool)
        for _ in range(rng.integers(3, 6)):
            bx, by = cx + rng.normal(0, crown_r * 0.5), foot - s * 0.5 + rng.normal(0, crown_r * 0.4)
            blob |= (xx - bx) ** 2 + (yy - by) ** 2 < (crown_r * rng.uniform(0.6, 1.0)) ** 2
        leaves = _jitter(rng, [(60, 110, 40), (35, 80, 35), (150, 140, 50), (90, 120, 60)][rng.integers(4)], 20)
        foliage = leaves + texture(2, 30) + fine * 14
        _fill(image, label, trunk, np.broadcast_to(_jitter(rng, (80, 60, 40), 15), (h, w, 3)), TREE)
        _fill(image, label, blob, foliage, TREE)

    for _ in range(rng.integers(0, 4)):  # poles, some carrying a sign
        foot = horizon + rng.uniform(0.05, 0.6) * (h - horizon)
        side = rng.choice([-1, 1])
        cx = centre_at(foot, vanish_x, w, horizon, h) + side * (half_bottom * depth_at(foot, horizon, h) + rng.uniform(1, 6))
        s = on_ground_scale(foot) * h
        pole = (np.abs(xx - cx) < max(0.6, s * 0.012)) & (yy <= foot) & (yy > foot - s * 0.7)
        metal = _jitter(rng, (120, 120, 120), 40) + fine * 6
        _fill(image, label, pole, metal, POLE)
        if rng.random() < 0.6:
            sy, size = foot - s * 0.7, max(2.0, s * rng.uniform(0.06, 0.1))
            shape = rng.integers(3)
            if shape == 0:
                sign = (np.abs(xx - cx) < size) & (np.abs(yy - sy) < size * 0.8)
            elif shape == 1:
                sign = (xx - cx) ** 2 + (yy - sy) ** 2 < size ** 2
            else:
                sign = (yy - sy + size > 0) & (np.abs(xx - cx) < (yy - sy + size) * 0.6) & (yy < sy + size)
            colour = _jitter(rng, [(200, 30, 30), (30, 70, 190), (230, 200, 30), (235, 235, 235)][rng.integers(4)], 15)
            _fill(image, label, sign, np.broadcast_to(colour, (h, w, 3)) + fine * 3, SIGN)

    for _ in range(rng.integers(0, 3) if rng.random() < 0.6 else 0):  # people: rare and small
        foot = horizon + rng.uniform(0.05, 0.7) * (h - horizon)
        side = rng.choice([-1, 1])
        cx = centre_at(foot, vanish_x, w, horizon, h) + side * (half_bottom * depth_at(foot, horizon, h) + rng.uniform(2, 10))
        s = on_ground_scale(foot) * h * rng.uniform(0.3, 0.45)
        body = (np.abs(xx - cx) < s * 0.16) & (yy <= foot - s * 0.05) & (yy > foot - s * 0.8)
        legs = (np.abs(np.abs(xx - cx) - s * 0.08) < s * 0.05) & (yy <= foot) & (yy > foot - s * 0.4)
        head = (xx - cx) ** 2 + (yy - (foot - s * 0.9)) ** 2 < (s * 0.1) ** 2 + 0.5
        clothes = _jitter(rng, rng.uniform(20, 230, 3), 10) + texture(3, 10)
        _fill(image, label, body | legs, clothes, PERSON)
        _fill(image, label, head, np.broadcast_to(_jitter(rng, (200, 160, 130), 40), (h, w, 3)), PERSON)

    cars = sorted(horizon + rng.uniform(0.1, 0.9, rng.integers(0, 4)) * (h - horizon))
    for foot in cars:  # cars on the road, far ones first
        s = on_ground_scale(foot) * h
        cx = centre_at(foot, vanish_x, w, horizon, h) + rng.uniform(-0.6, 0.6) * half_bottom * depth_at(foot, horizon, h)
        car_w, car_h = s * rng.uniform(0.45, 0.7), s * rng.uniform(0.25, 0.33)
        lower = (np.abs(xx - cx) < car_w / 2) & (yy <= foot - car_h * 0.12) & (yy > foot - car_h * 0.6)
        cabin = (np.abs(xx - cx) < car_w * 0.33) & (yy <= foot - car_h * 0.6) & (yy > foot - car_h)
        wheels = np.zeros((h, w), bool)
        for wx in (cx - car_w * 0.3, cx + car_w * 0.3):
            wheels |= (xx - wx) ** 2 + (yy - (foot - car_h * 0.15)) ** 2 < (car_h * 0.17) ** 2
        paint = _jitter(rng, [(180, 20, 20), (30, 40, 140), (200, 200, 200), (90, 90, 95), (40, 40, 40),
                              (60, 120, 60), (230, 200, 40), (235, 235, 235)][rng.integers(8)], 20)
        body_colour = paint + np.clip(-(yy[..., None] - foot) / (car_h + 1), 0, 1) * 25 + fine * 4
        glass = np.where((np.abs(xx - cx) < car_w * 0.29)[..., None] & (yy > foot - car_h * 0.95)[..., None],
                         _jitter(rng, (50, 70, 90), 15), body_colour)
        _fill(image, label, lower, body_colour, CAR)
        _fill(image, label, cabin, glass, CAR)
        _fill(image, label, wheels, np.broadcast_to(np.float32(25), (h, w, 3)), CAR)

    # 5. Lighting: gain, tint, contrast, a soft shadow band and sensor noise.
    gain = rng.uniform(0.6, 1.3)
    tint = rng.uniform(0.85, 1.15, 3)
    contrast = rng.uniform(0.7, 1.2)
    shadow = 1 - 0.35 * (rng.random() < 0.5) * (np.abs(xx - rng.uniform(0, w) - 0.4 * yy) < w * 0.15)
    image = (image - 128) * contrast + 128
    image = image * gain * tint * shadow[..., None] + rng.normal(0, rng.uniform(2, 8), image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), label


def depth_at(y: float, horizon: int, h: int) -> float:
    return float(np.clip((y - horizon) / max(h - horizon, 1), 0, 1))


def centre_at(y: float, vanish_x: float, w: int, horizon: int, h: int) -> float:
    return vanish_x + (w / 2 - vanish_x) * depth_at(y, horizon, h)
