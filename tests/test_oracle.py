"""The oracle bound and the joint budget solve, against brute force and hand-derived answers: the oracle's choice
is the argmin over the grid of KL to dense plus its prices, its prices hold it to the budget, the headroom figures
follow from the rows, and the multipliers of a policy that couples its axes are solved together."""
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import schedules  # noqa: E402
import sol  # noqa: E402
from test_method import CFG, episodes, fixed_bias  # noqa: E402
from test_method import gpt as random_gpt  # noqa: E402


def gpt(seed=0):
    """A tiny random GPT with weights sharp enough that every action moves its predictions."""
    return random_gpt(seed, std=0.3)


@torch.no_grad()
def brute_force_kl(model, cache, token, grid, acfg):
    """KL(p_dense || p_a) for every action, one plain decode step per action on a copy of the cache: (N, A)."""
    dense = torch.log_softmax(model(token[:, None], cache.copy())[0][:, -1], -1)
    kl = []
    for a in range(len(grid.values)):
        logits, _ = model(token[:, None], cache.copy(), grid.values[a].expand(len(token), 3), acfg)
        logp = torch.log_softmax(logits[:, -1], -1)
        kl.append((dense.exp() * (dense - logp)).sum(-1))
    return torch.stack(kl, 1)


@pytest.mark.parametrize("criterion", ["recency", "quest"])
def test_the_oracle_picks_the_argmin_of_kl_plus_price(criterion):
    model, acfg = gpt(), sol.ActionConfig(criterion=criterion, page_size=4)
    grid = sol.action_grid(acfg)
    x = episodes(5, 30, 4)
    cache, h = sol.prefill(model, x, 30, 4)
    kl = brute_force_kl(model, cache, x[:, 30], grid, acfg)
    assert kl.std() > 1e-3  # the actions differ: the argmin means something
    probed = schedules.probe(model, cache, x[:, 30], grid, acfg, chunk=2 * 4 * len(grid.values) * CFG.vocab_size)  # 2 rows a forward
    assert torch.allclose(probed, kl.clamp_min(0), rtol=1e-3, atol=1e-5)  # the fork reads the cache in place: another summation order
    obs = dict(emb=model.wte(x[:, 30]), scalars=torch.ones(5, 8), cache=cache, token=x[:, 30])
    for price in ([0.05, 0.02, 0.01], [0.5, 0.0, 0.2], [0.0, 0.0, 0.0]):
        price = torch.tensor(price)
        lam = -price  # the oracle's bias is lam . budget(a), as the policy's: a price is a negative multiplier
        picked = schedules.oracle_scheduler(model, grid, acfg, fixed_bias(grid.budget @ lam))(0, obs)
        best = (kl + grid.budget @ price).min(1).values
        assert torch.allclose((kl + grid.budget @ price).gather(1, picked[:, None])[:, 0], best, atol=1e-3), price
    assert (kl.gather(1, picked[:, None]) < 1e-6).all()  # at zero prices: an action of KL 0 (dense, or one equal to it)


@torch.no_grad()
def test_the_oracle_is_held_to_the_budget():
    model, C, T = gpt(), 30, 6
    val = episodes(24, C, T, seed=1)
    for acfg, requested in ((sol.ActionConfig(), [0.5, 0.6, 0.5]), (sol.ActionConfig(prune=(1.0,)), [0.3, None, 0.75])):
        grid = sol.action_grid(acfg)
        target = torch.tensor([1.0 if v is None else v for v in requested])
        control = schedules.budget_controller(requested, grid)
        _, achieved, actions = sol.score_episodes(model, val, target, lambda: schedules.oracle_scheduler(model, grid, acfg, control), grid, acfg, C, 12)
        assert schedules.off_budget(achieved.tolist(), requested, schedules.BUDGET_TOL / 2) == [], (requested, achieved)
        assert (actions != grid.dense).float().mean() > 0.5  # held there by its prices, not by going dense


def test_headroom_follows_from_the_rows():
    # ppl sol 3, static 4, oracle 2 on every episode: headroom 4 - 2 = 2, SOL's share (4 - 3) / 2 = 0.5, no spread
    E = 10
    nll = {"sol": torch.full((E,), math.log(3)), "static": torch.full((E,), math.log(4)), "oracle": torch.full((E,), math.log(2)),
           "dense": torch.zeros(E)}
    room = schedules.headroom(nll, 200, torch.Generator().manual_seed(0))
    assert room["headroom"] == pytest.approx(2.0) and room["sol_share"] == pytest.approx(0.5)
    assert room["sol_share_ci95"] == pytest.approx([0.5, 0.5])
    # per-episode NLLs that differ: the point figures are those of the mean NLLs, the interval brackets the point
    g = torch.Generator().manual_seed(1)
    nll = {m: base + 0.3 * torch.rand(200, generator=g) for m, base in (("sol", 1.0), ("static", 1.2), ("oracle", 0.9))}
    room = schedules.headroom(nll, 500, torch.Generator().manual_seed(0))
    ppl = {m: math.exp(v.mean().item()) for m, v in nll.items()}
    assert room["headroom"] == pytest.approx(ppl["static"] - ppl["oracle"], rel=1e-5)
    assert room["sol_share"] == pytest.approx((ppl["static"] - ppl["sol"]) / (ppl["static"] - ppl["oracle"]), rel=1e-5)
    lo, hi = room["sol_share_ci95"]
    assert lo < room["sol_share"] < hi


def coupled_policy(grid):
    """A policy whose logits are the same at every step: -(k^2 + p^2) - 2 (k - p)^2 over keep k and prune p, so a
    multiplier on one axis moves both (its greedy choice keeps them close)."""
    k, p = grid.values[:, 0], grid.values[:, 1]
    policy = sol.Policy(sol.PolicyConfig(width=16, heads=2), CFG.n_embd, len(grid.values)).eval()
    with torch.no_grad():
        for w in (policy.head.weight, policy.budget_head.weight, policy.budget_head.bias):
            w.zero_()
        policy.head.bias.copy_(-(k ** 2 + p ** 2) - 2 * (k - p) ** 2)
    return policy


@torch.no_grad()
def test_the_joint_solve_meets_targets_that_per_axis_bisection_misses():
    acfg = sol.ActionConfig(keep=tuple(i / 10 for i in range(1, 11)), prune=(0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0), bits=(16,))
    grid = sol.action_grid(acfg)
    policy, model = coupled_policy(grid), gpt()
    C, T = 20, 4
    val = episodes(6, C, T)
    requested, target = [0.5, 0.8, None], torch.tensor([0.5, 0.8, 1.0])
    spent_under = lambda bias: sol.score_episodes(model, val, target, lambda: schedules.policy_scheduler(policy, True, control=fixed_bias(bias)),
                                                 grid, acfg, C, 6)[1]
    # by hand: the logits plus lam . (k, p) peak where -2k - 4(k - p) + lam_k = 0 and -2p + 4(k - p) + lam_p = 0; at
    # k = 0.5, p = 0.8: lam = (-0.2, 2.8), and there the greedy action is keep 0.5, prune 0.8
    at = lambda lam: spent_under(grid.budget @ torch.tensor(lam))
    assert torch.allclose(at([-0.2, 2.8, 0.0]), target)
    # two rounds of bisection, one axis at a time, stop off the target on keep
    x = torch.zeros(3)
    schedules.solve(lambda: spent_under(grid.budget @ x), target, [0, 1], x, -20.0, 20.0, rounds=2)
    assert schedules.missed(at(x.tolist()), target, [0, 1]) == [0]
    # the joint solve meets both, with multipliers in the region of the hand-derived ones
    cal = schedules.calibrate_bias(spent_under, requested, grid)
    assert torch.allclose(spent_under(schedules.multiplier_bias(grid, *cal)), target)
    for lam in cal[:2]:  # the multipliers below and above each axis's knob
        assert abs(lam[0] + 0.2) < 0.4 and abs(lam[1] - 2.8) < 0.4 and lam[2] == 0


def test_the_oracle_controller_solves_kl_scale_scores():
    """One step of 64 rows on the keep axis alone, scores -KL of a few hundredths of a nat (as SmolLM2's): held to a
    keep of 0.5, the oracle's controller must reach nearly the Lagrangian bound of the step, sum_r max_a (S + lam b)
    - N lam want minimised over lam, which no choice of actions at that budget can beat. With the policy's cell of 0.25
    it split the rows between prices 0.25 apart and stayed near static: the bug this guards."""
    grid = sol.action_grid(sol.ActionConfig(prune=(1.0,), bits=(16,)))
    b = grid.budget[:, 0]  # keep 0.1, 0.25, 0.5, 0.75, 1
    g = torch.Generator().manual_seed(0)
    N, want = 64, 0.5
    kl = torch.distributions.Exponential(20.0).sample((N, 1)) * (1 - b) ** 2 * (0.5 + torch.rand(N, len(b), generator=g))  # convex in keep
    S = -kl
    lams = torch.linspace(-2, 0, 20001)
    dual = ((S[None] + lams[:, None, None] * b).amax(-1).sum(-1) - N * lams * want).min().item()
    static = S[:, (b - want).abs().argmin()].sum().item()  # every row at keep 0.5
    obs = {"scalars": torch.ones(N, 8), "live": torch.ones(N, dtype=torch.bool)}

    def closed(control):
        a = control(0, S, obs)
        assert abs(b[a].mean().item() - want) <= schedules.BUDGET_TOL / 4
        return (S.gather(1, a[:, None]).sum().item() - static) / (dual - static)
    assert dual > static + 0.05  # there is room over static
    assert closed(schedules.oracle_controller([want, None, None], grid)) > 0.95
    assert closed(schedules.budget_controller([want, None, None], grid, cell=0.25)) < 0.8
