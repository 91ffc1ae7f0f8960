"""Every reported budget honest: greedy decoding held on any budget the grid can reach, every method
checked against what it was asked for, requests below the grid clamped with a notice; and the inputs that
could take the machine down (memory bombs, a full disk) or leave half a file (signals) answered with one line."""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import cli  # noqa: E402
import grpo  # noqa: E402
import schedules  # noqa: E402
import sol  # noqa: E402
import train  # noqa: E402
from test_train import TINY  # noqa: E402

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TQDM_DISABLE="1")  # no progress bars: stderr holds what was said
FAST = ["--val_episodes=8", "--eval_episodes=12", "--search_schedules=4", "--bootstrap=100"]
CFG = sol.GPTConfig(block_size=64, vocab_size=64, n_layer=1, n_head=2, n_embd=32, mlp_hidden=48)


def script(name, *args, timeout=600):
    return subprocess.run([sys.executable, str(ROOT / name), *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def one_error_line(p, needle):
    lines = [line for line in p.stderr.strip().splitlines() if not line.startswith(("grpo:", "pretrain:", "evaluating a "))]  # less progress and cost
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (p.returncode, p.stderr[-2000:])
    assert needle in lines[0], lines[0]
    return lines[0]


def constant_policy(grid, logit_of):
    """A policy whose logits are the same at every step of every row: logit_of(keep, prune, bits) per action."""
    policy = sol.Policy(sol.PolicyConfig(width=16, heads=2), CFG.n_embd, len(grid.values)).eval()
    with torch.no_grad():
        for p in (policy.head.weight, policy.budget_head.weight, policy.budget_head.bias):
            p.zero_()
        policy.head.bias.copy_(torch.tensor([logit_of(*v) for v in grid.values.tolist()]))
    return policy


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "out"
    p = script("train.py", *TINY, f"--out_dir={out}")
    assert p.returncode == 0, p.stderr[-2000:]
    return out

# -----------------------------------------------------------------------------
# the controller reaches any budget in the grid's range


def test_the_controller_meets_a_target_between_two_jumps():
    # keep: 0.25 or 1.0 (the others never win), prune: 0.4 or 1.0. The greedy action is the same at every step of
    # every row, so the achieved budget jumps from 0.25 straight to 1.0 (0.4 to 1.0) at one multiplier
    acfg = sol.ActionConfig(bits=(16,))
    grid = sol.action_grid(acfg)
    policy = constant_policy(grid, lambda k, p, b: {0.25: 0.0, 1.0: -0.3}.get(k, -100.0) + {0.4: 0.0, 1.0: 0.2}.get(round(p, 2), -100.0))
    model = sol.GPT(CFG).eval()
    test = torch.randint(0, CFG.vocab_size, (24, 40 + 8 + 1), generator=torch.Generator().manual_seed(0))
    fixed, target = [0.6, 0.7, None], torch.tensor([0.6, 0.7, 1.0])
    spent = lambda control: sol.score_episodes(model, test, target, lambda: schedules.policy_scheduler(policy, True, control=control), grid, acfg, 40, 8)[1]
    # no single multiplier meets either target: a scan over the whole range bisection searches
    at = lambda lam: (lambda t, score, obs: (score + grid.budget @ torch.tensor([lam, lam, 0.0])).argmax(-1))
    reached = {tuple(round(x, 4) for x in spent(at(float(lam))).tolist()[:2]) for lam in np.linspace(-20, 20, 21)}
    assert {k for k, _ in reached} == {0.25, 1.0} and {p for _, p in reached} == {0.4, 1.0}, reached
    control = schedules.budget_controller(fixed, grid)
    achieved = spent(control)  # in batches of 8 rows
    assert abs(achieved[0] - 0.6) <= schedules.BUDGET_TOL / 2 and abs(achieved[1] - 0.7) <= schedules.BUDGET_TOL / 2, achieved
    lam = torch.stack(control.multipliers)
    assert (lam[:, 2] == 0).all()  # bits held dense: untouched


def test_multiplier_bias_mixes_in_the_given_share():
    grid = sol.action_grid(sol.ActionConfig())
    lower, upper, share = torch.tensor([-1.0, 0.0, 2.0]), torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.3, 0.0, 0.0])
    bias = schedules.multiplier_bias(grid, lower, upper, share)
    rows = torch.cat([bias(t, 10) for t in range(4)])  # (40, A): 4 steps of 10 rows
    up = (rows == grid.budget @ upper).all(1)
    assert torch.equal(up | (rows == grid.budget @ lower).all(1), torch.ones(40, dtype=torch.bool))  # every row one of the two
    assert up.sum() == 12  # 30% of 40, by a fixed pattern: the same every time
    assert torch.equal(torch.cat([bias(t, 10) for t in range(4)]), rows)

# -----------------------------------------------------------------------------
# every method held to what it was asked for


def stuck_run(finished, tmp):
    """A copy of the finished run whose policy always takes keep 0.25, prune 1.0, bits 16, by a margin no
    budget multiplier can overcome: SOL cannot meet any target below dense."""
    work = tmp / "stuck"
    shutil.copytree(finished, work)
    state = torch.load(work / "ckpt.pt", weights_only=True)
    grid = sol.action_grid(sol.ActionConfig(**state["config"]["action"]))
    stuck = [1e4 if (k, p, b) == (0.25, 1.0, 16.0) else 0.0 for k, p, b in grid.values.tolist()]
    state["policy"] = {k: torch.zeros_like(v) if k.startswith(("head.", "budget_head.")) else v for k, v in state["policy"].items()}
    state["policy"]["head.bias"] = torch.tensor(stuck)
    torch.save(state, work / "ckpt.pt")
    return work


def test_off_budget_sol_is_flagged_in_train_table_and_json(finished, tmp_path):
    work = stuck_run(finished, tmp_path)
    p = script("train.py", *TINY, f"--out_dir={work}")  # a finished run: straight to evaluation
    assert p.returncode == 0, p.stderr[-2000:]
    assert "already finished 3 iterations; evaluating it" in p.stdout
    table = {line.split()[0]: line for line in p.stdout.splitlines() if line.split()[:1] in (["sol"], ["dense"], ["static"])}
    assert table["sol"].endswith("OFF BUDGET: keep, prune, bits"), table
    assert "OFF BUDGET" not in table["static"] + table["dense"]
    rows = {r["method"]: r for r in json.loads((work / "eval.json").read_text())["results"]}
    assert rows["sol"]["achieved"] == {"keep": 0.25, "prune": 1.0, "bits": 16.0}
    assert rows["sol"]["off_budget"] == ["keep", "prune", "bits"] and rows["static"]["off_budget"] == rows["dense"]["off_budget"] == []


def test_off_budget_sol_is_flagged_in_eval_table_and_json_and_requests_are_clamped(finished, tmp_path):
    work = stuck_run(finished, tmp_path)
    p = script("eval.py", f"--out_dir={work}", "--budgets=0.3,0.6", "--plot=false", *FAST)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "notice: the prune target 0.3 is below the grid's cheapest prune 0.4, so it is held to 0.4; extend --prune to go lower" in p.stdout
    sol_lines = [line for line in p.stdout.splitlines() if line.startswith("sol ")]
    assert len(sol_lines) == 2 and all(line.endswith("OFF BUDGET: keep, prune, bits") for line in sol_lines), sol_lines
    rows = json.loads((work / "eval.json").read_text())["results"]
    for r in rows:
        if r["method"] == "sol":
            b = r["budget"]
            assert r["target"] == {"keep": b, "prune": max(b, 0.4), "bits": max(16 * b, 5.0)} and r["off_budget"] == ["keep", "prune", "bits"]
        elif r["method"] in ("static", "random", "dense"):  # at SOL's achieved budget, which they meet by construction
            assert r["off_budget"] == [], r


def test_training_targets_below_the_grid_are_clamped_with_a_notice(capsys):
    g = grpo.GRPOConfig(target_budget=0.5, target_prune=0.3, target_bits=2)
    assert grpo.targets(g, sol.ActionConfig()) == [0.5, 0.4, 5 / 16]
    said = capsys.readouterr().out.splitlines()
    assert said == ["notice: the prune target 0.3 is below the grid's cheapest prune 0.4, so it is held to 0.4; extend --prune to go lower",
                    "notice: the bits target 2 is below the grid's cheapest bits 5, so it is held to 5; extend --bits to go lower"]
    assert grpo.targets(grpo.GRPOConfig(), sol.ActionConfig()) == [0.5, 0.5, 0.5] and capsys.readouterr().out == ""

# -----------------------------------------------------------------------------
# memory bombs: refused before allocating, under a guard (a bare failure could freeze the machine)


# 4 GB of address space at most, and the peak resident memory of the command measured
WATCH = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
         "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(p.returncode)")


def guarded(*args):
    """The command under a 4 GB address-space limit: (exit code, stderr lines, the command's peak resident KiB)."""
    cmd = f"ulimit -v 4000000; exec {sys.executable} -c '{WATCH}' " + " ".join(map(str, args))
    p = subprocess.run(["bash", "-c", cmd], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    *said, peak_kib = p.stderr.strip().splitlines()
    return p.returncode, said, int(peak_kib)


@pytest.fixture(scope="module")
def idle_kib():
    """What the interpreter takes with a script's imports (torch above all) and nothing allocated, on this machine
    and build: a CUDA build of torch alone takes more than a CPU one, so no fixed figure holds everywhere."""
    def peak(script_name):
        code, said, kib = guarded(sys.executable, "-c", f"'import {script_name[:-3]}'")
        assert code == 0, said
        return kib
    return {name: peak(name) for name in ("train.py", "eval.py")}


@pytest.mark.parametrize("script_name, args, needle", [
    ("train.py", ["--batch_size=100000000"], "GRPO with --batch_size=100000000 and --rollouts=16 needs about"),
    ("train.py", ["--rollouts=1000000"], "GRPO with --batch_size=8 and --rollouts=1000000 needs about"),
    ("train.py", ["--pretrain=true", "--pretrain_batch=100000000", "--seed=99"], "pretraining with --pretrain_batch=100000000 needs about"),
    ("train.py", ["--eval_episodes=1000000000"], "--eval_episodes=1000000000 needs about"),
    ("eval.py", ["--eval_episodes=1000000000"], "--eval_episodes=1000000000 and --val_episodes=128 needs about"),
    ("eval.py", ["--bootstrap=1000000000"], "the bootstrap with --bootstrap=1000000000"),
])
def test_memory_bombs_are_refused_before_allocating(finished, idle_kib, tmp_path, script_name, args, needle):
    out = ["--out_dir", str(finished if script_name == "eval.py" else tmp_path / "out")]
    code, said, peak_kib = guarded(sys.executable, ROOT / script_name, *out, *args)
    assert code == 2 and len(said) == 1 and said[0].startswith("error: ") and needle in said[0], said
    assert "GiB of memory, more than the" in said[0]
    # beyond the imports, only flags, memory-mapped tokens and a tiny checkpoint: the batch itself was never allocated
    assert peak_kib < idle_kib[script_name] + 200 * 1024, (peak_kib, idle_kib[script_name])
    assert not (tmp_path / "out").exists()


def test_memory_estimate_is_an_upper_bound_of_a_real_grpo_batch():
    # the estimate guards against bombs, so it must not undercount a real batch: measure one in this process
    g = grpo.GRPOConfig(batch_size=4, rollouts=64, context_len=40, rollout_len=16)
    model, acfg = sol.GPT(CFG).eval(), sol.ActionConfig()
    grid = sol.action_grid(acfg)
    x = torch.randint(0, CFG.vocab_size, (g.batch_size, 40 + 16 + 1))
    cache, h0 = sol.prefill(model, x, 40, 16)
    forked = cache.fork(g.rollouts, 16)
    policy = sol.Policy(sol.PolicyConfig(width=16, heads=2), CFG.n_embd, len(grid.values))
    roll = sol.rollout(model, forked, h0.repeat_interleave(64, 0), x[:, 40:].repeat_interleave(64, 0), torch.full((256, 3), 0.5),
                       schedules.policy_scheduler(policy, greedy=False), grid, acfg)
    kept = sum(t.numel() * t.element_size() for t in (*roll.values(), cache.k, cache.v, forked.k, forked.v) if torch.is_tensor(t))
    assert kept < cli.episode_bytes(CFG, g.batch_size, g.rollouts, 40, 16)

# -----------------------------------------------------------------------------
# full disks, truncated checkpoints, runs killed mid-GRPO


def test_a_checkpoint_that_cannot_be_written_leaves_nothing_half_written(finished, tmp_path):
    # writes to /dev/full fail as on a full disk (ENOSPC), at once: a checkpoint's temporary file leads there
    out = tmp_path / "out"
    out.mkdir()
    (out / "ckpt.pt.tmp").symlink_to("/dev/full")
    p = script("train.py", *TINY, f"--out_dir={out}")
    one_error_line(p, f"cannot write {out / 'ckpt.pt'} (No space left on device); any earlier ckpt.pt is intact")
    assert os.listdir(out) == []
    # a finished run re-evaluated: eval.json cannot be written, the earlier one stays whole
    work = tmp_path / "work"
    shutil.copytree(finished, work)
    before = (work / "eval.json").read_bytes()
    for name in ("train.py", "eval.py"):
        (work / "eval.json.tmp").symlink_to("/dev/full")
        p = script(name, *(TINY if name == "train.py" else FAST), f"--out_dir={work}", *(["--plot=false"] if name == "eval.py" else []))
        one_error_line(p, f"cannot write {work / 'eval.json'} (No space left on device); any earlier eval.json is intact")
        assert (work / "eval.json").read_bytes() == before and not (work / "eval.json.tmp").exists()


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/proc/mounts").exists(), reason="mounting a small tmpfs needs root on Linux")
def test_out_dir_on_a_full_file_system_is_refused_up_front(tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(full)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        fd = os.open(full / "filler", os.O_WRONLY | os.O_CREAT)
        with pytest.raises(OSError, match="No space left"):  # fill it
            while True:
                os.write(fd, b"\0" * 4096)
        os.close(fd)
        p = script("train.py", *TINY, f"--out_dir={full / 'out'}")
        one_error_line(p, f"--out_dir={full / 'out'} is on a file system with 0.0 MiB free, too little for a checkpoint")
        assert os.listdir(full) == ["filler"]
    finally:
        subprocess.run(["umount", str(full)])


def test_truncated_checkpoints_are_refused_and_kept(finished, tmp_path):
    work = tmp_path / "out"
    shutil.copytree(finished, work)
    ckpt = work / "ckpt.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:ckpt.stat().st_size // 2])
    cut = ckpt.read_bytes()
    for name, args in (("train.py", TINY), ("train.py", [*TINY, "--resume"]), ("eval.py", FAST)):
        p = script(name, *args, f"--out_dir={work}")
        one_error_line(p, f"cannot read the policy checkpoint {ckpt}: truncated or corrupt")
        assert ckpt.read_bytes() == cut


def test_eval_of_a_run_killed_mid_grpo_says_how_to_finish_it(finished, tmp_path):
    out = tmp_path / "out"
    args = [*TINY, "--max_iters=30", "--ckpt_interval=1", f"--out_dir={out}"]  # the base GPT is the fixture's
    with open(tmp_path / "log", "w") as log:
        p = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=ENV, stdout=log, stderr=log)
        while not (out / "ckpt.pt").exists() and p.poll() is None:
            time.sleep(0.01)
        p.send_signal(signal.SIGKILL)
        p.wait(60)
    done = torch.load(out / "ckpt.pt", weights_only=True)["iter"]
    assert done < 30
    p = script("eval.py", f"--out_dir={out}", *FAST)
    line = one_error_line(p, f"{out / 'ckpt.pt'} is a run stopped at GRPO iteration {done} of 30 (interrupted or killed); "
                             "finish it with python train.py ")
    assert line.endswith(" --resume, then evaluate") and not (out / "eval.json").exists()
    again = line.split("finish it with ")[1].removesuffix(", then evaluate").split()[2:]
    assert script("train.py", *again).returncode == 0  # the command it gives finishes the run
    assert script("eval.py", f"--out_dir={out}", "--plot=false", *FAST).returncode == 0

# -----------------------------------------------------------------------------
# interrupted evaluation: nothing half-written, one line on how to evaluate again


def signal_after(args, sig, when, log):
    """Run a script, send sig once its output contains `when`, wait; returns (exit code, stdout, stderr)."""
    with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
        p = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=ENV, stdout=out, stderr=err)
        while p.poll() is None and when not in Path(f"{log}.out").read_text():
            time.sleep(0.01)
        p.send_signal(sig)
        p.wait(120)
    return p.returncode, Path(f"{log}.out").read_text(), Path(f"{log}.err").read_text()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_train_evaluation(finished, tmp_path, sig):
    work = tmp_path / "out"
    shutil.copytree(finished, work)
    before = {f: (work / f).read_bytes() for f in ("ckpt.pt", "eval.json")}
    slow = [*TINY, "--eval_episodes=20000", "--eval_batch=50", f"--out_dir={work}"]  # long enough to be caught in it
    code, out, err = signal_after([str(ROOT / "train.py"), *slow], sig, "evaluating it", tmp_path / "log")
    assert code == 128 + sig, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last == (f"{sig.name}: stopped during the final evaluation, {work / 'eval.json'} not (re)written; {work / 'ckpt.pt'} "
                    f"holds the finished policy: python train.py {' '.join(slow)} evaluates it again"), last
    assert {f: (work / f).read_bytes() for f in before} == before and sorted(os.listdir(work)) == sorted(before)


def test_signal_during_eval_py(finished, tmp_path):
    work = tmp_path / "out"
    shutil.copytree(finished, work)
    before = (work / "eval.json").read_bytes()
    args = [f"--out_dir={work}", "--eval_episodes=20000", "--eval_batch=50", "--plot=false"]
    code, out, err = signal_after([str(ROOT / "eval.py"), *args], signal.SIGTERM, "policy ", tmp_path / "log")
    assert code == 128 + signal.SIGTERM, err[-2000:]
    assert [line for line in err.strip().splitlines() if not line.startswith("evaluating a ")] == [f"SIGTERM: evaluation stopped, eval.json not (re)written; python {ROOT / 'eval.py'} "
                                        f"{' '.join(args)} evaluates again"]
    assert (work / "eval.json").read_bytes() == before and not [f for f in os.listdir(work) if f.endswith(".tmp")]


def test_a_finished_run_goes_straight_to_evaluation(finished, tmp_path):
    work = tmp_path / "out"
    shutil.copytree(finished, work)
    ckpt = (work / "ckpt.pt").read_bytes()
    first = json.loads((work / "eval.json").read_text())["results"]
    (work / "eval.json").unlink()
    p = script("train.py", *TINY, f"--out_dir={work}")
    assert p.returncode == 0 and "already finished 3 iterations; evaluating it" in p.stdout and "grpo" not in p.stderr, p.stderr[-2000:]
    assert "base GPT: reusing" in p.stdout
    assert json.loads((work / "eval.json").read_text())["results"] == first and (work / "ckpt.pt").read_bytes() == ckpt
    assert train.without(["--a=1", "--overwrite", "--b", "2", "--overwrite", "true", "--overwrite=1"], "--overwrite") == ["--a=1", "--b", "2"]
