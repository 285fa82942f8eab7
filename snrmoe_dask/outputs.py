"""What may be written where: every command's ``--out`` is checked here before anything is written.

The rule (a write never destroys something it did not create):

* a path that does not exist, or an empty directory, is written;
* an existing path of the kind the command writes is replaced only with
  ``--overwrite`` (a predictions store by ``predict``, a metrics file by
  ``evaluate``, an audit or ceiling directory, a simulated catalog by
  ``simulate``, a run directory by ``run``; ``fit`` replaces only an
  interrupted fit's directory, and continues one with ``--resume``);
* anything else is refused, ``--overwrite`` or not: a catalog that was not
  simulated, a complete model store, a folder or file of any other kind.
  The error names what is there.

One writer per output: :func:`output_lock` holds ``.NAME.lock`` beside the
output (pid, host, start time, command) while a command writes it; a second
writer gets a one-line error naming the holder, and a lock left by a process
that no longer runs on this host is taken over.

Kinds are recognised by what snrmoe writes into them (``model.json``,
``run.json``, a zarr group with ``flux`` or ``logg_pred``, ...), not by name.
A replacement is written beside the target first and swapped in when complete
(:func:`replace_atomically`), so an interrupted write leaves the old output.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

__all__ = ["OutputError", "describe", "claim_output", "claimed", "replace_atomically", "output_lock", "lock_path",
           "KINDS"]

#: what each kind of output is called in messages
KINDS = ("catalog", "simulated catalog", "model", "interrupted fit", "run directory", "predictions store",
         "metrics file", "audit directory", "ceiling directory")


class OutputError(FileExistsError):
    """An output path that must not be written (one line, naming what is there)."""


def _zarr_group(path: Path) -> tuple[set[str], dict] | None:
    """Members and attributes of a zarr group at ``path`` (v2 or v3), or ``None`` if it is not one."""
    if (path / "zarr.json").is_file():
        try:
            meta = json.loads((path / "zarr.json").read_text())
        except (OSError, ValueError):
            return set(), {}
        members = {p.name for p in path.iterdir() if (p / "zarr.json").is_file()}
        return members, dict(meta.get("attributes") or {})
    if (path / ".zgroup").is_file():
        try:
            attrs = json.loads((path / ".zattrs").read_text()) if (path / ".zattrs").is_file() else {}
        except (OSError, ValueError):
            attrs = {}
        members = {p.name for p in path.iterdir() if (p / ".zarray").is_file() or (p / ".zgroup").is_file()}
        return members, dict(attrs)
    return None


def describe(path: str | Path) -> str | None:
    """What is at ``path``: ``None`` if nothing, else one of :data:`KINDS`, ``"empty directory"``,
    ``"zarr store"``, ``"file"`` or ``"directory"``."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return None
    if path.is_file():
        if path.suffix == ".json":
            try:
                doc = json.loads(path.read_text())
            except (OSError, ValueError, UnicodeDecodeError):
                return "file"
            if isinstance(doc, dict) and "models" in doc and "n_test" in doc:
                return "metrics file"
        return "file"
    if not path.is_dir():
        return "file"
    if not any(path.iterdir()):
        return "empty directory"
    group = _zarr_group(path)
    if group is not None:
        members, attrs = group
        if "flux" in members:
            return "simulated catalog" if str(attrs.get("simulated", "")).lower() == "true" else "catalog"
        if "logg_pred" in members:
            return "predictions store"
        return "zarr store"
    if (path / "run.json").is_file() or (path / "seeds.json").is_file():
        return "run directory"
    if (path / "model.json").is_file():
        return "model"
    if any((path / name).exists() for name in ("experts.zarr", "checkpoints", "rows", "features.zarr")):
        return "interrupted fit"
    if (path / "audit.json").is_file():
        return "audit directory"
    if (path / "ceiling.json").is_file():
        return "ceiling directory"
    return "directory"


def claim_output(path: str | Path, kind: str, *, overwrite: bool = False, resume: bool = False,
                 replace_model: bool = False, what: str = "--out") -> str | None:
    """Check that ``path`` may receive an output of ``kind`` (one of :data:`KINDS`); returns what is there now.

    ``resume`` lets ``fit`` continue an interrupted fit and ``run`` a run
    directory; ``replace_model`` lets a caller that owns ``path`` (``run``
    redoing its own study) replace a complete model. No output goes inside a
    catalog, a model or a predictions store. Raises :class:`OutputError`
    (one line) otherwise.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    for parent in Path(path).absolute().parents:
        try:
            inside = describe(parent)
        except OSError:  # an unreadable ancestor (permissions) holds nothing of ours to protect
            continue
        if inside in ("catalog", "simulated catalog", "model", "predictions store"):
            raise OutputError(f"{path} is inside {parent}, a {inside}; snrmoe does not write into one: choose "
                              f"another {what}")
    lock = lock_path(path)
    if lock.exists() and Path(path).absolute() not in _HELD:
        holder = _holder(lock)
        if not _stale(lock, holder):
            raise _busy(Path(path), lock, holder)
    now = describe(path)
    if now in (None, "empty directory"):
        return now
    same = now == kind or (kind == "model" and now == "interrupted fit")
    if resume and same and kind in ("model", "run directory") and now != "model":
        return now
    if now == "catalog":
        raise OutputError(f"{path} is a catalog; snrmoe never replaces or writes into a catalog: choose another "
                          f"{what}")
    if now == "model" and kind == "model" and replace_model:
        return now
    if now == "model" and kind == "model":
        raise OutputError(f"{path} holds a complete model; a fit never replaces one (choose another {what}, or "
                          f"delete it yourself)")
    if not same:
        raise OutputError(f"{path} exists and is a {now}, not a {kind}; snrmoe does not replace it, with or without "
                          f"--overwrite: choose another {what}")
    if not overwrite:
        hint = "--resume to continue it or --overwrite to start again" if kind in ("model", "run directory") \
            else "--overwrite to replace it"
        raise OutputError(f"{path} already exists ({now}); pass {hint}")
    return now


@contextmanager
def replace_atomically(path: str | Path):
    """Yield a fresh temporary path beside ``path``; when the block completes it takes ``path``'s place.

    The old output (if any) is moved aside, the new one renamed in, and the
    old one deleted; if the block fails, the temporary is removed and
    ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.partial-"))
    tmp.rmdir()  # writers create it (zarr, a file); the unique name is what we keep
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    old = None
    if path.exists() or path.is_symlink():
        old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))  # unique: no leftover in the way
        old.rmdir()
        path.rename(old)
    tmp.rename(path)
    if old is not None:
        _remove(old)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink(missing_ok=True)


_HELD: set[Path] = set()  # locks this process holds (a run's stages nest: run_pipeline -> run_study)
#: an unreadable lock file younger than this may be a writer between creating and filling it
_UNREADABLE_GRACE_S = 10.0


def lock_path(path: str | Path) -> Path:
    """The lock file of an output: ``.NAME.lock`` beside it (outside it, so it never looks like content)."""
    path = Path(path).absolute()
    return path.parent / f".{path.name}.lock"


def _holder(lock: Path) -> dict | None:
    try:
        doc = json.loads(lock.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _stale(lock: Path, holder: dict | None) -> bool:
    """True if the lock's writer is gone: a dead pid on this host (or the pid now belongs to a newer process)."""
    import psutil

    if holder is None:
        try:
            return time.time() - lock.stat().st_mtime > _UNREADABLE_GRACE_S
        except OSError:
            return True
    if holder.get("host") != socket.gethostname():
        return False  # another machine's process: its liveness cannot be checked from here
    pid = holder.get("pid")
    if not isinstance(pid, int) or not psutil.pid_exists(pid):
        return True
    try:
        return psutil.Process(pid).create_time() > float(holder.get("started_unix", 0.0)) + 1.0  # pid reused
    except psutil.Error:
        return True


def _who(holder: dict | None) -> str:
    if holder is None:
        return "another process (unreadable lock)"
    return (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')} "
            f"({holder.get('command', 'snrmoe')})")


def _busy(path: Path, lock: Path, holder: dict | None) -> OutputError:
    return OutputError(f"{path} is being written by {_who(holder)}; wait for it to finish or choose another output "
                       f"(if that process is gone, delete {lock})")


@contextmanager
def output_lock(path: str | Path, command: str = "snrmoe"):
    """Hold the lock of output ``path`` while the block writes it (re-entrant within one process).

    Raises :class:`OutputError` naming the holder if another live process
    holds it; a stale lock (its process is gone) is removed and taken.
    """
    path = Path(path).absolute()
    if path in _HELD:
        yield
        return
    lock = lock_path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": datetime.now().isoformat(timespec="seconds"),
          "started_unix": time.time(), "command": command}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(lock)
            if _stale(lock, holder):
                lock.unlink(missing_ok=True)  # several may try; O_EXCL above decides who takes it
                continue
            raise _busy(path, lock, holder) from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    else:
        raise OutputError(f"{path}: could not take its lock {lock} (another writer keeps taking it)")
    _HELD.add(path)
    try:
        yield
    finally:
        _HELD.discard(path)
        h = _holder(lock)
        if h is not None and h.get("pid") == me["pid"] and h.get("started_unix") == me["started_unix"]:
            lock.unlink(missing_ok=True)


@contextmanager
def claimed(path: str | Path, kind: str, command: str, **rules):
    """:func:`claim_output` (nothing is written if refused, not even the lock), then :func:`output_lock`, then the
    claim again under the lock (another writer may have finished in between). ``rules``: as for claim_output."""
    claim_output(path, kind, **rules)
    with output_lock(path, command):
        claim_output(path, kind, **rules)
        yield
