"""Site-taking `can_use_*` predicates (DESIGN.md: `can_use_<op>(site) -> reason | None`)."""

from __future__ import annotations

import dataclasses

from attnc.graph.sites import AttentionSite
from attnc.kernels import flash
from attnc.kernels.neighborhood import can_use_neighborhood_site

SITE = AttentionSite(index=0, layer=0, module="blocks.0.attn", node="sdpa", kind="self",
                     num_heads=8, num_kv_heads=2, head_dim=64, causal=False, mask="none",
                     scale=0.125, window=None, pattern="dense", q_proj=None, k_proj=None,
                     v_proj=None,
                     o_proj=None, residual_add=None, norm=None, block_style="pre-norm")


def test_neighborhood_site():
    assert can_use_neighborhood_site(SITE, 196, [14, 14], [7, 7]) is None
    assert can_use_neighborhood_site(SITE, 196, [-1, 14], [7, 7], [2, 1]) is None
    assert "cross" in can_use_neighborhood_site(dataclasses.replace(SITE, kind="cross"), 196,
                                                [14, 14], [7, 7])
    # a site's mask is carried as a key padding mask (issue 14 item 4); a score bias is not
    assert can_use_neighborhood_site(dataclasses.replace(SITE, mask="bool"), 196, [14, 14],
                                     [7, 7]) is None
    assert "alibi" in can_use_neighborhood_site(dataclasses.replace(SITE, score="alibi"), 196,
                                                [14, 14], [7, 7])
    assert "kv heads" in can_use_neighborhood_site(dataclasses.replace(SITE, num_kv_heads=3), 196,
                                                   [14, 14], [7, 7])
    assert can_use_neighborhood_site(SITE, 196, [14, 14], [15, 7]) is not None  # K > extent
    assert can_use_neighborhood_site(SITE, 195, [14, 14], [7, 7]) is not None  # 195 tokens


def test_flash_site():
    assert flash.can_use_flash_site(SITE) is None
    assert "head dim" in flash.can_use_flash_site(dataclasses.replace(SITE, head_dim=8))
    assert "kv heads" in flash.can_use_flash_site(dataclasses.replace(SITE, num_kv_heads=3))
