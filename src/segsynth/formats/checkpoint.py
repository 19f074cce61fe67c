"""The segmenter checkpoint format: read, write and validate, in one place.

A checkpoint is a folder (`segsynth train --out OUT` writes `OUT/checkpoint/`):

    config.json, model.safetensors   the segmenter, as transformers' save_pretrained writes it
    optimizer.safetensors            AdamW state; the param groups in the file's metadata
    segsynth.json                    format, model name, classes, palette, data spec, the resolved
                                     train config and the training state {"iteration", "finished", ...}

It is written to a staging folder and swapped in whole (`segsynth.io.staged_swap`);
the previous checkpoint is kept as `checkpoint.old` until the swap completes, and
readers accept either, so a kill at any moment leaves a loadable checkpoint.
Weights are safetensors only: pickles are never unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from segsynth import __version__
from segsynth.formats.classes import check_class_list
from segsynth.io import SegsynthError, atomic_write_json, loading, read_json, staged_swap

FORMAT = "segsynth-checkpoint/1"
META_FILE = "segsynth.json"
FOLDER = "checkpoint"


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a train --out folder or its checkpoint/ folder; recover from a kill mid-swap."""
    path = Path(path)
    for candidate in (path, path / FOLDER, path / f"{FOLDER}.old"):
        if (candidate / META_FILE).is_file():
            return candidate
    raise SegsynthError(f"{path}: no segsynth checkpoint here (expected {META_FILE} in it or in {FOLDER}/); "
                        "give a `segsynth train --out` folder")


def has_checkpoint(out: str | Path) -> bool:
    """Whether a `train --out` folder holds a checkpoint to resume (either side of a swap)."""
    return any((Path(out) / name / META_FILE).is_file() for name in (FOLDER, f"{FOLDER}.old"))


def read_checkpoint_meta(checkpoint: str | Path, model_names=None) -> dict:
    """The checkpoint's segsynth.json, validated: a model name (one of `model_names` when given), a class
    list, safetensors weights present."""
    checkpoint = Path(checkpoint)
    meta_path = checkpoint / META_FILE
    if not meta_path.is_file():
        raise SegsynthError(f"{checkpoint}: not a segsynth checkpoint (no {META_FILE}); give a `segsynth train "
                            "--out` folder or its checkpoint/ folder")
    meta = read_json(meta_path)
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), str):
        raise SegsynthError(f"{meta_path}: not a segsynth checkpoint description (no \"model\"); "
                            "give a `segsynth train --out` folder, or retrain")
    if model_names is not None and meta["model"] not in model_names:
        raise SegsynthError(f"{meta_path}: unknown segmenter {meta['model']!r}; options: {', '.join(model_names)}")
    if not isinstance(meta.get("classes"), list):
        raise SegsynthError(f"{meta_path}: no \"classes\" list; give a `segsynth train --out` folder, or retrain")
    check_class_list(meta["classes"], str(meta_path), "restore the file `segsynth train` wrote, or retrain")
    if not any((checkpoint / weights).is_file() for weights in ("model.safetensors", "model.safetensors.index.json")):
        raise SegsynthError(f"{checkpoint}: no model.safetensors; segsynth loads weights from safetensors only, never "
                            "from pickle files such as pytorch_model.bin. Give a `segsynth train --out` folder, or retrain")
    return meta


def checkpoint_meta(model_name: str, dataset, data_spec: str, train_config: dict, **extra) -> dict:
    """The segsynth.json of a new checkpoint (the training state is added at each save)."""
    return {"format": FORMAT, "segsynth_version": __version__, "model": model_name,
            "classes": list(dataset.classes), "palette": [list(c) for c in dataset.palette],
            "data": data_spec, "train_config": train_config, **extra}


def save_checkpoint(out: Path, model, optimizer, meta: dict) -> Path:
    """Write the whole checkpoint (model, optimizer, meta) to a staging folder, then swap it in."""
    with staged_swap(out, [FOLDER], what=FOLDER, hide_old=False) as staging:
        folder = staging / FOLDER
        folder.mkdir()
        model.save(folder)
        save_optimizer_state(optimizer, folder / "optimizer.safetensors")
        atomic_write_json(folder / META_FILE, meta)
    return out / FOLDER


def save_optimizer_state(optimizer, path: Path) -> None:
    """The optimizer's state as safetensors (tensors per parameter index), its param groups in the metadata."""
    state = optimizer.state_dict()
    tensors = {f"state.{index}.{key}": value.detach().contiguous().cpu() for index, entry in state["state"].items()
               for key, value in entry.items()}
    groups = [dict(group) for group in state["param_groups"]]
    save_file(tensors, path, metadata={"param_groups": json.dumps(groups)})


def load_optimizer_state(optimizer, path: Path) -> None:
    with loading(path, "the checkpoint is damaged: restore it, or train again into a new --out", "the optimizer state"):
        with safe_open(str(path), framework="pt") as handle:
            groups = json.loads(handle.metadata()["param_groups"])
        tensors = load_file(str(path))
        state: dict = {}
        for key, value in tensors.items():
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": state, "param_groups": groups})


# --- a generator's resumable training state (OUT/training_state, swapped in whole) -------------------------


def training_state_folder(out: Path, name: str = "training_state") -> Path | None:
    """The saved training state in `out` (or its `.old` copy when a kill fell between the two renames)."""
    for candidate in (out / name, out / f".{name}.old"):
        if (candidate / "state.json").is_file():
            return candidate
    return None


def check_resumed_settings(folder: Path, saved_config: dict, current_config: dict, resumable: tuple[str, ...]) -> None:
    """A resumed run must use the saved run's settings, except the `resumable` ones (length, logging, device)."""
    saved = {k: v for k, v in saved_config.items() if k not in resumable}
    current = {k: v for k, v in current_config.items() if k not in resumable}
    changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if changed:
        raise SegsynthError(f"{folder}: settings differ from the run being resumed ({', '.join(changed)}); "
                            "resume with the same settings or use a new --out")

