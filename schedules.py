"""
The schedulers: functions (t, obs) -> (N,) action indices that pick each step's compute for sol.rollout. The
policy (sampled for training, greedy for evaluation), dense, static allocation and the oracle bound; the joint
calibration that holds greedy decoding (and the oracle) to a requested budget; and the bookkeeping of budgets,
requested against achieved, and of the oracle's headroom.
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
    """The logit bias of budget-calibrated greedy decoding (see calibrate_bias), a function (t, N) -> (N, A):
    lam . budget(a), where on each axis a share of the steps takes the upper multiplier and the rest the lower
    one, in static_scheduler's fixed round-robin over all rows and steps. lower, upper, share: (3,) each."""
    def bias(t, N):
        n = (t * N + torch.arange(N, device=lower.device)).double()[:, None]  # (N, 1)
        up = torch.floor((n + 1) * share.double()) > torch.floor(n * share.double())  # (N, 3)
        return torch.where(up, upper, lower) @ grid.budget.T  # (N, A)
    return bias


def policy_scheduler(policy, greedy, generator=None, bias=None, shard=(0, 1)):
    """The learned schedule: sample (training rollouts) or take the argmax (evaluation). bias, (A,) or a function
    (t, N) -> (N, A), is added to the logits: evaluation uses it to steer greedy decoding onto the budget.
    shard (rank, world): these rows are part `rank` of `world` equal parts of a larger batch, one per
    data-parallel process; every process draws the whole batch's noise, so each samples what one would."""
    cache = None

    def pick(t, obs):
        nonlocal cache
        if t == 0:
            cache = policy.new_cache(obs["emb"].size(0))
        logits = policy(*(obs[k][:, None] for k in ("h_prev", "emb", "scalars", "prev_action")), cache)[:, -1]
        if bias is not None:
            logits = logits + (bias(t, logits.size(0)) if callable(bias) else bias)
        if greedy:
            return logits.argmax(-1)
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
    bisect one axis at a time over [lo, hi], in rounds, until every axis is within half the tolerance (test episodes
    differ a little) or the rounds run out. An axis already within it is left alone; a bisection stops once its
    axis is within a quarter. spent() is decoded once per distinct x."""
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
    budget. spent_under(bias) decodes the validation episodes under a bias and returns the achieved budget (3,).
    The achieved budget is a step function of lam and can jump across the target at one lam (many steps tie), so
    each axis is steered by a knob x that mixes: a share frac(x / cell) of the steps takes the multiplier just above
    x on a grid of the given cell, the rest the one just below. The budget is then continuous in x, and solve meets
    every axis at once. Only the budget is calibrated, never quality. Returns the lower and upper multipliers and
    the upper one's share, (3,) each."""
    target = torch.tensor([1.0 if v is None else v for v in requested], device=grid.budget.device)
    x = torch.zeros(3, device=grid.budget.device)

    def mix():
        lower = torch.floor(x / cell) * cell
        share = x / cell - torch.floor(x / cell)
        return lower, torch.where(share > 0, lower + cell, lower), share
    solve(lambda: spent_under(multiplier_bias(grid, *mix())), target, [i for i in range(3) if requested[i] is not None], x, -20.0, 20.0)
    return mix()


def calibrate(model, policy, eps, requested, grid, acfg, C, batch, prefilled=None):
    """Greedy decoding takes the policy's mode, which can sit off the requested budget: an axis that costs no
    quality gets its cheapest value even when the sampled schedules average to the target. calibrate_bias on
    the validation episodes eps, decoding the greedy policy under each bias tried."""
    target = torch.tensor([1.0 if v is None else v for v in requested], device=eps.device)
    prefilled = prefilled or sol.prefill_batches(model, eps, C, batch)  # one prefill for all the decodes
    scheduler = lambda bias: lambda: policy_scheduler(policy, greedy=True, bias=bias)
    with progress("calibrate sol (val)") as bar:
        return calibrate_bias(lambda bias: sol.score_episodes(model, eps, target, scheduler(bias), grid, acfg, C, batch, prefilled, bar)[1],
                              requested, grid)


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


def oracle_scheduler(model, grid, acfg, bias=None, record=None):
    """The oracle's schedule: argmax over actions of -KL(p_dense || p_a) + bias, bias (A,) or (t, N) -> (N, A) as
    for the policy (multiplier_bias: lam . budget(a), lam the negated price). record: a list that gets (t, -KL)
    of every controllable step, for fitting the prices without decoding again."""
    def pick(t, obs):
        N = obs["emb"].size(0)
        if not obs["scalars"][0, 1]:  # not controllable: the action is not used
            return torch.full((N,), grid.dense, dtype=torch.long, device=obs["emb"].device)
        score = -probe(model, obs["cache"], obs["token"], grid, acfg)
        if record is not None:
            record.append((t, score))
        return (score + (bias(t, N) if callable(bias) else 0 if bias is None else bias)).argmax(-1)
    return pick


def calibrate_oracle(model, eps, requested, grid, acfg, C, batch, prefilled=None, fits=4):
    """The oracle's prices held to the requested budget on the validation episodes eps, by calibrate_bias as SOL's
    multipliers are, but over recorded probes instead of decodes: decode recording every step's -KL over the grid,
    solve on the records, and decode again at the solution (its choices change the states it probes), until a
    decode meets the target or `fits` decodes are spent. Returns (lower, upper, share) as calibrate."""
    target = torch.tensor([1.0 if v is None else v for v in requested], device=eps.device)
    on = [i for i in range(3) if requested[i] is not None]
    prefilled = prefilled or sol.prefill_batches(model, eps, C, batch)
    cal = tuple(torch.zeros(3, device=eps.device) for _ in range(3))  # price 0: the first decode is (nearly) dense
    for i in range(fits):
        records = []  # per batch of episodes, its (t, -KL) steps

        def make():
            records.append([])
            return oracle_scheduler(model, grid, acfg, multiplier_bias(grid, *cal), records[-1])
        with progress(f"calibrate oracle {i + 1}/{fits} (val)", len(prefilled) * (eps.size(1) - C - 1)) as bar:
            achieved = sol.score_episodes(model, eps, target, make, grid, acfg, C, batch, prefilled, bar)[1]
        if i > 0 and not missed(achieved, target, on):
            break
        cal = calibrate_bias(lambda bias: replayed_budget(records, bias, grid), requested, grid)
    return cal


def replayed_budget(records, bias, grid):
    """The mean budget (3,) the oracle's choices would spend under bias, on the recorded probes of its steps."""
    spent = [grid.budget[(score + bias(t, score.size(0))).argmax(-1)] for steps in records for t, score in steps]
    return torch.cat(spent).mean(0)


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
