"""bench/run.py --smoke: the benchmark suite still runs end to end (issue 7).

No timing assertions: only that it completes, prints its tables, and stops
every process it started.  Redis is left out (--smoke never uses it).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import base_env

BENCH = Path(__file__).resolve().parents[2] / "bench" / "run.py"


def test_bench_smoke_completes_and_prints_the_table(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(BENCH), "--smoke", "--save", str(out)], env=base_env(),
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    table = r.stdout
    for heading in ("== unbatched:", "== batched:", "== rtt:", "== multi-unbatched:", "== multi-batched:",
                    "== cli:", "== depth:", "== targets =="):
        assert heading in table, f"{heading!r} missing from:\n{table}"
    assert "ipcd recv_many(ack=prev)" in table and "floor: relay" in table
    doc = json.loads(out.read_text())
    assert doc["meta"]["mode"] == "smoke"
    scenarios = {row["scenario"] for row in doc["results"]}
    assert {"unbatched", "batched", "rtt", "multi-unbatched", "multi-batched", "cli", "depth"} <= scenarios
    # worker: either measured or skipped with a reason, never silently absent
    assert "worker" in scenarios or any(s["scenario"] == "worker" for s in doc["skipped"])
    assert all(row["runs"] >= 1 for row in doc["results"])
