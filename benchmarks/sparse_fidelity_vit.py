"""The `vit` case of benchmarks/sparse_fidelity.py with chosen recipe overrides as variants, to
see what each kept-mass statistic and each `min_mass` does to the tiny ViT's held-out accuracy
without editing the shared experiment table. Results merge into
benchmarks/results/sparse_fidelity-<device>.json (re-read just before writing) as
`vit-<key>-<value>...`; with --default also the default recipe as `vit`.

    python benchmarks/sparse_fidelity_vit.py --default '{"statistic": "quantile"}'
    python benchmarks/sparse_fidelity_vit.py '{"statistic": "mean", "min_mass": 0.7}'
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sparse_fidelity as sf  # noqa: E402


def main(argv: list[str]) -> None:
    variants = [json.loads(a) for a in argv if a != "--default"]
    exp = sf.EXPERIMENTS["vit"]
    exp["variants"] = variants
    if "--default" not in argv:
        def run_variants(key: str, save=None) -> dict:
            """sf.run without the default build: each variant builds, is evaluated, saved."""
            out = {}
            for ov in variants:
                name = "vit-" + "-".join(f"{k}-{v}" for k, v in ov.items())
                recipe = sf._variant_recipe(sf.ROOT / exp["recipe"], name, ov)
                print(f"· {name}: building", flush=True)
                rec = {"model": exp["model"], "recipe": exp["recipe"], "overrides": ov,
                       "target": exp["target"],
                       **sf.build(name, exp["spec"], recipe, sf.ROOT / exp["calib"])}
                if rec["rc"] == 0:
                    print(f"· {name}: evaluating", flush=True)
                    ev = sf.evaluate(rec["build"], sf.ROOT / exp["eval"], exp["max_length"],
                                     exp["samples"])
                    if "error" not in ev:
                        b = Path(rec["build"])
                        ev["accuracy"] = sf.accuracy(b / "model.pt2", sf.ROOT / exp["eval"])
                        ev["accuracy_original"] = sf.accuracy(b / "original.pt2",
                                                              sf.ROOT / exp["eval"])
                    rec["eval"], rec["met"] = ev, sf._met(name, ev)
                out[name] = rec
                if save is not None:
                    save({name: rec})
            return out

        sf.run = run_variants
    sf.main(["vit"])


if __name__ == "__main__":
    main(sys.argv[1:])
