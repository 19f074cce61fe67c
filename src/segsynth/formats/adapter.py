"""The LoRA adapter format (`segsynth adapt --out ADAPTER`): read, write and validate, in one place.

An adapter is a folder holding only what the adaptation trained, never the model it adapts:

    adapter.safetensors   the LoRA weights (peft's state dict of the UNet: `<layer>.lora_A.weight`,
                          `<layer>.lora_B.weight`, no adapter name), nothing else
    adapter.json          format, the base generator it was trained on (its name and identity: a content
                          fingerprint, or a hub id and revision), the LoRA settings (rank, alpha, dropout,
                          target modules) a loader rebuilds the layers from, the prompt the images were
                          conditioned on, the working size, the target images and the training stats
    adapt.config.yaml     the resolved config
    training_state/       the trainable weights, AdamW state and iteration (for --resume)
    train_log.jsonl       loss per log_every iterations

A generator loads it with `synthesize --lora ADAPTER` after checking that the adapter was made for
it: an adapter of another base model would add its low-rank updates to weights they were never fitted
to, so `check_base` refuses it, naming both identities.
"""

from __future__ import annotations

from pathlib import Path

from segsynth.io import SegsynthError, read_json

FORMAT = "segsynth-lora-adapter/1"
INFO_FILE = "adapter.json"
WEIGHTS_FILE = "adapter.safetensors"


def read_adapter_info(folder: str | Path) -> dict:
    """adapter.json of an adapter folder, checked: the weights file is there, the format and the fields a loader
    needs are right. Errors name the folder and the verb that makes one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SegsynthError(f"LoRA adapter {folder}: no such folder; make one with `segsynth adapt --generator GEN "
                            f"--images DIR --out {folder}`")
    missing = [name for name in (INFO_FILE, WEIGHTS_FILE) if not (folder / name).is_file()]
    if missing:
        raise SegsynthError(f"{folder}: not a LoRA adapter, missing {', '.join(missing)}; give a `segsynth adapt "
                            "--out` folder (an adapt still running writes them at its first save)")
    info = read_json(folder / INFO_FILE)
    found = info.get("format") if isinstance(info, dict) else None
    if found != FORMAT:
        raise SegsynthError(f"{folder / INFO_FILE}: format {found!r}, expected {FORMAT!r}")
    lora = info.get("lora")
    if not (isinstance(lora, dict) and isinstance(lora.get("rank"), int) and lora["rank"] >= 1
            and isinstance(lora.get("alpha"), (int, float)) and isinstance(lora.get("target_modules"), list)
            and isinstance(info.get("base"), dict)):
        raise SegsynthError(f"{folder / INFO_FILE}: no valid \"lora\" settings or \"base\"; restore the file "
                            "`segsynth adapt` wrote, or adapt again")
    return info


def describe_base(base: dict) -> str:
    """A base generator identity in words: 'attention fingerprint 1a2b... (/path)' or 'hub id org/name@rev'."""
    what = base.get("generator", "generator")
    if base.get("fingerprint"):
        where = f" ({base['path']})" if base.get("path") else ""
        return f"{what} fingerprint {base['fingerprint']}{where}"
    if base.get("hub_id"):
        return f"{what} hub id {base['hub_id']}" + (f"@{base['revision']}" if base.get("revision") else "")
    return f"{what} {base}"


def same_base(saved: dict, current: dict) -> bool:
    """Whether two identities name the same base weights: content fingerprints when both have one, else hub id
    (and revision where both know it)."""
    if saved.get("family") != current.get("family"):
        return False
    if saved.get("fingerprint") and current.get("fingerprint"):
        return saved["fingerprint"] == current["fingerprint"]
    if saved.get("hub_id") and current.get("hub_id"):
        revisions = (saved.get("revision"), current.get("revision"))
        return saved["hub_id"] == current["hub_id"] and (None in revisions or revisions[0] == revisions[1])
    return False


def check_base(folder: str | Path, info: dict, current: dict, spec: str) -> None:
    """Refuse an adapter made for another base generator, naming both."""
    if not same_base(info["base"], current):
        raise SegsynthError(f"LoRA adapter {folder} was made for {describe_base(info['base'])}, not for "
                            f"{describe_base(current)} ({spec}); adapt this generator (`segsynth adapt --generator "
                            f"{spec} --images DIR --out NEW`) or give the generator the adapter was made for")


__all__ = ["FORMAT", "INFO_FILE", "WEIGHTS_FILE", "check_base", "describe_base", "read_adapter_info", "same_base"]
