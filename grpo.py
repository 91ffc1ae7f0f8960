"""
GRPO on teacher-forced episodes (docs/method.md, section 3): the config, the rewards and returns, the budget
penalty, the group-relative advantages, the PPO update, and one training iteration that puts them together.
"""
import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

import schedules
import sol
from cli import UsageError


@dataclass
class GRPOConfig:
    max_iters: int = 200
    batch_size: int = 8  # training sequences per micro-batch, over all processes together
    rollouts: int = 16  # K schedules per sequence
    context_len: int = 128  # C, prefilled densely (reference 512)
    rollout_len: int = 16  # T controlled steps
    grad_accum: int = 1
    # budgets: --target_budget X sets keep*=X, prune*=X, bits*=16X; the target_* flags override one axis.
    # An axis whose grid list holds only its dense value (e.g. --bits=16) is off: held dense.
    target_budget: float = 0.5
    target_keep: float = None
    target_prune: float = None
    target_bits: float = None
    sample_budgets: bool = False  # draw targets per sequence from the ranges below instead
    keep_range: tuple = (0.1, 1.0)
    prune_range: tuple = (0.4, 1.0)
    bits_range: tuple = (5.0, 16.0)
    # reward, return, advantage
    task_w_kl: float = 0.0  # r_t = (1-w) log p_sparse - w KL(p_dense || p_sparse)
    reward_agg: str = "sum"  # sum | max
    gamma: float = 0.85
    adv_level: str = "process"  # process | outcome
    adv_norm: str = "center"  # center | zscore, over the K rollouts of one sequence
    whiten: bool = True  # whiten advantages over the batch
    # budget penalty per rollout and axis: price * (achieved - target) + alpha * max(|achieved - target| - tol, 0)^2.
    # The price is learned by dual ascent (price += dual_lr * the batch's mean gap, each iteration), so it settles where
    # the policy spends the target; the quadratic keeps the policy's choices concentrated. The reference's fixed
    # penalty: --dual_lr=0 --alpha_keep=100 --alpha_prune=100 --alpha_bits=200.
    dual_lr: float = 1.0
    alpha_keep: float = 30.0
    alpha_prune: float = 30.0
    alpha_bits: float = 60.0
    budget_tol: float = 0.02
    # update
    clip_eps: float = 0.2
    ppo_epochs: int = 1
    ent_coef: float = 0.05
    kl_coef: float = 0.0  # KL to a frozen copy of the initial policy
    lr: float = 1e-3  # reference 1e-4 over far longer runs
    grad_clip: float = 2.0
    ckpt_interval: int = 50  # iterations between checkpoints, in pretraining and in GRPO


def targets(cfg, acfg):
    """The requested budget per axis as fractions of dense (keep, prune, bits/16); None for an axis held dense.
    A request below the grid's cheapest value is held to it, with a notice."""
    asked = (cfg.target_keep if cfg.target_keep is not None else cfg.target_budget,
             cfg.target_prune if cfg.target_prune is not None else cfg.target_budget,
             cfg.target_bits / 16 if cfg.target_bits is not None else cfg.target_budget)
    for name, value in zip(schedules.AXES, asked):
        if not 0 < value <= 1:
            raise UsageError(f"the {name} target must lie in (0, 1] (bits: in (0, 16]), got {value}; e.g. --target_budget=0.5")
    requested, notices = schedules.clamp_targets(acfg, asked)
    for line in notices:
        print(line)
    return requested


def sample_targets(cfg, requested, n, rng):
    """(n, 3) budget fractions: the requested targets, or a fresh draw per sequence from the ranges."""
    t = torch.tensor([1.0 if v is None else v for v in requested]).repeat(n, 1)
    if cfg.sample_budgets:
        for axis, (lo, hi) in enumerate((cfg.keep_range, cfg.prune_range, (cfg.bits_range[0] / 16, cfg.bits_range[1] / 16))):
            if requested[axis] is not None:
                t[:, axis] = torch.from_numpy(rng.uniform(lo, hi, n)).float()
    return t


def returns(r, cfg):
    """G_t = r_t + gamma G_{t+1} ("sum") or max(r_t, gamma G_{t+1}) ("max"); r (N, T)."""
    G, nxt = torch.zeros_like(r), None
    for t in reversed(range(r.size(1))):
        if nxt is None:
            nxt = r[:, t]
        elif cfg.reward_agg == "sum":
            nxt = r[:, t] + cfg.gamma * nxt
        else:
            nxt = torch.maximum(r[:, t], cfg.gamma * nxt)
        G[:, t] = nxt
    return G


def budget_penalty(achieved, target, price, enabled, cfg):
    """Per rollout (N,): sum over the enabled axes of price * gap + alpha * max(|gap| - tol, 0)^2, gap = achieved - target.
    achieved, target (N, 3); price (3,). Within a group of rollouts the linear term charges spending itself, as a
    Lagrange multiplier does; the quadratic charges any deviation, which also keeps the policy's choices
    concentrated, so that greedy decoding spends what the samples do (docs/experiments.md, the budget penalty)."""
    on = torch.tensor(enabled, dtype=torch.float32, device=achieved.device)
    alpha = torch.tensor([cfg.alpha_keep, cfg.alpha_prune, cfg.alpha_bits], device=achieved.device)
    gap = achieved - target
    return ((price.to(gap.device) * gap + alpha * (gap.abs() - cfg.budget_tol).clamp_min(0) ** 2) * on).sum(-1)


def dual_ascent(price, gap, enabled, cfg):
    """The next price (3,): raised on an axis the batch overspent, lowered on one it underspent, by dual_lr times the
    mean gap (achieved - target, (N, 3)) over every process's rollouts. It may go negative: a policy that underspends
    is paid to spend."""
    if not cfg.dual_lr:
        return price
    return price + cfg.dual_lr * gather_rows(gap).mean(0).cpu() * torch.tensor(enabled, dtype=torch.float32)


def rewards(roll, cfg):
    """A rollout's step rewards r_t = (1-w) log p_sparse(x_t+1) - w KL(p_dense || p_sparse), (N, T); roll holds "kl"
    only when w > 0."""
    return (1 - cfg.task_w_kl) * roll["logp"] - (cfg.task_w_kl * roll["kl"] if "kl" in roll else 0)


def penalized_returns(roll, target, price, enabled, cfg):
    """The returns of a rollout's step rewards, less its budget penalty at every step. (N, T)"""
    return returns(rewards(roll, cfg), cfg) - budget_penalty(roll["achieved"], target, price, enabled, cfg)[:, None]


def gather_rows(x):
    """Every process's x stacked in rank order: the whole batch's rows, under data parallelism; else x."""
    if not dist.is_initialized():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def advantages(G, B, K, cfg):
    """Group-relative advantages: compare each rollout with the K rollouts of the same sequence."""
    A = G[:, :1].expand_as(G) if cfg.adv_level == "outcome" else G  # (B*K, T)
    A = A.reshape(B, K, -1)
    A = A - A.mean(1, keepdim=True)
    if cfg.adv_norm == "zscore":
        A = A / (A.std(1, keepdim=True) + 1e-8)
    A = A.reshape(B * K, -1)
    if not cfg.whiten:
        return A
    batch = gather_rows(A)  # whitened over the whole batch, every process's rows
    return (A - batch.mean()) / (batch.std() + 1e-8)


def policy_logprobs(policy, roll, temperature):
    """Replay the recorded steps through the policy in one causal forward: log pi(a_t) and entropy, (N, T)."""
    logits = policy(roll["h_prev"], roll["emb"], roll["scalars"], roll["prev_action"]) / temperature
    logp_all = F.log_softmax(logits.float(), -1)
    return logp_all.gather(-1, roll["action"][..., None])[..., 0], -(logp_all.exp() * logp_all).sum(-1), logp_all


def policy_loss(logp, old_logp, A, entropy, cfg, logp_all=None, ref_all=None):
    """PPO's clipped surrogate against the sampling log-probs, minus the entropy bonus, plus KL(pi || pi_initial)
    when the initial policy's log-probs ref_all are given. logp, old_logp, A, entropy (N, T); logp_all, ref_all (N, T, A)."""
    ratio = (logp - old_logp).exp()
    surrogate = torch.minimum(ratio * A, ratio.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps) * A)
    loss = -surrogate.mean() - cfg.ent_coef * entropy.mean()
    if ref_all is not None:
        loss = loss + cfg.kl_coef * (logp_all.exp() * (logp_all - ref_all)).sum(-1).mean()
    return loss


def autocast(device):
    """bf16 autocast on CUDA; elsewhere float32 throughout."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()


def rollouts(model, policy, x, target, grid, acfg, cfg, shard=(0, 1), compiled=None):
    """Steps 1-3 of GRPO for sequences x (B, C+T+1) with budget targets (B, 3): a dense prefill of the context,
    the dense reference over the T controlled steps, and K sampled schedules per sequence (rows r*K .. r*K+K-1)
    over the same tokens. Returns the rollouts (sol.rollout's dict, B*K rows) and the dense log-probs (B, T).
    compiled: the GPT and the policy compiled (see compile_steps), to decode the rollouts' steps with."""
    C, T, K = cfg.context_len, cfg.rollout_len, cfg.rollouts
    with torch.no_grad(), autocast(x.device.type):  # the frozen GPT's work: no gradients; bf16 on a GPU
        cache, h0 = sol.prefill(model, x, C, T)
        forked = cache.fork(K, T)  # the K rollouts of a sequence all read its one prefix cache
        dense = F.log_softmax(model(x[:, C:C + T], cache)[0].float(), -1)  # teacher-forced: all T steps in one forward
        ref = dense.repeat_interleave(K, 0) if cfg.task_w_kl > 0 else None  # (B*K, T, V), for the KL reward
        step_model, step_policy = compiled or (model, policy)
        scheduler = schedules.policy_scheduler(step_policy, greedy=False, shard=shard)
        roll = sol.rollout(step_model, forked, h0.repeat_interleave(K, 0), x[:, C:].repeat_interleave(K, 0),
                           target.repeat_interleave(K, 0), scheduler, grid, acfg, ref)
    return roll, dense.gather(-1, x[:, C + 1:, None])[..., 0]


def compile_steps(model, policy, acfg):
    """The GPT and the policy compiled for the rollouts' decode steps (torch.compile; inductor's C++ on a CPU, Triton
    on CUDA). Dynamic shapes: the caches grow by one position a step, so a run compiles a few times, not once a step.
    Under quest the GPT stays eager: its page bookkeeping, in Python integers of the cache's length, took over
    9 minutes to compile on a CPU (torch 2.13) without finishing."""
    gpt = model if acfg.criterion == "quest" else torch.compile(model, dynamic=True)
    return gpt, torch.compile(policy, dynamic=True)


def iteration(model, policy, opt, draw, grid, acfg, cfg, enabled, price, trained=None, initial=None, shard=(0, 1), compiled=None):
    """One GRPO iteration: cfg.grad_accum micro-batches, each drawn by draw() -> (x (B, C+T+1), target (B, 3)),
    rolled out (steps 1-3), scored (4-7: reward, return, budget penalty at the budget's price (3,), advantage),
    one update (8), then the budget price's dual-ascent step (part of 6).
    trained: the policy as the backward sees it (DDP's wrapper); initial: a frozen copy for the KL term; compiled:
    compile_steps(model, policy, acfg), to decode the rollouts with.
    Returns the last micro-batch's rollouts, targets and dense log-probs, whether the update was applied, and the next price."""
    trained = trained or policy
    opt.zero_grad(set_to_none=True)
    gaps = []
    for micro in range(cfg.grad_accum):
        x, target = draw()
        roll, dense_logp = rollouts(model, policy, x, target, grid, acfg, cfg, shard, compiled)
        targets = target.repeat_interleave(cfg.rollouts, 0)
        A = advantages(penalized_returns(roll, targets, price, enabled, cfg), len(x), cfg.rollouts, cfg)
        gaps.append(roll["achieved"] - targets)
        with torch.no_grad():
            old_logp = policy_logprobs(policy, roll, policy.pcfg.temperature)[0]  # the policy that sampled
        for epoch in range(cfg.ppo_epochs):
            if trained is not policy:  # DDP: average the gradients once, in the iteration's last backward
                trained.require_backward_grad_sync = micro == cfg.grad_accum - 1 and epoch == cfg.ppo_epochs - 1
            logp, entropy, logp_all = policy_logprobs(trained, roll, policy.pcfg.temperature)
            ref_all = policy_logprobs(initial, roll, policy.pcfg.temperature)[2] if initial is not None else None
            loss = policy_loss(logp, old_logp, A, entropy, cfg, logp_all, ref_all)
            (loss / (cfg.grad_accum * cfg.ppo_epochs)).backward()  # a mean over rows: the processes' average is the batch's
    # a non-finite reward, advantage or loss makes every gradient non-finite: skip the update, never average it in
    applied = bool(torch.isfinite(torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)))
    if applied:
        opt.step()
    price = dual_ascent(price, torch.cat(gaps), enabled, cfg)
    return roll, target, dense_logp, applied, price
