"""The method pinned by value: GRPO's returns, advantages, budget penalty and loss; the policy's sampling and
budget head; the attention criteria; the rollout's scalars; the budget controller; resuming. Every expected value comes
from a second route: a hand computation, a brute-force loop, or another path through the model."""
import math
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import eval as ev  # noqa: E402
import cli  # noqa: E402
import grpo  # noqa: E402
import schedules  # noqa: E402
import sol  # noqa: E402
import train  # noqa: E402
from test_train import TINY  # noqa: E402

CFG = sol.GPTConfig(block_size=64, vocab_size=64, n_layer=2, n_head=2, n_embd=32, mlp_hidden=48)


def gpt(seed=0, std=None):
    """A tiny random GPT; std > 0.02 gives sharper, more varied predictions than the default init."""
    torch.manual_seed(seed)
    model = sol.GPT(CFG).eval().requires_grad_(False)
    if std is not None:
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, std)
    return model


def close(a, b, tol=1e-5):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=tol, rtol=tol)

# -----------------------------------------------------------------------------
# GRPO: returns, advantages, budget penalty, reward, loss


def test_returns_by_hand_and_by_brute_force():
    g = grpo.GRPOConfig(gamma=0.85)
    r = torch.tensor([[-1.0, -3.0, -2.0]])
    close(grpo.returns(r, g), [[-1 + 0.85 * (-3 + 0.85 * -2), -3 + 0.85 * -2, -2]])  # [-4.995, -4.7, -2]
    g.reward_agg = "max"
    close(grpo.returns(r, g), [[-1.0, -1.7, -2.0]])  # max(-3, 0.85 * -2) = -1.7, max(-1, 0.85 * -1.7) = -1
    gen = torch.Generator().manual_seed(0)
    r = torch.randn(3, 6, generator=gen)
    for agg in ("sum", "max"):
        g = grpo.GRPOConfig(reward_agg=agg, gamma=0.6)
        want = [[(sum if agg == "sum" else max)(0.6 ** (k - t) * r[n, k].item() for k in range(t, 6)) for t in range(6)] for n in range(3)]
        close(grpo.returns(r, g), want)


def reference_advantages(G, B, K, level, norm, whiten):
    """advantages() in plain Python lists: group statistics over the K rollouts of each sequence."""
    T = len(G[0])
    A = [[G[i][0] if level == "outcome" else G[i][t] for t in range(T)] for i in range(B * K)]
    for b in range(B):
        for t in range(T):
            col = [A[b * K + j][t] for j in range(K)]
            mean = sum(col) / K
            sd = math.sqrt(sum((c - mean) ** 2 for c in col) / (K - 1))
            for j in range(K):
                A[b * K + j][t] = (col[j] - mean) / ((sd + 1e-8) if norm == "zscore" else 1)
    if whiten:
        flat = [a for row in A for a in row]
        mean = sum(flat) / len(flat)
        sd = math.sqrt(sum((a - mean) ** 2 for a in flat) / (len(flat) - 1))
        A = [[(a - mean) / (sd + 1e-8) for a in row] for row in A]
    return A


def test_advantages_by_hand_and_by_reference():
    g = grpo.GRPOConfig(adv_level="process", adv_norm="center", whiten=False)
    G = torch.tensor([[1.0], [2.0], [3.0], [6.0]])  # one sequence, K = 4 rollouts, mean 3
    close(grpo.advantages(G, 1, 4, g), [[-2.0], [-1.0], [0.0], [3.0]])
    g.adv_norm = "zscore"  # sample std of (-2, -1, 0, 3): sqrt(14 / 3)
    close(grpo.advantages(G, 1, 4, g), [[v / math.sqrt(14 / 3)] for v in (-2, -1, 0, 3)])
    # B = 2 sequences, T = 3 steps: every level, norm and whitening against the list version
    G = torch.tensor([[1.0, 0.5, 0.0], [2.0, 2.0, 1.0], [3.0, -1.0, 4.0], [6.0, 0.0, 0.0],
                      [9.0, 1.0, 1.0], [5.0, 5.0, 3.0], [5.0, 2.0, 2.0], [7.0, 0.0, -4.0]])
    for level in ("process", "outcome"):
        for norm in ("center", "zscore"):
            for whiten in (False, True):
                g = grpo.GRPOConfig(adv_level=level, adv_norm=norm, whiten=whiten)
                close(grpo.advantages(G, 2, 4, g), reference_advantages(G.tolist(), 2, 4, level, norm, whiten))


def test_budget_penalty_price_dead_zone_square_alpha():
    g = grpo.GRPOConfig(alpha_keep=100, alpha_prune=100, alpha_bits=200)  # the reference's; tolerance 0.02
    target, zero = torch.full((6, 3), 0.5), torch.zeros(3)
    achieved = torch.tensor([[0.519, 0.5, 0.5],  # inside the dead zone: free
                             [0.521, 0.5, 0.5],  # just outside: 100 * 0.001^2
                             [0.55, 0.5, 0.5],  # keep over by 0.05: 100 * 0.03^2
                             [0.5, 0.45, 0.5],  # prune under by 0.05: the same
                             [0.5, 0.5, 0.6],  # bits over by 0.1: 200 * 0.08^2
                             [0.8, 0.8, 0.8]])  # all over by 0.3: (100 + 100 + 200) * 0.28^2
    want = [0.0, 1e-4, 0.09, 0.09, 1.28, 400 * 0.28 ** 2]
    close(grpo.budget_penalty(achieved, target, zero, [True, True, True], g), want, 1e-4)
    # an axis held dense costs nothing
    close(grpo.budget_penalty(achieved, target, zero, [True, False, True], g), [0.0, 1e-4, 0.09, 0.0, 1.28, 300 * 0.28 ** 2], 1e-4)
    # the price is linear in the gap, with its sign: under budget earns, over budget pays, no dead zone
    price = torch.tensor([2.0, 1.0, 4.0])
    linear = [2 * 0.019, 2 * 0.021, 2 * 0.05, -0.05, 0.4, 0.3 * 7]
    close(grpo.budget_penalty(achieved, target, price, [True, True, True], g), [w + l for w, l in zip(want, linear)], 1e-4)


def test_dual_ascent_steps_by_the_mean_gap_of_enabled_axes():
    g = grpo.GRPOConfig(dual_lr=2.0)
    gap = torch.tensor([[0.1, -0.2, 0.3], [0.3, 0.0, 0.1]])  # mean gap 0.2, -0.1, 0.2
    close(grpo.dual_ascent(torch.tensor([1.0, 1.0, 1.0]), gap, [True, True, False], g), [1.4, 0.8, 1.0])


def test_penalized_returns_reward_kl_and_penalty_signs():
    g = grpo.GRPOConfig(gamma=0.5, alpha_keep=100)
    target, enabled, price = torch.full((1, 3), 0.5), [True, True, True], torch.tensor([3.0, 0.0, 0.0])
    roll = {"logp": torch.tensor([[-1.0, -2.0]]), "achieved": torch.tensor([[0.6, 0.5, 0.5]])}
    # returns: G_1 = -2, G_0 = -1 + 0.5 * -2 = -2; penalty 3 * 0.1 + 100 * (0.1 - 0.02)^2 = 0.94, taken off every step
    close(grpo.penalized_returns(roll, target, price, enabled, g), [[-2.94, -2.94]])
    g.task_w_kl = 0.25  # r_t = 0.75 log p - 0.25 KL
    roll["kl"] = torch.tensor([[0.4, 0.8]])
    close(grpo.penalized_returns(roll, target, price, enabled, g), [[-0.85 + 0.5 * -1.7 - 0.94, -1.7 - 0.94]])


def bandit(cfg, iters, seed=0):
    """GRPO's own pieces (penalty, dual ascent, advantages, PPO loss) training a table of logits over two actions,
    cheap (budget 0.1) and dense (1.0), for T = 8 steps of which steps 1 and 5 gain 1 nat from dense compute and
    the rest nothing. At a target of 0.1 + 0.25 * 0.9 the known answer is dense exactly at steps 1 and 5.
    Returns the sampled rollouts' mean achieved budget over the last 50 iterations, the greedy actions, the price."""
    torch.manual_seed(seed)
    T, B, K, budget = 8, 4, 8, torch.tensor([[0.1] * 3, [1.0] * 3])
    gain = torch.zeros(T, 2)
    gain[[1, 5], 1] = 1.0
    target = torch.full((B * K, 3), 0.1 + 0.25 * 0.9)
    logits = torch.zeros(T, 2, requires_grad=True)
    opt, price, spent = torch.optim.Adam([logits], lr=0.05), torch.zeros(3), []
    for it in range(iters):
        with torch.no_grad():
            a = torch.multinomial(F.softmax(logits, -1).repeat(B * K, 1), 1).view(B * K, T)
        achieved = budget[a].mean(1)  # (N, 3)
        G = grpo.penalized_returns({"logp": gain.gather(1, a.T).T, "achieved": achieved}, target, price, [True] * 3, cfg)
        A = grpo.advantages(G, B, K, cfg)
        logp_all = F.log_softmax(logits, -1).expand(B * K, T, 2)
        logp = logp_all.gather(-1, a[..., None])[..., 0]
        loss = grpo.policy_loss(logp, logp.detach(), A, -(logp_all.exp() * logp_all).sum(-1), cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        price = grpo.dual_ascent(price, achieved - target, [True] * 3, cfg)
        spent.append(achieved.mean(0))
    return torch.stack(spent[-50:]).mean(0), logits.argmax(-1).tolist(), price


def test_dual_ascent_meets_the_budget_where_compute_pays():
    dual = dict(alpha_keep=3, alpha_prune=3, alpha_bits=6)  # a small quadratic: the price does the work
    spent, greedy, price = bandit(grpo.GRPOConfig(dual_lr=1.0, **dual), 400)
    assert (spent - 0.325).abs().max() < 0.05, spent  # the sampled schedules on budget
    assert greedy == [0, 1, 0, 0, 0, 1, 0, 0], greedy  # dense where it pays, cheap elsewhere
    # a dense step costs 3 axes x 0.9 / 8 of budget: any price up to 1 nat / 0.3375 keeps it at steps 1 and 5
    assert (price > 0).all() and (price < 1 / 0.3375).all(), price
    # the price's sign flipped (it falls while the batch overspends): the policy buys compute everywhere
    spent, greedy, _ = bandit(grpo.GRPOConfig(dual_lr=-1.0, **dual), 400)
    assert (spent > 0.5).all(), spent


def test_policy_loss_clip_entropy_and_kl_by_hand():
    g = grpo.GRPOConfig(clip_eps=0.2, ent_coef=0.05, kl_coef=0.1)
    ratio = torch.tensor([[1.5, 1.5, 0.5, 0.5, 1.1]])
    A = torch.tensor([[1.0, -1.0, 1.0, -1.0, 2.0]])
    old = torch.log(torch.tensor([[0.2, 0.3, 0.4, 0.5, 0.6]]))
    logp = (old + ratio.log()).requires_grad_()
    entropy = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    # min(r A, clip(r) A): 1.2 (clipped), -1.5, 0.5, -0.8 (clipped), 2.2; their mean 0.32; entropy bonus 0.05 * 3
    loss = grpo.policy_loss(logp, old, A, entropy, g)
    close(loss, -0.32 - 0.15)
    loss.backward()  # a clipped term passes no gradient; the others pull log pi up where A > 0
    close(logp.grad, [[0.0, 1.5 / 5, -0.5 / 5, 0.0, -2.2 / 5]])
    # KL(pi || pi_initial) at every step: pi = (1/2, 1/2), pi_initial = (1/4, 3/4)
    logp_all = torch.log(torch.tensor([0.5, 0.5])).expand(1, 5, 2)
    ref_all = torch.log(torch.tensor([0.25, 0.75])).expand(1, 5, 2)
    kl = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    close(grpo.policy_loss(logp.detach(), old, A, entropy, g, logp_all, ref_all), -0.47 + 0.1 * kl)


@torch.no_grad()
def test_rollout_kl_is_the_dense_to_sparse_divergence():
    model, acfg = gpt(std=0.2), sol.ActionConfig()
    grid = sol.action_grid(acfg)
    N, C, T = 3, 20, 4
    x = torch.randint(0, CFG.vocab_size, (N, C + T + 1), generator=torch.Generator().manual_seed(0))
    target = torch.full((N, 3), 0.5)
    cache, h0 = sol.prefill(model, x, C, T)
    dense = torch.log_softmax(model(x[:, C:C + T], cache)[0], -1)  # (N, T, V), as train.py's dense reference
    cheap = lambda t, obs: torch.zeros(N, dtype=torch.long)  # the cheapest action
    cache, h0 = sol.prefill(model, x, C, T)
    roll = sol.rollout(model, cache, h0, x[:, C:], target, cheap, grid, acfg, dense)
    cache, _ = sol.prefill(model, x, C, T)  # the second route: decode step by step under the cheapest action
    sparse = []
    for t in range(T):
        act = grid.values[torch.zeros(N, dtype=torch.long)] if sol.controllable(cache.len, acfg) else None
        sparse.append(torch.log_softmax(model(x[:, C + t:C + t + 1], cache, act, acfg)[0][:, -1], -1))
    want = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=dense),
                                             torch.distributions.Categorical(logits=torch.stack(sparse, 1)))
    close(roll["kl"], want)
    assert (want > 1e-3).all()  # the cheapest action really changes the prediction
    cache, h0 = sol.prefill(model, x, C, T)
    same = sol.rollout(model, cache, h0, x[:, C:], target, schedules.dense_scheduler(grid), grid, acfg, dense)
    close(same["kl"], torch.zeros(N, T))

# -----------------------------------------------------------------------------
# the policy: sampling temperature, greedy with a bias, the budget head


def fixed_logits_policy(logits, n_in=8):
    """A real Policy whose every output is `logits` (only the budget head's bias is non-zero)."""
    policy = sol.Policy(sol.PolicyConfig(width=16, heads=2), n_in, len(logits))
    with torch.no_grad():
        for p in (policy.head.weight, policy.head.bias, policy.budget_head.weight):
            p.zero_()
        policy.budget_head.bias.copy_(torch.tensor(logits))
    return policy.eval()


@torch.no_grad()
def test_scheduler_samples_softmax_over_temperature_and_logprobs_agree():
    logits, tau, N = [2.0, 1.0, 0.0, -1.0], 1.3, 20000
    policy = fixed_logits_policy(logits)
    assert policy.pcfg.temperature == tau
    gen = torch.Generator().manual_seed(0)
    obs = dict(h_prev=torch.randn(N, 8, generator=gen), emb=torch.randn(N, 8, generator=gen), scalars=torch.rand(N, 8, generator=gen),
               prev_action=torch.full((N,), 4))
    z = [v / tau for v in logits]
    p = [math.exp(v) / sum(math.exp(u) for u in z) for v in z]
    a = schedules.policy_scheduler(policy, greedy=False, generator=gen)(0, obs)
    freq = torch.bincount(a, minlength=4).float() / N
    close(freq, p, 0.015)  # 3.5 standard errors at most
    assert (schedules.policy_scheduler(policy, greedy=True)(0, obs) == 0).all()
    greedy = schedules.policy_scheduler(policy, greedy=True, control=fixed_bias(torch.tensor([0.0, 0.0, 2.5, 0.0])))(0, obs)
    assert (greedy == 2).all()  # a control takes the argmax in its place: logits + bias, 2 < 0 + 2.5
    # the training loss replays the steps at the same temperature: its log pi is the sampling distribution's
    roll = {k: v[:, None] for k, v in obs.items()} | {"action": a[:, None]}
    logp, entropy, logp_all = grpo.policy_logprobs(policy, roll, tau)
    z = [v / tau for v in logits]
    p = torch.tensor([math.exp(v) / sum(math.exp(u) for u in z) for v in z])
    close(logp_all.exp()[:5, 0], p.expand(5, 4))
    close(logp[:, 0], p.log()[a])
    close(entropy[:5, 0], torch.full((5,), -(p * p.log()).sum().item()))


@torch.no_grad()
def test_policy_logprobs_are_the_tempered_categorical():
    torch.manual_seed(0)
    policy = sol.Policy(sol.PolicyConfig(width=16, heads=2), 8, 10).eval()
    N, T = 3, 5
    roll = {"h_prev": torch.randn(N, T, 8), "emb": torch.randn(N, T, 8), "scalars": torch.rand(N, T, 8),
            "prev_action": torch.randint(0, 11, (N, T)), "action": torch.randint(0, 10, (N, T))}
    raw = policy(roll["h_prev"], roll["emb"], roll["scalars"], roll["prev_action"])
    for tau in (1.0, 1.3, 0.5):
        dist = torch.distributions.Categorical(logits=raw / tau)
        logp, entropy, _ = grpo.policy_logprobs(policy, roll, tau)
        close(logp, dist.log_prob(roll["action"]))
        close(entropy, dist.entropy())


@torch.no_grad()
def test_budget_head_moves_the_logits_by_the_targets():
    """The targets enter twice: through the scalar MLP and, directly, through the budget head. With the scalar
    MLP's output zeroed, a change d of the targets must move the logits by exactly W_budget d."""
    torch.manual_seed(0)
    policy = sol.Policy(sol.PolicyConfig(width=16, heads=2), 8, 12).eval()
    policy.scalars[-1].weight.zero_()
    policy.scalars[-1].bias.zero_()
    N, T = 2, 3
    h, e, act = torch.randn(N, T, 8), torch.randn(N, T, 8), torch.randint(0, 13, (N, T))
    s = torch.rand(N, T, 8)
    base = policy(h, e, s, act)
    d = torch.tensor([0.3, -0.2, 0.1])
    moved = s.clone()
    moved[..., 2:5] += d  # the three targets
    close(policy(h, e, moved, act) - base, (policy.budget_head.weight @ d).expand(N, T, 12))
    moved = s.clone()
    moved[..., 5:8] += d  # the deviations do not reach the budget head
    close(policy(h, e, moved, act), base)

# -----------------------------------------------------------------------------
# attention criteria against brute force


def brute_quest(q, k, keep, acfg):
    """The middle keys quest keeps for one head: pages of S keys scored by the box bound
    sum_d max(q_d kmax_d, q_d kmin_d), the top ceil(keep M / S) pages kept. q (hd,), k (L, hd)."""
    Ts, S, L = acfg.sinks, acfg.page_size, k.size(0)
    M = L - 1 - acfg.window - Ts
    pages = [list(range(Ts + s, min(Ts + s + S, Ts + M))) for s in range(0, M, S)]
    scores = []
    for page in pages:
        hi = [max(k[j, d].item() for j in page) for d in range(len(q))]
        lo = [min(k[j, d].item() for j in page) for d in range(len(q))]
        bound = sum(max(q[d].item() * hi[d], q[d].item() * lo[d]) for d in range(len(q)))
        best = max(sum(q[d].item() * k[j, d].item() for d in range(len(q))) for j in page)
        assert bound >= best - 1e-5  # an upper bound of every q.k in the page, reached when S = 1
        if S == 1:
            assert abs(bound - best) < 1e-5
        scores.append(bound)
    n = min(max(math.ceil(keep * M / S - 1e-6), 1), len(pages))
    top = sorted(range(len(pages)), key=lambda p: -scores[p])[:n]
    return {j for p in top for j in pages[p]}


@pytest.mark.parametrize("S", [1, 4, 8])
def test_quest_keeps_the_pages_with_the_highest_bound(S):
    acfg = sol.ActionConfig(criterion="quest", page_size=S)
    gen = torch.Generator().manual_seed(S)
    for L in (30, 61):
        N, H, hd = 3, 2, 6
        q, k = torch.randn(N, H, 1, hd, generator=gen), torch.randn(N, H, L, hd, generator=gen)
        k[..., 3] += 2.0  # one coordinate off-centre: q.centre and q.radius both matter
        keep = torch.tensor([0.1, 0.25, 0.5])
        mask = sol.sparse_mask(q, k, keep, acfg)
        M = L - 1 - acfg.window - acfg.sinks
        for r in range(N):
            for h in range(H):
                kept = {acfg.sinks + j for j in range(M) if mask[r, h, 0, acfg.sinks + j]}
                assert kept == brute_quest(q[r, h, 0], k[r, h], keep[r].item(), acfg), (L, r, h)


def brute_relevancy(q, k, keep, acfg, layer):
    """The middle keys relevancy keeps: the top ceil(keep M) by q.k, per head, or by its mean over heads
    for relevancy_layer. q (H, hd), k (H, L, hd) -> a set per head."""
    H, L, hd = k.shape
    Ts, M = acfg.sinks, L - 1 - acfg.window - acfg.sinks
    score = [[sum(q[h, d].item() * k[h, Ts + j, d].item() for d in range(hd)) for j in range(M)] for h in range(H)]
    if layer:
        score = [[sum(score[h][j] for h in range(H)) / H for j in range(M)]] * H
    n = min(max(math.ceil(keep * M - 1e-6), 1), M)
    return [{Ts + j for j in sorted(range(M), key=lambda j: -score[h][j])[:n]} for h in range(H)]


@pytest.mark.parametrize("criterion", ["relevancy", "relevancy_layer"])
def test_relevancy_keeps_the_largest_logits(criterion):
    acfg = sol.ActionConfig(criterion=criterion)
    gen = torch.Generator().manual_seed(0)
    for L in (12, 40):
        N, H, hd = 3, 3, 8
        q, k = torch.randn(N, H, 1, hd, generator=gen), torch.randn(N, H, L, hd, generator=gen)
        keep = torch.tensor([0.1, 0.3, 0.75])
        mask = sol.sparse_mask(q, k, keep, acfg)
        M = L - 1 - acfg.window - acfg.sinks
        for r in range(N):
            want = brute_relevancy(q[r, :, 0], k[r], keep[r].item(), acfg, criterion == "relevancy_layer")
            for h in range(H):
                assert {acfg.sinks + j for j in range(M) if mask[r, h, 0, acfg.sinks + j]} == want[h], (L, r, h)

# -----------------------------------------------------------------------------
# the rollout: its scalars, the dense early steps, the achieved budget


@torch.no_grad()
def test_rollout_scalars_and_early_dense_steps():
    """C = 5: steps 0-2 see 5-7 past keys, no more than sinks + window + 1 = 7, so they run dense and stay out of
    the budget; from step 3 on the schedule applies. The scalars follow METHOD.md section 2, step by step."""
    model, acfg = gpt(std=0.2), sol.ActionConfig()
    grid = sol.action_grid(acfg)
    N, C, T = 3, 5, 7
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, CFG.vocab_size, (N, C + T + 1), generator=gen)
    actions = torch.randint(0, len(grid.values), (N, T), generator=gen)
    actions[:, 3] = 0  # the cheapest action at the first controlled step: it must show in the log-probs
    target = torch.tensor([[0.5, 0.6, 0.7], [0.2, 0.4, 0.5], [1.0, 1.0, 1.0]])
    runs = {}
    for name, scheduler in (("dense", schedules.dense_scheduler(grid)), ("sched", lambda t, obs: actions[:, t])):
        cache, h0 = sol.prefill(model, x, C, T)
        runs[name] = sol.rollout(model, cache, h0, x[:, C:], target, scheduler, grid, acfg)
    roll, dense = runs["sched"], runs["dense"]
    budget = grid.budget.tolist()
    eff = [C + t > acfg.sinks + acfg.window + 1 for t in range(T)]
    assert eff == [False] * 3 + [True] * 4
    for r in range(N):
        for t in range(T):
            earlier = [budget[actions[r, s]] for s in range(t) if eff[s]]
            dev = [sum(b[i] for b in earlier) / len(earlier) - target[r, i].item() if earlier else 0.0 for i in range(3)]
            close(roll["scalars"][r, t], [t / T, float(eff[t]), *target[r].tolist(), *dev])
        close(roll["achieved"][r], [sum(budget[actions[r, t]][i] for t in range(T) if eff[t]) / 4 for i in range(3)])
    assert roll["prev_action"][:, 0].eq(len(grid.values)).all() and torch.equal(roll["prev_action"][:, 1:], actions[:, :-1])
    assert torch.equal(roll["logp"][:, :3], dense["logp"][:, :3])  # early steps: dense, whatever the action
    assert (roll["logp"][:, 3] != dense["logp"][:, 3]).all()
    # the sparse log-probs are the model's own, step by step under the same actions
    cache = model.new_cache(N, C + T)
    model(x[:, :C], cache)
    for t in range(T):
        logits, _ = model(x[:, C + t:C + t + 1], cache, grid.values[actions[:, t]] if eff[t] else None, acfg)
        close(roll["logp"][:, t], F.log_softmax(logits[:, -1], -1).gather(1, x[:, C + t + 1:C + t + 2])[:, 0])

# -----------------------------------------------------------------------------
# targets


def test_targets_per_axis_overrides():
    acfg = sol.ActionConfig()
    g = grpo.GRPOConfig(target_budget=0.5)
    assert grpo.targets(g, acfg) == [0.5, 0.5, 0.5]
    g.target_keep, g.target_bits = 0.3, 12.0
    assert grpo.targets(g, acfg) == [0.3, 0.5, 0.75]
    g.target_prune = 0.9
    assert grpo.targets(g, acfg) == [0.3, 0.9, 0.75]
    assert grpo.targets(g, sol.ActionConfig(bits=(16,))) == [0.3, 0.9, None]  # an axis held dense


def test_sample_targets_fixed_and_ranges():
    g = grpo.GRPOConfig(keep_range=(0.2, 0.6), bits_range=(6.0, 12.0))
    fixed = [0.3, None, 0.75]
    close(grpo.sample_targets(g, fixed, 4, np.random.default_rng(0)), [[0.3, 1.0, 0.75]] * 4)
    g.sample_budgets = True
    n = 4000
    t = grpo.sample_targets(g, fixed, n, np.random.default_rng(0))
    assert t[:, 1].eq(1.0).all()  # the axis held dense stays dense
    for axis, (lo, hi) in ((0, (0.2, 0.6)), (2, (6 / 16, 12 / 16))):
        col = t[:, axis]
        assert lo - 1e-6 <= col.min() and col.max() <= hi + 1e-6 and col.unique().numel() > 0.99 * n  # a draw per row
        assert abs(col.mean().item() - (lo + hi) / 2) < 0.01 and abs(col.std().item() - (hi - lo) / math.sqrt(12)) < 0.01
    assert torch.equal(t, grpo.sample_targets(g, fixed, n, np.random.default_rng(0)))  # seeded

# -----------------------------------------------------------------------------
# budgets of the evaluated methods: SOL and the entropy heuristic held by the controller, random schedule search


def episodes(n, C, T, seed=0):
    return torch.randint(0, CFG.vocab_size, (n, C + T + 1), generator=torch.Generator().manual_seed(seed))


def random_policy(grid):
    """A freshly initialized policy (seed 1): its greedy choices depend on the tokens, and spend off any target."""
    torch.manual_seed(1)
    return sol.Policy(sol.PolicyConfig(width=16, heads=2), CFG.n_embd, len(grid.values)).eval()


def fixed_bias(bias):
    """A control that adds a fixed bias, (A,) or multiplier_bias's (t, N) -> (N, A), to the scores and takes the argmax."""
    return lambda t, score, obs: (score + (bias(t, score.size(0)) if callable(bias) else bias)).argmax(-1)


@torch.no_grad()
def test_the_controller_meets_the_target():
    model, acfg = gpt(std=0.2), sol.ActionConfig()
    grid = sol.action_grid(acfg)
    policy = random_policy(grid)
    C, T = 12, 8
    eps = episodes(32, C, T)
    for fixed in ([0.25, 0.85, 0.4], [0.8, None, 0.35]):
        target = torch.tensor([1.0 if v is None else v for v in fixed])
        control = schedules.budget_controller(fixed, grid)
        achieved = sol.score_episodes(model, eps, target, lambda: schedules.policy_scheduler(policy, True, control=control), grid, acfg, C, 16)[1]
        raw = sol.score_episodes(model, eps, target, lambda: schedules.policy_scheduler(policy, True), grid, acfg, C, 16)[1]
        assert len(control.multipliers) == 2 * T  # one solve per step of each of the two batches
        for axis in range(3):
            if fixed[axis] is None:
                assert all(lam[axis] == 0 for lam in control.multipliers)
                continue
            assert abs(achieved[axis] - target[axis]) <= schedules.BUDGET_TOL / 2, (fixed, axis, achieved)
        assert (raw - target).abs().max() > 0.1  # uncontrolled, the greedy policy is off the target


@torch.no_grad()
def test_the_controller_holds_a_test_split_whose_spend_differs_from_validation():
    # validation episodes draw every token, test episodes a tenth of the vocabulary: the greedy policy spends
    # differently on them, so multipliers fitted on validation miss on test, and the controller, which reads the
    # spend as it decodes, does not
    model, acfg = gpt(std=0.2), sol.ActionConfig()
    grid = sol.action_grid(acfg)
    policy = random_policy(grid)
    C, T, requested = 12, 8, [0.5, 0.6, 0.5]
    target = torch.tensor(requested)
    val = episodes(32, C, T)
    test = torch.randint(0, CFG.vocab_size // 10, (32, C + T + 1), generator=torch.Generator().manual_seed(2))
    spent = lambda eps, control: sol.score_episodes(model, eps, target, lambda: schedules.policy_scheduler(policy, True, control=control), grid, acfg, C, 16)[1]
    fit = schedules.calibrate_bias(lambda bias: spent(val, fixed_bias(bias)), requested, grid)
    assert not schedules.off_budget(spent(val, fixed_bias(schedules.multiplier_bias(grid, *fit))).tolist(), requested)  # on val
    missed = spent(test, fixed_bias(schedules.multiplier_bias(grid, *fit)))
    assert (missed - target).abs().max() > schedules.BUDGET_TOL, missed  # off on test
    held = spent(test, schedules.budget_controller(requested, grid))
    assert (held - target).abs().max() <= schedules.BUDGET_TOL / 2, held


@torch.no_grad()
def test_the_controller_holds_the_heuristic_to_the_budget():
    acfg = sol.ActionConfig()
    grid = sol.action_grid(acfg)
    C, T = 12, 8
    val = episodes(16, C, T)
    flat = gpt()
    flat.wte.weight.zero_()  # tied head: every prediction uniform, every step's entropy ln V, a tie
    for model in (gpt(std=0.2), flat):
        for requested in ([0.4, 0.7, 0.6], [0.55, None, 0.45]):
            control = schedules.budget_controller(requested, grid)
            spent = sol.score_episodes(model, val, torch.ones(3), lambda: ev.heuristic_scheduler(grid, control), grid, acfg, C, 16)[1]
            assert not schedules.off_budget(spent.tolist(), requested, schedules.BUDGET_TOL / 2), (requested, spent)  # a tie: mixed
            if requested[1] is None:
                assert spent[1] == 1.0


@torch.no_grad()
def test_search_schedules_spend_the_budget():
    model, acfg = gpt(), sol.ActionConfig()
    grid = sol.action_grid(acfg)
    C, T = 12, 16
    eps, budget = episodes(4, C, T), [0.37, 0.66, 0.55]
    cands = ev.search_candidates(acfg, budget, 3, T, torch.Generator().manual_seed(0))
    for c in cands:  # what the decoded schedule spends, read off the grid: each axis within 0.005 of the budget
        spent = sol.score_episodes(model, eps, torch.ones(3), lambda: ev.plan_scheduler(acfg, c), grid, acfg, C, 4)[1]
        values = [torch.tensor(v, dtype=torch.float32)[c[:, i]] / s for i, (v, s) in enumerate(schedules.axis_lists(acfg))]
        close(spent, [v.mean() for v in values])
        close(spent, budget, 0.0051)

# -----------------------------------------------------------------------------
# generation against plain forwards


@torch.no_grad()
def test_generate_dense_is_plain_greedy_decoding():
    model, acfg = gpt(std=0.2), sol.ActionConfig()
    grid = sol.action_grid(acfg)
    ids, n = [3, 14, 15, 9, 26], 12
    new, achieved = ev.generate(model, ids, n, lambda: schedules.dense_scheduler(grid), torch.full((3,), 0.5), grid, acfg)
    x = list(ids)
    for _ in range(n):  # no cache: the whole sequence every step
        x.append(int(model(torch.tensor([x]))[0][0, -1].argmax()))
    assert new == x[len(ids):] and len(set(new)) > 1
    close(achieved, torch.ones(3))
    # under a plan: the first three steps (5-7 past keys) run dense and stay out of the achieved budget and the
    # deviations the policy sees, as in the rollout
    plan, target, seen = torch.randint(0, 4, (n, 3), generator=torch.Generator().manual_seed(0)), torch.tensor([0.5, 0.6, 0.7]), []

    def make():
        pick = ev.plan_scheduler(acfg, plan)
        return lambda t, obs: seen.append(obs["scalars"][0]) or pick(t, obs)
    _, achieved = ev.generate(model, ids, n, make, target, grid, acfg)
    spent = grid.budget[ev.combine(acfg, plan)]  # (n, 3)
    close(achieved, spent[3:].mean(0))
    for t, scalars in enumerate(seen):
        close(scalars, [t / n, float(t >= 3), *target, *(spent[3:t].mean(0) - target if t > 3 else torch.zeros(3))])


# -----------------------------------------------------------------------------
# resuming


def test_pretraining_resumes_from_its_partial(tmp_path):
    """A run stopped at iteration 3 of 6 and rerun from a different initial model must end where the straight
    run ends, in 3 more iterations: the partial's weights, optimizer, generators and counter are all used."""
    tc = train.TrainConfig(pretrain_iters=6, pretrain_batch=2, seed=0, compile="false")
    cfg = sol.GPTConfig(block_size=16, vocab_size=32, n_layer=1, n_head=2, n_embd=16, mlp_hidden=32)
    data = np.random.default_rng(0).integers(0, 32, 3000).astype(np.uint16)
    splits = {"train": data[:2000], "val": data[2000:]}

    def pretrain(seed, partial, stop_at=None):
        torch.manual_seed(seed)
        model, steps = sol.GPT(cfg), []

        def count(module, args):
            if module.training:
                steps.append(1)
                if len(steps) == stop_at:  # as SIGINT's handler does: the loop saves and returns None
                    train.STOP["signal"] = signal.SIGINT
        model.register_forward_pre_hook(count)
        try:
            val = train.pretrain(model, splits, tc, "cpu", partial, 100)
        finally:
            train.STOP["signal"] = 0
        return model, val, len(steps)

    straight, val, n = pretrain(0, tmp_path / "straight.partial")
    assert n == 6 and val is not None and not (tmp_path / "straight.partial").exists()
    partial = tmp_path / "base.partial"
    _, val, n = pretrain(0, partial, stop_at=3)
    assert val is None and n == 3 and torch.load(partial, weights_only=True)["iter"] == 3
    saved = torch.load(partial, weights_only=True)
    resumed, _, n = pretrain(7, partial)  # another seed: only the partial can make it the straight run's model
    assert n == 3
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), straight.state_dict().values()))
    # a partial that says it is done is the result, as it stands
    cli.save_atomic({**saved, "iter": 6}, partial)
    done, _, n = pretrain(7, partial)
    assert n == 0 and all(torch.equal(done.state_dict()[k], v.half().float()) for k, v in saved["model"].items())  # kept in half precision
    assert any(not torch.equal(v.half().float(), v) for v in saved["model"].values())  # which is a rounding


def test_resume_refuses_another_base_gpt(tmp_path):
    out = tmp_path / "out"
    train.main([*TINY, "--max_iters=1", "--eval_episodes=2", f"--out_dir={out}"])
    state = torch.load(out / "ckpt.pt", weights_only=True)
    for key, value in (("base", str(tmp_path / "base-0123456789.pt")), ("base_sha1", "0" * 40)):
        torch.save({**state, "config": {**state["config"], key: value}}, out / "ckpt.pt")
        before = (out / "ckpt.pt").read_bytes()
        with pytest.raises(train.UsageError, match="another base GPT"):
            train.main([*TINY, "--max_iters=1", "--eval_episodes=2", f"--out_dir={out}", "--resume"])
        assert (out / "ckpt.pt").read_bytes() == before
