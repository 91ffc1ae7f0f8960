"""
Train a SOL policy with GRPO on teacher-forced episodes, on top of a frozen GPT.

    python train.py --target_budget 0.5
    python train.py --dataset shakespeare --target_budget 0.3 --rollouts 8
    python train.py --init_from path/to/Llama-3.2-1B --dataset mytext.txt --dtype bfloat16
    python train.py --init_from path/to/SmolLM2-135M-Instruct.Q4_1.gguf --dataset mytext.txt
    python train.py --help

1. prepare the dataset if its token files are missing;
2. pretrain the base GPT once per dataset and model config (cached next to the data), or load a pretrained
   checkpoint (--init_from), then freeze it;
3. GRPO (METHOD.md section 3): prefill the context densely, run a dense reference and K sampled
   schedules over the next T tokens, reward the log-probs, penalize missed budgets, update the policy;
4. evaluate on the test split: SOL (greedy), dense, and static allocation at SOL's achieved budget.

Data parallel, one process per GPU (or several on a CPU), each with its share of every batch:

    torchrun --standalone --nproc_per_node=4 train.py --target_budget 0.5
"""
import contextlib
import hashlib
import json
import math
import os
import shlex
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import pretrained
import sol
from sol import ActionConfig, GPTConfig, PolicyConfig

ROOT = Path(__file__).resolve().parent


@dataclass
class TrainConfig:
    dataset: str = "synth"  # synth | shakespeare | path/to/file.txt
    init_from: str = ""  # a llama or gpt2 checkpoint folder, or a llama GGUF file: its model and tokenizer, no pretraining
    dtype: str = "float32"  # of the frozen GPT: float32 | bfloat16 | float16
    out_dir: str = "out"
    device: str = "auto"  # auto | cpu | cuda | mps
    compile: str = "auto"  # torch.compile the pretraining step: auto = with CUDA | true | false
    seed: int = 1337
    resume: bool = False  # continue the run saved in out_dir
    overwrite: bool = False  # start over even if out_dir holds a run
    pretrain_iters: int = 1600  # base GPT pretraining, done once per dataset and model config
    pretrain_batch: int = 16
    pretrain_lr: float = 3e-3
    eval_episodes: int = 256  # held-out episodes of the final evaluation
    eval_batch: int = 128


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
    alpha_keep: float = 100.0
    alpha_prune: float = 100.0
    alpha_bits: float = 200.0
    budget_tol: float = 0.02
    # update
    clip_eps: float = 0.2
    ppo_epochs: int = 1
    ent_coef: float = 0.05
    kl_coef: float = 0.0  # KL to a frozen copy of the initial policy
    lr: float = 1e-3  # reference 1e-4 over far longer runs
    grad_clip: float = 2.0
    ckpt_interval: int = 50  # iterations between checkpoints, in pretraining and in GRPO


CHOICES = {"reward_agg": ("sum", "max"), "adv_level": ("process", "outcome"), "adv_norm": ("center", "zscore"),
           "criterion": sol.CRITERIA, "device": ("auto", "cpu", "cuda", "mps"), "compile": ("auto", "true", "false"),
           "dtype": ("float32", "bfloat16", "float16")}
# GPTConfig fields that come from the dataset or a checkpoint, never from flags
ARCH = ("n_kv_head", "norm", "norm_eps", "mlp", "pos", "bias", "tie_embeddings", "rope_scaling")
# (flags, test, what the test asks): values that would crash a run, or train something meaningless
LIMITS = [(("max_iters", "batch_size", "context_len", "rollout_len", "grad_accum", "ppo_epochs", "ckpt_interval", "pretrain_batch",
            "eval_episodes", "eval_batch", "block_size", "n_layer", "n_head", "n_embd", "mlp_hidden", "width", "heads", "depth",
            "act_emb", "scalar_hidden", "max_steps", "page_size"), lambda v: v >= 1, "at least 1"),
          (("pretrain_iters", "sinks", "window"), lambda v: v >= 0, "at least 0"),
          (("lr", "pretrain_lr", "clip_eps", "grad_clip", "temperature", "rope_theta"), lambda v: v > 0, "positive"),
          (("ent_coef", "kl_coef", "alpha_keep", "alpha_prune", "alpha_bits", "budget_tol"), lambda v: v >= 0, "at least 0"),
          (("gamma", "task_w_kl"), lambda v: 0 <= v <= 1, "in [0, 1]")]
DEFAULTS = {f.name: f.default for cfg in (TrainConfig, GRPOConfig, GPTConfig, ActionConfig, PolicyConfig) for f in fields(cfg)}


class UsageError(Exception):
    """Bad input: printed as one line, exit code 2."""


# SIGINT/SIGTERM inside a training loop only set a flag: the loop saves a checkpoint at the end of the
# iteration and exits (never from inside the handler, which could interrupt a save). Elsewhere, or a second
# signal: stop at once; checkpoints on disk are whole either way.
STOP = {"signal": 0, "defer": False}


def on_signal(signum, frame):
    first, STOP["signal"] = not STOP["signal"], signum
    if not (first and STOP["defer"]):
        raise KeyboardInterrupt


# -----------------------------------------------------------------------------
# command line: every config field is a flag, --name=value or --name value


def parse_value(name, text, default):
    try:
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        if isinstance(default, tuple):
            kind = type(default[0])
            return tuple(kind(v) for v in text.split(","))
        if default is None:
            return None if text.lower() == "none" else float(text)
        return type(default)(text)
    except ValueError:
        kind = {bool: "true/false", tuple: "a comma-separated list of numbers", int: "an integer", str: "text"}.get(
            type(default), "a number")
        raise UsageError(f"--{name}={text!r} is not {kind}; e.g. --{name}={default if default is not None else 0.5}")


def parse_args(argv, cfgs):
    flags = {f.name: cfg for cfg in cfgs for f in fields(cfg) if f.name not in ("vocab_size", *ARCH)}
    names = [f.name for cfg in cfgs for f in fields(cfg)]
    assert len(names) == len(set(names)), "two configs share a field name: one flag would set both"
    if any(a in ("-h", "--help") for a in argv):
        for cfg in cfgs:
            print(f"{type(cfg).__name__}:")
            for f in fields(cfg):
                if f.name in flags:
                    print(f"  --{f.name}={getattr(cfg, f.name)}")
        sys.exit(0)
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise UsageError(f"unexpected argument {arg!r}; options look like --name=value (see --help)")
        name, eq, text = arg[2:].partition("=")
        if name not in flags:
            raise UsageError(f"unknown option --{name}; see python {Path(sys.argv[0]).name} --help for the list")
        default = getattr(flags[name], name)
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                i, text = i + 1, argv[i + 1]
            elif isinstance(default, bool):
                text = "true"
            else:
                raise UsageError(f"--{name} needs a value, e.g. --{name}={default}")
        setattr(flags[name], name, parse_value(name, text, default))
        i += 1


def targets(g, acfg):
    """The requested budget per axis as fractions of dense (keep, prune, bits/16); None for an axis held dense.
    A request below the grid's cheapest value is held to it, with a notice."""
    asked = (g.target_keep if g.target_keep is not None else g.target_budget,
             g.target_prune if g.target_prune is not None else g.target_budget,
             g.target_bits / 16 if g.target_bits is not None else g.target_budget)
    for name, value in zip(sol.AXES, asked):
        if not 0 < value <= 1:
            raise UsageError(f"the {name} target must lie in (0, 1] (bits: in (0, 16]), got {value}; e.g. --target_budget=0.5")
    fixed, notices = sol.clamp_targets(acfg, asked)
    for line in notices:
        print(line)
    return fixed


def validate(tc, g, gcfg, acfg, pcfg):
    for cfg in (tc, g, gcfg, acfg, pcfg):
        for f in fields(cfg):
            v = getattr(cfg, f.name)
            if any(isinstance(x, float) and not math.isfinite(x) for x in (v if isinstance(v, tuple) else (v,))):
                raise UsageError(f"--{f.name}={v} is not a finite number; pass a finite one (default {getattr(type(cfg)(), f.name)})")
    for cfg in (tc, g, acfg):
        for name, allowed in CHOICES.items():
            if hasattr(cfg, name) and getattr(cfg, name) not in allowed:
                raise UsageError(f"--{name}={getattr(cfg, name)} is not one of {', '.join(allowed)}")
    if g.rollouts < 2:
        raise UsageError("GRPO compares rollouts of the same sequence, so --rollouts must be at least 2")
    values = {f.name: getattr(cfg, f.name) for cfg in (tc, g, gcfg, acfg, pcfg) for f in fields(cfg)}
    for names, ok, what in LIMITS:
        for name in names:
            if not ok(values[name]):
                raise UsageError(f"--{name} must be {what}, got {values[name]}; the default is {DEFAULTS[name]}")
    for name, top in (("keep_range", 1), ("prune_range", 1), ("bits_range", 16)):
        r = values[name]
        if len(r) != 2 or not 0 < r[0] <= r[1] <= top:
            raise UsageError(f"--{name} must be two numbers lo,hi with 0 < lo <= hi <= {top}, got {','.join(map(str, r))}")
    if g.context_len + g.rollout_len > gcfg.block_size:
        raise UsageError(f"context_len + rollout_len = {g.context_len + g.rollout_len} exceeds the model's block_size "
                         f"{gcfg.block_size}; lower --context_len or raise --block_size")
    if g.rollout_len > pcfg.max_steps:
        raise UsageError(f"--rollout_len={g.rollout_len} exceeds the policy's --max_steps={pcfg.max_steps}; raise --max_steps")
    if not (min(acfg.bits) >= 2 and 0 < min(acfg.keep) and 0 < min(acfg.prune)):
        raise UsageError("grid values must be positive and bits at least 2; see --keep, --prune, --bits")
    if gcfg.n_embd % gcfg.n_head or pcfg.width % pcfg.heads:
        raise UsageError("--n_embd must be divisible by --n_head, and --width by --heads")

# -----------------------------------------------------------------------------
# data


def gpt_config(gcfg):
    """The model config as saved: the architecture fields only where they differ from the small model's defaults,
    so base GPTs cached and runs saved before those fields existed keep their keys."""
    return {k: v for k, v in asdict(gcfg).items() if k not in ARCH or v != getattr(GPTConfig, k)}


def load_dataset(name, checkpoint=None):
    """Token splits of a dataset, prepared on first use: returns (data_dir, meta, {split: token memmap}). A text file
    is tokenized with the checkpoint's tokenizer if given (a folder or GGUF file), else with GPT-2's BPE."""
    text = name.endswith(".txt") or os.path.sep in name
    if checkpoint is not None and not text:
        raise UsageError(f"--init_from needs a text dataset (--dataset=path/to/file.txt) to tokenize with the checkpoint's "
                         f"tokenizer; {name} comes tokenized for the small model")
    if name == "synth":
        from data.synth.prepare import prepare
        data_dir = ROOT / "data" / "synth"
        if not (data_dir / "meta.json").exists():
            print("preparing the synthetic corpus (once) ...")
            prepare(data_dir)
    elif name == "shakespeare":
        from data.shakespeare.prepare import prepare
        data_dir = ROOT / "data" / "shakespeare"
        if not (data_dir / "meta.json").exists():
            prepare(data_dir)
    elif text:
        from data.text import prepare_text
        path = Path(name).expanduser()
        if not path.exists():
            raise UsageError(f"dataset file {name} does not exist; pass an existing .txt file, or --dataset=synth")
        if not path.is_file():
            kind = "a folder" if path.is_dir() else "not a regular file (a device, pipe or socket)"
            raise UsageError(f"--dataset={name} is {kind}; pass a .txt file of text, or --dataset=synth")
        digest = hashlib.sha1(path.read_bytes()).hexdigest()[:10]
        tokenizer = None if checkpoint is None else pretrained.tokenizer_file(checkpoint)  # None: GPT-2's BPE
        if tokenizer is not None:  # the cache is keyed by the tokenizer's file too: another tokenizer, other tokens
            with open(tokenizer, "rb") as fh:
                digest += "-tok" + hashlib.file_digest(fh, "sha1").hexdigest()[:8]
        data_dir = ROOT / "data" / "cache" / f"{path.stem}-{digest}"
        if not (data_dir / "meta.json").exists():
            prepare_text(path, data_dir, None if tokenizer is None else pretrained.encoding(checkpoint))
    else:
        raise UsageError(f"unknown dataset {name!r}; use synth, shakespeare, or a path to a .txt file")
    meta = json.loads((data_dir / "meta.json").read_text())
    dtype = meta.get("dtype", "uint16")  # uint32 for vocabularies over 65536 tokens
    splits = {s: np.memmap(data_dir / f"{s}.bin", dtype=dtype, mode="r") for s in ("train", "val", "test")}
    return data_dir, meta, splits


def episodes(data, n, length):
    """n evenly spaced windows of `length` tokens (fixed held-out episodes)."""
    starts = np.linspace(0, len(data) - length, n).astype(np.int64)
    return torch.from_numpy(np.stack([data[s:s + length].astype(np.int64) for s in starts]))


def random_windows(data, n, length, rng):
    starts = rng.integers(0, len(data) - length + 1, n)
    return torch.from_numpy(np.stack([data[s:s + length].astype(np.int64) for s in starts]))

# -----------------------------------------------------------------------------
# checkpoints: written whole or not at all (sol.save_atomic)


def rng_state(rng):
    # cuda: the generator of the device this process samples on (each rank's own, all in the same state)
    return {"torch": torch.get_rng_state(), "numpy": rng.bit_generator.state,
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state, rng):
    torch.set_rng_state(state["torch"])
    rng.bit_generator.state = state["numpy"]
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def load_checkpoint(path, what):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"cannot read the {what} checkpoint {path}: truncated or corrupt ({type(e).__name__}); delete it to start over")


def autocast(device):
    """bf16 autocast on CUDA; elsewhere float32 throughout."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()


def pretrain(model, splits, tc, device, partial, every):
    """Next-token pretraining of the base GPT on random windows of the train split. Every `every` iterations
    (and on SIGINT/SIGTERM, then returning None) its whole state goes to `partial`, which a rerun resumes."""
    rng = np.random.default_rng(tc.seed)
    T = model.cfg.block_size
    opt = torch.optim.AdamW(model.parameters(), lr=tc.pretrain_lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, tc.pretrain_iters // 20)
    start = 0
    if partial.exists():
        state = load_checkpoint(partial, "partial base GPT")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = state["iter"]
        set_rng_state(state["rng"], rng)
        print(f"base GPT: resuming pretraining from {partial} at iteration {start}")
    model.train()
    # the fast path where it pays: compiled (fixed shapes, so one compilation) and in bf16 on a GPU
    forward = torch.compile(model) if tc.compile == "true" or (tc.compile == "auto" and device == "cuda") else model
    pbar = tqdm(range(start, tc.pretrain_iters), desc="pretrain", dynamic_ncols=True, initial=start, total=tc.pretrain_iters)
    for it in pbar:
        lr = tc.pretrain_lr * min(1, (it + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * it / tc.pretrain_iters))
        for group in opt.param_groups:
            group["lr"] = lr
        x = random_windows(splits["train"], tc.pretrain_batch, T + 1, rng).to(device)
        with autocast(device):
            logits, _ = forward(x[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if it % 20 == 0:
            pbar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.1e}")
        if (it + 1) % every == 0 or STOP["signal"]:
            sol.save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(), "iter": it + 1, "rng": rng_state(rng)}, partial)
            if STOP["signal"]:
                pbar.close()
                return None
    model.eval()
    with torch.no_grad():
        x = episodes(splits["val"], 32, T + 1).to(device)
        logits, _ = model(x[:, :-1])
        val = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).item()
    print(f"base GPT: val loss {val:.4f} (ppl {math.exp(val):.2f})")
    return val

# -----------------------------------------------------------------------------
# GRPO pieces, in the order of METHOD.md section 3


def sample_targets(g, fixed, n, rng):
    """(n, 3) budget fractions: the fixed targets, or a fresh draw per sequence from the ranges."""
    t = torch.tensor([1.0 if v is None else v for v in fixed]).repeat(n, 1)
    if g.sample_budgets:
        for axis, (lo, hi) in enumerate((g.keep_range, g.prune_range, (g.bits_range[0] / 16, g.bits_range[1] / 16))):
            if fixed[axis] is not None:
                t[:, axis] = torch.from_numpy(rng.uniform(lo, hi, n)).float()
    return t


def returns(r, g):
    """G_t = r_t + gamma G_{t+1} ("sum") or max(r_t, gamma G_{t+1}) ("max"); r (N, T)."""
    G, nxt = torch.zeros_like(r), None
    for t in reversed(range(r.size(1))):
        if nxt is None:
            nxt = r[:, t]
        elif g.reward_agg == "sum":
            nxt = r[:, t] + g.gamma * nxt
        else:
            nxt = torch.maximum(r[:, t], g.gamma * nxt)
        G[:, t] = nxt
    return G


def budget_penalty(achieved, target, enabled, g):
    """Per rollout: sum over axes of alpha * max(|achieved - target| - tol, 0)^2."""
    alpha = torch.tensor([g.alpha_keep, g.alpha_prune, g.alpha_bits]) * torch.tensor(enabled, dtype=torch.float32)
    cost = ((achieved - target).abs() - g.budget_tol).clamp_min(0) ** 2
    return (cost * alpha.to(cost.device)).sum(-1)


def penalized_returns(roll, target, enabled, g):
    """The returns of a rollout's step rewards r_t = (1-w) log p_sparse - w KL(p_dense || p_sparse), less its
    budget penalty at every step; roll holds "kl" only when w > 0. (N, T)"""
    reward = (1 - g.task_w_kl) * roll["logp"] - (g.task_w_kl * roll["kl"] if "kl" in roll else 0)
    return returns(reward, g) - budget_penalty(roll["achieved"], target, enabled, g)[:, None]


def gather_rows(x):
    """Every process's x stacked in rank order: the whole batch's rows, under data parallelism; else x."""
    if not dist.is_initialized():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def advantages(G, B, K, g):
    """Group-relative advantages: compare each rollout with the K rollouts of the same sequence."""
    A = G[:, :1].expand_as(G) if g.adv_level == "outcome" else G  # (B*K, T)
    A = A.reshape(B, K, -1)
    A = A - A.mean(1, keepdim=True)
    if g.adv_norm == "zscore":
        A = A / (A.std(1, keepdim=True) + 1e-8)
    A = A.reshape(B * K, -1)
    if not g.whiten:
        return A
    batch = gather_rows(A)  # whitened over the whole batch, every process's rows
    return (A - batch.mean()) / (batch.std() + 1e-8)


def policy_logprobs(policy, roll, temperature):
    """Replay the recorded steps through the policy in one causal forward: log pi(a_t) and entropy, (N, T)."""
    logits = policy(roll["h_prev"], roll["emb"], roll["scalars"], roll["prev_action"]) / temperature
    logp_all = F.log_softmax(logits.float(), -1)
    return logp_all.gather(-1, roll["action"][..., None])[..., 0], -(logp_all.exp() * logp_all).sum(-1), logp_all


def policy_loss(logp, old_logp, A, entropy, g, logp_all=None, ref_all=None):
    """PPO's clipped surrogate against the sampling log-probs, minus the entropy bonus, plus KL(pi || pi_initial)
    when the initial policy's log-probs ref_all are given. logp, old_logp, A, entropy (N, T); logp_all, ref_all (N, T, A)."""
    ratio = (logp - old_logp).exp()
    surrogate = torch.minimum(ratio * A, ratio.clamp(1 - g.clip_eps, 1 + g.clip_eps) * A)
    loss = -surrogate.mean() - g.ent_coef * entropy.mean()
    if ref_all is not None:
        loss = loss + g.kl_coef * (logp_all.exp() * (logp_all - ref_all)).sum(-1).mean()
    return loss

# -----------------------------------------------------------------------------
# evaluation: SOL, dense, and static at SOL's achieved budget, on the same held-out episodes


def axes(v):
    """Budget fractions (keep, prune, bits/16) as reported: bits in bits, None for an axis held dense."""
    return {name: None if x is None else float(x) * scale for name, x, scale in zip(("keep", "prune", "bits"), v, (1, 1, 16))}


def calibrate(model, policy, eps, fixed, grid, acfg, C, batch, steps=8, prefilled=None):
    """Greedy decoding takes the policy's mode, which can sit off the requested budget: an axis that costs no
    quality gets its cheapest value even when the sampled schedules average to the target. A Lagrange
    multiplier per axis, lam, adds lam . budget(a) to the logits; bisect each on the validation episodes until
    the greedy schedule's achieved budget meets the target. The achieved budget is a step function of lam and
    can jump across the target: on such an axis a share of the steps takes the upper end of lam's last bracket
    and the rest its lower end (sol.multiplier_bias), and that share is bisected in turn. Only the budget is
    calibrated, never quality. Returns the lower and upper multipliers and the upper one's share, (3,) each."""
    target = torch.tensor([1.0 if v is None else v for v in fixed], device=eps.device)
    lower, upper, share = (torch.zeros(3, device=eps.device) for _ in range(3))
    scheduler = lambda: sol.policy_scheduler(policy, greedy=True, bias=sol.multiplier_bias(grid, lower, upper, share))
    prefilled = prefilled or sol.prefill_batches(model, eps, C, batch)  # one prefill for all the bisection's decodes
    spent = lambda: sol.decode(model, eps, target, scheduler, grid, acfg, C, batch, prefilled)[1]

    def bisect(x, axis, lo, hi):  # the budget grows with x[axis]; returns the last bracket
        for _ in range(steps):
            x[axis] = (lo + hi) / 2
            lo, hi = (x[axis].item(), hi) if spent()[axis] < target[axis] else (lo, x[axis].item())
        x[axis] = (lo + hi) / 2
        return lo, hi

    on = [i for i in range(3) if fixed[i] is not None]
    brackets = {}
    for _ in range(2):  # the axes interact a little: two rounds of coordinate bisection
        for axis in on:
            brackets[axis] = bisect(lower, axis, -20.0, 20.0)
    upper.copy_(lower)
    missed = (spent() - target).abs() > sol.BUDGET_TOL / 2  # aim within half the tolerance: test episodes differ a little
    for axis in on:
        if missed[axis]:  # no one multiplier meets the target: mix the two around the jump
            lower[axis], upper[axis] = brackets[axis]
            bisect(share, axis, 0.0, 1.0)
    return lower, upper, share


def evaluate(model, policy, eps, fixed, grid, acfg, C, batch, cal):
    """SOL (greedy, budget-calibrated), dense, and static at SOL's achieved budget, on the same episodes. Each
    method's achieved budget is checked against what it was asked for: off_budget lists the axes it missed."""
    target = torch.tensor([1.0 if v is None else v for v in fixed], device=eps.device)
    bias = sol.multiplier_bias(grid, *cal)
    pre = sol.prefill_batches(model, eps, C, batch)
    nll, achieved, _ = sol.decode(model, eps, target, lambda: sol.policy_scheduler(policy, greedy=True, bias=bias), grid, acfg, C, batch, pre)
    rows = [("sol", fixed, nll, achieved)]
    nll, dense, _ = sol.decode(model, eps, target, lambda: sol.dense_scheduler(grid), grid, acfg, C, batch, pre)
    rows.append(("dense", [1.0, 1.0, 1.0], nll, dense))
    matched = achieved.tolist()
    nll, static, _ = sol.decode(model, eps, target, lambda: sol.static_scheduler(acfg, matched), grid, acfg, C, batch, pre)
    rows.append(("static", matched, nll, static))
    T = eps.size(1) - C - 1
    asked = lambda t: [x if v is not None else None for x, v in zip(t, fixed)]  # axes held dense are not checked
    return [{"method": m, "target": axes(t), "achieved": axes(a.tolist()), "off_budget": sol.off_budget(a.tolist(), asked(t)),
             "nll": n.mean().item(), "ppl": math.exp(n.mean().item()), "tokens": n.numel() * T} for m, t, n, a in rows]


def check_resources(tc, g, gcfg, pcfg, n_actions, device, world, pretraining, parent):
    """Refuse, before allocating anything, a run whose rough peak memory exceeds what the device has free (every
    process's share, all of them on one CPU), or whose checkpoint cannot fit where it is to be saved."""
    lm_bytes = torch.finfo(getattr(torch, tc.dtype)).bits // 8
    n_lm, n_pol = sol.n_params(lambda: sol.GPT(gcfg)), sol.n_params(lambda: sol.Policy(pcfg, gcfg.n_embd, n_actions))
    B, K, C, T, E = g.batch_size // world, g.rollouts, g.context_len, g.rollout_len, tc.eval_episodes
    weights = n_lm * lm_bytes
    update = 16 * n_pol + B * K * T * 4 * (40 * pcfg.width + 8 * n_actions)  # AdamW's state; the replay kept for backward
    needs = [(f"the GPT ({n_lm:,} parameters in {tc.dtype})", weights, "choose a smaller model"),
             (f"pretraining with --pretrain_batch={tc.pretrain_batch}", sol.pretrain_bytes(gcfg, n_lm, tc.pretrain_batch) * pretraining,
              "lower --pretrain_batch"),
             (f"GRPO with --batch_size={g.batch_size} and --rollouts={K}",
              weights + update + sol.episode_bytes(gcfg, B, K, C, T, lm_bytes, g.task_w_kl > 0), "lower --batch_size or --rollouts"),
             (f"the evaluation with --eval_batch={tc.eval_batch} and --eval_episodes={E}",
              weights + sol.episode_bytes(gcfg, min(tc.eval_batch, E), 1, C, T, lm_bytes) + 2 * E * (C + T + 1) * 8,
              "lower --eval_batch or --eval_episodes")]
    sol.check_memory([(what, need * (world if device == "cpu" else 1), fix) for what, need, fix in needs], device)
    ckpt = 32 * n_pol + 2**20  # the policy, its initial copy and AdamW's moments in float32, twice while replaced; headroom
    free = shutil.disk_usage(parent).free
    if free < ckpt:
        raise UsageError(f"--out_dir={tc.out_dir} is on a file system with {free / 2**20:.1f} MiB free, too little for a "
                         f"checkpoint (about {ckpt / 2**20:.1f} MiB); free some space or choose another --out_dir")


def without(argv, flag):
    """argv less a boolean flag, in any of its forms: --flag, --flag=value, --flag value."""
    is_value = lambda i: i > 0 and argv[i - 1] == flag and not argv[i].startswith("--")
    return [a for i, a in enumerate(argv) if a.split("=")[0] != flag and not is_value(i)]

# -----------------------------------------------------------------------------


def main(argv):
    tc, g, gcfg, acfg, pcfg = TrainConfig(), GRPOConfig(), GPTConfig(), ActionConfig(), PolicyConfig()
    parse_args(argv, (tc, g, gcfg, acfg, pcfg))
    grid = sol.action_grid(acfg)
    fixed = targets(g, acfg)
    enabled = [v is not None for v in fixed]
    device = tc.device if tc.device != "auto" else "cuda" if torch.cuda.is_available() else \
        "mps" if torch.backends.mps.is_available() else "cpu"
    out_dir = Path(tc.out_dir)
    ckpt_path = out_dir / "ckpt.pt"
    if tc.resume and not ckpt_path.exists():
        raise UsageError(f"--resume: no checkpoint at {ckpt_path}; drop --resume to start a new run")
    if ckpt_path.exists() and not (tc.resume or tc.overwrite):
        done = load_checkpoint(ckpt_path, "policy")["iter"]
        if done < g.max_iters:
            raise UsageError(f"{out_dir} already holds a run, stopped at GRPO iteration {done} of {g.max_iters}; pass --resume "
                             "to continue it, --overwrite to start over, or another --out_dir")
        tc.resume = True  # a finished run goes straight to evaluation, its config checked as for --resume
    parent = next(p for p in (out_dir.absolute(), *out_dir.absolute().parents) if p.exists())
    if not (parent.is_dir() and os.access(parent, os.W_OK)):
        raise UsageError(f"cannot write to --out_dir={out_dir} ({parent} is not a writable folder); choose another --out_dir")
    cmd = shlex.join(["python", "train.py", *argv])  # a resumed run may use any number of processes
    rerun = shlex.join(["python", "train.py", *without(argv, "--overwrite")])  # a finished run: evaluated again

    # data parallel under torchrun: one process per GPU (or several on a CPU), each taking an equal share of
    # every batch; gradients are averaged, and rank 0 alone prepares data, pretrains, saves, logs and evaluates
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, local, world = (int(os.environ[v]) for v in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) if ddp else (0, 0, 1)
    master = rank == 0
    if ddp:
        if g.batch_size % world:
            raise UsageError(f"--batch_size={g.batch_size} is the batch of all {world} processes together and must "
                             f"divide evenly among them; e.g. --batch_size={g.batch_size // world * world or world}")
        if device not in ("cuda", "cpu"):
            raise UsageError(f"data-parallel training runs on cuda (nccl) or cpu (gloo), not {device}; pass --device=cpu")
        if device == "cuda":
            torch.cuda.set_device(local)  # from here on "cuda" is this process's own GPU
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
        if not master:
            sys.stdout = open(os.devnull, "w")  # one log: rank 0's

    def stop(saved, then):
        if master:
            print(f"{signal.Signals(STOP['signal']).name}: saved {saved}; to continue, run {then}", file=sys.stderr)
        if ddp:
            dist.destroy_process_group()
        sys.exit(128 + STOP["signal"])

    init = Path(tc.init_from).expanduser() if tc.init_from else None
    if init is not None:
        flags = [f.name for f in fields(gcfg) if getattr(gcfg, f.name) != getattr(GPTConfig, f.name)]
        if flags:
            raise UsageError(f"--init_from takes the model config from the checkpoint; drop --{', --'.join(flags)}")
        gcfg = pretrained.config(init)
    if ddp and not master:
        dist.barrier()  # rank 0 prepares the data and pretrains the base GPT first; the others then read them
    data_dir, meta, splits = load_dataset(tc.dataset, init)
    if init is None:
        gcfg.vocab_size = meta["vocab_size"]
    elif max(int(d.max()) for d in splits.values()) >= gcfg.vocab_size:
        raise UsageError(f"{tc.dataset} was tokenized beyond the checkpoint's {gcfg.vocab_size} tokens: its tokenizer does not "
                         "match the model, or the text holds bytes the tokenizer lacks (e.g. control characters); remove them")
    validate(tc, g, gcfg, acfg, pcfg)
    C, T = g.context_len, g.rollout_len
    need = C + T + 1 if init else max(C + T + 1, gcfg.block_size + 1)  # a pretraining window only if we pretrain
    for split, data in splits.items():
        if len(data) < need:
            raise UsageError(f"the {split} split of {tc.dataset} has {len(data)} tokens, fewer than one episode"
                             f"{'' if init else ' or pretraining window'} ({need}); use a longer text or a smaller --context_len/--block_size")
    torch.manual_seed(tc.seed)
    rng = np.random.default_rng(tc.seed)
    print(f"seed {tc.seed} | dataset {tc.dataset} ({', '.join(f'{s} {len(d):,}' for s, d in splits.items())} tokens) | device {device}")

    # 1. the base GPT: a pretrained checkpoint, or pretrained here once per dataset and model config; then frozen
    key = json.dumps([gpt_config(gcfg), meta, tc.pretrain_iters, tc.pretrain_batch, tc.pretrain_lr, tc.seed], sort_keys=True)
    base_path = init or data_dir / f"base-{hashlib.sha1(key.encode()).hexdigest()[:10]}.pt"
    base_sha1 = pretrained.digest(init) if init else None
    check_resources(tc, g, gcfg, pcfg, len(grid.tags), device, world, init is None and not base_path.exists(), parent)
    t0 = time.time()
    model = pretrained.load(init, getattr(torch, tc.dtype), device) if init else sol.GPT(gcfg).to(device)
    partial = Path(f"{base_path}.partial")
    STOP["defer"] = True
    if init:
        print(f"base GPT: {init} (sha1 {base_sha1[:10]}) loaded as {tc.dtype} in {time.time() - t0:.1f} s")
    elif base_path.exists():
        state = load_checkpoint(base_path, "base GPT")
        if state.get("config") != gpt_config(gcfg):
            raise UsageError(f"the base checkpoint {base_path} was made for another model config; delete it to retrain")
        model.load_state_dict(state["model"])
        print(f"base GPT: reusing {base_path} (val loss {state['val_loss']:.4f})")
    else:
        if not master:  # rank 0 pretrained it, on another machine
            raise UsageError(f"{base_path} is missing here: on several machines, data/ must be a folder they share")
        t0 = time.time()
        val = pretrain(model, splits, tc, device, partial, g.ckpt_interval)
        if val is None:
            stop(partial, f"the same command again: {cmd}")
        sol.save_atomic({"model": model.state_dict(), "config": gpt_config(gcfg), "val_loss": val}, base_path)
        print(f"base GPT: saved to {base_path} after {time.time() - t0:.0f} s")
    partial.unlink(missing_ok=True)
    model.eval().requires_grad_(False).to(getattr(torch, tc.dtype))
    if ddp and master:
        dist.barrier()

    # 2. the policy and its optimizer
    grid = grid._replace(values=grid.values.to(device), budget=grid.budget.to(device))  # indexed by actions chosen on device
    policy = sol.Policy(pcfg, gcfg.n_embd, len(grid.tags)).to(device)
    opt = torch.optim.AdamW(policy.parameters(), lr=g.lr, weight_decay=0.0)
    ref_policy = None
    config = {"train": asdict(tc), "grpo": asdict(g), "gpt": gpt_config(gcfg), "action": asdict(acfg), "policy": asdict(pcfg),
              "base": str(base_path.resolve() if init else base_path), "base_sha1": base_sha1}
    start, skipped = 0, 0
    if tc.resume:
        state = load_checkpoint(ckpt_path, "policy")
        for part in ("gpt", "action", "policy"):
            if state["config"][part] != config[part]:
                diff = [k for k in {**state["config"][part], **config[part]} if state["config"][part].get(k) != config[part].get(k)]
                raise UsageError(f"{ckpt_path} was trained with another {part} config ({', '.join(diff)}); use its settings or a new --out_dir")
        # another --dataset, --seed or --pretrain_*, or another checkpoint (the same one moved is fine: same hash)
        if state["config"].get("base_sha1") != base_sha1 or (init is None and Path(state["config"]["base"]).name != base_path.name):
            raise UsageError(f"{ckpt_path} was trained on another base GPT ({state['config']['base']}); use its settings or a new --out_dir")
        policy.load_state_dict(state["policy"])
        opt.load_state_dict(state["optimizer"])
        start, skipped = state["iter"], state.get("skipped", 0)
        print(f"resuming {ckpt_path} at iteration {start}")
    initial = state["initial_policy"] if tc.resume else {k: v.clone() for k, v in policy.state_dict().items()}
    if g.kl_coef > 0:
        ref_policy = sol.Policy(pcfg, gcfg.n_embd, len(grid.tags)).to(device).requires_grad_(False)
        ref_policy.load_state_dict(initial)
    if tc.resume:  # last, so nothing above draws from the restored generators
        set_rng_state(state["rng"], rng)
    lm_flops = sol.matmul_flops(model, C + T, gcfg.n_layer, gcfg.n_embd)
    pol_flops = sol.matmul_flops(policy, T, pcfg.depth, pcfg.width)
    print(f"LM {sum(p.numel() for p in model.parameters()):,} params | policy {sum(p.numel() for p in policy.parameters()):,} params "
          f"| {len(grid.tags)} actions | policy/LM FLOPs per decode step {pol_flops / lm_flops:.1%}")
    print(f"target: keep {fixed[0]} prune {fixed[1]} bits {None if fixed[2] is None else fixed[2] * 16:g}"
          + (" (training targets sampled per sequence from ranges)" if g.sample_budgets else ""))

    def save(it):
        if not master:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        sol.save_atomic({"policy": policy.state_dict(), "optimizer": opt.state_dict(), "iter": it, "config": config,
                         "initial_policy": initial, "skipped": skipped, "rng": rng_state(rng), "command": cmd}, ckpt_path)

    # 3. GRPO
    # B sequences per process. Every process draws the whole batch (all generators stay in step, so the
    # rank-0 checkpoint resumes any of them) and keeps rows rank*B .. rank*B+B-1: W processes train as one would
    B, K = g.batch_size // world, g.rollouts
    rows = slice(rank * B, (rank + 1) * B)
    trained = DDP(policy, device_ids=[local] if device == "cuda" else None) if ddp else policy
    pbar = tqdm(range(start, g.max_iters), desc="grpo", dynamic_ncols=True, initial=start, total=g.max_iters,
                disable=not master or start >= g.max_iters)
    for it in pbar:
        opt.zero_grad(set_to_none=True)
        for micro in range(g.grad_accum):
            # a batch of training sequences, each with its own budget
            x = random_windows(splits["train"], g.batch_size, C + T + 1, rng)[rows].to(device)  # (B, C+T+1)
            target = sample_targets(g, fixed, g.batch_size, rng)[rows].to(device)  # (B, 3)
            with torch.no_grad(), autocast(device):  # the frozen GPT's work: no gradients; bf16 on a GPU
                # prefill the context once, densely; the K rollouts of a sequence all read that one prefix cache
                cache, h0 = sol.prefill(model, x, C, T)
                cache_k = cache.fork(K, T)
                # the dense reference over the controlled steps: teacher-forced, so all T steps in one forward
                dense = F.log_softmax(model(x[:, C:C + T], cache)[0].float(), -1)  # (B, T, V)
                dense_logp = dense.gather(-1, x[:, C + 1:, None])[..., 0]  # (B, T)
                ref = dense.repeat_interleave(K, 0) if g.task_w_kl > 0 else None
                # K counterfactual schedules per sequence: same tokens, compute sampled from the policy
                roll = sol.rollout(model, cache_k, h0.repeat_interleave(K, 0), x[:, C:].repeat_interleave(K, 0),
                                   target.repeat_interleave(K, 0), sol.policy_scheduler(policy, greedy=False, shard=(rank, world)), grid, acfg, ref)
            # step rewards, returns, budget penalty, group-relative advantage
            A = advantages(penalized_returns(roll, target.repeat_interleave(K, 0), enabled, g), B, K, g)
            # PPO clipped surrogate against the sampling policy, entropy bonus, optional KL to the initial policy
            with torch.no_grad():
                old_logp = policy_logprobs(policy, roll, pcfg.temperature)[0]
            for epoch in range(g.ppo_epochs):
                if ddp:  # average the gradients across processes once, in the iteration's last backward (as nanoGPT)
                    trained.require_backward_grad_sync = micro == g.grad_accum - 1 and epoch == g.ppo_epochs - 1
                logp, entropy, logp_all = policy_logprobs(trained, roll, pcfg.temperature)
                ref_all = policy_logprobs(ref_policy, roll, pcfg.temperature)[2] if ref_policy is not None else None
                loss = policy_loss(logp, old_logp, A, entropy, g, logp_all, ref_all)
                (loss / (g.grad_accum * g.ppo_epochs)).backward()  # a mean over rows: the processes' average is the batch's
        # a non-finite reward, advantage or loss makes every gradient non-finite: skip the update, never average it in
        if torch.isfinite(torch.nn.utils.clip_grad_norm_(policy.parameters(), g.grad_clip)):
            opt.step()
        else:
            skipped += 1
            tqdm.write(f"warning: iteration {it + 1}: non-finite reward, advantage or loss; update skipped ({skipped} so far)")
        ach = roll["achieved"].mean(0)
        pbar.set_postfix(reward=f"{roll['logp'].mean():.3f}", dense=f"{dense_logp.mean():.3f}",
                         keep=f"{ach[0]:.2f}", prune=f"{ach[1]:.2f}", bits=f"{ach[2] * 16:.1f}",
                         gap=f"{(roll['achieved'] - target.repeat_interleave(K, 0)).abs().mean():.3f}", skipped=skipped)
        if ddp:  # a signal reaches the processes at different moments: all stop after the same iteration
            flag = torch.tensor(STOP["signal"], device=device)
            dist.all_reduce(flag, dist.ReduceOp.MAX)
            STOP["signal"] = int(flag)
        if (it + 1) % g.ckpt_interval == 0 or it + 1 == g.max_iters or STOP["signal"]:
            save(it + 1)
        if STOP["signal"]:
            pbar.close()
            stop(f"{ckpt_path} at iteration {it + 1}", cmd if tc.resume else f"{cmd} --resume")
    STOP["defer"] = False
    if skipped:
        print(f"warning: {skipped} of {g.max_iters} GRPO updates were skipped for non-finite rewards, advantages or losses")
    if start >= g.max_iters:
        print(f"{ckpt_path} already finished {start} iterations; evaluating it (--overwrite trains a new one)")
    if ddp:
        dist.destroy_process_group()
        if not master:
            return

    # 4. held-out evaluation at the target: calibrate greedy decoding's budget on val, report on test
    policy.eval()
    try:
        evaluate_and_report(model, policy, splits, fixed, grid, acfg, C, T, tc, config, out_dir)
    except KeyboardInterrupt:
        print(f"{signal.Signals(STOP['signal'] or signal.SIGINT).name}: stopped during the final evaluation, {out_dir / 'eval.json'} "
              f"not (re)written; {ckpt_path} holds the finished policy: {rerun} evaluates it again", file=sys.stderr)
        sys.exit(128 + (STOP["signal"] or signal.SIGINT))
    print(f"wrote {out_dir / 'eval.json'} and {ckpt_path}")


def evaluate_and_report(model, policy, splits, fixed, grid, acfg, C, T, tc, config, out_dir):
    """Calibrate greedy decoding's budget on val, evaluate on test, print the table and write eval.json."""
    device = model.lm_head.weight.device
    cal = calibrate(model, policy, episodes(splits["val"], tc.eval_episodes // 2, C + T + 1).to(device), fixed, grid, acfg, C, tc.eval_batch)
    eps = episodes(splits["test"], tc.eval_episodes, C + T + 1).to(device)
    results = evaluate(model, policy, eps, fixed, grid, acfg, C, tc.eval_batch, cal)
    lower, upper, share = (t.tolist() for t in cal)
    print(f"\ntest split, {len(eps)} episodes x {T} controlled steps, greedy policy, budget multipliers "
          + ", ".join(f"{name} {lo:+.2f}" + (f" / {hi:+.2f} on {f:.0%} of steps" if f else "")
                      for name, v, lo, hi, f in zip(sol.AXES, fixed, lower, upper, share) if v is not None)
          + f" (fit on val), seed {tc.seed}")
    print(f"{'method':<8} {'nll':>7} {'ppl':>8} {'keep':>6} {'prune':>6} {'bits':>6}")
    for r in results:
        a = r["achieved"]
        flag = f"  OFF BUDGET: {', '.join(r['off_budget'])}" if r["off_budget"] else ""
        print(f"{r['method']:<8} {r['nll']:7.4f} {r['ppl']:8.3f} {a['keep']:6.3f} {a['prune']:6.3f} {a['bits']:6.2f}{flag}")
    if any(r["off_budget"] for r in results):
        print(f"OFF BUDGET: achieved more than {sol.BUDGET_TOL} (bits {sol.BUDGET_TOL * 16:g}) away from what the method was "
              "asked for (sol: the target; static: sol's achieved budget)")
    report = {"dataset": tc.dataset, "seed": tc.seed, "config": config, "budget_multipliers": {"lower": lower, "upper": upper, "upper_share": share},
              "episodes": {"calibration (val)": tc.eval_episodes // 2, "test": len(eps)}, "results": results}
    out_dir.mkdir(parents=True, exist_ok=True)
    sol.save_atomic(json.dumps(report, indent=2), out_dir / "eval.json")


if __name__ == "__main__":
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        main(sys.argv[1:])
    except (UsageError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; checkpoints written so far are intact (rerun to continue, with --resume once ckpt.pt exists)", file=sys.stderr)
        sys.exit(128 + (STOP["signal"] or signal.SIGINT))
