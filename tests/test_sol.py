import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import grpo  # noqa: E402
import schedules  # noqa: E402
import sol  # noqa: E402

CFG = sol.GPTConfig(block_size=96, vocab_size=64, n_layer=2, n_head=4, n_embd=32, mlp_hidden=48)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return sol.GPT(CFG).eval()


def decode(model, x, C, actions=None, acfg=None):
    """Prefill x[:, :C], then decode the rest one token at a time; returns (N, T, V) step logits."""
    cache = model.new_cache(x.size(0), x.size(1))
    model(x[:, :C], cache)
    out = []
    for t in range(C, x.size(1)):
        act = None if actions is None else actions[:, t - C]
        out.append(model(x[:, t:t + 1], cache, act, acfg)[0][:, -1])
    return torch.stack(out, 1)


@torch.no_grad()
def test_dense_action_reproduces_plain_forward(model):
    acfg = sol.ActionConfig()
    grid = sol.action_grid(acfg)
    assert grid.values[grid.dense].tolist() == [1.0, 1.0, 16.0]
    x = torch.randint(0, CFG.vocab_size, (3, 60))
    dense = grid.values[grid.dense].expand(3, 10, 3)
    for criterion in sol.CRITERIA:
        acfg.criterion = criterion
        assert torch.equal(decode(model, x, 50, dense, acfg), decode(model, x, 50))
        assert torch.equal(decode(model, x[:1], 50, dense[:1], acfg), decode(model, x[:1], 50))  # one row too
    full, _ = model(x)
    torch.testing.assert_close(decode(model, x, 50), full[:, 50:], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_fused_attention_matches_manual(model):
    torch.manual_seed(1)
    q, k, v = torch.randn(3, 2, 5, 8), torch.randn(3, 2, 5, 8), torch.randn(3, 2, 5, 8)
    torch.testing.assert_close(sol.attention(q, k, v, None, True), sol.attention(q, k, v, None, False))
    mask = torch.rand(3, 2, 5, 5) > 0.5
    mask[..., 0] = True  # every query attends somewhere
    torch.testing.assert_close(sol.attention(q, k, v, mask, True), sol.attention(q, k, v, mask, False))
    # and through the whole model, sparse actions included
    acfg, grid = sol.ActionConfig(), sol.action_grid(sol.ActionConfig())
    x = torch.randint(0, CFG.vocab_size, (4, 70))
    actions = grid.values[torch.randint(0, len(grid.values), (4, 10))]
    fused = decode(model, x, 60, actions, acfg)
    for m in model.modules():
        if isinstance(m, sol.CausalSelfAttention):
            m.fused = False
    torch.testing.assert_close(decode(model, x, 60, actions, acfg), fused, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_realized_recency_matches_masked(model):
    """One row under recency reads only the kept keys; it decodes as the masked path does."""
    acfg, grid = sol.ActionConfig(), sol.action_grid(sol.ActionConfig())
    x = torch.randint(0, CFG.vocab_size, (1, 90))
    actions = grid.values[torch.randint(0, len(grid.values), (1, 80))]  # from 10 keys on: short contexts too
    realized = decode(model, x, 10, actions, acfg)
    for m in model.modules():
        if isinstance(m, sol.CausalSelfAttention):
            m.realized = False
    torch.testing.assert_close(realized, decode(model, x, 10, actions, acfg), atol=1e-5, rtol=1e-5)
    q, k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 60, 8), torch.randn(1, 2, 60, 8)
    for keep in acfg.keep:
        mask = sol.sparse_mask(q, k, torch.tensor([keep]), acfg)
        torch.testing.assert_close(sol.recent_attention(q, k, v, torch.tensor(keep), acfg), sol.attention(q, k, v, mask))


@pytest.mark.parametrize("criterion", sol.CRITERIA)
@pytest.mark.parametrize("C", [6, 28, 45])
@torch.no_grad()
def test_forked_cache_matches_copies(model, criterion, C):
    """K rollouts reading one shared prefix cache decode exactly as K private copies of it."""
    torch.manual_seed(C)
    acfg, grid = sol.ActionConfig(criterion=criterion), sol.action_grid(sol.ActionConfig())
    B, K, T = 3, 4, 12
    x = torch.randint(0, CFG.vocab_size, (B, C + T + 1))
    cache, h0 = sol.prefill(model, x, C, T)
    copies = model.new_cache(B * K, C + T)
    copies.k[:, :, :, :C], copies.v[:, :, :, :C] = (t[:, :, :, :C].repeat_interleave(K, 1) for t in (cache.k, cache.v))
    copies.len = C
    actions = torch.randint(0, len(grid.values), (B * K, T))
    xs, hs, target = x[:, C:].repeat_interleave(K, 0), h0.repeat_interleave(K, 0), torch.full((B * K, 3), 0.5)
    runs = [sol.rollout(model, c, hs, xs, target, lambda t, obs: actions[:, t], grid, acfg) for c in (cache.fork(K, T), copies)]
    torch.testing.assert_close(runs[0]["logp"], runs[1]["logp"], atol=1e-5, rtol=1e-5)
    assert torch.equal(runs[0]["achieved"], runs[1]["achieved"])
    assert cache.len == C and not cache.k[:, :, :, C:].any()  # the rollouts wrote nothing into the shared prefix


@pytest.mark.parametrize("criterion", sol.CRITERIA)
@pytest.mark.parametrize("L", [8, 9, 30, 77])
def test_sparse_mask_counts_sinks_window(criterion, L):
    torch.manual_seed(L)
    acfg = sol.ActionConfig(criterion=criterion)
    N, H = 6, 3
    q, k = torch.randn(N, H, 1, 16), torch.randn(N, H, L, 16)
    keep = torch.tensor([0.1, 0.25, 0.3, 0.5, 0.75, 1.0])
    mask = sol.sparse_mask(q, k, keep, acfg)
    assert mask.shape == (N, H, 1, L)  # keys past the query do not exist: causality by construction
    Ts, Tw = acfg.sinks, acfg.window
    M = L - 1 - Tw - Ts
    if M <= 1:
        assert mask.all() and not sol.controllable(L - 1, acfg)
        return
    assert sol.controllable(L - 1, acfg)
    assert mask[..., :Ts].all() and mask[..., L - 1 - Tw:].all()  # sinks, window and the query itself
    kept = mask[..., Ts:Ts + M].sum(-1)[..., 0]  # (N, H)
    for r in range(N):
        if criterion == "quest":
            S = acfg.page_size
            pages = min(max(math.ceil(round(keep[r].item() * M / S, 4)), 1), math.ceil(M / S))
            # whole pages are kept; only the last page may be shorter than S
            assert ((kept[r] <= pages * S) & (kept[r] >= (pages - 1) * S + 1)).all()
        else:
            assert (kept[r] == max(1, math.ceil(round(keep[r].item() * M, 4)))).all()
    if criterion == "recency":  # the kept middle keys are the most recent ones
        n = kept[0, 0].item()
        assert mask[0, 0, 0, Ts + M - n:Ts + M].all()
    if criterion == "relevancy_layer":  # one set of keys for all heads of a layer
        assert (mask == mask[:, :1]).all()


def test_quest_keeps_the_page_with_the_best_key():
    acfg = sol.ActionConfig(criterion="quest")
    L, hd = 60, 8
    k = torch.randn(1, 1, L, hd) * 0.1
    q = torch.ones(1, 1, 1, hd)
    k[0, 0, 30] = 5.0  # one key with a large q.k, in page (30 - 4) // 8 = 3
    mask = sol.sparse_mask(q, k, torch.tensor([0.1]), acfg)
    assert mask[0, 0, 0, 30] and mask[0, 0, 0, 4 + 3 * 8:4 + 4 * 8].all()


@torch.no_grad()
def test_rows_are_independent(model):
    acfg, grid = sol.ActionConfig(), sol.action_grid(sol.ActionConfig())
    x = torch.randint(0, CFG.vocab_size, (4, 60))
    actions = grid.values[torch.randint(0, len(grid.values), (4, 8))]
    a = decode(model, x, 52, actions, acfg)
    x2, actions2 = x.clone(), actions.clone()
    x2[1:] = torch.randint(0, CFG.vocab_size, (3, 60))
    actions2[1:] = grid.values[torch.randint(0, len(grid.values), (3, 8))]
    b = decode(model, x2, 52, actions2, acfg)
    torch.testing.assert_close(a[0], b[0], atol=1e-6, rtol=1e-6)


def test_topn_and_mlp_pruning_keep_the_right_channels():
    torch.manual_seed(0)
    mlp = sol.MLP(16, 40)
    x = torch.randn(4, 1, 16)
    prune = torch.tensor([0.4, 0.55, 0.8, 1.0])
    act = torch.stack([torch.ones(4), prune, torch.full((4,), 16.0)], 1)
    h = F.silu(mlp.gate(x)) * mlp.up(x)
    kept = sol.topn_mask(h.abs(), torch.ceil(prune * 40 - 1e-6).long())
    assert kept.sum(-1).flatten().tolist() == [16, 22, 32, 40]
    # kept channels are the largest ones
    for r in range(3):
        assert h[r].abs()[kept[r]].min() >= h[r].abs()[~kept[r]].max()
    torch.testing.assert_close(mlp(x, sol.resolve(act, 1, sol.ActionConfig(), 40)), mlp.down(h * kept))
    # ties (an all-zero row) still keep exactly n
    assert sol.topn_mask(torch.zeros(2, 10), torch.tensor([3, 7])).sum(-1).tolist() == [3, 7]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topn_mask_matches_a_stable_sort(dtype):
    """topn_mask's one selection against the plain way, one stable sort, with many ties, infinities and every n."""
    gen = torch.Generator().manual_seed(0)
    for M in (1, 2, 7, 40):
        score = torch.randint(0, 4, (6, 3, 1, M), generator=gen).to(dtype)  # few values: many ties
        score[0, 0, 0, 0], score[1, 1, 0, -1] = float("inf"), float("-inf")
        n = torch.cat([torch.tensor([1, M]), torch.randint(1, M + 1, (4,), generator=gen)])
        order = torch.argsort(score, dim=-1, descending=True, stable=True)
        want = torch.zeros_like(score, dtype=torch.bool).scatter(-1, order, (torch.arange(M) < n.view(-1, 1, 1, 1)).expand_as(order))
        assert torch.equal(sol.topn_mask(score, n), want), M


def test_fake_quant_error_and_identity():
    torch.manual_seed(0)
    x = torch.randn(5, 3, 64) * torch.tensor([1e-3, 1.0, 10.0, 1e4, 0.0]).view(5, 1, 1)
    for b in range(2, 17):
        bits = torch.full((5,), float(b))
        xq = sol.fake_quant(x, bits)
        assert torch.isfinite(xq).all()
        if b == 16:
            assert torch.equal(xq, x)
            continue
        step = x.abs().amax(-1, keepdim=True) / (2 ** (b - 1) - 1)
        assert ((xq - x).abs() <= step / 2 + 1e-6 * x.abs().amax(-1, keepdim=True)).all()
        assert (xq[4] == 0).all()  # an all-zero row stays zero
        assert len(torch.unique(xq[1, 0])) <= 2 ** b - 1


@torch.no_grad()
def test_policy_step_matches_sequence_forward():
    torch.manual_seed(0)
    pcfg = sol.PolicyConfig(width=32, heads=4, depth=2)
    policy = sol.Policy(pcfg, 24, 80).eval()
    N, T = 3, 7
    inputs = (torch.randn(N, T, 24), torch.randn(N, T, 24), torch.randn(N, T, 8), torch.randint(0, 81, (N, T)))
    full = policy(*inputs)
    cache = policy.new_cache(N)
    steps = torch.cat([policy(*(v[:, t:t + 1] for v in inputs), cache) for t in range(T)], 1)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)
    # the targets move the logits through the budget head
    moved = inputs[2].clone()
    moved[..., 2:5] += 0.5
    assert not torch.allclose(policy(inputs[0], inputs[1], moved, inputs[3]), full)


def test_grid_requires_dense_action():
    with pytest.raises(ValueError, match="dense action"):
        sol.action_grid(sol.ActionConfig(keep=(0.1, 0.5)))
    grid = sol.action_grid(sol.ActionConfig())
    assert len(grid.values) == 5 * 4 * 4 and len(grid.values.unique(dim=0)) == len(grid.values)
    assert all((grid.values == torch.tensor(a)).all(1).any() for a in ([0.5, 0.6, 8.0], [0.1, 1.0, 5.0]))
    torch.testing.assert_close(grid.budget[grid.dense], torch.ones(3))


@torch.no_grad()
def test_rollout_dense_and_static_budgets(model):
    acfg = sol.ActionConfig()
    grid = sol.action_grid(acfg)
    N, C, T = 8, 40, 16
    x = torch.randint(0, CFG.vocab_size, (N, C + T + 1))
    target = torch.full((N, 3), 0.5)

    def run(scheduler):
        cache = model.new_cache(N, C + T)
        _, h = model(x[:, :C], cache)
        return sol.rollout(model, cache, h[:, -1], x[:, C:], target, scheduler, grid, acfg)

    dense = run(schedules.dense_scheduler(grid))
    full = F.log_softmax(model(x[:, :-1])[0], -1)[:, C:].gather(-1, x[:, C + 1:, None])[..., 0]
    torch.testing.assert_close(dense["logp"], full, atol=1e-5, rtol=1e-5)
    assert torch.equal(dense["achieved"], torch.ones(N, 3))
    for budget in ([0.5, 0.5, 0.5], [0.3, 0.7, 0.6], [0.1, 0.4, 5 / 16]):
        static = run(schedules.static_scheduler(acfg, budget))
        torch.testing.assert_close(static["achieved"].mean(0), torch.tensor(budget), atol=0.02, rtol=0)
        # its log-probs are the model's, decoded step by step under the actions it recorded
        steps = decode(model, x[:, :-1], C, grid.values[static["action"]], acfg)
        logp = F.log_softmax(steps, -1).gather(-1, x[:, C + 1:, None])[..., 0]
        torch.testing.assert_close(static["logp"], logp, atol=1e-5, rtol=1e-5)
        assert (static["logp"] != dense["logp"]).any()
    # the policy scheduler samples valid actions and records what it saw
    policy = sol.Policy(sol.PolicyConfig(width=16, heads=2), CFG.n_embd, len(grid.values))
    roll = run(schedules.policy_scheduler(policy, greedy=False, generator=torch.Generator().manual_seed(0)))
    greedy = run(schedules.policy_scheduler(policy, greedy=True))
    assert roll["action"].shape == (N, T) and (roll["action"] != greedy["action"]).float().mean() > 0.5  # sampled, not the mode
    assert roll["prev_action"][:, 0].eq(len(grid.values)).all()  # BOS before the first step
    assert roll["scalars"].shape == (N, T, 8) and torch.equal(roll["prev_action"][:, 1:], roll["action"][:, :-1])


@pytest.mark.parametrize("criterion", sol.CRITERIA)
def test_shared_prefix_gives_the_same_mask_and_attention(criterion):
    torch.manual_seed(0)
    acfg = sol.ActionConfig(criterion=criterion)
    B, K, H, hd = 2, 3, 2, 8
    for L0 in (5, 12, 13, 20, 28, 29):
        for L1 in range(1, 14):
            k0, v0 = torch.randn(B, H, L0, hd), torch.randn(B, H, L0, hd)
            k1, v1, q = torch.randn(B * K, H, L1, hd), torch.randn(B * K, H, L1, hd), torch.randn(B * K, H, 1, hd)
            keep = torch.rand(B * K)
            k, v = torch.cat([k0.repeat_interleave(K, 0), k1], 2), torch.cat([v0.repeat_interleave(K, 0), v1], 2)
            mask = sol.sparse_mask(q, k, keep, acfg)
            assert torch.equal(sol.sparse_mask(q, k1, keep, acfg, k0), mask), (L0, L1)
            torch.testing.assert_close(sol.attention_shared(q, k0, v0, k1, v1, mask), sol.attention(q, k, v, mask), atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_compiled_forward_matches_eager(model):
    """torch.compile is the optional fast path (train.py uses it with CUDA); the plain modules are the reference."""
    if not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("torch.compile needs a C++ compiler on the CPU")
    x = torch.randint(0, CFG.vocab_size, (2, 40))
    for a, b in zip(torch.compile(model)(x), model(x)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_compiled_rollout_steps_match_eager(model):
    """grpo.compile_steps (train.py's --compile) decodes the rollouts with the GPT and the policy compiled; the eager
    modules are the reference. The same schedule decoded both ways gives the same log-probs, the policy the same
    logits step by step, and a second rollout compiles nothing new (the caches grow, the graphs stay)."""
    if not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("torch.compile needs a C++ compiler on the CPU")
    from torch._dynamo.utils import counters
    acfg = sol.ActionConfig(bits=(16,))  # 16 bits: a rounding flip in the quantizer would magnify float's last bits
    grid = sol.action_grid(acfg)
    policy = sol.Policy(sol.PolicyConfig(), CFG.n_embd, len(grid.values))
    gpt, pol = grpo.compile_steps(model, policy, acfg)
    B, K, C, T = 2, 3, 40, 6
    x = torch.randint(0, CFG.vocab_size, (B, C + T + 1))
    actions = torch.randint(0, len(grid.values), (B * K, T))

    def run(m, p):
        cache, h0 = sol.prefill(model, x, C, T)
        roll = sol.rollout(m, cache.fork(K, T), h0.repeat_interleave(K, 0), x[:, C:].repeat_interleave(K, 0),
                           torch.full((B * K, 3), 0.5), lambda t, obs: actions[:, t], grid, acfg)
        cache = p.new_cache(B * K)
        logits = [p(*(roll[k][:, t:t + 1] for k in ("h_prev", "emb", "scalars", "prev_action")), cache) for t in range(T)]
        return roll["logp"], torch.cat(logits, 1)
    eager = run(model, policy)
    before = counters["stats"]["unique_graphs"]
    compiled = run(gpt, pol)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    graphs = counters["stats"]["unique_graphs"]
    run(gpt, pol)
    assert counters["stats"]["unique_graphs"] == graphs and graphs - before <= 6, (before, graphs)


def test_triton_fake_quant_matches_torch():
    """The Triton kernel (used on CUDA when Triton is installed) against the PyTorch reference, run on the CPU
    by Triton's interpreter; it reads TRITON_INTERPRET when imported, hence a fresh process."""
    pytest.importorskip("triton")
    code = """
import torch, sol
torch.manual_seed(0)
x = torch.randn(6, 3, 100) * torch.tensor([1e-3, 1.0, 10.0, 1e4, 0.0, 1.0]).view(6, 1, 1)
x[5, 0, :8] = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.0, 7.0])  # exact ties round to even
for bits in ([5, 8, 12, 16, 3, 2], [4, 4, 4, 4, 4, 4]):
    bits = torch.tensor(bits, dtype=torch.float32)
    assert torch.equal(sol.fake_quant_triton(x, bits), sol.fake_quant(x, bits)), bits
print("ok")
"""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(sol.__file__).parent, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
