"""One selector grammar for recipes: layer indices and ranges, and module-name globs.

    layers: "0-3,5"        or  [0, 1, "4-6"]
    modules: ["*.self_attn", "encoder.layer.*"]

An empty selector selects everything.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from attnc.errors import RecipeError


def parse_layers(spec) -> frozenset[int] | None:
    if spec is None or spec == () or spec == "":
        return None
    items = spec if isinstance(spec, (list, tuple)) else [spec]
    out: set[int] = set()
    for item in items:
        for part in str(item).split(","):
            part = part.strip()
            if not part:
                continue
            try:
                if "-" in part:
                    lo, hi = (int(x) for x in part.split("-", 1))
                    if hi < lo:
                        raise ValueError
                    out.update(range(lo, hi + 1))
                else:
                    out.add(int(part))
            except ValueError:
                raise RecipeError(f"bad layer selector {part!r}: use 3, 0-5 or 1,4,7") from None
    if any(i < 0 for i in out):
        raise RecipeError("layer indices must be non-negative")
    return frozenset(out)


@dataclass(frozen=True)
class Selector:
    layers: frozenset[int] | None = None
    modules: tuple[str, ...] = ()

    @classmethod
    def parse(cls, layers=None, modules=()) -> Selector:
        return cls(parse_layers(layers), tuple(modules or ()))

    def matches(self, layer: int | None, module: str) -> bool:
        if self.layers is not None and layer not in self.layers:
            return False
        return not self.modules or any(fnmatch.fnmatchcase(module, g) for g in self.modules)
