"""Class lists: a folder dataset's or a synthetic set's classes.json, a checkpoint's and a statistics
file's "classes", checked in one place.

    classes.json   {"classes": ["name", ...],             one unique name per label value 0..C-1
                    "palette": [[r, g, b], ...],          optional: exactly one colour per class
                    "ignore_index": 255 or [v, ...]}      optional: raw mask values read as ignore

Per-class results (IoU, L̄_c, ignored fractions) are keyed by class name, so two classes of one name
would silently merge; a palette longer or shorter than the class list means the list and the colours
were written for different label ids; an ignore value that is also a class id would hide that class.
Each is refused with the file named. (Palette colours may repeat: the standard ADE20K and COCO-Stuff
palettes share a few, and only colour coding needs them distinct, which refuses there:
methods/seggen/colour.py.)
"""

from __future__ import annotations

from typing import Any

from segsynth import IGNORE_INDEX
from segsynth.io import SegsynthError

MAX_CLASSES = IGNORE_INDEX  # label values 0..254 are classes; 255 is ignore


def check_class_list(classes: Any, where: str, fix: str) -> list[str]:
    """A non-empty list of distinct, non-empty class names (at most 255); returns it."""
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c.strip() for c in classes):
        raise SegsynthError(f"{where}: needs \"classes\": a non-empty list of class names; {fix}")
    if len(classes) > MAX_CLASSES:
        raise SegsynthError(f"{where}: {len(classes)} classes, but label maps hold at most {MAX_CLASSES} (values "
                            f"0..{MAX_CLASSES - 1}; {IGNORE_INDEX} is ignore); {fix}")
    seen: dict[str, int] = {}
    for index, name in enumerate(classes):
        if name in seen:
            raise SegsynthError(f"{where}: class {name!r} is listed twice (label ids {seen[name]} and {index}), so "
                                f"per-class results would merge them; give every label id its own name; {fix}")
        seen[name] = index
    return list(classes)


def check_palette(palette: Any, classes: list[str], where: str, fix: str) -> list[list[int]]:
    """Exactly one [r, g, b] (integers 0..255) per class, in class order; returns it."""
    if not isinstance(palette, list) or len(palette) != len(classes):
        count = len(palette) if isinstance(palette, list) else "no list of"
        raise SegsynthError(f"{where}: \"palette\" has {count} colour(s) for {len(classes)} classes; give exactly "
                            f"one [r, g, b] per class, in the order of \"classes\"; {fix}")
    for index, colour in enumerate(palette):
        if not (isinstance(colour, list) and len(colour) == 3 and
                all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in colour)):
            raise SegsynthError(f"{where}: \"palette\" entry {index} ({classes[index]!r}) is {colour!r}, not "
                                f"[r, g, b] with three integers 0..255; {fix}")
    return [list(colour) for colour in palette]


def check_ignore_values(ignore: Any, classes: list[str], where: str, fix: str) -> list[int]:
    """The raw mask values read as ignore: integers 0..255 that are not class ids; returns them."""
    values = ignore if isinstance(ignore, list) else [ignore]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in values):
        raise SegsynthError(f"{where}: \"ignore_index\" is {ignore!r}; give a mask value 0..255 (or a list of "
                            f"them); {fix}")
    hidden = [v for v in values if v < len(classes)]
    if hidden:
        raise SegsynthError(f"{where}: \"ignore_index\" {hidden[0]} is also the label id of class "
                            f"{classes[hidden[0]]!r}, which could then never be learned; use a value outside "
                            f"0..{len(classes) - 1} (255 is usual); {fix}")
    return list(values)
