"""Write calibration and held-out English sentences taken from the Python standard library's
module docstrings (every Python install has them), as JSONL lines {"text": ...}.

    python examples/make_calib.py            # writes examples/data/minilm_{calib,eval}.jsonl
"""

from __future__ import annotations

import ast
import json
import random
import re
import sysconfig
from pathlib import Path

HERE = Path(__file__).parent


def sentences(limit_files: int = 4000) -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out: list[str] = []
    files = sorted(
        p
        for p in stdlib.rglob("*.py")
        if "site-packages" not in p.parts and "test" not in p.parts and "tests" not in p.parts
    )[:limit_files]
    for f in files:
        try:
            tree = ast.parse(f.read_text(encoding="utf-8", errors="ignore"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)):
                continue
            doc = ast.get_docstring(node) or ""
            para = " ".join(doc.split("\n\n")[0].split())
            for s in re.split(r"(?<=[.!?])\s+", para):
                words = s.split()
                if 6 <= len(words) <= 40 and s[0].isupper() and s.endswith(".") and ">>>" not in s:
                    out.append(s)
    return sorted(set(out))


def main() -> None:
    rng = random.Random(0)
    sents = sentences()
    rng.shuffle(sents)
    (HERE / "data").mkdir(exist_ok=True)
    for name, chunk in (("minilm_calib", sents[:256]), ("minilm_eval", sents[256:512])):
        with open(HERE / "data" / f"{name}.jsonl", "w", encoding="utf-8") as fh:
            for s in chunk:
                fh.write(json.dumps({"text": s}) + "\n")
        print(f"wrote {len(chunk)} sentences to examples/data/{name}.jsonl")


if __name__ == "__main__":
    main()
