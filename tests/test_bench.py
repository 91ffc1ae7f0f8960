"""bench.py runs end to end and reports every figure (no timing is asserted: timings belong to the benchmark)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_reports_every_figure():
    p = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--json", "--reps=1", "--context_len=32", "--rollout_len=4",
                        "--batch_size=2", "--decode_context=64"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(p.stdout)
    r = report["results"]["default"]
    assert report["machine"]["matmul_gflops"] > 0 and r["pretrain_tokens_per_s"] > 0 and 0 < r["policy_flops_share"] < 1
    for K in ("K=1", "K=16"):
        assert r["grpo"][K]["episodes_per_s"] > 0 and r["grpo"][K]["peak_memory_mb"] >= 0
    assert set(r["decode_s"]) == {"step", "attention", "mlp"}
    assert {"dense", "keep 0.25", "prune 0.4", "bits 5"} <= set(r["decode_s"]["step"])
    assert {"dense", "keep 0.25", "masked keep 0.25"} <= set(r["decode_s"]["attention"])
    assert all(t > 0 for part in r["decode_s"].values() for t in part.values())
