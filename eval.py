"""
Evaluate a trained SOL policy against every baseline at the same achieved budget (docs/method.md section 4).

    python eval.py --out_dir out                                  # at the policy's training target
    python eval.py --out_dir out --budgets 0.2,0.35,0.5,0.65,0.8  # a sweep, and a Pareto plot
    python eval.py --out_dir out --prompt "facts : color red ." --max_new_tokens 24
    python eval.py --out_dir out --mc path/to/mmlu.jsonl           # multiple choice, by log-likelihood
    python eval.py --out_dir out --init_from path/to/model.gguf    # a run trained on a checkpoint that has moved

Methods, all on the same frozen GPT, test episodes and controllable steps:
  sol        the policy, greedy, its budget held on target by a controller as it decodes (schedules.budget_controller)
  dense      every step dense: the upper bound
  static     the same setting every step, two neighbouring grid values mixed to SOL's achieved budget
  random     per sequence, a random order of the same per-axis values as static
  search     N random schedules at the budget, the best on validation, reported on test
  heuristic  an axis dense after a step whose prediction was uncertain (high entropy), cheapest otherwise, its
             entropy thresholds held by a controller as SOL's multipliers are, to spend what SOL spent
  oracle     a bound, not a method: every step tries every action and takes the one that moves the next-token
             distribution least from the dense one, at a price per unit of budget held by a controller.
             It costs A dense decodes (A = grid actions: 80 by default); --oracle=false skips it
"""
import contextlib
import io
import json
import shlex
import shutil
import signal
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import cli
import pretrained
import schedules
import sol
from cli import UsageError, load_checkpoint, parse_args
from data import episodes, load_dataset
from data.synth.prepare import RECALL
from schedules import axes
from sol import prefill, score_episodes


@dataclass
class EvalConfig:
    out_dir: str = "out"  # where train.py left ckpt.pt
    budgets: str = ""  # comma list of budgets for every enabled axis; empty = the policy's training target
    dataset: str = ""  # empty = the dataset the policy was trained on
    init_from: str = ""  # the checkpoint (folder or GGUF) of a run trained with --init_from; empty = where it was then
    dtype: str = "auto"  # of the frozen GPT: auto (cli.pick_dtype) | float32 | bfloat16 | float16
    device: str = "auto"  # auto (cuda if there is one) | cpu | cuda
    seed: int = 1337
    eval_episodes: int = 256  # test episodes per method
    val_episodes: int = 128  # validation episodes (the search's choice)
    eval_batch: int = 128
    search_schedules: int = 128  # random schedule search: candidates tried on validation
    oracle: bool = True  # the oracle's row: every grid action probed at every step, A times a dense decode, 3 to 5 decodes
    bootstrap: int = 1000  # paired bootstrap resamples for the confidence intervals
    prompt: str = ""  # generate side by side from this prompt instead of evaluating
    max_new_tokens: int = 32
    mc: str = ""  # multiple choice: a JSONL file, or "synth" for the task built from the default corpus
    mc_questions: int = 200  # at most this many questions
    plot: bool = True


def combine(acfg, per_axis):
    """Per-axis value indices (..., 3) -> action indices of the product grid."""
    sizes = (len(acfg.keep), len(acfg.prune), len(acfg.bits))
    return (per_axis[..., 0] * sizes[1] + per_axis[..., 1]) * sizes[2] + per_axis[..., 2]


def mix_plan(acfg, budget, n, T, gen):
    """n schedules of T steps whose per-axis mean equals budget: the two grid values around it in the right
    proportion (random rounding of the count), in random order per schedule. (n, T, 3) value indices."""
    plan = torch.zeros(n, T, 3, dtype=torch.long)
    for axis, (values, scale) in enumerate(schedules.axis_lists(acfg)):
        lo, hi, f = schedules.bracket(values, scale, budget[axis])
        n_hi = (f * T + torch.rand(n, generator=gen)).floor().long()  # E[n_hi] = f*T exactly
        upper = torch.argsort(torch.rand(n, T, generator=gen), 1) < n_hi[:, None]
        plan[..., axis] = torch.where(upper, hi, lo)
    return plan


def search_candidates(acfg, budget, n, T, gen):
    """Random schedules at the budget: every step's value drawn from the whole grid, then single steps moved
    one grid value up or down until the per-axis mean is within 0.005 of the budget. (n, T, 3) indices."""
    plan = torch.zeros(n, T, 3, dtype=torch.long)
    for axis, (values, scale) in enumerate(schedules.axis_lists(acfg)):
        order = sorted(range(len(values)), key=lambda k: values[k])
        fr = torch.tensor(sorted(values), dtype=torch.float64) / scale
        b = min(max(budget[axis], fr[0].item()), fr[-1].item())
        for s in range(n):
            lv = torch.randint(0, len(fr), (T,), generator=gen)
            for _ in range(100 * T):
                gap = fr[lv].mean().item() - b
                if abs(gap) <= 0.005:
                    break
                movable = (lv > 0) if gap > 0 else (lv < len(fr) - 1)
                k = movable.nonzero()[torch.randint(0, int(movable.sum()), (1,), generator=gen)].item()
                lv[k] += -1 if gap > 0 else 1
            plan[s, :, axis] = torch.tensor(order)[lv]
    return plan


def plan_scheduler(acfg, plan):
    """Replays a plan: (T, 3) value indices shared by every row, or a function n -> (n, T, 3)."""
    state = {}

    def pick(t, obs):
        if t == 0:
            n = obs["emb"].size(0)
            state["a"] = combine(acfg, plan(n) if callable(plan) else plan.expand(n, -1, -1)).to(obs["emb"].device)
        return state["a"][:, t]
    return pick


def heuristic_scheduler(grid, control):
    """More compute after an uncertain step: each axis at its dense value or its cheapest, dense when the previous
    prediction's entropy e is high. It scores those actions e * (number of dense axes), and control (a
    budget_controller) adds lam . budget(a) as for the policy, so axis i goes dense when e > -lam_i (1 - cheapest_i):
    the controller sets the thresholds, and mixes two of them where many steps tie (a run of near-certain predictions)."""
    b = grid.budget
    ends = ((b == b.min(0).values) | (b == b.max(0).values)).all(-1)  # (A,) dense or cheapest on every axis
    n_dense = (b == b.max(0).values).sum(-1).float()  # (A,)

    def pick(t, obs):
        score = (obs["entropy"][:, None] * n_dense).masked_fill(~ends, float("-inf"))  # (N, A)
        return control(t, score, obs)
    return pick


def bootstrap_delta(nll, ref, n, gen):
    """ppl(method) - ppl(ref) and its 95% paired-bootstrap interval over episodes."""
    idx = torch.randint(0, len(nll), (n, len(nll)), generator=gen)
    d = nll[idx].mean(1).exp() - ref[idx].mean(1).exp()
    return (nll.mean().exp() - ref.mean().exp()).item(), d.quantile(0.025).item(), d.quantile(0.975).item()


def read_mc(path):
    """A JSONL file of {"question": str, "choices": [str, ...], "answer": int}, checked line by line."""
    items = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            q = json.loads(line)
        except json.JSONDecodeError:
            raise UsageError(f"{path} line {n} is not JSON; each line must be {{\"question\": ..., \"choices\": [...], \"answer\": i}}")
        ok = isinstance(q, dict) and isinstance(q.get("question"), str) and isinstance(q.get("choices"), list) \
            and len(q["choices"]) >= 2 and all(isinstance(c, str) and c for c in q["choices"]) \
            and isinstance(q.get("answer"), int) and 0 <= q["answer"] < len(q["choices"])
        if not ok:
            raise UsageError(f"{path} line {n} needs a string \"question\", a list of 2+ non-empty \"choices\" "
                             f"and an integer \"answer\" indexing them")
        items.append(q)
    if not items:
        raise UsageError(f"{path} holds no questions")
    return items


@torch.no_grad()
def choice_loglik(model, enc, q, make_scheduler, target, grid, acfg):
    """Log-likelihood of each choice after the question: the choice tokens are the controlled steps."""
    ctx = enc.encode_ordinary(q["question"])
    out = []
    for choice in q["choices"]:
        ids = enc.encode_ordinary(choice)
        x = torch.tensor([ctx + ids], device=target.device)[:, -model.cfg.block_size:]
        C = x.size(1) - len(ids) - 1
        cache, h0 = prefill(model, x, C, len(ids))
        roll = sol.rollout(model, cache, h0, x[:, C:], target[None], make_scheduler(), grid, acfg)
        out.append(roll["logp"].sum().item())
    return out


@torch.no_grad()
def generate(model, ids, n, make_scheduler, target, grid, acfg):
    """Greedy continuation under a schedule; returns the new tokens and the achieved budget."""
    x = torch.tensor([ids], device=target.device)
    cache = model.new_cache(1, x.size(1) + n)
    h = model.hidden(x, cache)
    scheduler, spent, n_eff, out, prev = make_scheduler(), torch.zeros(1, 3, device=x.device), 0, [], torch.tensor([len(grid.values)], device=x.device)
    token = model.lm_head(h[:, -1]).argmax(-1)
    for t in range(n):
        out.append(token.item())
        eff = sol.controllable(cache.len, acfg)
        scalars = sol.step_scalars(t, n, eff, target[None], spent, n_eff)
        a = scheduler(t, dict(h_prev=h[:, -1], emb=model.wte(token), scalars=scalars, prev_action=prev, entropy=None))
        if eff:
            spent, n_eff = spent + grid.budget[a], n_eff + 1
        logits, h = model(token[:, None], cache, grid.values[a] if eff else None, acfg)
        token, prev = logits[:, -1].argmax(-1), a
    return out, spent[0] / max(n_eff, 1)


def tokenizer(run):
    """The tokenizer of the evaluation data: the checkpoint's own, else the one the data's meta.json names."""
    from data.text import load_tokenizer
    return (pretrained.encoding(run.init) if run.init else None) or load_tokenizer(run.data_dir)


def pareto_plot(rows, path):
    """ppl against the mean achieved budget, one curve per method: a PNG, or ASCII without matplotlib."""
    methods = sorted({r["method"] for r in rows} - {"dense"})
    dense = [r["ppl"] for r in rows if r["method"] == "dense"][0]

    def points(m):  # (mean budget fraction, ppl) of method m at every budget
        return [(np.mean([r["achieved"]["keep"], r["achieved"]["prune"], r["achieved"]["bits"] / 16]), r["ppl"])
                for r in rows if r["method"] == m]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(pip install matplotlib for a PNG Pareto plot; an ASCII one follows)")
        pts = [(m, x, y) for m in methods for x, y in points(m)]
        lo, hi = min(y for _, _, y in pts + [("", 0, dense)]), max(y for _, _, y in pts)
        for m, x, y in sorted(pts, key=lambda p: (p[1], p[0])):
            bar = int(50 * (y - lo) / max(hi - lo, 1e-9))
            print(f"  budget {x:.2f} {m:<9} {'#' * bar} {y:.3f}")
        print(f"  dense ppl {dense:.3f}")
        return None
    plt.figure(figsize=(6, 4))
    for m in methods:
        p = sorted(points(m))
        plt.plot([a for a, _ in p], [b for _, b in p], "o-", label=m)
    plt.axhline(dense, color="k", ls="--", lw=1, label="dense")
    plt.xlabel("achieved budget (mean of keep, prune, bits/16)")
    plt.ylabel("test perplexity")
    plt.legend()
    plt.tight_layout()
    png = io.BytesIO()
    plt.savefig(png, format="png", dpi=120)
    cli.save_atomic(png.getvalue(), path)
    return path


def shade(tokens, compute, html_path):
    """Print tokens with a background as dark as the compute spent on them (ANSI), and write HTML."""
    line = "".join(f"\x1b[48;5;{232 + round(23 * c)}m\x1b[38;5;{16 if c > 0.6 else 255}m{t}\x1b[0m" for t, c in zip(tokens, compute))
    print(line)
    spans = "".join(f'<span style="background: rgba(220,60,30,{c:.2f})" title="{c:.2f}">{t.replace("&", "&amp;").replace("<", "&lt;")}</span>'
                    for t, c in zip(tokens, compute))
    cli.save_atomic(f"<html><body><pre style='font-size:15px'>{spans}</pre>"
                    "<p>background: compute spent on the token (mean of keep, prune, bits/16)</p></body></html>", html_path)

# -----------------------------------------------------------------------------
# the steps of main


def parse(argv):
    """The flags, checked before anything is loaded: (EvalConfig, the budgets, None = the training target)."""
    ec = EvalConfig()
    parse_args(argv, (ec,))
    if ec.dtype not in cli.DTYPES:
        raise UsageError(f"--dtype={ec.dtype} is not one of {', '.join(cli.DTYPES)}")
    if ec.device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device={ec.device} is not one of auto, cpu, cuda")
    if ec.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device=cuda, but torch finds no CUDA device here; pass --device=cpu")
    ec.device = ec.device if ec.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    for name in ("eval_episodes", "val_episodes", "eval_batch", "search_schedules", "bootstrap", "mc_questions"):
        if getattr(ec, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(ec, name)}")
    try:
        budgets = [float(b) for b in ec.budgets.split(",")] if ec.budgets else [None]
    except ValueError:
        budgets = [-1.0]
    if any(b is not None and not 0 < b <= 1 for b in budgets):
        raise UsageError(f"--budgets must be a comma list of numbers in (0, 1], e.g. --budgets=0.2,0.5,0.8; got {ec.budgets!r}")
    return ec, budgets


@dataclass
class Run:
    """A finished training run, loaded for evaluation."""
    out_dir: Path
    cfg: dict  # the run's configs, as train.py saved them
    model: sol.GPT  # frozen
    policy: sol.Policy
    acfg: sol.ActionConfig
    grid: sol.Grid
    C: int  # context tokens per episode, prefilled dense
    T: int  # controlled steps per episode
    trained_target: list  # the budget fractions (keep, prune, bits/16) the policy was trained for
    init: Path  # the pretrained checkpoint it was trained on, or None
    dataset: str
    data_dir: Path
    splits: dict  # split name -> token memmap
    questions: list  # multiple-choice questions, or None


def finished_checkpoint(out_dir):
    """ckpt.pt of a run that ran all its GRPO iterations, in a folder with room for eval.json."""
    if not (out_dir / "ckpt.pt").exists():
        raise UsageError(f"no trained policy at {out_dir / 'ckpt.pt'}; run python train.py --out_dir {out_dir} first")
    state = load_checkpoint(out_dir / "ckpt.pt", "policy")
    g = state["config"]["grpo"]
    if state["iter"] < g["max_iters"]:
        how = state.get("command", f"python train.py --out_dir {out_dir} <the flags it was started with>")
        raise UsageError(f"{out_dir / 'ckpt.pt'} is a run stopped at GRPO iteration {state['iter']} of {g['max_iters']} "
                         f"(interrupted or killed); finish it with {how}{'' if '--resume' in how.split() else ' --resume'}, then evaluate")
    if shutil.disk_usage(out_dir).free < 2**20:
        raise UsageError(f"{out_dir} is on a file system with less than 1 MiB free, too little for eval.json; free some space")
    return state


def check_memory(ec, gcfg, C, T):
    """Whether the episodes, the frozen GPT and the bootstrap fit in memory, before any is loaded."""
    E, V, lm_bytes = ec.eval_episodes, ec.val_episodes, torch.finfo(getattr(torch, ec.dtype)).bits // 8
    cli.check_memory([(f"evaluation with --eval_batch={ec.eval_batch}, --eval_episodes={E} and --val_episodes={V}",
                       cli.n_params(lambda: sol.GPT(gcfg)) * lm_bytes + 2 * (E + V) * (C + T + 1) * 8
                       + cli.episode_bytes(gcfg, min(ec.eval_batch, max(E, V)), 1, C, T, lm_bytes), "lower them"),
                      (f"the bootstrap with --bootstrap={ec.bootstrap} and --eval_episodes={E}", 16 * ec.bootstrap * E, "lower --bootstrap")], ec.device)


def load_gpt(ec, cfg, out_dir):
    """The frozen GPT the policy was trained on, and the pretrained checkpoint it came from (None for train.py's own)."""
    dtype = getattr(torch, ec.dtype)
    if cfg.get("base_sha1"):  # trained on a pretrained checkpoint (runs from before --init_from lack the key)
        init = Path(ec.init_from or cfg["base"]).expanduser()
        if not init.exists() or pretrained.digest(init) != cfg["base_sha1"]:
            raise UsageError(f"{init} is not the checkpoint {out_dir} was trained on ({cfg['base']}, sha1 {cfg['base_sha1'][:10]}); "
                             "pass that one with --init_from")
        print(f"reading {init}", file=sys.stderr)  # a real LM's file takes a while to read and dequantize
        return pretrained.load(init, dtype, ec.device), init
    if ec.init_from:
        raise UsageError(f"{out_dir} was trained on its own base GPT, not a checkpoint; drop --init_from")
    model = sol.GPT(sol.GPTConfig(**cfg["gpt"]))
    model.load_state_dict(load_checkpoint(cfg["base"], "base GPT")["model"])
    return model.eval().requires_grad_(False).to(ec.device, dtype), None


def load_questions(ec):
    if ec.mc == "synth":
        from data.synth.prepare import multiple_choice
        return multiple_choice(ec.mc_questions, ec.seed)
    if ec.mc:
        if not Path(ec.mc).is_file():
            raise UsageError(f"--mc file {ec.mc} does not exist; pass a JSONL file or --mc=synth")
        return read_mc(ec.mc)[:ec.mc_questions]
    return None


def load_run(ec):
    """The checkpoint, the frozen GPT, the policy and the data, each checked against the others."""
    out_dir = Path(ec.out_dir)
    state = finished_checkpoint(out_dir)
    cfg, g = state["config"], state["config"]["grpo"]
    gcfg, acfg, pcfg = sol.GPTConfig(**cfg["gpt"]), sol.ActionConfig(**cfg["action"]), sol.PolicyConfig(**cfg["policy"])
    grid = sol.action_grid(acfg)
    grid = grid._replace(values=grid.values.to(ec.device), budget=grid.budget.to(ec.device))
    ec.dtype, why = cli.pick_dtype(ec.dtype, ec.device, bool(cfg.get("base_sha1")))
    print(f"dtype {ec.dtype} ({why})")
    check_memory(ec, gcfg, g["context_len"], g["rollout_len"])
    model, init = load_gpt(ec, cfg, out_dir)
    policy = sol.Policy(pcfg, gcfg.n_embd, len(grid.values))
    policy.load_state_dict(state["policy"])
    policy.to(ec.device).eval()
    dataset = ec.dataset or cfg["train"]["dataset"]
    data_dir, meta, splits = load_dataset(dataset, init)
    if init is None and meta["vocab_size"] != gcfg.vocab_size:
        raise UsageError(f"{dataset} has a vocabulary of {meta['vocab_size']} but the model of {out_dir} has {gcfg.vocab_size}; evaluate on its own dataset")
    trained_target = [g["target_keep"] if g["target_keep"] is not None else g["target_budget"],
                      g["target_prune"] if g["target_prune"] is not None else g["target_budget"],
                      g["target_bits"] / 16 if g["target_bits"] is not None else g["target_budget"]]
    torch.manual_seed(ec.seed)
    print(f"policy {out_dir / 'ckpt.pt'} ({state['iter']} GRPO iterations, trained "
          + ("on budgets sampled from ranges" if g["sample_budgets"] else f"for a single budget {trained_target}") + f"), dataset {dataset}, seed {ec.seed}")
    return Run(out_dir, cfg, model, policy, acfg, grid, g["context_len"], g["rollout_len"], trained_target,
               init, dataset, data_dir, splits, load_questions(ec))


def requested_for(run, b):
    """The budget requested at b (None: the policy's training target) on each axis, held to the grid's range (with
    a notice; None for an axis held dense), and as the policy's target tensor (3,)."""
    requested, notices = schedules.clamp_targets(run.acfg, run.trained_target if b is None else [b] * 3)
    for line in notices:
        print(line)
    return requested, torch.tensor([1.0 if v is None else v for v in requested], device=run.grid.budget.device)


def held_out(run, ec, split, n):
    """n fixed episodes (n, C+T+1) of a split, and their dense prefill, which every schedule shares."""
    eps = episodes(run.splits[split], n, run.C + run.T + 1).to(ec.device)
    return eps, schedules.prefill_shown(run.model, eps, run.C, ec.eval_batch, split)


def score(run, ec, split, target, make_scheduler, desc=None, bar=None):
    """score_episodes on held-out episodes: per-episode NLL (E,), achieved budget (3,), actions (E, T). Its progress
    goes to bar, or to a bar of its own named desc. All three on the CPU, where the tables are made."""
    eps, prefilled = split
    with schedules.progress(desc, len(prefilled) * run.T) if bar is None else contextlib.nullcontext(bar) as bar:
        out = score_episodes(run.model, eps, target.to(ec.device), make_scheduler, run.grid, run.acfg, run.C, ec.eval_batch, prefilled, bar)
    return tuple(t.cpu() for t in out)


def sol_scheduler(run, requested):
    """SOL greedy, its budget held by a controller: a scheduler factory, and the controller."""
    control = schedules.budget_controller(requested, run.grid)
    return (lambda: schedules.policy_scheduler(run.policy, greedy=True, control=control)), control


def generate_side_by_side(run, ec, b, enc):
    """Greedy continuations of --prompt, dense and SOL, each with its achieved budget and its log-prob under dense."""
    ids = enc.encode_ordinary(ec.prompt)
    if not ids or len(ids) + ec.max_new_tokens > run.model.cfg.block_size:
        raise UsageError(f"prompt plus --max_new_tokens must be 1..{run.model.cfg.block_size} tokens (got {len(ids)} + {ec.max_new_tokens})")
    requested, target = requested_for(run, b)
    make_sol, _ = sol_scheduler(run, requested)
    for name, make in (("dense", lambda: schedules.dense_scheduler(run.grid)), ("sol", make_sol)):
        new, ach = generate(run.model, ids, ec.max_new_tokens, make, target, run.grid, run.acfg)
        x = torch.tensor([ids + new], device=ec.device)
        logp = torch.log_softmax(run.model(x[:, :-1])[0], -1)[0, len(ids) - 1:].gather(-1, x[0, len(ids):, None]).mean().item()
        print(f"\n[{name}] keep {ach[0]:.2f} prune {ach[1]:.2f} bits {ach[2] * 16:.1f} | mean log-prob under dense {logp:.3f}")
        print(ec.prompt + enc.decode(new))


def every_method(run, ec, b, val, test, dense_nll, gen):
    """Each method on the test episodes at budget b: {method: (nll (E,), achieved (3,), actions)}, the budget
    requested, the mean multipliers of the methods held by a controller and the search's validation NLLs."""
    acfg, T = run.acfg, run.T
    requested, target = requested_for(run, b)
    make_sol, control = sol_scheduler(run, requested)
    held = {"sol": control}
    res = {"sol": score(run, ec, test, target, make_sol, "sol (test)")}
    ach = res["sol"][1].tolist()  # every baseline spends what SOL spent
    res["dense"] = (dense_nll, torch.ones(3), None)
    res["static"] = score(run, ec, test, target, lambda: schedules.static_scheduler(acfg, ach), "static (test)")
    res["random"] = score(run, ec, test, target, lambda: plan_scheduler(acfg, lambda n: mix_plan(acfg, ach, n, T, gen)), "random (test)")
    # candidates: half reorderings of static's values (local), half drawn from the whole grid (broad)
    cands = torch.cat([mix_plan(acfg, ach, ec.search_schedules // 2, T, gen),
                       search_candidates(acfg, ach, ec.search_schedules - ec.search_schedules // 2, T, gen)])
    with schedules.progress(f"search {len(cands)} schedules (val)", len(cands) * len(val[1]) * T) as bar:
        val_nll = torch.stack([score(run, ec, val, target, lambda: plan_scheduler(acfg, c), bar=bar)[0].mean() for c in cands])
    best = int(val_nll.argmin())
    res["search"] = score(run, ec, test, target, lambda: plan_scheduler(acfg, cands[best]), "search (test)")
    held["heuristic"] = schedules.budget_controller([a if len(v) > 1 else None for a, (v, _) in zip(ach, schedules.axis_lists(acfg))], run.grid)
    res["heuristic"] = score(run, ec, test, target, lambda: heuristic_scheduler(run.grid, held["heuristic"]), "heuristic (test)")
    if ec.oracle:  # at the requested budget, as SOL
        held["oracle"] = schedules.budget_controller(requested, run.grid)
        res["oracle"] = score(run, ec, test, target, lambda: schedules.oracle_scheduler(run.model, run.grid, acfg, held["oracle"]), "oracle (test)")
    return res, requested, {m: schedules.mean_multipliers(c) for m, c in held.items()}, {"val_nll": val_nll.tolist(), "best": best}


def budget_table(run, ec, b, res, requested, cals, gen):
    """Print one budget's table and return its rows for eval.json: every method beside static, each checked
    against what it was asked to spend."""
    ach = res["sol"][1].tolist()
    enabled = [len(v) > 1 for v in (run.acfg.keep, run.acfg.prune, run.acfg.bits)]
    print(f"{'method':<10} {'nll':>7} {'ppl':>8} {'dppl vs static [95% CI]':>28} {'keep':>6} {'prune':>6} {'bits':>6}")
    rows = []
    for m, (nll, a, _) in res.items():
        d, lo, hi = bootstrap_delta(nll, res["static"][0], ec.bootstrap, gen)
        asked = requested if m in ("sol", "oracle") else [1.0] * 3 if m == "dense" else ach  # SOL, oracle: the target; the others: what SOL spent
        off = schedules.off_budget(a.tolist(), [x if on else None for x, on in zip(asked, enabled)])
        flag = f"  OFF BUDGET: {', '.join(off)}" if off else ""
        print(f"{m:<10} {nll.mean():7.4f} {nll.mean().exp():8.3f} {d:+9.3f} [{lo:+.3f}, {hi:+.3f}]{'':>4} "
              f"{a[0]:6.3f} {a[1]:6.3f} {a[2] * 16:6.2f}{flag}")
        rows.append({"method": m, "budget": b, "target": axes(asked), "achieved": axes(a.tolist()), "nll": nll.mean().item(),
                     "ppl": nll.mean().exp().item(), "tokens": len(nll) * run.T, "dppl_vs_static": d, "dppl_ci95": [lo, hi],
                     "off_budget": off, "controller_mean_multipliers": cals.get(m)})
    if any(r["off_budget"] for r in rows):
        print(f"OFF BUDGET: achieved more than {schedules.BUDGET_TOL} (bits {schedules.BUDGET_TOL * 16:g}) away from what the method was "
              "asked for (sol, oracle: the target; the others: sol's achieved budget)")
    if "oracle" in res:
        room = schedules.headroom({m: v[0] for m, v in res.items()}, ec.bootstrap, gen)
        rows[0].update(room)
        print(schedules.headroom_line(room))
    return rows


def evaluate_budgets(run, ec, budgets, val, test, gen):
    """Every method at every budget: the rows of eval.json, and per budget SOL's actions (E, T) and the search."""
    dense_nll, _, _ = score(run, ec, test, torch.ones(3), lambda: schedules.dense_scheduler(run.grid), "dense (test)")
    rows, details = [], {}
    for b in budgets:
        res, requested, cals, search = every_method(run, ec, b, val, test, dense_nll, gen)
        details[b] = {"sol_actions": res["sol"][2], "search": search}
        label = "trained target" if b is None else f"budget {b}"
        print(f"\n{label}: target keep {requested[0]} prune {requested[1]} bits {None if requested[2] is None else requested[2] * 16:g}"
              f" | {len(test[0])} test episodes x {run.T} steps | search: best of {ec.search_schedules} on {len(val[0])} val episodes")
        rows += budget_table(run, ec, b, res, requested, cals, gen)
    return rows, details


def where_compute_went(run, ec, b, actions, test, enc):
    """Shade the first test episodes' tokens by SOL's compute (allocation.html); on the default corpus, compare
    the tokens that need far context with the rest. actions (E, T) at budget b."""
    C, T, grid = run.C, run.T, run.grid._replace(values=run.grid.values.cpu(), budget=run.grid.budget.cpu())
    compute = grid.budget[actions].mean(-1)  # (E, T) mean budget fraction of the step's action
    print(f"\nwhere the compute went ({'trained target' if b is None else f'budget {b}'}; darker = more): "
          "each token shaded by the compute of the step that predicted it")
    toks = test[0][:6, C + 1:].cpu()  # the controlled tokens of the first six test episodes, one per line
    shade([enc.decode([t]).replace("\n", " / ") + ("\n" if k % T == T - 1 else "") for k, t in enumerate(toks.flatten().tolist())],
          compute[:6].flatten().tolist(), run.out_dir / "allocation.html")
    allocation = None
    if (run.data_dir / "test_skill.bin").exists():  # the default corpus knows which tokens need far context
        skill = np.memmap(run.data_dir / "test_skill.bin", dtype=np.uint8, mode="r")  # one flag per test token
        far = episodes(skill, ec.eval_episodes, C + T + 1)[:, C + 1:] == RECALL  # (E, T), aligned with the test episodes
        keep = grid.values[actions][..., 0]
        dense_attn = keep == 1.0
        allocation = {"dense_attention_share": {"far_context": dense_attn[far].float().mean().item(), "other": dense_attn[~far].float().mean().item()},
                      "mean_keep": {"far_context": keep[far].mean().item(), "other": keep[~far].mean().item()}}
        print(f"dense-attention steps: {allocation['dense_attention_share']['far_context']:.1%} of the tokens that need far context "
              f"vs {allocation['dense_attention_share']['other']:.1%} of the rest (mean keep {allocation['mean_keep']['far_context']:.2f} vs {allocation['mean_keep']['other']:.2f})")
    print(f"wrote {run.out_dir / 'allocation.html'}")
    return allocation


def multiple_choice(run, ec, b, val, enc):
    """Accuracy on the questions, each answer the choice of highest log-likelihood, for SOL, static and dense at b."""
    requested, target = requested_for(run, b)
    make_sol, _ = sol_scheduler(run, requested)
    accuracy = {}
    for m, make in (("sol", make_sol), ("static", lambda: schedules.static_scheduler(run.acfg, target.tolist())),
                    ("dense", lambda: schedules.dense_scheduler(run.grid))):
        questions = tqdm(run.questions, desc=f"multiple choice, {m}", leave=False, dynamic_ncols=True)
        right = sum(int(np.argmax(choice_loglik(run.model, enc, q, make, target, run.grid, run.acfg))) == q["answer"] for q in questions)
        accuracy[m] = right / len(run.questions)
    print(f"\nmultiple choice ({ec.mc}, {len(run.questions)} questions, budget {requested}): "
          + ", ".join(f"{m} {acc:.1%}" for m, acc in accuracy.items()))
    return accuracy


def write_report(run, ec, budgets, rows, details, allocation, mc, val, test):
    """eval.json, and the Pareto plot when there are budgets to plot."""
    png = pareto_plot(rows, run.out_dir / "pareto.png") if ec.plot and len(budgets) > 1 else None
    report = {"dataset": run.dataset, "seed": ec.seed, "config": {**run.cfg, "eval": asdict(ec)},
              "splits": {s: len(d) for s, d in run.splits.items()},
              "episodes": {"val": len(val[0]), "test": len(test[0]), "steps_per_episode": run.T},
              "results": rows, "allocation": allocation, "multiple_choice": mc,
              "search": {str(b): d["search"] for b, d in details.items()}}
    cli.save_atomic(json.dumps(report, indent=2), run.out_dir / "eval.json")
    print(f"wrote {run.out_dir / 'eval.json'}" + (f" and {png}" if png else ""))


def say_cost(run, ec, budgets):
    """What the evaluation will decode, on stderr before it starts: on a large model the defaults take a while."""
    A, n = len(run.grid.values), len(budgets)
    test = 1 + (5 + (A if ec.oracle else 0)) * n  # dense; sol, static, random, search, heuristic; the oracle
    params = sum(p.numel() for p in run.model.parameters())
    print(f"evaluating a {params:,}-parameter GPT in {ec.dtype}: {ec.search_schedules * n:,} decodes of {ec.val_episodes} validation episodes "
          f"(the search) and {test:,} of {ec.eval_episodes} test episodes, {run.T} steps each ({'the oracle counts as one per grid action; ' if ec.oracle else ''}"
          "fewer with --val_episodes, --eval_episodes, --search_schedules, --oracle=false, --budgets)", file=sys.stderr)


def main(argv):
    ec, budgets = parse(argv)
    run = load_run(ec)
    if ec.prompt:
        return generate_side_by_side(run, ec, budgets[0], tokenizer(run))
    say_cost(run, ec, budgets)
    val = held_out(run, ec, "val", ec.val_episodes)
    test = held_out(run, ec, "test", ec.eval_episodes)
    gen = torch.Generator().manual_seed(ec.seed)  # the baselines' random plans and the bootstrap
    rows, details = evaluate_budgets(run, ec, budgets, val, test, gen)
    b = budgets[len(budgets) // 2]  # the allocation and multiple choice at the middle budget
    enc = tokenizer(run)
    allocation = where_compute_went(run, ec, b, details[b]["sol_actions"], test, enc)
    mc = multiple_choice(run, ec, b, val, enc) if run.questions else None
    write_report(run, ec, budgets, rows, details, allocation, mc, val, test)


def on_signal(signum, frame):
    raise KeyboardInterrupt(signum)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, on_signal)  # as SIGINT: unwind, so no file is left half-written
    try:
        main(sys.argv[1:])
    except (UsageError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        sig = signal.Signals(e.args[0] if e.args else signal.SIGINT)
        print(f"{sig.name}: evaluation stopped, eval.json not (re)written; python {shlex.join(sys.argv)} evaluates again", file=sys.stderr)
        sys.exit(128 + sig)
