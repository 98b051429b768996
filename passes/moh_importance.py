"""moh's head importance by loss change (`importance: loss`): per site and head, how much the
calibration loss rises when that one head's output is masked, streamed over the calibration
batches by the trial runner (`attnc.recipe.trials`): one copy of the program with a per-head
gate buffer after each site's attention call, each trial zeroes one head, the baseline (every
head on) runs once per batch.

The loss: next-token NLL (nats per token) for causal LMs; for every other kind the relative
squared change of the model's output against the unmasked output on the same batch (no labels
needed). Cost: heads x sites trials over the calibration batches (`max_batches` of them).
"""

from __future__ import annotations

from typing import Any

import torch

from attnc.check.fidelity import Memo, _first
from attnc.errors import PassError
from attnc.graph.edit import prune
from attnc.graph.gate import add_buffer, insert_head_gate
from attnc.recipe.trials import Objective, TrialRunner

from .sink_calibration import next_token_nll


def _objective(program, kind: str) -> Objective:
    if kind == "causal-lm":
        return Objective(next_token_nll, "next-token NLL (nats/token)", higher_is_better=False)
    ref = Memo(program)  # the unmasked output of each batch, computed once

    def distortion(out: Any, batch) -> float:
        o, r = _first(out).float(), _first(ref(*batch.args)).float()
        return float((o - r).pow(2).sum() / r.pow(2).sum().clamp_min(1e-30))

    return Objective(distortion, "relative output change", higher_is_better=False)


def loss_importance(program, sites, batches, max_batches: int = 8
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(site node -> (H,) rise of the loss when each head is masked, a summary for the
    decisions' metrics)."""
    batches = list(batches)[:max_batches]
    if not batches:
        raise PassError("moh importance: loss needs calibration batches (--calib)")
    work = program.clone()
    gm = work.gm
    nodes = {n.name: n for n in gm.graph.nodes}
    knobs: dict[str, torch.Tensor] = {}
    for s in sites:
        attn = nodes.get(s.node)
        if attn is None:
            raise PassError(f"moh importance: site {s.node} is not in the graph")
        dtype = attn.meta["val"].dtype
        g = add_buffer(gm, f"attnc_moh_mask_{s.node}", torch.ones(1, s.num_heads, 1, dtype=dtype),
                       before=attn, like=attn)  # (1, H, 1): broadcast over (B, H, S)
        insert_head_gate(gm, attn, g)
        knobs[s.node] = getattr(gm, g.target)
    prune(gm)
    gm.recompile()
    runner = TrialRunner(work, _objective(program, getattr(program, "kind", "")), knobs,
                         batches, [], budget=sum(s.num_heads for s in sites))
    out: dict[str, torch.Tensor] = {}
    for s in sites:
        rise = []
        for h in range(s.num_heads):
            mask = torch.ones(s.num_heads)
            mask[h] = 0.0
            t = runner.run(f"{s.node}.h{h}", {s.node: mask})
            rise.append(-t.gain)  # loss objectives: gain = baseline - score
        out[s.node] = torch.tensor(rise, dtype=torch.float32)
    summary = {"objective": runner.objective.name, "batches": len(batches),
               "baseline": round(-runner.baseline(), 6),
               "seconds": round(sum(t.seconds for t in runner.trials), 2)}
    return out, summary
