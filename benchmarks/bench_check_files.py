"""The check before compute: seconds to check every file of a dataset, cold and from the cache.

Generates a folder dataset of N small PNG pairs (default 3000 pairs = 6000 files at 96x128) and times
`segsynth.data.validate.check_files` over it twice: cold (an empty cache: every image header and PNG
checksum read, every mask decoded) and cached (every file only stat-ed). With --camvid PATH (default:
/work/shared/datasets/camvid when present) the same for CamVid's train and val splits. Each cold figure
uses a fresh cache folder; the page cache is warm (the files were just written or read once), so the
cold figure is the CPU cost, not a disk's.

    python benchmarks/bench_check_files.py [--pairs 3000] [--size 96x128] [--camvid PATH]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_filter import machine_info, report  # noqa: E402

CAMVID = Path("/work/shared/datasets/camvid")


def write_folder(root: Path, pairs: int, size: tuple[int, int]) -> None:
    """A folder: dataset of `pairs` random images with striped 3-class masks."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.json").write_text('{"classes": ["a", "b", "c"]}')
    mask = np.repeat(np.arange(size[1]) * 3 // size[1], size[0]).reshape(size[1], size[0]).T.astype(np.uint8)
    for index in range(pairs):
        image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        image[::2] //= 2  # a little structure, so the PNGs are not pure noise
        Image.fromarray(image).save(root / "images" / f"{index:06d}.png", compress_level=1)
        Image.fromarray(mask).save(root / "masks" / f"{index:06d}.png")


def time_checks(spec: str, cache_root: Path) -> dict:
    """Seconds to open the dataset (list and pair its files), for a cold check (fresh cache) and a cached
    one, and the number of files."""
    from segsynth.data import open_dataset
    from segsynth.data.validate import check_files

    os.environ["SEGSYNTH_CACHE_DIR"] = str(cache_root)
    shutil.rmtree(cache_root, ignore_errors=True)
    started = time.perf_counter()
    dataset = open_dataset(spec)
    opened = time.perf_counter() - started
    files = sum(len(pairs) * 2 for pairs in dataset.pairs.values())
    started = time.perf_counter()
    check_files(dataset, progress=False)
    cold = time.perf_counter() - started
    started = time.perf_counter()
    check_files(dataset, progress=False)
    cached = time.perf_counter() - started
    return {"files": files, "open_s": round(opened, 3), "cold_s": round(cold, 3), "cached_s": round(cached, 3),
            "cold_ms_per_file": round(1e3 * cold / files, 4), "cached_ms_per_file": round(1e3 * cached / files, 4)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3000)
    parser.add_argument("--size", default="96x128", help="HxW of the generated images")
    parser.add_argument("--camvid", default=str(CAMVID) if CAMVID.is_dir() else "",
                        help="a CamVid folder to time as well ('' to skip)")
    parser.add_argument("--out", default="results/bench_check_files.json")
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))

    result = {"benchmark": "check_files", "pairs": args.pairs, "size": list(size)}
    with tempfile.TemporaryDirectory(prefix="bench-check-files-") as temp:
        root = Path(temp) / "folder"
        started = time.perf_counter()
        write_folder(root, args.pairs, size)
        result["generate_s"] = round(time.perf_counter() - started, 2)
        generated = time_checks(f"folder:{root}", Path(temp) / "cache")
        result.update({f"generated_{key}": value for key, value in generated.items()})
        if args.camvid:
            camvid = time_checks(f"camvid:{args.camvid}", Path(temp) / "cache-camvid")
            result.update({f"camvid_{key}": value for key, value in camvid.items()})
    # 20k images + 20k masks at the generated set's cold and cached rates, for the README's claim
    result["projected_20k_pairs_cold_s"] = round(40_000 * result["generated_cold_ms_per_file"] / 1e3, 1)
    result["projected_20k_pairs_cached_s"] = round(40_000 * result["generated_cached_ms_per_file"] / 1e3, 2)
    result["settings"] = vars(args)
    result["machine"] = machine_info()
    keys = [key for key in result if key not in ("benchmark", "settings", "machine")]
    report(result, keys, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
