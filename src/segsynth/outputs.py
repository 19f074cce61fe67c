"""Where a stage may write: its own output folder or file, nothing else, one run at a time.

Every stage claims its output before it writes anything:

* **Ownership.** An output folder must be new, empty, or one this verb made before (it holds the
  verb's resolved config, whose first line names the config class, or another file only this verb
  writes). An output file must be new or a file of the kind this verb writes (a plan, class
  statistics, metrics) -- never a dataset's classes.json, a checkpoint's segsynth.json or anything
  else that happens to sit at that path. The companion `.config.yaml` written beside a file output
  follows the same rule.
* **No escape.** A symlink inside the output folder (or an output file that is a symlink) whose
  target resolves outside the folder is refused: writing through it would land elsewhere (an
  appended log would follow it). `--out` itself may be a symlink: it names the folder.
* **One writer.** An exclusive lock (`flock`) on `.VERB.lock` in the folder (for a file output:
  `.NAME.lock` beside it), held while the stage runs and removed when it ends; a second run of the
  verb into the same output is refused. `synthesize` and `filter` both take `.synthesize.lock` of a
  synthetic set, so neither runs while the other writes to it.

If the claim made the folder and the stage fails before writing into it, the folder is removed
again, so bad input leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable

from segsynth.io import SegsynthError

LOCK_RETRIES = 3


# --- ownership -------------------------------------------------------------------------------


def config_header_names(path: Path, config_class: str) -> bool:
    """Whether `path` is a resolved config segsynth wrote for `config_class` (config.save_config's header)."""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.readline().startswith(f"# resolved {config_class};")
    except (OSError, UnicodeDecodeError):
        return False


def check_folder_is_ours(out: Path, verb: str, config_file: str, config_class: str,
                         markers: Iterable[str] = ()) -> None:
    """Refuse an existing, non-empty `out` that this verb did not make (see the module docstring)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise SegsynthError(f"{out}: exists and is a file, not an output folder; give `segsynth {verb}` a new or "
                            "empty --out folder")
    entries = [entry for entry in out.iterdir() if not entry.name.startswith(".")]
    if not entries:
        return
    if config_header_names(out / config_file, config_class) or any((out / marker).exists() for marker in markers):
        return
    raise SegsynthError(f"{out}: exists and holds files `segsynth {verb}` did not write (no {config_file} of a "
                        f"{config_class}; e.g. {sorted(entry.name for entry in entries)[:3]}); choose a new or empty "
                        "--out folder")


def check_file_is_ours(path: Path, verb: str, what: str, is_ours: Callable[[Path], bool],
                       config_path: Path | None = None, config_class: str = "") -> None:
    """Refuse an existing output file that is not a `what` (and an existing companion config that is not
    this verb's), and an output path that is a folder or a link leaving its folder."""
    for candidate in (path, config_path):
        if candidate is not None:
            check_link_stays_inside(candidate, candidate.parent)
    if path.is_dir():
        raise SegsynthError(f"{path}: is a folder; give `segsynth {verb}` --out a file path")
    if path.exists() and not is_ours(path):
        raise SegsynthError(f"{path}: exists and is not a {what} segsynth wrote; choose another --out (segsynth "
                            "overwrites only its own outputs)")
    if config_path is not None and config_path.exists() and not config_header_names(config_path, config_class):
        raise SegsynthError(f"{config_path}: exists and is not the resolved config `segsynth {verb}` writes beside "
                            f"{path.name}; move it, or choose another --out")


# --- links that leave the folder -----------------------------------------------------------------


def check_link_stays_inside(path: Path, folder: Path) -> None:
    """If `path` is a symlink, its target must resolve inside `folder` (itself resolved)."""
    if path.is_symlink():
        target, root = path.resolve(), folder.resolve()
        if target != root and root not in target.parents:
            raise SegsynthError(f"{path}: is a symlink to {target}, outside {root}; writing through it would "
                                "change a file segsynth does not own: remove the link or choose another --out")


def check_no_escaping_links(out: Path) -> None:
    """Every symlink anywhere under `out` must resolve inside it."""
    if not out.is_dir():
        return
    root = out.resolve()
    pending = [root]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                if entry.is_symlink():
                    check_link_stays_inside(Path(entry.path), root)
                elif entry.is_dir(follow_symlinks=False):
                    pending.append(Path(entry.path))


# --- one writer ----------------------------------------------------------------------------------


def acquire_lock(lock_path: Path, verb: str, busy: str):
    """An exclusive, non-blocking flock on `lock_path` (created); returns the open handle. `busy` is the
    message when another process holds it. The lock file is removed by `release_lock`, so a holder
    checks after locking that the path still names the file it locked."""
    for _ in range(LOCK_RETRIES):
        handle = open(lock_path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            handle.close()
            if error.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise SegsynthError(busy) from None
            raise
        try:
            same = os.fstat(handle.fileno()).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            handle.seek(0)
            handle.truncate()
            handle.write(f"segsynth {verb} pid {os.getpid()}\n")
            handle.flush()
            return handle
        handle.close()  # the previous holder removed it as we opened it: lock the new one
    raise SegsynthError(busy)


def release_lock(handle, lock_path: Path) -> None:
    """Remove the lock file while still holding it, then let it go."""
    with contextlib.suppress(OSError):
        os.unlink(lock_path)
    handle.close()


@contextlib.contextmanager
def claim_folder(out: str | os.PathLike, verb: str, config_file: str, config_class: str,
                 markers: Iterable[str] = (), lock_name: str | None = None, lock: bool = True,
                 busy: str | None = None):
    """Check that `out` is this verb's (or new), that no link inside leaves it, and hold its lock while
    the block runs. `lock=False` (ranks other than 0): the link check only -- rank 0 judges ownership
    before it writes anything, and meanwhile its lock file and first outputs would make a rank that
    looked at the same moment see a folder that is not (yet) the verb's. Folders the claim created are
    removed again if the block fails before writing anything into them."""
    out = Path(out)
    if not lock:
        check_no_escaping_links(out)
        yield out
        return
    check_folder_is_ours(out, verb, config_file, config_class, markers)
    check_no_escaping_links(out)
    with _locked(out, out / (lock_name or f".{verb}.lock"), verb,
                 busy or f"{out}: another `segsynth {verb}` is writing to this folder; wait for it, or use another "
                         "--out"):
        yield out


@contextlib.contextmanager
def claim_file(path: str | os.PathLike, verb: str, what: str, is_ours: Callable[[Path], bool],
               config_path: Path | None = None, config_class: str = "", lock: bool = True):
    """The same for an output file (and the resolved config written beside it): ownership, links, and a
    `.NAME.lock` beside it held while the block runs."""
    path = Path(path)
    if not lock:  # ranks other than 0: rank 0 judges ownership (see claim_folder)
        yield path
        return
    check_file_is_ours(path, verb, what, is_ours, config_path, config_class)
    with _locked(path.parent, path.parent / f".{path.name}.lock", verb,
                 f"{path}: another `segsynth {verb}` is writing this file; wait for it, or use another --out"):
        yield path


@contextlib.contextmanager
def _locked(folder: Path, lock_path: Path, verb: str, busy: str):
    """Make `folder` (and missing parents), hold the lock in it; afterwards remove the lock, and the
    folders made here if nothing else was written into them."""
    created = folder
    while not created.parent.exists():
        created = created.parent
    made = not created.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        handle = acquire_lock(lock_path, verb, busy)
    except BaseException:
        if made:
            _remove_if_empty(created)
        raise
    try:
        yield
    finally:
        release_lock(handle, lock_path)
        if made:
            _remove_if_empty(created)


def _remove_if_empty(folder: Path) -> None:
    """Remove `folder` if no file ended up anywhere under it."""
    if folder.is_dir() and not any(path.is_file() or path.is_symlink() for path in folder.rglob("*")):
        shutil.rmtree(folder, ignore_errors=True)
