"""
The schedulers: functions (t, obs) -> (N,) action indices that pick each step's compute for sol.rollout. The
policy (sampled for training, greedy for evaluation), dense, static allocation and the oracle bound; the budget
controller that holds greedy decoding (and the oracle) to a requested budget as it decodes; and the bookkeeping of
budgets, requested against achieved, and of the oracle's headroom.
"""
import torch
import torch.nn.functional as F
from tqdm import tqdm

import sol


def dense_scheduler(grid):
    return lambda t, obs: torch.full((obs["emb"].size(0),), grid.dense, dtype=torch.long, device=obs["emb"].device)


def bracket(values, scale, b):
    """The grid values around the budget fraction b (indices lo, hi into values) and the share f of steps
    at the upper one that makes their mix average to b."""
    fr = [v / scale for v in values]
    b = min(max(b, min(fr)), max(fr))
    lo = max((i for i in range(len(fr)) if fr[i] <= b + 1e-9), key=fr.__getitem__)
    hi = min((i for i in range(len(fr)) if fr[i] >= b - 1e-9), key=fr.__getitem__)
    return lo, hi, 0.0 if fr[hi] == fr[lo] else (b - fr[lo]) / (fr[hi] - fr[lo])


def axis_lists(acfg):
    return ((acfg.keep, 1.0), (acfg.prune, 1.0), (acfg.bits, 16.0))  # each with the scale of its dense value


AXES = ("keep", "prune", "bits")


BUDGET_TOL = 0.02  # an achieved budget fraction within this of the one asked for meets it (bits: 0.32 bits)
LAM = 100.0  # the budget multipliers' range, [-LAM, LAM]: how far the controller may steer a policy from its own choice


def clamp_targets(acfg, asked):
    """Requested budget fractions (keep, prune, bits/16) held to what the grid can reach: None for an axis whose
    list holds its dense value alone (held dense), the cheapest value for a request below it. Returns the
    targets and one notice line per request that was raised."""
    out, notices = [], []
    for name, b, (values, scale) in zip(AXES, asked, axis_lists(acfg)):
        floor = min(values) / scale
        if len(values) > 1 and b < floor - 1e-9:
            notices.append(f"notice: the {name} target {b * scale:g} is below the grid's cheapest {name} {min(values):g}, "
                           f"so it is held to {min(values):g}; extend --{name} to go lower")
        out.append(max(b, floor) if len(values) > 1 else None)
    return out, notices


def off_budget(achieved, asked, tol=BUDGET_TOL):
    """The axes on which achieved budget fractions (3,) miss the ones asked for (3, None = axis held dense) by more than tol."""
    return [name for name, a, b in zip(AXES, achieved, asked) if b is not None and abs(float(a) - b) > tol]


def static_scheduler(acfg, achieved):
    """The same setting every step: on each axis, the two grid values around the requested budget
    fraction, mixed in a fixed round-robin (over all rows and steps) so their average hits it."""
    plans = [(len(v), *bracket(v, scale, float(b))) for (v, scale), b in zip(axis_lists(acfg), achieved)]

    def pick(t, obs):
        N = obs["emb"].size(0)
        n = (t * N + torch.arange(N, device=obs["emb"].device)).double()  # one cycle over all rows and steps
        a = torch.zeros(N, dtype=torch.long, device=n.device)
        for size, lo, hi, f in plans:
            upper = torch.floor((n + 1) * f) > torch.floor(n * f)
            a = a * size + torch.where(upper, hi, lo)
        return a
    return pick


def multiplier_bias(grid, lower, upper, share):
    """The logit bias of budget-held greedy decoding (see calibrate_bias), a function (t, N) -> (N, A):
    lam . budget(a), where on each axis a share of the steps takes the upper multiplier and the rest the lower
    one, in static_scheduler's fixed round-robin over all rows and steps. lower, upper, share: (3,) each."""
    def bias(t, N):
        n = (t * N + torch.arange(N, device=lower.device)).double()[:, None]  # (N, 1)
        up = torch.floor((n + 1) * share.double()) > torch.floor(n * share.double())  # (N, 3)
        return torch.where(up, upper, lower) @ grid.budget.T  # (N, A)
    return bias


def policy_scheduler(policy, greedy, generator=None, control=None, shard=(0, 1)):
    """The learned schedule: sample (training rollouts) or take the argmax (evaluation). control (t, logits, obs) ->
    actions replaces the argmax: evaluation passes a budget_controller, which steers greedy decoding onto the budget.
    shard (rank, world): these rows are part `rank` of `world` equal parts of a larger batch, one per
    data-parallel process; every process draws the whole batch's noise, so each samples what one would."""
    cache = None

    def pick(t, obs):
        nonlocal cache
        if t == 0:
            cache = policy.new_cache(obs["emb"].size(0))
        logits = policy(*(obs[k][:, None] for k in ("h_prev", "emb", "scalars", "prev_action")), cache)[:, -1]
        if greedy:
            return logits.argmax(-1) if control is None else control(t, logits, obs)
        probs = F.softmax(logits.float() / policy.pcfg.temperature, -1)
        # torch.multinomial's own one-sample method (argmax of p / Exp(1) noise, the same draws bit for bit)
        rank, world = shard
        N = probs.size(0)
        noise = torch.empty(world * N, probs.size(1), device=probs.device).exponential_(generator=generator)
        return (probs / noise[rank * N:(rank + 1) * N]).argmax(-1)
    return pick


def solve(spent, target, on, x, lo, hi, steps=14, rounds=6):
    """Knobs x (3,) that make spent() -> achieved budget (3,) meet target (3,) on the axes `on`, jointly: each axis's
    budget grows with its own knob but moves with the others' too (a policy that spends on all three axes together), so
    bisect one axis at a time over [lo, hi], in rounds, until every axis is within half the tolerance or the rounds run
    out. An axis already within it is left alone; a bisection stops once its axis is within a quarter. spent() is
    evaluated once per distinct x."""
    seen = {}

    def at():
        key = tuple(x.tolist())
        if key not in seen:
            seen[key] = spent()
        return seen[key]

    def bisect(axis):  # the budget grows with x[axis]
        a, b = lo, hi
        for _ in range(steps):
            x[axis] = (a + b) / 2
            gap = at()[axis] - target[axis]
            if gap.abs() <= BUDGET_TOL / 4:
                return
            a, b = (x[axis].item(), b) if gap < 0 else (a, x[axis].item())
        x[axis] = (a + b) / 2

    for _ in range(rounds):
        for axis in on:
            if (at()[axis] - target[axis]).abs() > BUDGET_TOL / 2:
                bisect(axis)
        if not missed(at(), target, on):
            break


def missed(achieved, target, on):
    return [axis for axis in on if (achieved[axis] - target[axis]).abs() > BUDGET_TOL / 2]


def calibrate_bias(spent_under, requested, grid, cell=0.25):
    """Multipliers of the logit bias lam . budget(a) (multiplier_bias) that hold greedy decoding to the requested
    budget. spent_under(bias) returns the budget (3,) spent under a bias (one step's choices, or a whole decode).
    The budget is a step function of lam and can jump across the target at one lam (many rows tie), so
    each axis is steered by a knob x that mixes: a share frac(x / cell) of the rows takes the multiplier just above
    x on a grid of the given cell, the rest the one just below. The budget is then continuous in x, and solve meets
    every axis at once. Only the budget is calibrated, never quality. Returns the lower and upper multipliers and
    the upper one's share, (3,) each."""
    target = torch.tensor([1.0 if v is None else v for v in requested], device=grid.budget.device)
    x = torch.zeros(3, device=grid.budget.device)

    def mix():
        lower = torch.floor(x / cell) * cell
        share = x / cell - torch.floor(x / cell)
        return lower, torch.where(share > 0, lower + cell, lower), share
    solve(lambda: spent_under(multiplier_bias(grid, *mix())), target, [i for i in range(3) if requested[i] is not None], x, -LAM, LAM)
    return mix()


def budget_controller(requested, grid, cell=0.25):
    """Greedy decoding held to the requested budget while it decodes: a function (t, score (N, A), obs) -> actions
    (N,) that, at every controllable step, aims this step's spend at what brings the spend of everything decoded
    through the controller so far (every row of every batch) back onto the target: it takes argmax(score + lam .
    budget(a)) with the multipliers lam solved for that aim (calibrate_bias), then repairs what the solve missed
    (repair). A fit made beforehand on other episodes misses by what their spend differs; this reads the spend as it
    happens, so the error left at the end is one step's, spread over all the steps. Only the spend steers it, never
    quality. Rows that only pad a batch (obs["live"] False) take their argmax, uncounted. Its .multipliers lists each
    step's mean lam (3,). cell: calibrate_bias's, in units of the scores: 0.25 suits a policy's logits, the oracle's
    KL scores need ORACLE_CELL."""
    target = torch.tensor([1.0 if v is None else v for v in requested], device=grid.budget.device)
    on = [i for i in range(3) if requested[i] is not None]
    total = {"spent": torch.zeros(3, device=target.device), "n": 0}

    def choose(t, all_scores, obs):
        a, live = all_scores.argmax(-1), obs["live"]
        if not obs["scalars"][0, 1] or not live.any():  # not controllable, or padding only: neither used nor counted
            return a
        score = all_scores[live]
        N = score.size(0)
        want = ((target * (total["n"] + N) - total["spent"]) / N).clamp_min(0).minimum(torch.ones_like(target))  # (3,)
        spent_at = lambda bias: grid.budget[(score + bias(t, N)).argmax(-1)].mean(0)
        lower, upper, share = calibrate_bias(spent_at, [want[i].item() if i in on else None for i in range(3)], grid, cell)
        biased, lam = score + multiplier_bias(grid, lower, upper, share)(t, N), lower + share * (upper - lower)
        a[live] = repair(biased, biased.argmax(-1), want, on, grid, lam)
        total["spent"], total["n"] = total["spent"] + grid.budget[a[live]].sum(0), total["n"] + N
        choose.multipliers.append(lam)
        return a
    choose.multipliers = []
    return choose


def repair(score, a, want, on, grid, lam):
    """Where a step's actions a (N,) still spend more than a quarter of the tolerance away from want (3,) on an axis
    of `on` (many rows tie, and the axes move together), change one row's action at a time: the change that closes
    most of the gap (summed over the axes) per unit of score given up, until every axis is within it or no change
    closes any. Only changes that some multipliers within the solve's range (|lam| <= LAM) would make are allowed:
    the controller steers the policy as far as the multipliers reach, never further. score: biased by lam (3,)."""
    N, a = score.size(0), a.clone()
    w = torch.zeros(3, device=score.device)
    w[on] = 1.0
    for _ in range(4 * N):
        gap = grid.budget[a].mean(0) - want  # (3,)
        if (gap[on].abs() <= BUDGET_TOL / 4).all():
            break
        step = grid.budget - grid.budget[a][:, None]  # (N, A, 3) each change's budget move
        closes = (gap.abs() - (gap + step / N).abs()) @ w  # (N, A) gap closed by each change
        cost = score.gather(1, a[:, None]) - score  # (N, A) score given up, >= 0 at the argmax
        reach = (LAM - lam.abs()) * step.abs() @ w  # the most a multiplier in range could pay for it
        ratio = torch.where((closes > 1e-9) & (cost <= reach), closes / (cost.clamp_min(0) + 1e-6), -1.0)  # -inf scores: never
        best = int(ratio.argmax())
        if ratio.view(-1)[best] < 0:
            break
        a[best // score.size(1)] = best % score.size(1)
    return a


def mean_multipliers(control):
    """A controller's multipliers averaged over its steps (3,), for the report."""
    return torch.stack(control.multipliers).mean(0).tolist() if control.multipliers else [0.0, 0.0, 0.0]


def prefill_shown(model, eps, C, batch, split):
    """sol.prefill_batches under a progress bar: one batch of a real LM's contexts can take a quarter of a minute."""
    with progress(f"prefill {split}", -(-len(eps) // batch), " batches") as bar:
        return sol.prefill_batches(model, eps, C, batch, bar)


def progress(desc, total=None, unit=" steps"):
    """A progress bar on stderr (stdout keeps the tables), counting decode steps of one batch: an evaluation of a
    large model is otherwise silent for minutes. It clears itself when done."""
    return tqdm(desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True)

# -----------------------------------------------------------------------------
# the oracle: at every step, every action tried, and the one that moves the next-token distribution least from
# the dense one, at a price per unit of budget. It reads only the past, so it is a schedule a perfect policy could
# output: a bound on what the policy can learn, which needs the dense step (and every other) it saves.


@torch.no_grad()
def probe(model, cache, token, grid, acfg, chunk=2**27):
    """KL(p_dense || p_a) of the next token, for every action a of the grid from the state in cache (N rows): the
    cache forked A ways and read in place, token (N,) fed under each action, (N, A). chunk: logits' bytes at once."""
    N, A = token.size(0), len(grid.values)
    per = max(1, chunk // (4 * A * model.cfg.vocab_size))  # rows per forward
    out = []
    with progress("probe every action", N, " rows") as bar:  # one step of a real LM can take half a minute
        for i in range(0, N, per):
            part = slice(i, min(i + per, N))
            sub = cache.rows(part).fork(A, 1)
            logits, _ = model(token[part].repeat_interleave(A)[:, None], sub, grid.values.repeat(sub.k.size(1) // A, 1), acfg)
            logp = torch.log_softmax(logits[:, -1].float(), -1).unflatten(0, (-1, A))  # (n, A, V)
            ref = logp[:, grid.dense]  # the dense action, from the same state
            out.append((ref.exp()[:, None] * (ref[:, None] - logp)).sum(-1).clamp_min(0))
            bar.update(part.stop - part.start)
    return torch.cat(out)


ORACLE_CELL = 2 * LAM / 2**14  # the solve's finest step: KL differences between actions are often under 0.1 nats, and a
# cell of 0.25 split a step's rows between prices that far apart (the oracle fell behind static: docs/pretrained.md)


def oracle_controller(requested, grid):
    """The budget controller of the oracle's KL scores: its multipliers on a grid as fine as the solve resolves."""
    return budget_controller(requested, grid, ORACLE_CELL)


def oracle_scheduler(model, grid, acfg, control=None):
    """The oracle's schedule: argmax over actions of -KL(p_dense || p_a), or control (t, -KL, obs) -> actions in its
    place (a budget_controller: the price per unit of budget that holds it to the target)."""
    def pick(t, obs):
        N = obs["emb"].size(0)
        if not obs["scalars"][0, 1]:  # not controllable: the action is not used
            return torch.full((N,), grid.dense, dtype=torch.long, device=obs["emb"].device)
        score = -probe(model, obs["cache"], obs["token"], grid, acfg)
        return score.argmax(-1) if control is None else control(t, score, obs)
    return pick


def headroom(nll, n, gen):
    """What there was to win and how much of it SOL won, from per-episode NLLs (E,) of sol, static and oracle:
    the headroom static - oracle (ppl), and SOL's share of it, (static - sol) / (static - oracle), with its 95%
    paired-bootstrap interval over episodes (n resamples)."""
    idx = torch.randint(0, len(nll["sol"]), (n, len(nll["sol"])), generator=gen)
    ppl = {m: (v.mean().exp(), v[idx].mean(1).exp()) for m, v in nll.items() if m in ("sol", "static", "oracle")}
    (s, s_b), (st, st_b), (o, o_b) = ppl["sol"], ppl["static"], ppl["oracle"]
    share_b = (st_b - s_b) / (st_b - o_b)
    return {"headroom": (st - o).item(), "sol_share": ((st - s) / (st - o)).item(),
            "sol_share_ci95": [share_b.quantile(0.025).item(), share_b.quantile(0.975).item()]}


def headroom_line(room):
    return (f"oracle: a bound, not a method (it runs every action, the dense one included, to choose one) | headroom static - oracle "
            f"{room['headroom']:.3f} ppl | sol's share (static - sol) / (static - oracle) {room['sol_share']:.2f} "
            f"[{room['sol_share_ci95'][0]:.2f}, {room['sol_share_ci95'][1]:.2f}]")


def axes(v):
    """Budget fractions (keep, prune, bits/16) as reported: bits in bits, None for an axis held dense."""
    return {name: None if x is None else float(x) * scale for name, x, scale in zip(AXES, v, (1, 1, 16))}
