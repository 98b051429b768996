"""The pass interface and the pass manager.

A pass is a frozen config dataclass plus `plan(program, config, ctx) -> list[Decision]` (pure
analysis) and `apply(program, decisions, config) -> Program` (graph edits). Passes live in
`attnc.passes` and are found through the `attnc.passes` entry-point group, so a user's package can
add its own the same way; the core never imports them directly. A pass may also register `report`,
the renderer of its own section of report.md and its plots (`attnc.report.section`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, is_dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from attnc.errors import AttncError, PassError, RecipeError

if TYPE_CHECKING:
    from attnc.report.section import PassSection, ReportPart

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    """What a pass decided for one site (or sublayer): every site gets one, skips included."""

    site: str
    action: str  # e.g. "drop", "keep", "skip"
    reason: str
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def fired(self) -> bool:
        return self.action not in ("keep", "skip")


@dataclass(frozen=True)
class PassInfo:
    id: str
    config_cls: type
    plan: Callable[..., list[Decision]]
    apply: Callable[..., Any]
    exact: bool
    summary: str
    paper: str = ""
    # renders the pass's section of report.md and its plots (attnc.report.section); None: the
    # report shows the pass's decisions as a table
    report: Callable[[PassSection], ReportPart] | None = None


_REGISTRY: dict[str, PassInfo] = {}
GROUP = "attnc.passes"


def register_pass(info: PassInfo) -> PassInfo:
    if info.id in _REGISTRY:
        raise RuntimeError(
            f"pass {info.id!r} registered twice (import passes as attnc.passes.*, never bare)"
        )
    _REGISTRY[info.id] = info
    return info


def unregister_pass(pass_id: str) -> PassInfo:
    """Remove a registered pass (a test's or a session's own); an unknown id is a RecipeError."""
    if pass_id not in _REGISTRY:
        raise RecipeError(f"pass {pass_id!r} is not registered")
    return _REGISTRY.pop(pass_id)


def _entry_points():
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def get_pass(pass_id: str) -> PassInfo:
    if pass_id in _REGISTRY:
        return _REGISTRY[pass_id]
    eps = _entry_points()
    if pass_id not in eps:
        known = sorted(set(eps) | set(_REGISTRY))
        raise RecipeError(f"unknown pass id {pass_id!r}", f"known passes: {', '.join(known)}")
    eps[pass_id].load()
    if pass_id not in _REGISTRY:
        raise RecipeError(f"entry point {pass_id!r} did not register a pass")
    return _REGISTRY[pass_id]


def list_passes() -> list[PassInfo]:
    for name in _entry_points():
        get_pass(name)
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


@dataclass
class PassContext:
    """What a pass may read: calibration data, the unmodified program, the recipe's fidelity
    bound, and an evaluator that scores a candidate program against the original."""

    calibration: Any = None
    original: Any = None
    fidelity: Any = None
    evaluate: Callable[[Any], dict[str, float]] | None = None
    meets_bound: Callable[[dict[str, float]], bool] | None = None

    def trials(self, program: Any, objective: Any, knobs: dict[str, Any], **kw: Any) -> Any:
        """A trial runner (`attnc.recipe.trials`) over this context's calibration batches: the
        knobs are buffers of `program` flipped between runs; search and check batches apart."""
        from attnc.recipe.trials import runner_from_context

        return runner_from_context(self, program, objective, knobs, **kw)


@dataclass
class PassResult:
    pass_id: str
    config: dict[str, Any]
    decisions: list[Decision]
    seconds: float


def config_dict(config: Any) -> dict[str, Any]:
    return asdict(config) if is_dataclass(config) else dict(config or {})


def check_program(program: Any, where: str) -> None:
    try:
        program.gm.graph.lint()
        program.sites  # noqa: B018 - site discovery must still succeed on the edited graph
    except Exception as exc:  # noqa: BLE001
        raise PassError(f"graph check failed {where}: {exc}") from exc


def check_repeats(steps) -> None:
    """A pass listed twice runs twice (llm-drop twice drops twice as much): only when the later
    step says `repeat: true`, never by a copy-paste slip."""
    seen: dict[str, int] = {}
    for i, step in enumerate(steps):
        first = seen.setdefault(step.id, i)
        if first != i and not getattr(step, "repeat", False):
            raise RecipeError(
                f"pass {step.id!r} is listed twice (passes[{first}] and passes[{i}])",
                f"to run it again on purpose, add 'repeat: true' to passes[{i}]",
            )


def run_passes(program: Any, steps, ctx: PassContext) -> tuple[Any, list[PassResult]]:
    from attnc.capture.program import PassRecord

    check_repeats(steps)
    results: list[PassResult] = []
    done: list[str] = []
    for step in steps:
        info = get_pass(step.id)
        where = f"while running {info.id!r}" + (f" after {done}" if done else "")
        t0 = time.perf_counter()
        try:
            decisions = info.plan(program, step.config, ctx)
            program = info.apply(program, decisions, step.config)
        except AttncError as exc:
            if isinstance(exc, PassError):
                raise
            raise type(exc)(f"{exc.message} ({where})", exc.hint) from exc
        except Exception as exc:  # noqa: BLE001 - any bug in a pass is reported as a PassError
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PassError(f"{first} {where}") from exc
        check_program(program, f"after {info.id!r}")
        seconds = time.perf_counter() - t0
        changed = tuple(d.site for d in decisions if d.fired)
        program.history.append(PassRecord(info.id, config_dict(step.config), changed, seconds))
        results.append(PassResult(info.id, config_dict(step.config), decisions, seconds))
        done.append(info.id)
        log.info(
            "%s: %d decision(s), %d fired, %.1fs", info.id, len(decisions), len(changed), seconds
        )
    return program, results
