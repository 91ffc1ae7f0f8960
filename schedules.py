"""
The schedulers: functions (t, obs) -> (N,) action indices that pick each step's compute for sol.rollout. The
policy (sampled for training, greedy for evaluation), dense, and static allocation; the calibration that holds
greedy decoding to a requested budget; and the bookkeeping of budgets, requested against achieved.
"""
import torch
import torch.nn.functional as F

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
    """The logit bias of budget-calibrated greedy decoding (see calibrate in train.py), a function (t, N) -> (N, A):
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


def calibrate(model, policy, eps, requested, grid, acfg, C, batch, steps=8, prefilled=None):
    """Greedy decoding takes the policy's mode, which can sit off the requested budget: an axis that costs no
    quality gets its cheapest value even when the sampled schedules average to the target. A Lagrange
    multiplier per axis, lam, adds lam . budget(a) to the logits; bisect each on the validation episodes until
    the greedy schedule's achieved budget meets the target. The achieved budget is a step function of lam and
    can jump across the target: on such an axis a share of the steps takes the upper end of lam's last bracket
    and the rest its lower end (multiplier_bias), and that share is bisected in turn. Only the budget is
    calibrated, never quality. Returns the lower and upper multipliers and the upper one's share, (3,) each."""
    target = torch.tensor([1.0 if v is None else v for v in requested], device=eps.device)
    lower, upper, share = (torch.zeros(3, device=eps.device) for _ in range(3))
    scheduler = lambda: policy_scheduler(policy, greedy=True, bias=multiplier_bias(grid, lower, upper, share))
    prefilled = prefilled or sol.prefill_batches(model, eps, C, batch)  # one prefill for all the bisection's decodes
    spent = lambda: sol.score_episodes(model, eps, target, scheduler, grid, acfg, C, batch, prefilled)[1]

    def bisect(x, axis, lo, hi):  # the budget grows with x[axis]; returns the last bracket
        for _ in range(steps):
            x[axis] = (lo + hi) / 2
            lo, hi = (x[axis].item(), hi) if spent()[axis] < target[axis] else (lo, x[axis].item())
        x[axis] = (lo + hi) / 2
        return lo, hi

    on = [i for i in range(3) if requested[i] is not None]
    brackets = {}
    for _ in range(2):  # the axes interact a little: two rounds of coordinate bisection
        for axis in on:
            brackets[axis] = bisect(lower, axis, -20.0, 20.0)
    upper.copy_(lower)
    missed = (spent() - target).abs() > BUDGET_TOL / 2  # aim within half the tolerance: test episodes differ a little
    for axis in on:
        if missed[axis]:  # no one multiplier meets the target: mix the two around the jump
            lower[axis], upper[axis] = brackets[axis]
            bisect(share, axis, 0.0, 1.0)
    return lower, upper, share


def axes(v):
    """Budget fractions (keep, prune, bits/16) as reported: bits in bits, None for an axis held dense."""
    return {name: None if x is None else float(x) * scale for name, x, scale in zip(AXES, v, (1, 1, 16))}
