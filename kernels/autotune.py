"""Autotuning for attnc's Triton kernels: pruned configs, a persistent cache, pinning, cost model.

- `candidates(...)`: a short list of configs keyed on the problem (head dim, dtype, lengths),
  pruned by shared-memory need; under `TRITON_INTERPRET=1` exactly one config (the interpreter
  cannot autotune several, and small tiles keep it fast).
- `choose(...)`: a pinned config if any (`ATTNC_PIN_CONFIG="BLOCK_M=128,BLOCK_N=64,num_warps=8,
  num_stages=3"`, optionally `,na_loop=class`, or `pin_config(...)`), else the persistent
  cache, else time every candidate (tile configs x kernel variants) with
  `triton.testing.do_bench` (clears L2 between runs, median) and store the winner.
- The cache is JSON at `$ATTNC_CACHE_DIR/autotune.json` (default `~/.cache/attnc`), keyed on op,
  shape bucket, dtype, GPU name, Triton version and a hash of the kernel sources.
- `dense_is_cheaper(...)`: the cost model that sends small or nearly dense problems to SDPA.

We never use `@triton.autotune` with several configs: our own loop picks one and launches it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

log = logging.getLogger(__name__)

INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
_PINNED: dict | None = None
_MEMORY: dict[str, dict] = {}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def pin_config(config: dict | None) -> None:
    """Pin one config for every kernel launch (None unpins); for reproducible builds."""
    global _PINNED
    _PINNED = dict(config) if config is not None else None


def _env_pin() -> dict | None:
    text = os.environ.get("ATTNC_PIN_CONFIG", "").strip()
    if not text:
        return None
    cfg: dict = {}
    for part in text.split(","):
        name, _, val = part.partition("=")
        val = val.strip()
        cfg[name.strip()] = int(val) if val.lstrip("-").isdigit() else val
    missing = {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"} - cfg.keys()
    if missing:
        from attnc.errors import KernelError

        raise KernelError(f"ATTNC_PIN_CONFIG lacks {sorted(missing)}",
                          hint="e.g. BLOCK_M=128,BLOCK_N=64,num_warps=8,num_stages=3")
    return cfg


def candidates(d: int, dtype: torch.dtype, sq: int, skv: int) -> list[dict]:
    """Configs worth timing for this problem, largest tiles first."""
    if interpreting():
        return [dict(INTERPRETER_CONFIG)]
    elem = 4 if dtype == torch.float32 else 2
    dp = max(16, 1 << (d - 1).bit_length())
    out = []
    for bm, bn, w, s in [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (64, 64, 4, 3),
                         (64, 64, 4, 2), (128, 32, 4, 4), (64, 32, 4, 2)]:
        smem = (bm * dp + s * 2 * bn * dp) * elem
        if smem > 200_000 or (elem == 4 and bm * bn > 64 * 64):
            continue
        if sq <= 64 and bm > 64:
            continue
        out.append({"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": s})
    return out or [{"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}]


def _bucket(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.cache  # read once per process: every tuned launch builds a cache key
def _sources_hash() -> str:
    here = Path(__file__).parent
    h = hashlib.sha1()
    for name in ("flash.py", "flash_kernels.py", "colsum.py", "masks.py", "autotune.py",
                 "tile_lists.py", "pattern_extras.py"):
        p = here / name
        if p.exists():
            h.update(p.read_bytes())
    return h.hexdigest()[:12]


def _device_name(t: torch.Tensor) -> str:
    if t.is_cuda:
        return torch.cuda.get_device_name(t.device)
    return "cpu"


def cache_key(op: str, q: torch.Tensor, k: torch.Tensor, causal: bool, masked: bool,
              extra: str = "") -> str:
    import triton

    b, h, sq, d = q.shape
    return "|".join([
        op, f"bh{_bucket(b * h)}", f"sq{_bucket(sq)}", f"skv{_bucket(k.shape[2])}", f"d{d}",
        f"g{h // max(k.shape[1], 1)}", f"c{int(causal)}", f"m{int(masked)}", str(q.dtype),
        _device_name(q), f"triton{triton.__version__}", _sources_hash(),
        hashlib.sha1(extra.encode()).hexdigest()[:8],
    ])


def cache_path() -> Path:
    root = os.environ.get("ATTNC_CACHE_DIR") or os.path.join(Path.home(), ".cache", "attnc")
    return Path(root) / "autotune.json"


def _load() -> dict:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _store(key: str, cfg: dict) -> None:
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _load()
        data[key] = cfg
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError as e:  # a read-only home must not break a build
        log.warning("could not write the autotune cache %s: %s", path, e)


def time_config(fn: Callable[[], object]) -> float:
    """Median milliseconds of `fn` with L2 flushed between runs."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))


def choose(op: str, q: torch.Tensor, k: torch.Tensor, causal: bool, masked: bool,
           bench: Callable[[dict], Callable[[], object]], extra: str = "",
           variants: Sequence[dict] = ({},)) -> dict:
    """The config to launch: pinned, cached, or the fastest candidate (then cached).
    `variants` are kernel-variant keys (e.g. {"na_loop": "class"}) crossed with the tile configs;
    the first is the default, the one a pinned config or the interpreter gets."""
    pinned = _PINNED or _env_pin()
    if pinned is not None:
        return {**variants[0], **pinned}
    cands = [{**c, **v} for c in candidates(q.shape[-1], q.dtype, q.shape[2], k.shape[2])
             for v in variants]
    if len(cands) == 1 or not q.is_cuda:
        return cands[0]
    key = cache_key(op, q, k, causal, masked, extra)
    if key in _MEMORY:
        return _MEMORY[key]
    disk = _load().get(key)
    if disk is not None:
        _MEMORY[key] = disk
        return disk
    return tune(key, cands, bench)


def tune(key: str, cands: Sequence[dict], bench: Callable[[dict], Callable[[], object]]) -> dict:
    """Time every candidate, keep the fastest in memory and on disk under `key`, and return it.
    A candidate that fails to compile or launch is skipped, and so is one whose output differs
    from the first working candidate's (the default): a kernel variant is only ever picked if it
    computes the same attention on this machine."""
    best, best_ms, ref = cands[0], float("inf"), None
    for cfg in cands:
        try:
            fn = bench(cfg)
            out = fn()  # compiles; checked against the reference before it is timed
            if ref is None:
                ref = out
            elif not agrees(out, ref):
                log.warning("%s: config %s disagrees with %s; skipped", key.split("|")[0], cfg,
                            cands[0])
                continue
            ms = time_config(fn)
        except Exception as e:  # out of resources and the like: skip the config
            log.info("config %s failed: %s", cfg, e)
            continue
        log.debug("%s %s: %.4f ms", key.split("|")[0], cfg, ms)
        if ms < best_ms:
            best, best_ms = cfg, ms
    _MEMORY[key] = best
    _store(key, best)
    return best


def agrees(out, ref) -> bool:
    """Whether two candidates' outputs are the same attention up to accumulation order (relative
    to the output's scale: 1e-4 in fp32, 2e-2 in fp16/bf16); non-tensors always agree."""
    if not (isinstance(out, torch.Tensor) and isinstance(ref, torch.Tensor)):
        return True
    if out.shape != ref.shape:
        return False
    a, b = out.float(), ref.float()
    if not bool(torch.isfinite(a).eq(torch.isfinite(b)).all()):
        return False
    fin = torch.isfinite(b)
    if not bool(fin.any()):
        return True
    tol = (1e-4 if ref.dtype == torch.float32 else 2e-2) * max(b[fin].abs().max().item(), 1e-6)
    return (a[fin] - b[fin]).abs().max().item() <= tol


def dense_is_cheaper(sq: int, skv: int, density: float) -> bool:
    """Cost model: a sparse kernel pays only when the problem is large enough that launch and
    list overheads vanish and enough tiles are skipped. `density` is the visible-tile fraction."""
    if sq * skv <= 512 * 512:
        return True
    return density > 0.85 and sq * skv <= 4096 * 4096
