"""The CUDA paths against their CPU twins: the decode step under sparse actions, the Triton fake-quant kernel, a
tiny train.py and eval.py on the GPU (compiled pretraining, bfloat16 autocast) and the memory guard. Skipped, one
line each, where torch finds no CUDA device; `.ci/gpu` runs them on a GPU machine."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import cli  # noqa: E402
import sol  # noqa: E402
from test_train import TINY  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
CFG = sol.GPTConfig(block_size=96, vocab_size=128, n_layer=2, n_head=4, n_embd=64, mlp_hidden=160)


@pytest.fixture(autouse=True)
def exact_float32():
    """float32 matmuls as float32 (no TF32), so CUDA and the CPU differ only in the order of their sums."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@torch.no_grad()
@pytest.mark.parametrize("criterion", sol.CRITERIA)
def test_a_decode_step_under_sparse_actions_matches_the_cpu(criterion):
    # Tolerance: float32 on both, only the summation order differs (~1e-6 relative per op); a near-tie in a top-n
    # selection (keys or channels) could pick another element on each device, so at most 1 row in 16 may
    # differ by more, and none by more than a single swapped element moves it
    torch.manual_seed(0)
    model = sol.GPT(CFG).eval()
    acfg = sol.ActionConfig(criterion=criterion, page_size=8)
    grid = sol.action_grid(acfg)
    x = torch.randint(0, CFG.vocab_size, (16, 65), generator=torch.Generator().manual_seed(1))
    a = torch.randint(0, len(grid.values), (16,), generator=torch.Generator().manual_seed(2))
    out = {}
    for device in ("cpu", "cuda"):
        m = model.to(device)
        cache, _ = sol.prefill(m, x[:, :64].to(device), 64, 1)
        logits, _ = m(x[:, 64:].to(device), cache, grid.values.to(device)[a.to(device)], acfg)
        out[device] = logits[:, -1].float().cpu()
    err = (out["cuda"] - out["cpu"]).abs().amax(-1)
    assert (err > 1e-4).sum() <= 1 and err.max() < 0.5, err


def test_the_triton_kernel_matches_the_vectorized_fake_quant_on_the_gpu():
    # Triton's float division need not round as torch's does, so a value that lands on a rounding boundary may take
    # the neighbouring level: at most one step (its row's scale) apart, and rarely
    pytest.importorskip("triton")
    torch.manual_seed(0)
    x = (torch.randn(64, 4, 384) * torch.logspace(-3, 4, 64).view(64, 1, 1)).cuda()
    for bits in ([5, 8, 12, 16] * 16, [4] * 64):
        bits = torch.tensor(bits, dtype=torch.float32, device="cuda")
        ours, ref = sol.fake_quant_triton(x, bits), sol.fake_quant_torch(x, bits)
        step = x.abs().amax(-1, keepdim=True) / (2.0 ** (bits.view(-1, 1, 1) - 1) - 1)
        assert ((ours - ref).abs() <= step * 1.001).all() and (ours != ref).float().mean() < 1e-3


def run(script, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_train_and_eval_on_the_gpu_match_eval_on_the_cpu(tmp_path):
    # train.py on the GPU: compiled pretraining in bfloat16 autocast, GRPO, its own evaluation. eval.py on the GPU and
    # on the CPU then score the same policy and base: float32 on both, so the same choices and NLLs up to the order of
    # sums; a near-tie in a greedy argmax may flip one step, hence 1e-3 relative on the NLL, 0.02 on each budget
    out = tmp_path / "out"
    p = run("train.py", *TINY, "--device=cuda", f"--out_dir={out}")
    assert p.returncode == 0 and "device cuda" in p.stdout, p.stderr[-3000:]
    rows = {}
    for device in ("cuda", "cpu"):
        p = run("eval.py", f"--out_dir={out}", f"--device={device}", "--val_episodes=8", "--eval_episodes=16", "--search_schedules=4",
                "--bootstrap=50", "--plot=false")
        assert p.returncode == 0, p.stderr[-3000:]
        rows[device] = {r["method"]: r for r in json.loads((out / "eval.json").read_text())["results"]}
    assert set(rows["cuda"]) == set(rows["cpu"]) >= {"sol", "dense", "static", "oracle"}
    for m, r in rows["cuda"].items():
        assert abs(r["nll"] - rows["cpu"][m]["nll"]) <= 1e-3 * rows["cpu"][m]["nll"], m
        assert all(abs(v - rows["cpu"][m]["achieved"][k]) <= 0.02 * (16 if k == "bits" else 1) for k, v in r["achieved"].items()), m


def test_the_memory_guard_refuses_a_bomb_on_the_gpu_before_allocating(tmp_path):
    torch.cuda.reset_peak_memory_stats()
    held = torch.cuda.memory_allocated()
    free = cli.free_memory("cuda")
    with pytest.raises(ValueError, match="GiB of memory, more than the .* free on cuda; lower it"):
        cli.check_memory([("a bomb", 2 * free, "lower it")], "cuda")
    assert torch.cuda.max_memory_allocated() == held  # nothing was allocated to find out
    p = run("train.py", *TINY, "--device=cuda", "--batch_size=100000000", f"--out_dir={tmp_path / 'out'}")
    assert p.returncode == 2 and "needs about" in p.stderr and "free on cuda" in p.stderr, p.stderr[-2000:]
