"""File helpers every stage uses: nothing is ever half-written.

Every write goes to a temporary name in the destination folder and is renamed
into place, so a kill at any moment leaves either the old file or the new one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from PIL import Image


class SegsynthError(Exception):
    """An error a user can fix: the message names the file or key and the fix."""


# errno values that mean "the disk (or the quota, or the file-size limit) is full".
DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


# How writers that are not Python's own (safetensors' Rust serializer) report the same errors.
DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "File too large")


def is_disk_full(error: BaseException) -> bool:
    if isinstance(error, OSError):
        return error.errno in DISK_FULL_ERRNOS
    return any(text in str(error) for text in DISK_FULL_TEXTS)  # e.g. SafetensorError "... (os error 28)"


def disk_full_error(path: str | os.PathLike | None, error: BaseException) -> SegsynthError:
    """The message for a full disk: which file, and that a rerun resumes (finished work is kept)."""
    where = path if path is not None else (getattr(error, "filename", None) or "output")
    if isinstance(error, OSError) and error.errno is not None:
        reason = error.strerror or os.strerror(error.errno)
    else:
        reason = next((text for text in DISK_FULL_TEXTS if text in str(error)), "No space left on device")
    return SegsynthError(f"{where}: {reason} while writing; free space on that disk (or give --out on a bigger "
                         "one) and rerun the same command: finished work is kept and the stage resumes")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, default_mode())  # mkstemp makes 0600; give the file what open() would have
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        _remove_quietly(tmp)
        if is_disk_full(error):
            raise disk_full_error(path, error) from error
        raise


def default_mode(directory: bool = False) -> int:
    """The permissions a plain open()/mkdir() would give under the current umask (0644/0755 for umask 022)."""
    return (0o777 if directory else 0o666) & ~_current_umask()


def _current_umask() -> int:
    try:  # Linux: read it without changing it (os.umask can only be read by setting it)
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def atomic_write_png(path: str | os.PathLike, array: np.ndarray, palette: Iterable[Iterable[int]] | None = None) -> None:
    """Write a uint8 HxW (index) or HxWx3 (RGB) array as PNG, atomically.

    Index masks get the palette attached (mode "P") so they look right in any
    viewer while still holding the raw class ids.
    """
    import io as _io

    array = np.asarray(array)
    if array.dtype != np.uint8:
        if array.min() < 0 or array.max() > 255:
            raise ValueError(f"cannot store values outside 0..255 in a PNG: {path}")
        array = array.astype(np.uint8)
    image = Image.fromarray(array)
    if array.ndim == 2 and palette is not None:
        image = image.convert("P")
        flat = [value for colour in palette for value in colour]
        image.putpalette(flat + [0] * (768 - len(flat)))
    buffer = _io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    atomic_write_bytes(path, buffer.getvalue())


@contextlib.contextmanager
def staged_swap(folder: str | os.PathLike, names: Iterable[str], what: str = "output", hide_old: bool = True):
    """Write several entries of `folder` (files or sub-folders named `names`) as one: yield a staging
    folder beside them, then swap each entry in (the previous one kept as `.NAME.old` until its new one
    is in place; with `hide_old=False` it is `NAME.old`, a name readers such as checkpoints' look
    for after a kill between the two renames). A failure or a full disk while writing leaves the
    previous entries untouched and no staging folder behind. Used by every writer of a multi-file output (checkpoints, generators)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{what}-", dir=folder))
    os.chmod(staging, default_mode(directory=True))  # mkdtemp makes 0700; outputs should be shareable
    try:
        yield staging
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if is_disk_full(error):
            raise disk_full_error(folder / what, error) from error
        raise
    for name in names:
        old = folder / f"{'.' if hide_old else ''}{name}.old"
        _remove_entry(old)
        if (folder / name).exists():
            os.replace(folder / name, old)
        os.replace(staging / name, folder / name)
        _remove_entry(old)
    shutil.rmtree(staging, ignore_errors=True)


def _remove_entry(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def loading(path: str | os.PathLike, fix: str, what: str = "it"):
    """Read a model or state file inside this block: what a library raises for a damaged or truncated file
    (SafetensorError, OSError from from_pretrained, a bad header, tensors of the wrong shape) becomes one
    SegsynthError naming `path` and ending with `fix`. A full disk is left to the caller's handling."""
    from safetensors import SafetensorError

    try:
        yield
    except SegsynthError:
        raise
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError, EOFError) as error:
        if is_disk_full(error):
            raise
        reason = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise SegsynthError(f"{path}: cannot load {what} ({reason}); {fix}") from None


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """A UTF-8 text file's contents. A missing file, a folder, a file that cannot be read or is not text
    (a binary file given by mistake) become one SegsynthError naming it."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SegsynthError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise SegsynthError(f"{path}: is a folder, not a {what}; give the file's path") from None
    except PermissionError:
        raise SegsynthError(f"{path}: permission denied; make the {what} readable") from None
    except UnicodeDecodeError as error:
        line = path.read_bytes()[: error.start].count(b"\n") + 1
        raise SegsynthError(f"{path}: line {line} is not UTF-8 text (byte {error.start}); is this the {what}? "
                            "Give the file segsynth wrote, or save it as UTF-8") from None


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    path = Path(path)
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise SegsynthError(f"{path}: not valid JSON ({error}); fix or regenerate the file") from None
    except RecursionError:  # "[[[[..." nested deeper than the parser's stack
        raise SegsynthError(f"{path}: JSON nested too deeply to read; fix or regenerate the file") from None


def link_or_copy(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """`target` becomes a hard link to `source` (replacing what was there), or a copy where the file system
    has no hard links or `target` is on another one: derived sets and kept snapshots share unchanged files."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() or target.is_symlink():
        target.unlink()
    try:
        os.link(source, target)
    except OSError:  # another file system, or no hard links
        shutil.copyfile(source, target)


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line and fsync it, so a finished record survives a kill."""
    append_text(path, json.dumps(record, default=_json_default) + "\n")


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append whole lines and fsync; a failed append (disk full) is cut back, so no torn line is left behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode("utf-8")
    # Unbuffered, so that nothing is left in a buffer to be flushed after the cut-back.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, default_mode())
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError as error:
            try:
                os.ftruncate(fd, start)
            except OSError:
                pass  # the rerun's reader skips a torn last line anyway
            if is_disk_full(error):
                raise disk_full_error(path, error) from error
            raise
    finally:
        os.close(fd)


def rewind_jsonl(path: str | os.PathLike, keep=lambda record: True) -> None:
    """Before appending again after a kill: drop a torn last line and the records `keep` rejects (atomically)."""
    path = Path(path)
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8")
    records = list(read_jsonl(path))
    kept = [r for r in records if keep(r)]
    if len(kept) != len(records) or (text and not text.endswith("\n")):
        atomic_write_text(path, "".join(json.dumps(r, default=_json_default) + "\n" for r in kept))


def read_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    """Read JSON lines; a torn last line (a kill mid-append) is skipped, any other bad line is an error."""
    path = Path(path)
    if not path.exists():
        return
    lines = read_text(path, "JSON-lines file").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            if number == len(lines):
                return  # a write cut short by a kill: the record never counted
            raise SegsynthError(f"{path}:{number}: not valid JSON; remove the line or regenerate the file") from None


def safe_relative_path(folder: str | os.PathLike, relative: str, what: str = "path") -> Path:
    """Resolve a manifest path inside its folder; paths that leave the folder are refused."""
    folder = Path(folder).resolve()
    if os.path.isabs(relative):
        raise SegsynthError(f"{what} {relative!r} is absolute; manifest paths must be relative to {folder}")
    resolved = (folder / relative).resolve()
    if folder != resolved and folder not in resolved.parents:
        raise SegsynthError(f"{what} {relative!r} leaves its folder {folder}; manifest paths may not contain '..'")
    return resolved


def _remove_quietly(path: str | os.PathLike) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
