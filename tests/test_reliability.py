"""Reliability: kill and resume bit for bit, numerics over the whole action grid, sparse-mask invariants,
NaN-safe GRPO, safe checkpoint loading, and one clear line for every bad invocation."""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings, strategies as st

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import schedules  # noqa: E402
import sol  # noqa: E402
import train  # noqa: E402
from test_train import TINY  # noqa: E402

CFG = sol.GPTConfig(block_size=64, vocab_size=64, n_layer=2, n_head=2, n_embd=32, mlp_hidden=48)
# these models are tiny: one thread is faster, and ten times faster when other work shares the two cores
ENV = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")  # no progress bars: stderr holds what was said


def run(*args):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)

# -----------------------------------------------------------------------------
# kill and resume


def stamp(path):
    try:
        s = os.stat(path)
        return s.st_ino, s.st_mtime_ns
    except FileNotFoundError:
        return None


def signal_when_written(args, log, paths, sig, writes):
    """Start train.py, send `sig` once `paths` have been (re)written `writes` times, wait; returns (exit code, stderr)."""
    seen = [stamp(f) for f in paths]
    with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
        p = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=ENV, stdout=out, stderr=err)
        while p.poll() is None:
            now = [stamp(f) for f in paths]
            writes -= sum(a not in (None, b) for a, b in zip(now, seen))
            seen = now
            if writes <= 0:
                p.send_signal(sig)
                break
            time.sleep(0.002)
        p.wait(60)
    return p.returncode, Path(f"{log}.err").read_text()


def test_killed_anywhere_and_resumed_gives_the_same_results(tmp_path):
    # own seed and pretraining length: a base GPT of its own, so the killed run really pretrains
    args = [*TINY, "--seed=4242", "--pretrain_iters=150", "--max_iters=40", "--ckpt_interval=1"]
    p = run(*args, f"--out_dir={tmp_path / 'ref'}")
    assert p.returncode == 0, p.stderr[-2000:]
    expected = json.loads((tmp_path / "ref" / "eval.json").read_text())["results"]
    base = Path(re.search(r"base GPT: (?:saved to|reusing) (\S+)", p.stdout).group(1))
    partial, out = Path(f"{base}.partial"), tmp_path / "killed"
    ckpt = out / "ckpt.pt"
    try:
        base.unlink()
        landed = []
        # pretraining: SIGKILL, then SIGINT (saves, exits 130); GRPO: SIGKILL, SIGTERM (saves, exits 143), SIGKILL
        for i, (sig, paths, writes) in enumerate([(signal.SIGKILL, [partial, ckpt], 30), (signal.SIGINT, [partial, ckpt], 30),
                                                  (signal.SIGKILL, [ckpt], 10), (signal.SIGTERM, [ckpt], 5), (signal.SIGKILL, [ckpt], 5)]):
            resume = ["--resume"] if ckpt.exists() else []  # before GRPO has saved, a rerun continues pretraining
            code, err = signal_when_written([*args, f"--out_dir={out}", *resume], tmp_path / str(i), paths, sig, writes)
            assert code == (-9 if sig == signal.SIGKILL else 128 + sig), err[-2000:]
            if sig != signal.SIGKILL:  # one line: what was saved and the command that continues
                last = err.strip().splitlines()[-1]
                assert last.startswith(f"{sig.name}: saved ") and "to continue, run " in last and "python train.py " in last, last
                assert last.endswith("--resume") == ckpt.exists(), last
            if not base.exists():
                landed.append("pretrain")
            elif ckpt.exists() and torch.load(ckpt, weights_only=True)["iter"] < 40:
                landed.append("grpo")
        assert landed.count("pretrain") >= 2 and landed.count("grpo") >= 2, landed
        p = run(*args, f"--out_dir={out}", "--resume")
        assert p.returncode == 0, p.stderr[-2000:]
        assert json.loads((out / "eval.json").read_text())["results"] == expected
        assert not partial.exists() and not [f for f in os.listdir(out) if f.endswith(".tmp")]
    finally:
        base.unlink(missing_ok=True)
        partial.unlink(missing_ok=True)

# -----------------------------------------------------------------------------
# train.py in this process: finished runs, T=1 and B=1, NaN rewards


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "out"
    train.main([*TINY, f"--out_dir={out}"])
    return out


def test_finished_run_is_kept_unless_overwrite(finished, tmp_path, capsys):
    work = tmp_path / "out"
    shutil.copytree(finished, work)
    before = {f: (work / f).read_bytes() for f in ("ckpt.pt", "eval.json")}
    with pytest.raises(train.UsageError, match="already holds a run, stopped at GRPO iteration 3 of 4; pass --resume.*--overwrite"):
        train.main([*TINY, f"--out_dir={work}", "--max_iters=4"])
    assert {f: (work / f).read_bytes() for f in before} == before
    capsys.readouterr()
    train.main([*TINY, f"--out_dir={work}", "--overwrite"])
    said = capsys.readouterr().out  # the run says where everything went
    assert re.search(r"base GPT: (saved to|reusing) \S+base-\w+\.pt", said)
    assert f"wrote {work / 'eval.json'} and {work / 'ckpt.pt'}" in said
    assert json.loads((work / "eval.json").read_text())["results"] == json.loads(before["eval.json"])["results"]


def test_resume_with_a_kl_reference_is_exact(tmp_path):
    # the frozen reference policy is built before the generators are restored, from the saved initial policy
    results = []
    for name, runs in (("straight", [[]]), ("resumed", [["--max_iters=2"], ["--resume"]])):
        for extra in runs:
            train.main([*TINY, "--kl_coef=0.1", f"--out_dir={tmp_path / name}", *extra])
        results.append(json.loads((tmp_path / name / "eval.json").read_text())["results"])
    assert results[0] == results[1]


def test_one_step_rollouts_and_one_sequence_batches_train(tmp_path):
    train.main([*TINY, "--rollout_len=1", "--batch_size=1", f"--out_dir={tmp_path / 'out'}"])
    rows = json.loads((tmp_path / "out" / "eval.json").read_text())["results"]
    assert all(math.isfinite(r["nll"]) and r["tokens"] == 8 for r in rows)


def test_nan_reward_skips_the_update_not_the_policy(tmp_path, monkeypatch, capsys):
    real, calls = sol.rollout, []

    def rollout(*args, **kwargs):  # the sampled rollouts of GRPO iteration 2 (one rollout call each) get a NaN log-prob in one row
        out = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            out["logp"][1, 0] = float("nan")
        return out
    monkeypatch.setattr(sol, "rollout", rollout)
    train.main([*TINY, f"--out_dir={tmp_path / 'out'}", "--ckpt_interval=1", "--kl_coef=0.1"])  # the KL term keeps initial_policy
    said = capsys.readouterr()
    assert "warning: iteration 2: non-finite reward, advantage or loss; update skipped (1 so far)" in said.err + said.out
    assert "1 of 3 GRPO updates were skipped" in said.out
    state = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert state["skipped"] == 1 and all(torch.isfinite(v).all() for v in state["policy"].values())
    assert any(not torch.equal(state["policy"][k], state["initial_policy"][k]) for k in state["policy"])  # others updated
    assert all(math.isfinite(r["nll"]) for r in json.loads((tmp_path / "out" / "eval.json").read_text())["results"])

# -----------------------------------------------------------------------------
# safe loading


class Payload:
    """Unpickling this creates a file: what a malicious checkpoint could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_checkpoints_that_run_code_are_refused(finished, tmp_path):
    assert all("weights_only=True" in call for call in re.findall(r"torch\.load\([^)]*\)", (ROOT / "train.py").read_text()))
    work, marker = tmp_path / "out", tmp_path / "pwned"
    shutil.copytree(finished, work)
    torch.save({"policy": Payload(marker)}, work / "ckpt.pt")
    p = run(*TINY, f"--out_dir={work}", "--resume")
    assert p.returncode == 2 and p.stderr.startswith("error: cannot read the policy checkpoint"), p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and not marker.exists()
    torch.load(work / "ckpt.pt", weights_only=False)  # the payload is live: a plain torch.load would have run it
    assert marker.exists()


@pytest.mark.parametrize("flags, needle", [(["--keep=0.1,1.0"], r"another action config \(keep\)"),
                                           (["--criterion=quest"], r"another action config \(criterion\)"),
                                           (["--width=32"], r"another policy config \(width\)")])
def test_resume_into_another_config_names_it(finished, tmp_path, flags, needle):
    work = tmp_path / "out"
    shutil.copytree(finished, work)
    with pytest.raises(train.UsageError, match=needle) as e:
        train.main([*TINY, f"--out_dir={work}", "--resume", *flags])
    assert "\n" not in str(e.value) and "new --out_dir" in str(e.value)

# -----------------------------------------------------------------------------
# bad invocations: exit 2, one "error:" line naming the problem and the fix, nothing half-written


def more_bad_cases(tmp):
    """Beyond tests/test_train.py's bad_cases."""
    latin1, a_file, empty_ckpt = tmp / "latin1.txt", tmp / "a_file", tmp / "empty_ckpt"
    latin1.write_bytes("café crème brûlée ".encode("latin-1") * 500)
    a_file.write_text("not a folder")
    empty_ckpt.mkdir()
    (empty_ckpt / "ckpt.pt").write_bytes(b"")
    return [
        (["--keep=0,1"], "keep (0, 1]"),
        (["--bits=1,16"], "bits at least 2"),
        (["--prune=0.5,1,1.5"], "prune (0, 1]"),
        (["--bits=5,16,16"], "dense action exactly once"),
        (["--keep="], "comma-separated list"),
        (["--max_iters=0"], "--max_iters must be at least 1"),
        (["--max_iters=1.5"], "is not an integer"),
        (["--lr=nan"], "--lr=nan is not a finite number"),
        (["--keep_range=0.1,inf"], "--keep_range=(0.1, inf) is not a finite number"),
        (["--target_keep=-0.1"], "keep target must lie in (0, 1]"),
        (["--target_bits=17"], "bits target must lie in (0, 1]"),
        (["--sample_budgets=yes"], "true/false"),
        (["--device=tpu"], "--device=tpu is not one of"),
        (["--n_head=3"], "divisible"),
        (["--rollout_len=0"], "--rollout_len must be at least 1"),
        (["--rollout_len=20", "--max_steps=8"], "raise --max_steps"),
        (["--context_len=61"], "exceeds the model's block_size 64"),  # 61 + 4 = block_size + 1
        (["--eval_episodes=0"], "--eval_episodes must be at least 1"),
        (["--ckpt_interval=-1"], "--ckpt_interval must be at least 1"),
        ([f"--dataset={latin1}"], "is not UTF-8"),
        ([f"--dataset={tmp}"], "is a folder; pass a .txt file"),
        (["--dataset=/dev/null"], "--dataset=/dev/null is not a regular file (a device, pipe or socket)"),
        (["--clip_eps=-1"], "--clip_eps must be positive, got -1.0"),
        (["--temperature=0"], "--temperature must be positive, got 0.0"),
        (["--lr=0"], "--lr must be positive"),
        (["--ent_coef=-0.05"], "--ent_coef must be at least 0"),
        (["--kl_coef=-1"], "--kl_coef must be at least 0"),
        (["--gamma=1.5"], "--gamma must be in [0, 1]"),
        (["--task_w_kl=-0.1"], "--task_w_kl must be in [0, 1]"),
        (["--alpha_bits=-200"], "--alpha_bits must be at least 0"),
        (["--grad_clip=0"], "--grad_clip must be positive"),
        (["--n_layer=0"], "--n_layer must be at least 1"),
        (["--page_size=0"], "--page_size must be at least 1"),
        (["--sinks=-1"], "--sinks must be at least 0"),
        (["--keep_range=0.9,0.2"], "--keep_range must be two numbers lo,hi with 0 < lo <= hi <= 1"),
        (["--bits_range=5"], "--bits_range must be two numbers"),
        ([f"--out_dir={a_file / 'x'}"], "not a writable folder"),  # a path under a regular file, even as root
        ([f"--out_dir={empty_ckpt}", "--resume"], "cannot read the policy checkpoint"),
    ]


def test_bad_invocations_one_clear_line(tmp_path, in_process):  # train.py's command line in this process (tests/conftest.py)
    def leftovers():
        return sorted(str(p) for d in (tmp_path, ROOT / "data") for p in d.rglob("*") if p.suffix in (".tmp", ".partial"))
    before = leftovers()
    for args, needle in more_bad_cases(tmp_path):
        out = [] if any(a.startswith("--out_dir") for a in args) else [f"--out_dir={tmp_path / 'out'}"]
        code, _, err = in_process(ROOT / "train.py", *TINY, *out, *args)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (args, err)
        assert needle in lines[0], (args, lines[0])
        assert not (tmp_path / "out").exists() and leftovers() == before, args


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod; the path-under-a-file case covers it")
def test_read_only_out_dir(tmp_path, in_process):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        code, _, err = in_process(ROOT / "train.py", *TINY, f"--out_dir={ro / 'out'}")
    finally:
        ro.chmod(0o700)
    assert code == 2 and err.startswith("error: cannot write to --out_dir") and len(err.strip().splitlines()) == 1

# -----------------------------------------------------------------------------
# numerics over the whole action grid


def adversarial_model(kind):
    torch.manual_seed(0)
    model = sol.GPT(CFG).eval()
    with torch.no_grad():
        if kind == "zero":  # every activation is exactly zero
            for p in model.parameters():
                p.zero_()
        elif kind == "huge":  # a residual stream of ~1e4 and normalized activations of ~1e2
            model.wte.weight.mul_(1e4)
            for m in model.modules():
                if isinstance(m, sol.RMSNorm):
                    m.weight.mul_(1e2)
    return model


@torch.no_grad()
@pytest.mark.parametrize("criterion", sol.CRITERIA)
@pytest.mark.parametrize("kind", ["random", "zero", "huge"])
def test_every_action_gives_finite_logits(criterion, kind):
    acfg = sol.ActionConfig(criterion=criterion)
    grid = sol.action_grid(acfg)
    model, A = adversarial_model(kind), len(grid.values)
    edge = acfg.sinks + acfg.window + 1  # the last past length that is not controllable
    for past in (1, edge, edge + 1, 40):  # one key in the past, the boundary, a long context
        x = torch.randint(0, CFG.vocab_size, (A, past + 1), generator=torch.Generator().manual_seed(past))
        cache = model.new_cache(A, past + 1)
        model(x[:, :past], cache)
        logits, h = model(x[:, past:], cache, grid.values, acfg)  # row a takes action a
        assert torch.isfinite(logits).all() and torch.isfinite(h).all(), (kind, criterion, past)


@torch.no_grad()
def test_mlp_and_attention_survive_huge_and_zero_inputs():
    acfg, grid = sol.ActionConfig(), sol.action_grid(sol.ActionConfig())
    torch.manual_seed(0)
    mlp, A = sol.MLP(32, 48), len(grid.values)
    for scale in (0.0, 1e-30, 1.0, 1e4):
        assert torch.isfinite(mlp(torch.randn(A, 1, 32) * scale, sol.resolve(grid.values, 1, acfg, 48))).all(), scale
        q, k, v = (torch.randn(A, 2, 1 if i == 0 else 40, 16) * scale for i in range(3))
        for criterion in sol.CRITERIA:
            acfg.criterion = criterion
            mask = sol.sparse_mask(q, k, grid.values[:, 0], acfg)
            for fused in (True, False):
                assert torch.isfinite(sol.attention(q, k, v, mask, fused)).all(), (scale, criterion, fused)


def test_fake_quant_every_bit_width_on_extreme_rows():
    torch.manual_seed(0)
    scales = torch.tensor([0.0, 1e-40, 1e-30, 1e-3, 1.0, 1e4, 1e30, 3e38])  # zero, subnormal .. near float32 max
    x = torch.randn(len(scales), 1, 64).clamp(-1, 1) * scales.view(-1, 1, 1)
    x[:, :, 0] = scales.view(-1, 1)  # each row reaches its scale exactly
    for b in range(2, 17):
        xq = sol.fake_quant(x, torch.full((len(scales),), float(b)))
        assert torch.isfinite(xq).all() and (xq.abs() <= x.abs().amax(-1, keepdim=True) * (1 + 1e-6)).all(), b
    # rows are quantized independently: mixed bit widths in one call equal one width at a time
    bits = torch.arange(2, 2 + len(scales)).float()
    mixed = sol.fake_quant(x, bits)
    for r, b in enumerate(bits):
        assert torch.equal(mixed[r], sol.fake_quant(x[r:r + 1], b.view(1))[0]), r


def test_smallest_keep_still_keeps_a_key():
    torch.manual_seed(0)
    for criterion in sol.CRITERIA:
        acfg = sol.ActionConfig(criterion=criterion)
        for L in range(acfg.sinks + acfg.window + 3, 70, 7):
            q, k = torch.randn(3, 2, 1, 8), torch.randn(3, 2, L, 8)
            mask = sol.sparse_mask(q, k, torch.tensor([0.0, 1e-9, min(acfg.keep)]), acfg)
            assert (mask[..., acfg.sinks:L - 1 - acfg.window].sum(-1) >= 1).all(), (criterion, L)


@torch.no_grad()
def test_single_row_evaluation():
    torch.manual_seed(0)
    acfg, model = sol.ActionConfig(), sol.GPT(CFG).eval()
    grid = sol.action_grid(acfg)
    policy = sol.Policy(sol.PolicyConfig(width=16, heads=2), CFG.n_embd, len(grid.values)).eval()
    eps, target = torch.randint(0, CFG.vocab_size, (1, 40 + 4 + 1)), torch.full((3,), 0.5)
    for make in (lambda: schedules.dense_scheduler(grid), lambda: schedules.static_scheduler(acfg, [0.5, 0.5, 0.5]),
                 lambda: schedules.policy_scheduler(policy, greedy=True), lambda: schedules.policy_scheduler(policy, greedy=False)):
        nll, achieved, _ = sol.score_episodes(model, eps, target, make, grid, acfg, 40, 1)
        assert nll.shape == (1,) and torch.isfinite(nll).all() and achieved.shape == (3,)
        cache, h0 = sol.prefill(model, eps, 40, 4)
        roll = sol.rollout(model, cache, h0, eps[:, 40:], target[None], make(), grid, acfg)
        assert roll["logp"].shape == (1, 4) and torch.isfinite(roll["logp"]).all()

# -----------------------------------------------------------------------------
# sparse-mask invariants, property style (tests/test_sol.py checks fixed cases)


@settings(max_examples=300, deadline=None)
@given(criterion=st.sampled_from(sol.CRITERIA), L=st.integers(1, 300), N=st.integers(1, 4), H=st.integers(1, 3),
       sinks=st.integers(0, 6), window=st.integers(0, 6), page=st.integers(1, 16),
       permille=st.lists(st.integers(1, 1000), min_size=4, max_size=4), seed=st.integers(0, 2 ** 16))
@example("recency", 177, 1, 1, 4, 2, 8, [300] * 4, 0)  # M = 170: float32 0.3 * 170 once rounded up to 52 keys
def test_mask_invariants(criterion, L, N, H, sinks, window, page, permille, seed):
    acfg = sol.ActionConfig(criterion=criterion, sinks=sinks, window=window, page_size=page)
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(N, H, 1, 8, generator=gen), torch.randn(N, H, L, 8, generator=gen)
    keep = torch.tensor([p / 1000 for p in permille[:N]])
    mask = sol.sparse_mask(q, k, keep, acfg)
    assert mask.shape == (N, H, 1, L) and mask.dtype == torch.bool  # only the past and the query itself: causal
    M = L - 1 - window - sinks
    if M <= 1:
        assert mask.all()
        return
    assert mask[..., :sinks].all() and mask[..., L - 1 - window:].all()  # sinks, window and the query
    mid = mask[:, :, 0, sinks:sinks + M]  # (N, H, M)
    for r in range(N):
        if criterion == "quest":  # whole pages: ceil(keep M / S) of them, at least one
            first = mid[r, :, ::page]  # (H, P) the first key of every page
            assert torch.equal(first.repeat_interleave(page, -1)[:, :M], mid[r])
            pages = min(max(-(-permille[r] * M // (1000 * page)), 1), first.size(-1))
            assert (first.sum(-1) == pages).all(), (r, first.sum(-1), pages)
        else:  # ceil(keep M) keys, at least one
            assert (mid[r].sum(-1) == min(max(-(-permille[r] * M // 1000), 1), M)).all(), (r, mid[r].sum(-1))
        # a row's mask depends on that row alone
        assert torch.equal(sol.sparse_mask(q[r:r + 1], k[r:r + 1], keep[r:r + 1], acfg), mask[r:r + 1])
