"""moh's per-site fit on calibration samples (`moh_calib.SiteCalib`): shared heads, router
parameters, gate values, optional distillation, and the local fidelity cost.

Router scores per token and head, (N, H):
- query-norm: a_h * ||q_h|| + c_h (a = 1, c = 0: the LLaMA3 conversion's parameter-free router;
  RoPE rotates q in pairs, so the norm of the call's q is the pre-RoPE query norm);
- linear: x W^T + b, least squares of each head's contribution norm on the q-projection input.
Per token, the shared heads plus the highest-scoring routed heads run (`k_total` in all).
Gate values (H,): 1 (binary), or the least-squares per-head scale of the kept heads' outputs
against the full attention output (weighted). `distill_steps` Adam steps then fit the router
(a, c or W, b; relaxed top-k) and, for weighted gates, the gate values against the original
attention-branch output (the layer's attention output after the output projection); the model's
own weights are never touched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .moh_calib import SiteCalib


@dataclass
class SitePlan:
    shared: list[int]
    k_total: int
    router: str
    params: dict[str, list]  # a, c (query-norm) or w, b (linear); gate: the gate values
    metrics: dict


def scores(router: str, params: dict, cal: SiteCalib) -> torch.Tensor:
    """(N, H) router scores of the sampled tokens."""
    if router == "query-norm":
        return cal.qn * params["a"][None] + params["c"][None]
    return cal.x @ params["w"].T + params["b"][None]


def select(s: torch.Tensor, shared: torch.Tensor, k_total: int) -> torch.Tensor:
    """(N, H) bool: shared heads plus the top scoring others, as the graph's gate computes."""
    s = s.float() + torch.where(shared, float("inf"), 0.0)[None]
    kth = s.topk(k_total, dim=1).values[:, -1:]  # (N, 1)
    return s >= kth


def contributions(cal: SiteCalib) -> torch.Tensor:
    """(N, H, E) each head's output through the output projection."""
    H = cal.heads
    return torch.einsum("nhd,ehd->nhe", cal.o, cal.w_o.reshape(cal.w_o.shape[0], H, -1))


def _lsq_gate(y: torch.Tensor, keep: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    my = y * keep[..., None].float()  # (N, H, E)
    G = torch.einsum("nhe,nke->hk", my.double(), my.double())
    r = torch.einsum("nhe,ne->h", my.double(), full.double())
    G = G + 1e-6 * G.diagonal().mean().clamp_min(1e-12) * torch.eye(len(r), dtype=G.dtype)
    return torch.linalg.solve(G, r).float()


def _cost(y, gate_nh, full) -> dict:
    out = (y * gate_nh[..., None]).sum(1)  # (N, E)
    err = ((out - full) ** 2).sum() / (full**2).sum().clamp_min(1e-30)
    cos = torch.nn.functional.cosine_similarity(out, full, dim=-1).mean()
    return {"branch_rel_err": round(float(err), 6), "branch_cosine": round(float(cos), 6)}


def fit_site(cal: SiteCalib, n_shared: int, k_total: int, router: str, gates: str,
             distill_steps: int, lr: float, seed: int = 0) -> SitePlan:
    H = cal.heads
    order = torch.argsort(cal.importance, descending=True, stable=True)
    shared_idx = sorted(int(h) for h in order[:n_shared])
    shared = torch.zeros(H, dtype=torch.bool)
    shared[shared_idx] = True
    if router == "query-norm":
        params = {"a": torch.ones(H), "c": torch.zeros(H)}
    else:
        reg = 1e-4 * cal.xtx.diagonal().mean() * torch.eye(cal.xtx.shape[0], dtype=cal.xtx.dtype)
        sol = torch.linalg.solve(cal.xtx + reg, cal.xty).float()  # (E+1, H)
        params = {"w": sol[:-1].T.contiguous(), "b": sol[-1].contiguous()}
    y = contributions(cal)  # (N, H, E)
    full = y.sum(1)  # (N, E)
    keep = select(scores(router, params, cal), shared, k_total)
    gate = torch.ones(H)
    if gates == "weighted":
        gate = _lsq_gate(y, keep, full)
    before = _cost(y, keep.float() * gate[None], full)
    trail = []
    if distill_steps > 0 and k_total > n_shared:
        params, gate, trail = _distill(cal, y, full, shared, k_total, router, params, gate,
                                       gates == "weighted", distill_steps, lr, seed)
        keep = select(scores(router, params, cal), shared, k_total)
    cost = _cost(y, keep.float() * gate[None], full)
    load = keep.float().mean(0)  # (H,) share of tokens that run each head
    metrics = {
        "shared_heads": shared_idx,
        "importance": [round(float(v), 5) for v in cal.importance],
        "load": [round(float(v), 4) for v in load],
        "active_heads": k_total,
        "heads": H,
        "gate_values": [round(float(v), 5) for v in gate],
        "calib_tokens": cal.tokens,
        "fit_tokens": int(len(cal.x)),
        **cost,
    }
    if distill_steps > 0:
        metrics["before_distill"] = before
        metrics["distill_trail"] = trail
    out_params = {k: v.tolist() for k, v in params.items()}
    out_params["gate"] = gate.tolist()
    return SitePlan(shared_idx, k_total, router, out_params, metrics)


def _distill(cal, y, full, shared, k_total, router, params, gate, fit_gate, steps, lr, seed):
    """Adam on the router parameters and, when `fit_gate`, the gate values, minimising the
    relative error of the gated branch output on batches of calibration tokens. The top-k is
    relaxed to a sigmoid around each token's k-th/(k+1)-th score midpoint whose temperature
    anneals from half the score spread to 2% of it (a straight-through hard top-k did not move
    the router: measured no change in 200 steps). Step sizes are relative to each tensor's scale
    (scores' spread over the input's). The checkpoint with the lowest exact (hard top-k) error on
    all sampled tokens is kept, so distillation never makes the sampled error worse."""
    g = torch.Generator().manual_seed(seed)
    p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    gv = gate.clone().requires_grad_(fit_gate)
    with torch.no_grad():
        spread = float(scores(router, p, cal).std().clamp_min(1e-6))
    if router == "linear":
        step_of = {"w": spread / max(float(cal.x.std()), 1e-6) / cal.x.shape[1] ** 0.5,
                   "b": spread}
    else:
        step_of = {"a": max(float(p["a"].detach().abs().mean()), 1e-6), "c": spread}
    groups = [{"params": [v], "lr": lr * step_of[k]} for k, v in p.items()]
    opt = torch.optim.Adam(groups + ([{"params": [gv], "lr": lr}] if fit_gate else []), lr=lr)
    n = len(cal.x)
    norm = (full**2).sum(-1).mean().clamp_min(1e-30)
    routed = ~shared
    k_r = k_total - int(shared.sum())
    trail = []

    def full_err() -> float:  # the exact (hard top-k) relative error on every sampled token
        with torch.no_grad():
            gate_nh = select(scores(router, p, cal), shared, k_total).float() * gv[None]
            return float(((y * gate_nh[..., None]).sum(1) - full).pow(2).sum(-1).mean() / norm)

    best = (full_err(), {k: v.detach().clone() for k, v in p.items()}, gv.detach().clone())
    trail.append({"step": 0, "rel_err": round(best[0], 6)})
    for step in range(1, steps + 1):
        idx = torch.randint(0, n, (min(n, 1024),), generator=g)
        sub = SiteCalib(cal.site, cal.heads, 0, cal.importance, cal.xtx, cal.xty, cal.x[idx],
                        cal.qn[idx], cal.o[idx], cal.w_o)
        s = scores(router, p, sub)[:, routed]  # (n, R) routed heads' scores
        sd = s.detach()
        top = sd.topk(min(k_r + 1, sd.shape[1]), dim=1).values  # (n, k_r + 1)
        thr = (top[:, k_r - 1] + top[:, -1]) / 2 if top.shape[1] > k_r else top[:, -1] - 1
        tau = sd.std().clamp_min(1e-6) * (0.02 + 0.5 * (1.0 - step / (steps + 1)))
        on = torch.ones(len(idx), cal.heads)
        on[:, routed] = torch.sigmoid((s - thr[:, None]) / tau)  # relaxed top-k
        out = (y[idx] * (on * gv[None])[..., None]).sum(1)
        loss = ((out - full[idx]) ** 2).sum(-1).mean() / norm
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % max(1, steps // 10) == 0 or step == steps:
            err = full_err()
            trail.append({"step": step, "rel_err": round(err, 6)})
            if err < best[0]:
                best = (err, {k: v.detach().clone() for k, v in p.items()}, gv.detach().clone())
    return best[1], best[2], trail  # the best checkpoint: never worse than the start
