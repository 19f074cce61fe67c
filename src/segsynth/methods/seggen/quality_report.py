"""`segsynth mask-quality`: how good SegGen's generated masks are, and how well their rendered images match them.

Two questions about MaskSyn (Ye et al., 2023), answered from files:

1. Do the generated masks look like the real training masks, as a set?
   `mask_quality.mask_quality` on the mask set's decoded labels against the
   real split's labels (class frequencies, pieces per mask, co-occurrence,
   undecodable pixels).
2. Do the images rendered from them show what the masks say (alignment)?
   The real-trained reference segmenter reads each rendered image; its mIoU
   against the generated mask is the alignment score. The same segmenter's
   mIoU on real held-out images (`--eval-split`) is the yardstick: an
   alignment near it means the renderer draws what the mask asks for as
   clearly as a real photo shows it. Both use the confusion-matrix mIoU of
   training/evaluate.py.

Writes OUT/mask_quality.json, OUT/mask_quality.md and OUT/mask_quality_grid.png
(rows of caption | generated colour map | decoded mask | rendered image).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from segsynth.config import save_config
from segsynth.data import open_dataset
from segsynth.data.base import read_image, read_raw_mask
from segsynth.data.synthetic import open_synthetic
from segsynth.data.validate import check_before_compute
from segsynth.formats.manifest import read_manifest
from segsynth.io import SegsynthError, atomic_write_json, atomic_write_png, atomic_write_text, safe_relative_path
from segsynth.methods.seggen.mask_quality import format_mask_quality, mask_quality
from segsynth.outputs import claim_folder
from segsynth.stage_configs import MaskQualityConfig

REPORT = "mask_quality.json"
GRID = "mask_quality_grid.png"
TILE_HEIGHT = 128  # grid tiles are scaled (nearest) to this height
CAPTION_WIDTH = 256


def write_mask_quality(config: MaskQualityConfig) -> dict:
    """Mask statistics and (with a segmenter and rendered sets) the alignment score; returns the report."""
    with claim_folder(config.out, "mask-quality", "mask_quality.config.yaml", "MaskQualityConfig",
                      markers=(REPORT,)):
        return _write_mask_quality(config)


def _write_mask_quality(config: MaskQualityConfig) -> dict:
    # 1. Everything is opened and checked before any model runs.
    real = open_dataset(config.data)
    masks = open_synthetic(Path(config.masks), f"synthetic-raw:{config.masks}", filtered=False)
    if list(masks.classes) != list(real.classes):
        raise SegsynthError(f"{config.masks}/classes.json: classes differ from {config.data}'s; compare a mask set "
                            "made for this dataset")
    rendered = [open_synthetic(Path(folder), f"synthetic-raw:{folder}", filtered=False) for folder in config.rendered]
    if config.rendered and config.segmenter is None:
        raise SegsynthError("--rendered needs --segmenter (the real-trained checkpoint that scores the alignment)")
    check_before_compute(real, [config.split] + ([config.eval_split] if config.segmenter else []))
    for generated in [masks, *rendered]:
        check_before_compute(generated, ["train"])

    # 2. The masks as a set, against the real ones.
    generated_split, real_split = masks.split("train"), real.split(config.split)
    report = mask_quality([generated_split.label(i) for i in range(len(generated_split))],
                          [real_split.label(i) for i in range(len(real_split))], real.num_classes)
    report.update(masks=str(config.masks), data=config.data, split=config.split, classes=list(real.classes))

    # 3. Alignment: the reference segmenter on the rendered images vs their masks, and on real images.
    if config.segmenter is not None:
        report["alignment"] = alignment(config, real, rendered)

    # 4. Files: the JSON report, its markdown, the grid.
    out = Path(config.out)
    atomic_write_json(out / REPORT, report)
    atomic_write_text(out / "mask_quality.md", format_report(report, real.classes))
    write_mask_grid(Path(config.masks), [Path(folder) for folder in config.rendered], out / GRID, real.palette,
                    config.grid_rows)
    save_config(config, out / "mask_quality.config.yaml")
    return report


def alignment(config: MaskQualityConfig, real, rendered: list) -> dict:
    """mIoU of the reference segmenter on every rendered set (and all together) and on the real eval split."""
    from segsynth.data.base import concat_splits
    from segsynth.generators.base import resolve_device
    from segsynth.segmenters import load_checkpoint_for
    from segsynth.training.evaluate import confusion_over_split, metrics_from_confusion

    device = resolve_device(config.device)
    model, _, checkpoint = load_checkpoint_for(config.segmenter, real.classes, f"dataset {config.data}",
                                               "score with the segmenter trained on this dataset")
    model.to(device)

    def miou(split) -> float:
        confusion = confusion_over_split(model, split, real.num_classes, device, config.size or None,
                                         config.batch_size, progress=False)
        return round(metrics_from_confusion(confusion, real.classes)["miou"], 2)

    result = {"segmenter": str(checkpoint), "real_split": config.eval_split,
              "real_miou": miou(real.split(config.eval_split))}
    if rendered:
        per_set = {folder: miou(dataset.split("train")) for folder, dataset in zip(config.rendered, rendered)}
        together = per_set[config.rendered[0]] if len(rendered) == 1 else miou(
            concat_splits("rendered", [dataset.split("train") for dataset in rendered]))
        result.update(rendered_miou=together, rendered_miou_per_set=per_set,
                      rendered_images=sum(len(dataset.split("train")) for dataset in rendered))
    return result


def format_report(report: dict, classes) -> str:
    lines = ["# Generated masks (SegGen MaskSyn)", "", f"Mask set `{report['masks']}` against `{report['data']}` "
             f"split `{report['split']}`.", "", format_mask_quality(report, classes)]
    if "alignment" in report:
        found = report["alignment"]
        lines += ["## Alignment", "", f"Reference segmenter `{found['segmenter']}`: mIoU on real "
                  f"`{found['real_split']}` images {found['real_miou']:.2f}"]
        if "rendered_miou" in found:
            lines[-1] += (f"; on the {found['rendered_images']} images rendered from the generated masks, against "
                          f"those masks: **{found['rendered_miou']:.2f}**")
        lines.append("")
    return "\n".join(lines)


# --- the grid -------------------------------------------------------------------------------


def write_mask_grid(masks: Path, rendered: list[Path], path: Path, palette, rows: int) -> Path | None:
    """Rows of caption | generated colour map | decoded mask | rendered image (the first rendering of each
    generated mask; blank when none was rendered). None when the mask set is empty."""
    records = read_manifest(masks)[:rows]
    if not records:
        return None
    renderings: dict[str, Path] = {}
    for folder in rendered:
        for record in read_manifest(folder):
            source = (record.get("meta") or {}).get("source") or {}
            renderings.setdefault(source.get("id") or record.get("source"), folder / record["image"])
    colours = np.zeros((256, 3), np.uint8)
    colours[: len(palette)] = np.asarray(palette, np.uint8)
    font = ImageFont.load_default()
    tiles = []
    for record in records:
        colour_map = _rgb(masks / ((record.get("extras") or {}).get("colour_mask") or record["image"]))
        decoded = colours[read_raw_mask(safe_relative_path(masks, record["mask"], f"manifest mask of {record['id']}"))]
        image = _rgb(renderings[record["id"]]) if record["id"] in renderings else np.zeros_like(colour_map)
        caption = record.get("prompt") or (record.get("meta") or {}).get("prompt") or ""
        row = [_caption_tile(caption, font)] + [_scaled(picture) for picture in (colour_map, decoded, image)]
        tiles.append(np.concatenate(row, axis=1))
    width = max(tile.shape[1] for tile in tiles)
    grid = np.concatenate([np.pad(tile, ((0, 2), (0, width - tile.shape[1]), (0, 0)), constant_values=255)
                           for tile in tiles], axis=0)
    atomic_write_png(path, grid)
    return path


def _rgb(path: Path) -> np.ndarray:
    return read_image(path)


def _scaled(picture: np.ndarray) -> np.ndarray:
    height, width = picture.shape[:2]
    size = (max(1, round(width * TILE_HEIGHT / height)), TILE_HEIGHT)
    return np.asarray(Image.fromarray(picture).resize(size, Image.NEAREST))


def _caption_tile(caption: str, font) -> np.ndarray:
    tile = Image.new("RGB", (CAPTION_WIDTH, TILE_HEIGHT), (255, 255, 255))
    draw = ImageDraw.Draw(tile)
    per_line = max(8, int((CAPTION_WIDTH - 8) / max(font.getlength("n"), 1)))
    lines = textwrap.wrap(caption, per_line)[: TILE_HEIGHT // 12]
    draw.multiline_text((4, 4), "\n".join(lines), fill=(0, 0, 0), font=font, spacing=2)
    return np.asarray(tile)
