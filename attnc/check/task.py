"""Task-level fidelity of an optimized model against its original, on held-out data.

- causal LMs: bits per byte and perplexity on the text, next-token top-1 agreement and
  KL(original ‖ optimized) per token;
- encoders: cosine of sentence embeddings (mean pooling over real tokens, L2-normalized, as
  sentence-transformers uses them) and nearest-neighbour retrieval agreement among the sentences;
- vision encoders: cosine of mean-pooled features.

The candidate can be a torch program (.pt2, a build folder, any loadable model) or an ONNX file
run in ONNX Runtime, so the deployment artifact itself is what gets measured.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from attnc.errors import UsageError
from attnc.load.calibration import Batch, CalibrationConfig, load_calibration

Runner = Callable[..., Any]


def _out(x: Any) -> torch.Tensor:
    from attnc.check.fidelity import _first

    return _first(x).float()


def lm_metrics(run: Runner, ref: Runner, batches: Sequence[Batch], tokenizer: Any) -> dict:
    """bits/byte, perplexity, top-1 agreement and KL on next-token prediction over real tokens."""
    nll_o = nll_r = kl = agree = n_tok = n_bytes = 0.0
    with torch.no_grad():
        for b in batches:
            ids = b.args[0]
            mask = b.token_mask if b.token_mask is not None else torch.ones_like(ids)
            lo, lr = _out(run(*b.args)), _out(ref(*b.args))
            if lo.shape[1] < lr.shape[1]:  # token-pruned: the text after the image aligns
                k = min(_text_after_image(ids, mask), lo.shape[1])
                lr, ids, mask = lr[:, -k:], ids[:, -k:], mask[:, -k:]
                lo = lo[:, -k:]
            lo, lr = lo[:, :-1], lr[:, :-1]  # (B, S-1, V)
            tgt = ids[:, 1:]
            valid = (mask[:, 1:] * mask[:, :-1]).bool()  # (B, S-1)
            logp_o, logp_r = F.log_softmax(lo, -1), F.log_softmax(lr, -1)
            nll_o += float(-logp_o.gather(-1, tgt[..., None])[..., 0][valid].sum())
            nll_r += float(-logp_r.gather(-1, tgt[..., None])[..., 0][valid].sum())
            kl_tok = (logp_r.exp() * (logp_r - logp_o)).sum(-1)  # (B, S-1)
            kl += float(kl_tok[valid].sum())
            agree += float((lo.argmax(-1) == lr.argmax(-1))[valid].sum())
            n_tok += float(valid.sum())
            n_bytes += sum(
                _n_bytes(tokenizer, row[v].tolist()) for row, v in zip(tgt, valid, strict=True)
            )
    if n_tok == 0:
        raise UsageError("no tokens to evaluate")
    ln2 = math.log(2)
    return {
        "bits_per_byte": nll_o / ln2 / max(n_bytes, 1.0),
        "bits_per_byte_original": nll_r / ln2 / max(n_bytes, 1.0),
        "bits_per_byte_delta": (nll_o - nll_r) / ln2 / max(n_bytes, 1.0),
        "bits_per_byte_increase": (nll_o - nll_r) / max(nll_r, 1e-12),  # relative (0.1 = +10%)
        "perplexity": math.exp(nll_o / n_tok),
        "perplexity_original": math.exp(nll_r / n_tok),
        "top1_agreement": agree / n_tok,
        "kl": max(kl / n_tok, 0.0),
        "tokens": int(n_tok),
        "bytes": int(n_bytes),
    }


def _text_after_image(ids: torch.Tensor, mask: torch.Tensor) -> int:
    """Positions after the image in every row: the image is each row's longest run of one id
    among real tokens (a VLM's image tokens), which token pruning thins; what follows is kept."""
    ends = []
    for row, m in zip(ids.tolist(), mask.tolist(), strict=True):
        best, run, end = 0, 0, 0
        for i, t in enumerate(row):
            run = run + 1 if i and t == row[i - 1] and m[i - 1] else int(bool(m[i]))
            best, end = (run, i) if run > best else (best, end)
        ends.append(len(row) - 1 - end)
    return min(ends)


def _n_bytes(tokenizer: Any, ids: list[int]) -> int:
    if tokenizer is None:
        return len(ids)
    return len(tokenizer.decode(ids, skip_special_tokens=True).encode("utf-8"))


def _pool(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if hidden.dim() == 2:
        return F.normalize(hidden, dim=-1)
    if mask is None or tuple(mask.shape) != tuple(hidden.shape[:2]):
        mask = torch.ones(hidden.shape[:2])
    m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, S, 1)
    return F.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)  # (B, C)


def embedding_metrics(run: Runner, ref: Runner, batches: Sequence[Batch], retrieval: bool) -> dict:
    """Cosine of pooled, normalized embeddings; nearest-neighbour agreement among all samples."""
    eo, er = [], []
    agree, rows = 0, 0  # a classifier's (B, C) output: does the predicted class stay?
    with torch.no_grad():
        for b in batches:
            o, r = _out(run(*b.args)), _out(ref(*b.args))
            eo.append(_pool(o, b.token_mask))
            er.append(_pool(r, b.token_mask))
            if rows is not None and o.dim() == 2 and o.shape == r.shape and o.shape[-1] > 1:
                agree += int((o.argmax(-1) == r.argmax(-1)).sum())
                rows += int(o.shape[0])
            else:
                rows = None
    eo_t, er_t = torch.cat(eo), torch.cat(er)  # (N, C)
    cos = (eo_t * er_t).sum(-1)
    out = {
        "embedding_cosine": float(cos.mean()),
        "embedding_cosine_min": float(cos.min()),
        "samples": int(eo_t.shape[0]),
    }
    if rows:
        out["prediction_agreement"] = agree / rows
    if retrieval and eo_t.shape[0] > 2:
        eye = torch.eye(eo_t.shape[0], dtype=torch.bool)
        nn_o = (eo_t @ eo_t.T).masked_fill(eye, -2).argmax(-1)
        nn_r = (er_t @ er_t.T).masked_fill(eye, -2).argmax(-1)
        out["retrieval_agreement"] = float((nn_o == nn_r).float().mean())
    return out


def task_metrics(
    kind: str, run: Runner, ref: Runner, batches: Sequence[Batch], tokenizer: Any = None
) -> dict:
    """Next-token metrics where the output is next-token logits over the input ids (causal-lm,
    vlm); elsewhere (encoder, vision, speech, seq2seq decoder outputs, custom) the outputs are
    compared as pooled embeddings."""
    if kind in ("causal-lm", "vlm"):
        return lm_metrics(run, ref, batches, tokenizer)
    out = embedding_metrics(run, ref, batches, retrieval=kind in ("encoder", "custom"))
    if batches and all(b.labels is not None for b in batches):
        out.update(label_metrics(run, ref, batches))
    return out


def label_metrics(run: Runner, ref: Runner, batches: Sequence[Batch]) -> dict:
    """Accuracy of both models on labelled samples (a classifier's (B, C) logits), and how
    often they agree; empty when the output is not one score row per sample."""
    hit_o = hit_r = agree = n = 0
    with torch.no_grad():
        for b in batches:
            lo, lr = _out(run(*b.args)), _out(ref(*b.args))
            if lo.dim() != 2 or lo.shape[0] != b.labels.shape[0]:
                return {}
            po, pr = lo.argmax(-1), lr.argmax(-1)
            hit_o += int((po == b.labels).sum())
            hit_r += int((pr == b.labels).sum())
            agree += int((po == pr).sum())
            n += int(b.labels.shape[0])
    return {
        "accuracy_original": hit_r / n,
        "accuracy_optimized": hit_o / n,
        "accuracy_drop_points": 100.0 * (hit_r - hit_o) / n,
        "prediction_agreement": agree / n,
        "labelled_samples": n,
    }


# ----------------------------------------------------------------------------------------------
# resolving what to evaluate


@dataclass
class Evaluable:
    run: Runner
    input_names: list[str]
    kind: str | None
    source: str
    tokenizer: Any = None
    example_args: tuple | None = None
    original_source: str | None = None  # a build's source model, as its report names it
    original_file: str | None = None  # a build's original.pt2, captured at build time
    build_dir: str | None = None
    positions: int | None = None  # the longest sequence the model takes, where known


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")


def read_report(folder: Path) -> dict:
    """A build's report.json, checked enough to use: a cut-off or foreign file is one line."""
    path = folder / "report.json"
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"{path} is not valid JSON (line {exc.lineno}: {exc.msg}); is it cut off?",
            "rebuild the folder with attnc optimize",
        ) from None
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text") from None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    model = report.get("model") if isinstance(report, dict) else None
    ok = (
        isinstance(model, dict)
        and isinstance(model.get("inputs"), list)
        and all(isinstance(n, str) for n in model["inputs"])
        and isinstance(model.get("kind"), str)
    )
    if not ok:
        raise UsageError(f"{path} is not an attnc build report (no model.inputs and model.kind)")
    return report


def _source_path(folder: Path, model: dict) -> str | None:
    """The report's source, as recorded (absolute) or relative to the build folder."""
    src = model.get("source")
    rel = model.get("source_relative")
    for cand in (src, str(folder / rel) if isinstance(rel, str) else None):
        if isinstance(cand, str) and Path(cand.rsplit(":", 1)[0] if ":" in cand else cand).exists():
            return cand
    return src if isinstance(src, str) else None


def _data_tokenizer(folder: Path, source: str | None) -> Any:
    """A tokenizer read as data (no remote code): from the build folder, else from a source that
    is a Hugging Face folder. None if neither has one."""
    for where in (folder, Path(source) if source else None):
        if where is None or not where.is_dir():
            continue
        if not any((where / n).exists() for n in TOKENIZER_FILES):
            continue
        try:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(
                str(where), local_files_only=True, trust_remote_code=False
            )
        except Exception:  # noqa: BLE001 - a tokenizer is optional here
            continue
    return None


def resolve(spec: str, *, onnx: bool = False, trust_pickle: bool = False) -> Evaluable:
    """A build folder (its model.pt2, or model.onnx with `onnx`), a .pt2, an .onnx file, or any
    model `attnc optimize` can load. A build folder runs no code: its source is only named."""
    from attnc.check.fidelity import ort_runner
    from attnc.load.models import load_model

    p = Path(spec)
    if _is_build(p):
        report = read_report(p)
        target = p / ("model.onnx" if onnx else "model.pt2")
        if not target.exists():
            raise UsageError(f"{p} has no {target.name}")
        ev = resolve(str(target))
        ev.input_names, ev.kind = report["model"]["inputs"], report["model"]["kind"]
        ev.original_source = _source_path(p, report["model"])
        ev.original_file = str(p / "original.pt2") if (p / "original.pt2").exists() else None
        ev.build_dir = str(p)
        ev.tokenizer = ev.tokenizer or _data_tokenizer(p, ev.original_source)
        return ev
    if p.suffix == ".onnx":
        if not p.exists():
            raise UsageError(f"model not found: {spec}")
        import onnxruntime as ort

        names = [i.name for i in ort.InferenceSession(str(p)).get_inputs()]
        return Evaluable(ort_runner(str(p), names), names, None, spec)
    loaded = load_model(spec, trust_pickle=trust_pickle)
    module = loaded.module
    ep = loaded.extra.get("pt2")

    def run(*args):
        with torch.no_grad():
            return module(*args)

    return Evaluable(
        run,
        loaded.input_names,
        loaded.kind if loaded.kind != "custom" else None,
        spec,
        loaded.tokenizer,
        loaded.example_args,
        positions=_pt2_positions(ep) if ep is not None else _config_positions(loaded.config),
    )


def _pt2_positions(ep: Any) -> int | None:
    """The longest sequence an exported program accepts: the upper bound torch.export proved for
    the sequence dims (axis 1) of its inputs, where one is finite."""
    names = {s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"}
    bounds = []
    for node in ep.graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" and node.name in names else None
        if val is None or getattr(val, "dim", lambda: 0)() < 2:
            continue
        dim = val.shape[1]
        if not isinstance(dim, torch.SymInt):
            continue
        vr = ep.range_constraints.get(dim.node.expr)
        try:
            bounds.append(int(vr.upper))
        except (AttributeError, TypeError, ValueError, OverflowError):  # unbounded
            continue
    return min(bounds) if bounds else None


def _config_positions(config: Any) -> int | None:
    try:
        from attnc.load.calib_files import model_positions
    except ImportError:  # pragma: no cover - moved
        return None
    return model_positions(config) if config is not None else None


def _is_build(p: Path) -> bool:
    return p.is_dir() and (p / "report.json").exists()


def original_of_build(folder: Path, trust_source: bool) -> str:
    """What a build is compared with when --against is not given: its original.pt2, or (only
    with trust_source) the source model its report names. Decided before anything is loaded."""
    report = read_report(folder)
    if (folder / "original.pt2").exists():
        return str(folder / "original.pt2")
    source = _source_path(folder, report["model"])
    if not trust_source:
        raise UsageError(
            f"{folder} holds no original.pt2, and loading the source its report names "
            f"({source}) may run code",
            "pass --against ORIGINAL, or --trust-source to load that source",
        )
    if not source:
        raise UsageError(f"{folder}/report.json names no source model", "pass --against ORIGINAL")
    return source


def evaluate(
    model: str,
    against: str | None = None,
    data: str | None = None,
    *,
    onnx: bool = False,
    samples: int = 128,
    max_length: int = 256,
    batch_size: int = 16,
    trust_source: bool = False,
) -> dict:
    """Compare `model` with `against`; for a build, by default, with the original.pt2 captured
    when it was built. A build's source model is loaded only with `trust_source`."""
    if against is None and _is_build(Path(model)):
        against = original_of_build(Path(model), trust_source)
    if against is None:
        raise UsageError("nothing to compare with", "pass --against ORIGINAL")
    cand = resolve(model, onnx=onnx)
    orig = resolve(against)
    kind = cand.kind or orig.kind or "custom"
    tokenizer = orig.tokenizer or cand.tokenizer
    example = orig.example_args or cand.example_args
    if example is None:
        raise UsageError("cannot make inputs: neither model has example inputs")
    if data is None and kind not in ("vision", "speech"):
        raise UsageError(f"a {kind} model needs --data (JSONL text or token ids)")
    vocab = getattr(getattr(tokenizer, "backend_tokenizer", None), "get_vocab_size", None)
    known = [n for n in (cand.positions, orig.positions) if n]
    positions = min(known) if known else None
    if positions:  # packed rows are cut to what both models take, not past it
        max_length = min(max_length, positions)
    cfg = CalibrationConfig(
        samples=samples, max_length=max_length, batch_size=batch_size, holdout=0.0
    )
    ds = load_calibration(
        data,
        names=orig.input_names,
        example_args=example,
        tokenizer=tokenizer,
        vocab=vocab() if callable(vocab) else None,
        cfg=cfg,
        positions=positions,
    )
    batches = ds.calib
    metrics = task_metrics(kind, cand.run, orig.run, batches, tokenizer)
    return {
        "model": model,
        "against": against,
        "runtime": "onnxruntime" if onnx else "torch",
        "kind": kind,
        "data": ds.source,
        "metrics": metrics,
    }
