"""Write calibration and held-out text for the tiny Llama as JSONL {"text": ...}: windows of at
most 255 UTF-8 bytes (the model adds BOS for a 256 context). Held-out windows come from the files
in the model's validation split (never trained on); calibration windows from training files.

    python examples/make_lm_data.py    # writes examples/data/tiny_llm_{calib,eval}.jsonl
"""

from __future__ import annotations

import json
import random
import sysconfig
from pathlib import Path

HERE = Path(__file__).parent
MODEL = HERE / "models" / "attnc-tiny-llama"


def windows(files: list[Path], n: int, seed: int, max_bytes: int = 255) -> list[str]:
    rng = random.Random(seed)
    out: list[str] = []
    texts = [f.read_text(encoding="utf-8", errors="ignore") for f in files if f.exists()]
    texts = [t for t in texts if len(t.encode()) > max_bytes * 2]
    while len(out) < n and texts:
        t = rng.choice(texts)
        start = rng.randrange(0, len(t) - max_bytes)
        chunk = t[start : start + max_bytes]
        while len(chunk.encode()) > max_bytes:
            chunk = chunk[:-1]
        if chunk.strip():
            out.append(chunk)
    return out


def main() -> None:
    split = json.loads((MODEL / "data_split.json").read_text())
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    val = {str(p) for p in split["val"]}
    val_files = [stdlib / p for p in sorted(val)]
    train_files = sorted(
        p
        for p in stdlib.rglob("*.py")
        if "site-packages" not in p.parts and str(p.relative_to(stdlib)) not in val
    )
    (HERE / "data").mkdir(exist_ok=True)
    for name, files, seed in (("tiny_llm_eval", val_files, 1), ("tiny_llm_calib", train_files, 2)):
        rows = windows(files, 128, seed)
        with open(HERE / "data" / f"{name}.jsonl", "w", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps({"text": r}) + "\n")
        print(f"wrote {len(rows)} windows to examples/data/{name}.jsonl")


if __name__ == "__main__":
    main()
