"""The build folder: what `-o` may replace, the marker that says a folder is an attnc build, the
staging folder beside it, and the swap that puts a finished build in place.

`-o` replaces only an earlier attnc build (a folder holding attnc's marker and nothing but the
files the marker lists) or an empty folder. With `force`, any other folder the user named may be
replaced, but never the current folder or one of its ancestors, the home folder, a filesystem
root, nor a folder that holds (or is) one of the build's inputs.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import io
import json
import os
import shutil
import signal
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from attnc.errors import AttncError, UsageError, WriteError

MARKER = ".attnc-build"
STAGE_TAG = ".attnc-"  # staging and swap folders are named .<name>.attnc-*


def _abs(path: str | Path) -> Path:
    """An absolute, symlink-resolved path that need not exist."""
    return Path(os.path.abspath(os.path.expanduser(str(path)))).resolve()


def spec_paths(spec: str) -> list[Path]:
    """The files or folders a model spec reads: the path itself, a factory's .py file, or an
    importable factory module's package folder (found without importing it)."""
    p = Path(spec).expanduser()
    if p.exists():
        return [_abs(p)]
    if ":" not in spec:
        return []
    left = spec.rsplit(":", 1)[0]
    if left.endswith(".py"):
        return [_abs(left)] if Path(left).expanduser().exists() else []
    top = left.split(".")[0]
    if not top.isidentifier():
        return []
    try:
        found = importlib.util.find_spec(top)  # a top-level name: located, not executed
    except (ImportError, ValueError):
        return []
    if found is None:
        return []
    if found.submodule_search_locations:
        return [_abs(loc) for loc in found.submodule_search_locations]
    return [_abs(found.origin)] if found.origin and os.path.isabs(found.origin) else []


def source_record(spec: str, out: Path) -> dict[str, str]:
    """`source` absolute (a path spec, or a factory file's path with `:fn`), plus the same
    relative to the build folder, so that neither depends on the working folder."""
    p = Path(spec).expanduser()
    path, tail = None, ""
    if p.exists():
        path = _abs(p)
    elif ":" in spec and spec.rsplit(":", 1)[0].endswith(".py"):
        left, fn = spec.rsplit(":", 1)
        path, tail = _abs(left), f":{fn}"
    if path is None:  # pkg.mod:factory, resolved by import, not by the working folder
        return {"source": spec, "source_relative": spec, "source_given": spec}
    rel = os.path.relpath(path, _abs(out))
    return {"source": f"{path}{tail}", "source_relative": f"{rel}{tail}", "source_given": spec}


def read_marker(folder: Path) -> dict | None:
    """The marker of an attnc build folder, or None when `folder` is not one."""
    try:
        line = (folder / MARKER).read_text(encoding="utf-8").splitlines()[0]
        data = json.loads(line)
    except (OSError, IndexError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or data.get("tool") != "attnc":
        return None
    files = data.get("files")
    return data if isinstance(files, list) else None


def write_marker(folder: Path, version: str) -> None:
    """Mark `folder` as an attnc build, listing every entry in it (the marker included)."""
    files = sorted({p.name for p in folder.iterdir()} | {MARKER})
    line = json.dumps({"tool": "attnc", "version": version, "files": files}, sort_keys=True)
    (folder / MARKER).write_text(line + "\n", encoding="utf-8")


def check_output_dir(out: Path, *, force: bool = False, inputs: Iterable[Path] = ()) -> Path:
    """Refuse an output folder attnc must not replace; return the folder the staging folder goes
    in. Runs before any work, and again just before the finished build is moved into place."""
    out = Path(out).expanduser()
    target = _abs(out)
    hint_o = "name a new folder with -o"
    if out.is_symlink():
        raise UsageError(f"output path {out} is a symbolic link", "name the folder itself")
    if out.exists() and not out.is_dir():
        raise UsageError(f"output path {out} exists and is not a folder", hint_o)
    cwd = _abs(Path.cwd())
    if target == cwd or target in cwd.parents:
        where = "the current folder" if target == cwd else "an ancestor of the current folder"
        raise UsageError(f"refusing to replace {out}: it is {where}", hint_o)
    if target == _abs(Path.home()) or target == Path(target.anchor):
        raise UsageError(f"refusing to replace {out}: it is the home folder or a root", hint_o)
    for src in inputs:
        src = _abs(src)
        if target == src or target in src.parents:
            what = "is" if target == src else "holds"
            raise UsageError(f"refusing to replace {out}: it {what} the input {src}", hint_o)
    if out.is_dir():
        _check_replaceable(out, force)
    parent = target.parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    try:  # a real write, not os.access: root passes access checks on read-only mounts
        with signals_held():  # Ctrl-C between making and removing it must not leave it
            tempfile.TemporaryDirectory(dir=probe, prefix=".attnc-probe-").cleanup()
    except OSError:
        raise UsageError(f"output folder {out} is not writable") from None
    return parent


def _check_replaceable(out: Path, force: bool) -> None:
    try:
        entries = sorted(p.name for p in out.iterdir())
    except OSError as exc:
        raise UsageError(f"cannot read output folder {out}: {exc.strerror or exc}") from None
    if not entries or force:
        return
    marker = read_marker(out)
    if marker is None:
        raise UsageError(
            f"refusing to replace {out}: it is not an attnc build ({len(entries)} entries, "
            f"e.g. {entries[0]!r})",
            "name a new or empty folder with -o, or pass --force to replace this one",
        )
    extra = [e for e in entries if e not in set(marker["files"]) | {MARKER}]
    if extra:
        raise UsageError(
            f"refusing to replace {out}: the earlier build there holds files attnc did not "
            f"write ({', '.join(extra[:3])})",
            "move them elsewhere, or pass --force",
        )


def make_stage(parent: Path, name: str) -> Path:
    """An empty staging folder beside the destination, with the permissions the umask gives."""
    parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{name}{STAGE_TAG}", dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    stage.chmod(0o777 & ~umask)  # mkdtemp makes 0700; the build folder follows the umask
    return stage


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM for the block (a scratch entry made and removed, a staging folder
    made, the folders swapped), so that an interrupt never strands an entry beside the build;
    a held signal is delivered right after."""
    sigs = {signal.SIGINT, signal.SIGTERM}
    can = hasattr(signal, "pthread_sigmask")
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs) if can else None
    try:
        yield
    finally:
        if can:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


def move_into_place(stage: Path, out: Path) -> None:
    """Swap the finished folder in; an older build there is replaced only at the very end."""
    with signals_held():
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}{STAGE_TAG}old-{os.getpid()}")
            out.rename(old)
        try:
            stage.rename(out)
        except BaseException:
            if old is not None:
                old.rename(out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def os_error_in(exc: BaseException) -> OSError | None:
    """The OSError behind `exc` (itself, or a cause/context an exporter wrapped), if any."""
    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 10:
        if isinstance(cur, OSError) and not isinstance(cur, AttncError):
            return cur
        cur = cur.__cause__ or (None if cur.__suppress_context__ else cur.__context__)
        seen += 1
    return None


def write_error(err: OSError, stage: Path, out: Path) -> WriteError:
    """`could not write OUT/FILE: cause`, naming the file at its final place."""
    name = err.filename if isinstance(err.filename, str) else None
    if not name:  # a bare write() error: the file being written is the newest in the stage
        with contextlib.suppress(OSError):
            files = [p for p in stage.iterdir() if p.is_file()]
            name = str(max(files, key=lambda p: p.stat().st_mtime_ns)) if files else None
    shown = out
    if name:
        try:
            shown = out / Path(os.path.abspath(name)).relative_to(os.path.abspath(stage))
        except ValueError:
            shown = Path(name)
    if err.strerror:
        cause = err.strerror
    elif err.errno:
        cause = os.strerror(err.errno)
    else:
        cause = str(err) or type(err).__name__
    hint = None
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "free some disk space, or write the build to another disk with -o"
    elif err.errno == errno.EFBIG:
        hint = "the file system or a ulimit caps the file size; write the build elsewhere"
    return WriteError(f"could not write {shown}: {cause}", hint)


def check_free_space(parent: Path, need: int) -> None:
    """Refuse to start writing when the disk clearly cannot hold the artifacts: a full disk
    can abort the process inside a C++ writer, where nothing can clean up."""
    try:
        free = shutil.disk_usage(parent).free
    except OSError:
        return
    if free < need:
        raise WriteError(
            f"could not write the build in {parent}: it needs about {need / 2**20:.0f} MiB, "
            f"{free / 2**20:.0f} MiB is free",
            "free some disk space, or write the build to another disk with -o",
        )


class _GuardedFile(io.RawIOBase):
    """A binary file for C++ writers that write through Python (torch's zip writer): the first
    OSError is kept and every later write is swallowed, so the writer never throws from its
    destructor (which aborts the process); `safe_writer` raises the kept error afterwards."""

    def __init__(self, f):
        super().__init__()
        self.f, self.error = f, None

    def write(self, data) -> int:
        if self.error is None:
            try:
                self.f.write(data)
            except OSError as exc:
                self.error = exc
        return len(data)

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        return self.f.seek(pos, whence) if self.error is None else 0

    def tell(self) -> int:
        return self.f.tell()

    def flush(self) -> None:
        if self.error is None:
            self.f.flush()


@contextlib.contextmanager
def safe_writer(path: Path) -> Iterator[_GuardedFile]:
    """Open `path` for a C++ writer; a write error (full disk, file too large) comes back as an
    OSError naming the file instead of a C++ abort."""
    path = Path(path)
    f = open(path, "wb")  # noqa: SIM115 - closed below, after the writer is done
    guard = _GuardedFile(f)
    try:
        yield guard
    finally:
        try:
            f.close()
        except OSError as exc:
            guard.error = guard.error or exc
    if guard.error is not None:
        err = guard.error
        raise OSError(err.errno, err.strerror or str(err), str(path)) from err
