"""A hard memory cap for one benchmark command: a Linux memory cgroup (v1 or v2) limited to a
given number of bytes, the command started inside it, and the cgroup's own accounting read back.

Why: a process's resident set counts the clean, memory-mapped file pages (safetensors, ONNX
external data) the kernel keeps only because memory is free; they are dropped and read back when
it is not. Whether a build *needs* more than N bytes is shown by running it with no more: the
cgroup charges its anonymous memory and every page-cache page it reads or writes, and reclaims
(or, for anonymous memory past the cap, kills with SIGKILL) at the limit. Page-cache pages read
before the build by another cgroup are not charged to it, so `drop_page_cache()` runs first;
pages still mapped by another running process (the same torch libraries, when tests run from the
same virtual environment) cannot be dropped and stay charged to it: run the capped build from a
copy of the environment then (`cp -a .venv /tmp/venv-cap`, then `/tmp/venv-cap/bin/python
benchmarks/scale.py --cap-x 1.5`). The build's own peak resident set (`/usr/bin/time -v`), which
counts every page it maps however charged, is recorded beside the cap as the check.

Needs root and a writable cgroup hierarchy (containers often have one); `available()` says
whether this machine has it. Only the benchmarks use this; attnc itself never does.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path

V1 = Path("/sys/fs/cgroup/memory")
V2 = Path("/sys/fs/cgroup")


def _root() -> tuple[Path, int] | None:
    if (V1 / "memory.limit_in_bytes").exists() and os.access(V1, os.W_OK):
        return V1, 1
    if (V2 / "cgroup.controllers").exists() and os.access(V2, os.W_OK) and "memory" in (
            V2 / "cgroup.subtree_control").read_text():
        return V2, 2
    return None


def available() -> bool:
    return _root() is not None


def drop_page_cache() -> bool:
    """Write back and drop the machine's clean page cache (so that files read earlier by other
    processes are charged to the capped command when it reads them); False where not allowed."""
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError:
        return False
    return True


class Cap:
    """`with Cap(limit_bytes) as cap: subprocess.run(cap.wrap(cmd))`; then `cap.stats`."""

    def __init__(self, limit: int, name: str | None = None):
        found = _root()
        if found is None:
            raise RuntimeError("no writable memory cgroup hierarchy here (needs root)")
        self.root, self.version = found
        self.limit = int(limit)
        self.dir = self.root / (name or f"attnc-bench-{os.getpid()}-{time.monotonic_ns()}")
        self.stats: dict = {}

    def __enter__(self) -> Cap:
        self.dir.mkdir()
        if self.version == 1:
            self._write("memory.limit_in_bytes", self.limit)
            with contextlib.suppress(OSError):  # no swap accounting on some kernels
                self._write("memory.memsw.limit_in_bytes", self.limit)
        else:
            self._write("memory.max", self.limit)
            with contextlib.suppress(OSError):
                self._write("memory.swap.max", 0)
        return self

    def _write(self, name: str, value: int) -> None:
        (self.dir / name).write_text(f"{value}\n")

    def _read(self, name: str) -> str | None:
        try:
            return (self.dir / name).read_text()
        except OSError:
            return None

    def wrap(self, cmd: list[str]) -> list[str]:
        """`cmd`, started inside the cgroup (so is every process it starts)."""
        procs = self.dir / "cgroup.procs"
        return ["sh", "-c", f'echo $$ > "{procs}" && exec "$@"', "sh", *cmd]

    def read(self) -> dict:
        """The cgroup's accounting now: peak charged bytes, times the cap forced reclaim, and
        processes killed for memory."""
        out: dict = {"limit_bytes": self.limit, "cgroup_version": self.version}
        if self.version == 1:
            peak, fails = self._read("memory.max_usage_in_bytes"), self._read("memory.failcnt")
            out["peak_charged_bytes"] = int(peak) if peak else None
            out["limit_hits"] = int(fails) if fails else None
            oom = self._read("memory.oom_control") or ""
        else:
            peak = self._read("memory.peak")
            out["peak_charged_bytes"] = int(peak) if peak else None
            oom = self._read("memory.events") or ""
            out["limit_hits"] = next((int(ln.split()[1]) for ln in oom.splitlines()
                                      if ln.startswith("max ")), None)
        out["oom_kills"] = next((int(ln.split()[1]) for ln in oom.splitlines()
                                 if ln.startswith("oom_kill ")), None)
        return out

    def __exit__(self, *exc) -> None:
        self.stats = self.read()
        for _ in range(50):  # the last processes may still be exiting
            try:
                self.dir.rmdir()
                return
            except OSError:
                time.sleep(0.1)
