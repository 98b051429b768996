"""Real-image calibration for the tiny LLaVA: photos with the VQA prompts of the calib split.

Writes ``calib.jsonl`` beside the photos, one line per photo: ``{"image": name, "input_ids":
[<bos>, <image>, question words..., <ans>]}`` (the single image token is expanded to the model's
64 by attnc.load.calib_images), the question being calib-split question i of
examples/make_vqa.py. The photos are the real ones scikit-image ships in ``skimage/data/``
(public-domain or freely licensed test photos), taken from an installed scikit-image or its
wheel, or any folder of images::

    python examples/make_photo_calib.py --out /tmp/photos            # installed skimage / wheel
    python examples/make_photo_calib.py --images my_photos --out /tmp/photos
"""

from __future__ import annotations

import argparse
import glob
import json
import shutil
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_vqa import ANS_ID, BOS_ID, IMAGE_ID, TOK, make_sample  # noqa: E402

SUFFIXES = (".png", ".jpg", ".jpeg")


def skimage_photos(out: Path, wheel: str | None) -> list[Path]:
    try:
        import skimage

        src = Path(skimage.__file__).parent / "data"
        files = sorted(p for p in src.iterdir() if p.suffix.lower() in SUFFIXES)
        return [Path(shutil.copy(p, out / p.name)) for p in files]
    except ImportError:
        pass
    wheels = [wheel] if wheel else sorted(glob.glob("/opt/pypi/files/scikit_image-*.whl"))
    if not wheels:
        sys.exit("no scikit-image installed and no wheel found: give --images or --wheel")
    got = []
    with zipfile.ZipFile(wheels[-1]) as z:
        for name in z.namelist():
            if name.startswith("skimage/data/") and name.lower().endswith(SUFFIXES):
                p = out / Path(name).name
                p.write_bytes(z.read(name))
                got.append(p)
    return sorted(got)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=Path, help="a folder of photos (default: scikit-image's)")
    ap.add_argument("--wheel", help="a scikit-image wheel to take skimage/data/ from")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.images:
        files = sorted(p for p in args.images.iterdir() if p.suffix.lower() in SUFFIXES)
        files = [Path(shutil.copy(p, args.out / p.name)) for p in files]
    else:
        files = skimage_photos(args.out, args.wheel)
    lines = []
    for i, f in enumerate(files):
        q = make_sample("calib", i)["question"]
        ids = [BOS_ID, IMAGE_ID] + [TOK[t] for t in q.split()] + [ANS_ID]
        lines.append(json.dumps({"image": f.name, "input_ids": ids}))
    (args.out / "calib.jsonl").write_text("\n".join(lines) + "\n")
    print(f"{len(files)} photos, {args.out / 'calib.jsonl'}")


if __name__ == "__main__":
    main()
