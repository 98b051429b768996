"""Every kernel variant compiles for an H100 (sm_90a) offline, with Triton's bundled ptxas and no
GPU, and takes Hopper's fast forms: wgmma dots, TMA copies for the descriptor variant (no
cp.async left), no register spills. Runs benchmarks/sm90_compile.py in a subprocess (the kernel
tests import Triton in interpreter mode, which cannot compile)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.kernels.conftest import GPU


@pytest.mark.slow  # compiles every variant to sm90 machine code (minutes on 2 cores)
@pytest.mark.skipif(GPU, reason="the GPU suite compiles for its own device")
def test_every_variant_compiles_for_sm90(root, tmp_path):
    out = tmp_path / "sm90.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "sm90_compile.py"), "--quick",
                        "--cases", "dense causal,na2d,block", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    assert len(rows) == 2 + 6 + 2  # dense causal x load, na2d x 3 loops x load, block x load
    for row in rows:
        assert "error" not in row, row
        ops = row["ops"]
        assert ops["wgmma"] >= 2 and ops["mma_sync"] == 0, row
        assert row["spill_store_bytes"] == 0 and row["spill_load_bytes"] == 0, row
        if row["config"].get("kv_tma"):
            assert ops["tma_load"] > 0 and ops["cp_async"] == 0, row
        else:
            assert ops["tma_load"] == 0 and ops["cp_async"] > 0, row
