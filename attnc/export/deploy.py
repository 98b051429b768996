"""What makes a build folder deployable beyond the model files: the source model's tokenizer,
processor and config beside `model.onnx`, a sentence-transformers model's pooled embedding as a
second ONNX output, named ONNX dims, `metadata_props`, and a `.pt2` whose bytes do not change
between identical builds."""

from __future__ import annotations

import json
import logging
import re
import shutil
import struct
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attnc.errors import ExportError, RecipeError

log = logging.getLogger(__name__)

# files a deployer needs to turn text/images into the model's inputs, and the model's config
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)
PROCESSOR_FILES = (
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "chat_template.json",
    "chat_template.jinja",
)
CONFIG_FILES = ("config.json", "generation_config.json")
# sentence-transformers' own description of the pipeline (modules' folders are copied too)
ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
ST_MODULES = {"Transformer", "Pooling", "Normalize"}  # what `sentence_embedding` reproduces


def source_dir(loaded: Any) -> Path | None:
    """The folder the model came from: a Hugging Face folder given directly, or the one a
    factory's model or tokenizer was loaded from (`from_pretrained(path)`)."""
    cands = [getattr(loaded, "source", None)]
    cands.append(getattr(getattr(loaded, "config", None), "_name_or_path", None))
    cands.append(getattr(getattr(loaded, "tokenizer", None), "name_or_path", None))
    for c in cands:
        if isinstance(c, str) and c and Path(c).is_dir() and (Path(c) / "config.json").exists():
            return Path(c)
    return None


def write_deploy_files(loaded: Any, stage: Path) -> list[str]:
    """Copy (or save) the tokenizer/processor files and config beside the model; the names."""
    src = source_dir(loaded)
    written: set[str] = set()
    tok = getattr(loaded, "tokenizer", None)
    if tok is not None and hasattr(tok, "save_pretrained"):
        # what the model was built with (a factory may have changed the tokenizer)
        try:
            for f in tok.save_pretrained(str(stage)) or ():
                written.add(Path(f).name)
        except Exception as exc:  # noqa: BLE001 - OSError included: reported by the build
            if isinstance(exc, OSError):
                raise
            log.warning("the tokenizer could not be saved (%s); copying its files instead", exc)
    if not written and src is not None:
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, stage / name)
                written.add(name)
    if src is not None:
        for name in CONFIG_FILES + ST_FILES + PROCESSOR_FILES:
            if (src / name).is_file() and name not in written:
                shutil.copyfile(src / name, stage / name)
                written.add(name)
        for module in _st_modules(src):
            sub = (module.get("path") or "").strip("/")
            if not sub or not (src / sub).is_dir() or ".." in Path(sub).parts:
                continue
            for f in sorted((src / sub).glob("*.json")):  # configs only, never weights
                (stage / sub).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, stage / sub / f.name)
                written.add(f"{sub}/{f.name}")
    cfg = getattr(loaded, "config", None)
    if "config.json" not in written and hasattr(cfg, "to_json_file"):
        cfg.to_json_file(str(stage / "config.json"))
        written.add("config.json")
    return sorted(written)


# ----------------------------------------------------------------------------------------------
# sentence-transformers pooling


@dataclass(frozen=True)
class Pooling:
    mode: str  # mean | cls | max
    normalize: bool


def _st_modules(src: Path) -> list[dict]:
    try:
        mods = json.loads((src / "modules.json").read_text())
    except (OSError, ValueError):
        return []
    return [m for m in mods if isinstance(m, dict)] if isinstance(mods, list) else []


def st_pooling(src: Path | None) -> tuple[Pooling | None, str]:
    """The pooling a sentence-transformers folder describes, or (None, why not)."""
    mods = _st_modules(src) if src is not None else []
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in mods]
    if "Pooling" not in kinds:
        return None, "the source has no sentence-transformers modules.json with a Pooling module"
    extra = sorted(set(kinds) - ST_MODULES)
    if extra:
        return None, f"its modules.json has modules attnc cannot export: {', '.join(extra)}"
    pool = mods[kinds.index("Pooling")]
    try:
        cfg = json.loads((src / (pool.get("path") or "") / "config.json").read_text())
    except (OSError, ValueError) as exc:
        return None, f"its pooling config cannot be read: {exc}"
    modes = [k for k in ("cls_token", "mean_tokens", "max_tokens") if cfg.get(f"pooling_mode_{k}")]
    others = [
        k
        for k, v in cfg.items()
        if k.startswith("pooling_mode_")
        and v
        and k[13:] not in ("cls_token", "mean_tokens", "max_tokens")
    ]
    if len(modes) != 1 or others:
        return (
            None,
            f"its pooling ({', '.join(modes + others) or 'none'}) is not one of cls, mean, max",
        )
    mode = {"cls_token": "cls", "mean_tokens": "mean", "max_tokens": "max"}[modes[0]]
    return Pooling(mode, "Normalize" in kinds), ""


def resolve_sentence_embedding(setting: bool | None, loaded: Any, program: Any) -> Pooling | None:
    """`export.sentence_embedding`: true (required), false, or null (on where the source is a
    sentence-transformers model whose pooling attnc can export)."""
    if setting is False:
        return None
    pooling, why = st_pooling(source_dir(loaded))
    if pooling is not None and "attention_mask" not in program.input_names:
        pooling, why = None, "the model takes no attention_mask"
    if pooling is not None and len(program.output_names) != 1:
        pooling, why = None, "the model has more than one output"
    if pooling is None and setting:
        raise RecipeError(f"export.sentence_embedding is true but {why}", "set it to false")
    if pooling is None and why:
        log.info("no sentence_embedding output: %s", why)
    return pooling


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """sentence-transformers' Pooling (+ Normalize) on (B, S, H) token states."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    if pooling.mode == "cls":
        emb = hidden[:, 0]
    elif pooling.mode == "max":
        emb = hidden.masked_fill(m == 0, -1e9).amax(dim=1)
    else:
        emb = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
    return F.normalize(emb, p=2, dim=1) if pooling.normalize else emb


class SentenceEmbedding(nn.Module):
    """The program's graph plus the pooled embedding as a second output."""

    def __init__(self, gm: nn.Module, mask_index: int, pooling: Pooling):
        super().__init__()
        self.gm = gm
        self.mask_index = mask_index
        self.pooling = pooling

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.gm(*inputs)
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
            raise ExportError("sentence_embedding needs a (batch, sequence, hidden) output")
        return hidden, pool(hidden, inputs[self.mask_index], self.pooling)


def check_sentence_embedding(
    onnx_path: Path, program: Any, batches: Sequence[Any], pooling: Pooling
) -> dict[str, float]:
    """ONNX Runtime's `sentence_embedding` output against the pooled torch program."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    idx = program.input_names.index("attention_mask")
    worst, cos_min = 0.0, 1.0
    for b in batches:
        with torch.no_grad():
            ref = pool(program(*b.args), b.args[idx], pooling)
        feed = {n: a.detach().cpu().numpy() for n, a in zip(names, b.args, strict=True)}
        got = torch.from_numpy(sess.run(["sentence_embedding"], feed)[0])
        worst = max(worst, (got - ref).abs().max().item())
        cos_min = min(cos_min, F.cosine_similarity(got, ref, dim=-1).min().item())
    return {"max_abs_diff": worst, "min_cosine": cos_min}


# ----------------------------------------------------------------------------------------------
# ONNX dims and metadata


def dim_names(program: Any) -> dict[str, dict[int, str]]:
    """The dim names each input's dynamic axes should carry in the ONNX file."""
    specs = program.dynamic_shapes(named=bool(program.dim_ranges)) if program.dynamic_dims else ()
    out: dict[str, dict[int, str]] = {}
    for name, spec in zip(program.input_names, specs, strict=False):
        for axis, label in (program.dynamic_dims.get(name) or {}).items():
            dim = (spec or {}).get(axis)
            given = getattr(dim, "__name__", None)
            fallback = "batch" if label == "batch" else "sequence" if label == "seq" else label
            out.setdefault(name, {})[axis] = given if given and given != "DYNAMIC" else fallback
    return out


def name_onnx_dims(model: Any, program: Any) -> None:
    """Rename the exporter's dim symbols (`s19`, ...) to `batch`/`sequence` everywhere."""
    want = dim_names(program)
    mapping: dict[str, str] = {}
    for inp in model.graph.input:
        for axis, name in want.get(inp.name, {}).items():
            dims = inp.type.tensor_type.shape.dim
            if axis < len(dims) and dims[axis].dim_param and dims[axis].dim_param != name:
                mapping.setdefault(dims[axis].dim_param, name)
    if not mapping:
        return
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, mapping)) + r")\b")
    values = [*model.graph.input, *model.graph.output, *model.graph.value_info]
    for v in values:
        for d in v.type.tensor_type.shape.dim:
            if d.dim_param:
                d.dim_param = pattern.sub(lambda m: mapping[m.group(1)], d.dim_param)


def _fmt(value: Any) -> Any:
    """Figures rounded to 6 significant digits, so reruns write the same bytes."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, Mapping):
        return {str(k): _fmt(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_fmt(v) for v in value]
    return value


def build_metadata(
    recipe_raw: Mapping, results: Sequence[Any], verification: Mapping, kind: str
) -> dict[str, str]:
    """`metadata_props` for the ONNX file: attnc's version, the recipe, the passes applied (with
    their decisions) and the verification figures. No times or paths: reruns are identical."""
    from attnc import __version__

    passes = [
        {
            "id": r.pass_id,
            "config": r.config,
            "decisions": [
                {"site": d.site, "action": d.action, "reason": d.reason} for d in r.decisions
            ],
        }
        for r in results
    ]
    dump = lambda v: json.dumps(_fmt(v), sort_keys=True, default=str)  # noqa: E731
    return {
        "attnc.version": __version__,
        "attnc.model_kind": kind,
        "attnc.recipe": dump(recipe_raw),
        "attnc.passes": dump(passes),
        "attnc.verification": dump(verification),
    }


def set_metadata(model: Any, props: Mapping[str, str]) -> None:
    import onnx

    current = {p.key: p.value for p in model.metadata_props}
    current.update(props)
    onnx.helper.set_model_props(model, dict(sorted(current.items())))


def add_metadata(path: Path, props: Mapping[str, str]) -> None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)  # external weights stay on disk
    set_metadata(model, props)
    onnx.save(model, str(path))


# ----------------------------------------------------------------------------------------------
# deterministic .pt2


_EVAL_KEY = re.compile(r"<eval_with_key>\.\d+")


def strip_provenance(ep: torch.export.ExportedProgram) -> None:
    """Node provenance (`from_node`) records Python object ids, and stack traces through
    generated code name a process-wide counter (`<eval_with_key>.25`): drop / normalise both."""
    for gm in ep.graph_module.modules():
        if isinstance(gm, torch.fx.GraphModule):
            for node in gm.graph.nodes:
                node.meta.pop("from_node", None)
                trace = node.meta.get("stack_trace")
                if isinstance(trace, str):
                    node.meta["stack_trace"] = _EVAL_KEY.sub("<eval_with_key>", trace)


def strip_onnx_stack_traces(model: Any) -> None:
    """The exporter stores each node's Python stack trace (build-machine paths, a process-wide
    counter for generated code) in the node's metadata: drop it, so reruns write the same bytes."""
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            keep = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
            if len(keep) != len(node.metadata_props):
                del node.metadata_props[:]
                node.metadata_props.extend(keep)
            graphs.extend(a.g for a in node.attribute if a.HasField("g"))
            graphs.extend(g for a in node.attribute for g in a.graphs)


def fix_serialization_id(path: Path) -> None:
    """torch writes a random `serialization_id` into every archive; replace it, in place, with
    one derived from the archive's other contents (same length, CRCs updated)."""
    with zipfile.ZipFile(path) as zf:
        infos = [i for i in zf.infolist() if i.filename.endswith(".data/serialization_id")]
        if len(infos) != 1 or infos[0].compress_type != zipfile.ZIP_STORED:
            return
        info = infos[0]
        digest = 0
        for i in zf.infolist():
            if i is not info:
                digest = zlib.crc32(i.filename.encode() + struct.pack("<I", i.CRC), digest)
        start_dir = zf.start_dir
    old_len = info.file_size
    new = str(digest).rjust(old_len, "0")[:old_len].encode()
    crc = zlib.crc32(new)
    with open(path, "r+b") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        if local[:4] != b"PK\x03\x04":
            raise ExportError(f"{path.name}: unexpected zip layout")
        n, m = struct.unpack("<HH", local[26:30])
        f.seek(info.header_offset + 14)
        f.write(struct.pack("<I", crc))
        f.seek(info.header_offset + 30 + n + m)
        f.write(new)
        f.seek(start_dir)
        central = f.read()
        pos = 0
        target = info.filename.encode()
        while central[pos : pos + 4] == b"PK\x01\x02":
            n, m, k = struct.unpack("<HHH", central[pos + 28 : pos + 34])
            if central[pos + 46 : pos + 46 + n] == target:
                f.seek(start_dir + pos + 16)
                f.write(struct.pack("<I", crc))
                return
            pos += 46 + n + m + k
    raise ExportError(f"{path.name}: serialization id not found in the zip directory")
