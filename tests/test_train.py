"""End to end: the real train.py on the real synthetic corpus, with a tiny model so it runs in seconds."""
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import cli  # noqa: E402
import grpo  # noqa: E402
import train  # noqa: E402
from data.text import gpt2_encoding  # noqa: E402

TINY = ["--pretrain=true", "--n_layer=1", "--n_embd=32", "--n_head=2", "--mlp_hidden=64", "--block_size=64", "--width=16",
        "--context_len=40", "--rollout_len=4", "--pretrain_iters=10", "--pretrain_batch=4", "--max_iters=3",
        "--batch_size=2", "--rollouts=2", "--eval_episodes=8", "--ckpt_interval=2"]


SHARED = ROOT.parent / "shared"


def run(*args, cwd=ROOT):
    env = dict(os.environ, TIKTOKEN_CACHE_DIR=str(SHARED / "tiktoken")) if SHARED.exists() else None
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    p = run(*TINY, f"--out_dir={out}")
    assert p.returncode == 0, p.stderr[-2000:]
    return out, p


def test_tiny_run_writes_valid_eval_json(tiny_run):
    out, p = tiny_run
    report = json.loads((out / "eval.json").read_text())
    assert report["dataset"] == "synth" and report["seed"] == 1337
    assert report["config"]["grpo"]["rollout_len"] == 4 and report["config"]["gpt"]["n_embd"] == 32
    rows = {r["method"]: r for r in report["results"]}
    assert set(rows) == {"sol", "dense", "static", "oracle"}
    assert rows["sol"]["target"] == rows["oracle"]["target"] == {"keep": 0.5, "prune": 0.5, "bits": 8.0}
    ppl = {m: r["ppl"] for m, r in rows.items()}  # the headroom is what the rows give
    assert math.isclose(report["headroom"]["headroom"], ppl["static"] - ppl["oracle"], abs_tol=1e-3)  # float32 means
    assert rows["dense"]["achieved"] == {"keep": 1.0, "prune": 1.0, "bits": 16.0}
    for r in rows.values():
        assert r["tokens"] == 8 * 4
        assert math.isclose(r["ppl"], math.exp(r["nll"]), rel_tol=1e-9) and r["nll"] > 0
    for axis in ("keep", "prune", "bits"):  # static is matched to what SOL achieved
        assert abs(rows["static"]["achieved"][axis] - rows["sol"]["achieved"][axis]) <= 0.02 * (16 if axis == "bits" else 1) + 1e-6
    assert "policy/LM FLOPs per decode step" in p.stdout and "seed 1337" in p.stdout
    # 10 pretraining iterations learn neither skill: each loss is above half its chance level, and the run says so
    skills = report["base_skills"]
    assert all(s["loss"] > s["chance"] / 2 and not s["formed"] for s in skills.values()) and set(skills) == {"recall", "copy"}
    assert "recall" in p.stdout and f"copy {skills['copy']['loss']:.3f} (2.773) NOT FORMED" in p.stdout
    assert "notice: the base GPT has not learned to recall or copy" in p.stdout
    state = torch.load(out / "ckpt.pt", weights_only=True)
    assert state["iter"] == 3 and set(state["config"]) >= {"train", "grpo", "gpt", "action", "policy"}


def test_same_seed_same_numbers_and_resume(tiny_run, tmp_path):
    out, _ = tiny_run
    first = json.loads((out / "eval.json").read_text())["results"]
    p = run(*TINY, f"--out_dir={tmp_path / 'again'}")
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads((tmp_path / "again" / "eval.json").read_text())["results"] == first
    # a run that stopped at its checkpoint (iteration 2) and was resumed ends with the same numbers
    p = run(*TINY[:-5], "--max_iters=2", "--batch_size=2", "--rollouts=2", "--eval_episodes=8", "--ckpt_interval=2",
            f"--out_dir={tmp_path / 'resumed'}")
    assert p.returncode == 0, p.stderr[-2000:]
    p = run(*TINY, f"--out_dir={tmp_path / 'resumed'}", "--resume")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "resuming" in p.stdout
    assert json.loads((tmp_path / "resumed" / "eval.json").read_text())["results"] == first


def test_parse_args_forms():
    g, t = grpo.GRPOConfig(), train.TrainConfig()
    train.parse_args(["--rollouts=4", "--gamma", "0.5", "--resume", "--keep_range=0.2,0.9", "--target_bits=none"], (g, t))
    assert (g.rollouts, g.gamma, t.resume, g.keep_range, g.target_bits) == (4, 0.5, True, (0.2, 0.9), None)


def bad_cases(tmp, bpe):
    empty, short, binary = tmp / "empty.txt", tmp / "short.txt", tmp / "binary.txt"
    empty.write_text("")
    short.write_text("to be or not to be " * 5)
    binary.write_bytes(bytes(range(256)) * 40)
    return [
        (["--target_budget=1.5"], "target"),
        (["--target_budget=0"], "target"),
        (["--target_budget=abc"], "not a number"),
        (["--no_such_flag=1"], "unknown option"),
        (["stray"], "unexpected argument"),
        (["--max_iters"], "needs a value"),
        (["--rollouts=1"], "at least 2"),
        (["--rollouts=two"], "is not an integer"),
        (["--keep=0.1,x,1"], "comma-separated"),
        (["--resume=maybe"], "true/false"),
        (["--dataset=nosuch"], "unknown dataset"),
        ([f"--dataset={tmp / 'missing.txt'}"], "does not exist"),
        ([f"--dataset={empty}"], "empty"),
        ([f"--dataset={binary}"], "UTF-8"),
        ([f"--dataset={short}"], "fewer than one episode" if bpe else "GPT-2 BPE"),  # without the BPE: says so
        (["--context_len=300"], "block_size"),
        (["--keep=0.1,0.5"], "dense action"),
        (["--criterion=random"], "criterion"),
        (["--reward_agg=mean"], "reward_agg"),
        ([f"--out_dir={tmp / 'none'}", "--resume"], "no checkpoint"),
    ]


def bpe_loads():
    """Whether GPT-2's BPE loads here as train.py would load it (cached, in ../shared, or fetched when online)."""
    try:
        gpt2_encoding()
        return True
    except ValueError:
        return False


def test_bad_inputs_one_clear_line(tmp_path, in_process, monkeypatch):
    # the first case a real `python train.py`, so an interpreter's start-up (imports, warnings) is held to the one line
    # too; the rest train.py's command line in this process (tests/conftest.py)
    if SHARED.exists():
        monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken"))
    for i, (args, needle) in enumerate(bad_cases(tmp_path, bpe_loads())):
        args = [*TINY, *([] if any(a.startswith("--out_dir") for a in args) else [f"--out_dir={tmp_path / 'out'}"]), *args]
        if i == 0:
            p = run(*args)
            code, err = p.returncode, p.stderr
        else:
            code, _, err = in_process(ROOT / "train.py", *args)
        lines = err.strip().splitlines()
        assert code == 2, (args, err[-1000:])
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle.lower() in lines[0].lower(), (args, err)
        assert not (tmp_path / "out").exists()


def test_bad_checkpoints_are_refused_and_kept(tiny_run, tmp_path):
    out, _ = tiny_run
    work = tmp_path / "out"
    shutil.copytree(out, work)
    before = (work / "ckpt.pt").read_bytes()
    p = run(*TINY, f"--out_dir={work}")  # a finished run is evaluated again, never overwritten by accident
    assert p.returncode == 0 and "evaluating it" in p.stdout and (work / "ckpt.pt").read_bytes() == before
    p = run(*TINY, f"--out_dir={work}", "--max_iters=5")  # asked for more: continuing needs --resume
    assert p.returncode == 2 and "stopped at GRPO iteration 3 of 5; pass --resume" in p.stderr and (work / "ckpt.pt").read_bytes() == before
    p = run(*TINY, f"--out_dir={work}", "--resume", "--width=32")
    assert p.returncode == 2 and "width" in p.stderr and (work / "ckpt.pt").read_bytes() == before
    (work / "ckpt.pt").write_bytes(b"not a checkpoint")
    p = run(*TINY, f"--out_dir={work}", "--resume")
    assert p.returncode == 2 and "cannot read" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert (work / "ckpt.pt").read_bytes() == b"not a checkpoint"
    assert not [f for f in os.listdir(work) if f.endswith(".tmp")]


def test_real_text_end_to_end(tmp_path):
    """Trained on two real texts at once (--dataset=a.txt,b.txt), evaluated on one of them, its own test split."""
    text, other = SHARED / "text" / "tinyshakespeare.txt", SHARED / "text" / "fortunes.txt"
    if not text.exists():
        pytest.skip(f"{text} is absent (real-text tests need ../shared)")
    p = run(*TINY, f"--dataset={text},{other}", f"--out_dir={tmp_path / 'out'}")
    assert p.returncode == 0, p.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert report["config"]["gpt"]["vocab_size"] == 50304  # GPT-2 BPE, padded
    assert all(math.isfinite(r["nll"]) for r in report["results"])
    p = subprocess.run([sys.executable, str(ROOT / "eval.py"), f"--out_dir={tmp_path / 'out'}", f"--dataset={other}", "--val_episodes=4",
                        "--eval_episodes=4", "--search_schedules=2", "--bootstrap=50"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env=dict(os.environ, TIKTOKEN_CACHE_DIR=str(SHARED / "tiktoken")))
    assert p.returncode == 0, p.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert {r["method"] for r in report["results"]} >= {"sol", "search", "heuristic"}
    gpt2_cache = [m for m in (ROOT / "data" / "cache").glob("fortunes-*/meta.json") if "-tok" not in m.parent.name]
    assert report["dataset"] == str(other) and report["splits"]["test"] == json.loads(gpt2_cache[0].read_text())["n_tokens"]["test"]


def test_dtype_auto_picks_bfloat16_only_for_a_pretrained_model_on_native_hardware(monkeypatch):
    for native in (True, False):  # the capability faked both ways, on a CPU and on a GPU
        for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
            monkeypatch.setattr(torch.cpu, probe, lambda: native)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: native)
        for device in ("cpu", "cuda"):
            assert cli.pick_dtype("auto", device, True)[0] == ("bfloat16" if native else "float32")
            assert cli.pick_dtype("auto", device, False)[0] == "float32"  # the built-in GPT: the same figures everywhere
            assert cli.pick_dtype("float16", device, True) == ("float16", "as asked")
        assert cli.pick_dtype("auto", "mps", True)[0] == "float32"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)  # AVX-512 BF16 without AMX is native too
    assert cli.pick_dtype("auto", "cpu", True)[0] == "bfloat16"


# -----------------------------------------------------------------------------
# the base GPT shipped with the built-in corpus


def test_the_shipped_base_is_the_recorded_one_and_has_both_skills():
    from data import episodes, load_dataset
    from data.synth.prepare import skills
    path = ROOT / "data" / "synth" / "base.pt"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest == train.BASE_SHA256 and digest in (ROOT / "README.md").read_text()  # the README names it too
    assert path.stat().st_size <= 1.5 * 2**20
    data_dir, meta, splits = load_dataset("synth")
    state = torch.load(path, weights_only=True)
    assert state["corpus"] == meta["sha256"] and all(v.dtype == torch.float16 for v in state["model"].values())
    gcfg = train.GPTConfig(**state["config"])
    assert gcfg == train.GPTConfig(vocab_size=meta["vocab_size"])  # the default model: what the quick start builds
    model = train.sol.GPT(gcfg).eval()
    model.load_state_dict(state["model"])
    x = episodes(splits["val"], 64, gcfg.block_size + 1)
    flags = episodes(np.memmap(data_dir / "val_skill.bin", dtype=np.uint8, mode="r"), 64, gcfg.block_size + 1)[:, 1:]
    with torch.no_grad():
        nll = F.cross_entropy(model(x[:, :-1])[0].flatten(0, 1), x[:, 1:].flatten(), reduction="none").view(flags.shape)
    assert all(s["formed"] for s in skills(nll, flags, meta["chance"]["val"]).values())
    x = episodes(splits["val"], 32, gcfg.block_size + 1)  # pretrain()'s own measure of the validation loss
    with torch.no_grad():
        assert abs(F.cross_entropy(model(x[:, :-1])[0].flatten(0, 1), x[:, 1:].flatten()).item() - state["val_loss"]) < 1e-3


def test_the_shipped_base_is_refused_where_it_does_not_belong(in_process, monkeypatch):
    import data
    code, _, err = in_process(ROOT / "train.py", "--n_layer=1", "--pretrain_iters=10")  # another model, without --pretrain
    assert code == 2 and err.count("\n") == 1 and "--n_layer, --pretrain_iters describe another base GPT" in err and "--pretrain=true" in err, err
    load = data.load_dataset
    monkeypatch.setattr(data, "load_dataset", lambda *a: (lambda d, m, s: (d, {**m, "sha256": "0" * 64}, s))(*load(*a)))  # another corpus
    code, _, err = in_process(ROOT / "train.py", "--max_iters=1")
    assert code == 2 and err.count("\n") == 1 and "was pretrained on another build of the built-in corpus" in err, err
