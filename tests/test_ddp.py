"""Data parallel: train.py under torchrun with 2 CPU processes (gloo) trains what one process does with the
same global batch, rank 0 alone writes, and a 2-process run resumes."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_train import TINY  # noqa: E402

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is unavailable")
# 4 sequences (2 per process), two micro-batches, two PPO epochs, sampled budgets and a KL reference: every
# path where the processes' shares must add up to the batch. Its own seed: a base GPT that rank 0 pretrains.
ARGS = [*TINY, "--batch_size=4", "--grad_accum=2", "--ppo_epochs=2", "--sample_budgets", "--kl_coef=0.1", "--seed=2718"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def run(out, *args, procs=1):
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] if procs > 1 else [sys.executable]
    p = subprocess.run([*launch, str(ROOT / "train.py"), *ARGS, f"--out_dir={out}", *args], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_two_processes_train_as_one(tmp_path):
    base = None
    try:
        p = run(tmp_path / "two", procs=2)
        base = Path(re.search(r"base GPT: (?:saved to|reusing) (\S+)", p.stdout).group(1))
        run(tmp_path / "one")
        one = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)
        two = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)
        assert two["iter"] == one["iter"] == 3
        assert max_diff(two["policy"], one["policy"]) < 1e-5
        # every process drew the whole batch: the generators end where one process's do
        assert torch.equal(two["rng"]["torch"], one["rng"]["torch"]) and two["rng"]["numpy"] == one["rng"]["numpy"]
        # rank 0 alone logs, pretrains and writes
        for line in ("seed 2718 |", "base GPT: saved to", "wrote "):
            assert p.stdout.count(line) == 1, (line, p.stdout[-2000:])
        assert sorted(os.listdir(tmp_path / "two")) == ["ckpt.pt", "eval.json"]
        # a 2-process run stopped at iteration 2 and resumed, again on 2 processes, ends where one process does
        run(tmp_path / "resumed", "--max_iters=2", procs=2)
        p = run(tmp_path / "resumed", "--resume", procs=2)
        assert p.stdout.count("resuming") == 1
        resumed = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)
        assert resumed["iter"] == 3 and max_diff(resumed["policy"], one["policy"]) < 1e-5
    finally:
        if base is not None:
            base.unlink(missing_ok=True)


def test_batch_must_split_evenly(tmp_path):
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    p = subprocess.run([*launch, str(ROOT / "train.py"), *TINY, "--batch_size=3", f"--out_dir={tmp_path / 'out'}"], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode != 0 and "error: --batch_size=3 is the batch of all 2 processes together" in p.stderr
    assert not (tmp_path / "out").exists()
