"""bench.py runs end to end and reports every figure (no timing is asserted: timings belong to the benchmark)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import bench  # noqa: E402
import sol  # noqa: E402


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


def test_op_counter_counts_every_operation_and_the_views():
    with bench.OpCounter() as c:
        x = torch.ones(3)  # ones: 1
        y = (x + 1).view(3, 1).t()  # add, view, t: 3, two of them views
        y.sum()  # 1
    assert (c.ops, c.views) == (5, 2)


@pytest.mark.parametrize("criterion", sol.CRITERIA)
def test_a_sampled_step_costs_at_most_half_again_the_operations_of_a_dense_one(criterion):
    """Counted, not timed: the per-layer aten operations of one rollout step under sampled actions against the same
    step without actions. Quest scores pages, two more products and their bounds: it is held to 2x."""
    bc = bench.BenchConfig(batch_size=2, context_len=40, rollout_len=4, dtype="float32")  # what main picks for the built-in GPT
    gcfg = sol.GPTConfig(vocab_size=64, n_embd=32, n_head=2, mlp_hidden=48)
    ops = bench.step_ops(gcfg, sol.ActionConfig(criterion=criterion), bc, "cpu", K=4)
    assert ops["dense"]["per_layer"] > 50 and ops["sampled"]["per_layer"] > ops["dense"]["per_layer"]
    assert ops["sampled"]["per_layer"] <= (2.0 if criterion == "quest" else 1.5) * ops["dense"]["per_layer"], ops
