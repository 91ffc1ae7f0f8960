"""
Train a SOL policy with GRPO on teacher-forced episodes, on top of a frozen GPT.

    python train.py --target_budget 0.5
    python train.py --dataset shakespeare --target_budget 0.3 --rollouts 8
    python train.py --init_from path/to/Llama-3.2-1B --dataset mytext.txt   # bfloat16 where the hardware has it (--dtype=auto)
    python train.py --init_from path/to/SmolLM2-135M-Instruct.Q4_1.gguf --dataset mytext.txt
    python train.py --help

1. prepare the dataset if its token files are missing;
2. load the base GPT shipped with the built-in corpus (data/synth/base.pt), or pretrain one once per dataset and
   model config (cached next to the data; --pretrain=true on the built-in corpus), or load a pretrained checkpoint
   (--init_from); then freeze it;
3. GRPO (docs/method.md, section 3): prefill the context densely, run a dense reference and K sampled
   schedules over the next T tokens, reward the log-probs, penalize missed budgets, update the policy;
4. evaluate on the test split: SOL (greedy, its budget held on target by a controller as it decodes), dense,
   static allocation at SOL's achieved budget, and the oracle: a bound, not a method, that tries every grid action
   at every step (A dense decodes for A actions, under a minute by default; --oracle=false skips it on a large
   grid or model).

Data parallel, one process per GPU (or several on a CPU), each with its share of every batch:

    torchrun --standalone --nproc_per_node=4 train.py --target_budget 0.5
"""
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
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import grpo
import pretrained
import schedules
import sol
from cli import DTYPES, UsageError, check_memory, episode_bytes, load_checkpoint, n_params, parse_args, pick_dtype, pretrain_bytes, save_atomic
from data import episodes, load_dataset, n_tokens, random_windows, texts
from data.synth.prepare import skills as synth_skills
from sol import ActionConfig, GPTConfig, PolicyConfig


@dataclass
class TrainConfig:
    dataset: str = "synth"  # synth | shakespeare | path/to/file.txt | a.txt,b.txt (several texts, each with its own splits)
    init_from: str = ""  # a llama or gpt2 checkpoint folder, or a llama GGUF file: its model and tokenizer, no pretraining
    dtype: str = "auto"  # of the frozen GPT: auto (bfloat16 where native, cli.pick_dtype) | float32 | bfloat16 | float16
    out_dir: str = "out"
    device: str = "auto"  # auto | cpu | cuda | mps
    compile: str = "auto"  # torch.compile: auto = pretraining, with CUDA | true = pretraining and the rollouts' decode steps | false
    seed: int = 1337
    resume: bool = False  # continue the run saved in out_dir
    overwrite: bool = False  # start over even if out_dir holds a run
    pretrain: bool = False  # synth: pretrain the base GPT here instead of loading the shipped data/synth/base.pt
    pretrain_iters: int = 3200  # base GPT pretraining (other datasets, or --pretrain), once per dataset and model config
    pretrain_batch: int = 16
    pretrain_lr: float = 1e-2  # the rate at which recall formed earliest (docs/experiments.md)
    eval_episodes: int = 256  # held-out episodes of the final evaluation
    eval_batch: int = 128
    oracle: bool = True  # the oracle's row: every grid action probed at every step, about A times a dense decode


CHOICES = {"reward_agg": ("sum", "max"), "adv_level": ("process", "outcome"), "adv_norm": ("center", "zscore"),
           "criterion": sol.CRITERIA, "device": ("auto", "cpu", "cuda", "mps"), "compile": ("auto", "true", "false"),
           "dtype": DTYPES}
# GPTConfig fields that come from the dataset or a checkpoint, never from flags
ARCH = ("n_kv_head", "norm", "norm_eps", "mlp", "pos", "bias", "tie_embeddings", "rope_scaling")
# (flags, test, what the test asks): values that would crash a run, or train something meaningless
LIMITS = [(("max_iters", "batch_size", "context_len", "rollout_len", "grad_accum", "ppo_epochs", "ckpt_interval", "pretrain_batch",
            "eval_episodes", "eval_batch", "block_size", "n_layer", "n_head", "n_embd", "mlp_hidden", "width", "heads", "depth",
            "act_emb", "scalar_hidden", "max_steps", "page_size"), lambda v: v >= 1, "at least 1"),
          (("pretrain_iters", "sinks", "window"), lambda v: v >= 0, "at least 0"),
          (("lr", "pretrain_lr", "clip_eps", "grad_clip", "temperature", "rope_theta"), lambda v: v > 0, "positive"),
          (("ent_coef", "kl_coef", "dual_lr", "alpha_keep", "alpha_prune", "alpha_bits", "budget_tol"), lambda v: v >= 0, "at least 0"),
          (("gamma", "task_w_kl"), lambda v: 0 <= v <= 1, "in [0, 1]")]
DEFAULTS = {f.name: f.default for cfg in (TrainConfig, grpo.GRPOConfig, GPTConfig, ActionConfig, PolicyConfig) for f in fields(cfg)}


# SIGINT/SIGTERM inside a training loop only set a flag: the loop saves a checkpoint at the end of the
# iteration and exits (never from inside the handler, which could interrupt a save). Elsewhere, or a second
# signal: stop at once; checkpoints on disk are whole either way.
STOP = {"signal": 0, "defer": False}


def on_signal(signum, frame):
    first, STOP["signal"] = not STOP["signal"], signum
    if not (first and STOP["defer"]):
        raise KeyboardInterrupt


# -----------------------------------------------------------------------------
# checks of the flags, before anything is allocated


def validate(tc, grpo_cfg, gcfg, acfg, pcfg):
    for cfg in (tc, grpo_cfg, gcfg, acfg, pcfg):
        for f in fields(cfg):
            v = getattr(cfg, f.name)
            if any(isinstance(x, float) and not math.isfinite(x) for x in (v if isinstance(v, tuple) else (v,))):
                raise UsageError(f"--{f.name}={v} is not a finite number; pass a finite one (default {getattr(type(cfg)(), f.name)})")
    for cfg in (tc, grpo_cfg, acfg):
        for name, allowed in CHOICES.items():
            if hasattr(cfg, name) and getattr(cfg, name) not in allowed:
                raise UsageError(f"--{name}={getattr(cfg, name)} is not one of {', '.join(allowed)}")
    if grpo_cfg.rollouts < 2:
        raise UsageError("GRPO compares rollouts of the same sequence, so --rollouts must be at least 2")
    values = {f.name: getattr(cfg, f.name) for cfg in (tc, grpo_cfg, gcfg, acfg, pcfg) for f in fields(cfg)}
    for names, ok, what in LIMITS:
        for name in names:
            if not ok(values[name]):
                raise UsageError(f"--{name} must be {what}, got {values[name]}; the default is {DEFAULTS[name]}")
    for name, top in (("keep_range", 1), ("prune_range", 1), ("bits_range", 16)):
        r = values[name]
        if len(r) != 2 or not 0 < r[0] <= r[1] <= top:
            raise UsageError(f"--{name} must be two numbers lo,hi with 0 < lo <= hi <= {top}, got {','.join(map(str, r))}")
    if grpo_cfg.context_len + grpo_cfg.rollout_len > gcfg.block_size:
        raise UsageError(f"context_len + rollout_len = {grpo_cfg.context_len + grpo_cfg.rollout_len} exceeds the model's block_size "
                         f"{gcfg.block_size}; lower --context_len or raise --block_size")
    if grpo_cfg.rollout_len > pcfg.max_steps:
        raise UsageError(f"--rollout_len={grpo_cfg.rollout_len} exceeds the policy's --max_steps={pcfg.max_steps}; raise --max_steps")
    if not (min(acfg.bits) >= 2 and 0 < min(acfg.keep) and 0 < min(acfg.prune)):
        raise UsageError("grid values must be positive and bits at least 2; see --keep, --prune, --bits")
    if gcfg.n_embd % gcfg.n_head or pcfg.width % pcfg.heads:
        raise UsageError("--n_embd must be divisible by --n_head, and --width by --heads")

# -----------------------------------------------------------------------------
# the base GPT


def gpt_config(gcfg):
    """The model config as saved: the architecture fields only where they differ from the small model's defaults,
    so base GPTs cached and runs saved before those fields existed keep their keys."""
    return {k: v for k, v in asdict(gcfg).items() if k not in ARCH or v != getattr(GPTConfig, k)}


# -----------------------------------------------------------------------------
# checkpoints: written whole or not at all (cli.save_atomic), with the random generators' state


def rng_state(rng):
    # cuda: the generator of the device this process samples on (each rank's own, all in the same state)
    return {"torch": torch.get_rng_state(), "numpy": rng.bit_generator.state,
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state, rng):
    torch.set_rng_state(state["torch"])
    rng.bit_generator.state = state["numpy"]
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


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
        with grpo.autocast(device):
            logits, _ = forward(x[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if it % 20 == 0:
            pbar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.1e}")
        if (it + 1) % every == 0 or STOP["signal"]:
            save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(), "iter": it + 1, "rng": rng_state(rng)}, partial)
            if STOP["signal"]:
                pbar.close()
                return None
    model.eval()
    with torch.no_grad():
        for p in model.parameters():  # saved in half precision: enough for a frozen model evaluated in float32
            p.copy_(p.half())
        x = episodes(splits["val"], 32, T + 1).to(device)
        logits, _ = model(x[:, :-1])
        val = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).item()
    print(f"base GPT: val loss {val:.4f} (ppl {math.exp(val):.2f})")
    return val


# -----------------------------------------------------------------------------
# evaluation: SOL, dense, and static at SOL's achieved budget, on the same held-out episodes


def evaluate(model, policy, eps, requested, grid, acfg, C, batch, oracle):
    """SOL (greedy, its budget held by a controller as it decodes), dense, static at SOL's achieved budget and, with
    oracle, the oracle at the requested budget, on the same episodes. Each method's achieved budget is checked against
    what it was asked for: off_budget lists the axes it missed. Returns the rows, each method's per-episode NLL and
    the controllers' mean multipliers."""
    target = torch.tensor([1.0 if v is None else v for v in requested], device=eps.device)
    pre = schedules.prefill_shown(model, eps, C, batch, "test")
    T = eps.size(1) - C - 1

    def decode(name, make):
        with schedules.progress(f"{name} (test)", len(pre) * T) as bar:
            return sol.score_episodes(model, eps, target, make, grid, acfg, C, batch, pre, bar)[:2]
    held = {"sol": schedules.budget_controller(requested, grid)}  # one per method, across all its batches
    rows = [("sol", requested, *decode("sol", lambda: schedules.policy_scheduler(policy, greedy=True, control=held["sol"])))]
    rows.append(("dense", [1.0, 1.0, 1.0], *decode("dense", lambda: schedules.dense_scheduler(grid))))
    matched = rows[0][3].tolist()
    rows.append(("static", matched, *decode("static", lambda: schedules.static_scheduler(acfg, matched))))
    if oracle:
        held["oracle"] = schedules.oracle_controller(requested, grid)
        rows.append(("oracle", requested, *decode("oracle", lambda: schedules.oracle_scheduler(model, grid, acfg, held["oracle"]))))
    asked = lambda t: [x if v is not None else None for x, v in zip(t, requested)]  # axes held dense are not checked
    return ([{"method": m, "target": schedules.axes(t), "achieved": schedules.axes(a.tolist()), "off_budget": schedules.off_budget(a.tolist(), asked(t)),
              "nll": n.mean().item(), "ppl": math.exp(n.mean().item()), "tokens": n.numel() * T} for m, t, n, a in rows],
            {m: n for m, _, n, _ in rows}, {m: schedules.mean_multipliers(c) for m, c in held.items()})


def check_resources(run, pretraining):
    """Refuse, before allocating anything, a run whose rough peak memory exceeds what the device has free (every
    process's share, all of them on one CPU), or whose checkpoint cannot fit where it is to be saved."""
    tc, cfg, gcfg, pcfg, n_actions, device, world = run.tc, run.grpo_cfg, run.gcfg, run.pcfg, len(run.grid.values), run.device, run.world
    lm_bytes = torch.finfo(getattr(torch, tc.dtype)).bits // 8
    n_lm, n_pol = n_params(lambda: sol.GPT(gcfg)), n_params(lambda: sol.Policy(pcfg, gcfg.n_embd, n_actions))
    B, K, C, T, E = cfg.batch_size // world, cfg.rollouts, cfg.context_len, cfg.rollout_len, tc.eval_episodes
    weights = n_lm * lm_bytes
    update = 16 * n_pol + B * K * T * 4 * (40 * pcfg.width + 8 * n_actions)  # AdamW's state; the replay kept for backward
    needs = [(f"the GPT ({n_lm:,} parameters in {tc.dtype})", weights, "choose a smaller model"),
             (f"pretraining with --pretrain_batch={tc.pretrain_batch}", pretrain_bytes(gcfg, n_lm, tc.pretrain_batch) * pretraining,
              "lower --pretrain_batch"),
             (f"GRPO with --batch_size={cfg.batch_size} and --rollouts={K}",
              weights + update + episode_bytes(gcfg, B, K, C, T, lm_bytes, cfg.task_w_kl > 0), "lower --batch_size or --rollouts"),
             (f"the evaluation with --eval_batch={tc.eval_batch} and --eval_episodes={E}",
              weights + episode_bytes(gcfg, min(tc.eval_batch, E), 1, C, T, lm_bytes) + 2 * E * (C + T + 1) * 8,
              "lower --eval_batch or --eval_episodes")]
    check_memory([(what, need * (world if device == "cpu" else 1), fix) for what, need, fix in needs], device)
    ckpt = 32 * n_pol + 2**20  # the policy, its initial copy and AdamW's moments in float32, twice while replaced; headroom
    free = shutil.disk_usage(run.parent).free
    if free < ckpt:
        raise UsageError(f"--out_dir={tc.out_dir} is on a file system with {free / 2**20:.1f} MiB free, too little for a "
                         f"checkpoint (about {ckpt / 2**20:.1f} MiB); free some space or choose another --out_dir")


def without(argv, flag):
    """argv less a boolean flag, in any of its forms: --flag, --flag=value, --flag value."""
    is_value = lambda i: i > 0 and argv[i - 1] == flag and not argv[i].startswith("--")
    return [a for i, a in enumerate(argv) if a.split("=")[0] != flag and not is_value(i)]

# -----------------------------------------------------------------------------
# the run, step by step: main at the bottom


def setup(argv):
    """The flags, checked; the data-parallel process group, if under torchrun; the data. Returns the run's state."""
    tc, grpo_cfg, gcfg, acfg, pcfg = TrainConfig(), grpo.GRPOConfig(), GPTConfig(), ActionConfig(), PolicyConfig()
    parse_args(argv, (tc, grpo_cfg, gcfg, acfg, pcfg), hidden=("vocab_size", *ARCH))
    run = SimpleNamespace(tc=tc, grpo_cfg=grpo_cfg, gcfg=gcfg, acfg=acfg, pcfg=pcfg, grid=sol.action_grid(acfg),
                          requested=grpo.targets(grpo_cfg, acfg), out_dir=Path(tc.out_dir), ckpt_path=Path(tc.out_dir) / "ckpt.pt",
                          device=tc.device if tc.device != "auto" else "cuda" if torch.cuda.is_available() else
                          "mps" if torch.backends.mps.is_available() else "cpu",
                          cmd=shlex.join(["python", "train.py", *argv]),  # a resumed run may use any number of processes
                          rerun=shlex.join(["python", "train.py", *without(argv, "--overwrite")]))  # a finished run: evaluated again
    run.enabled = [v is not None for v in run.requested]
    check_out_dir(run)
    start_processes(run)
    run.init = Path(tc.init_from).expanduser() if tc.init_from else None
    if run.init is not None:
        flags = [f.name for f in fields(gcfg) if getattr(gcfg, f.name) != getattr(GPTConfig, f.name)]
        if flags:
            raise UsageError(f"--init_from takes the model config from the checkpoint; drop --{', --'.join(flags)}")
        run.gcfg = gcfg = pretrained.config(run.init)
    if run.ddp and not run.master:
        dist.barrier()  # rank 0 prepares the data and pretrains the base GPT first; the others then read them
    run.data_dir, run.meta, run.splits = load_dataset(tc.dataset, run.init)
    if run.init is None:
        gcfg.vocab_size = run.meta["vocab_size"]
    elif max(int(d.max()) for split in run.splits.values() for d in texts(split)) >= gcfg.vocab_size:
        raise UsageError(f"{tc.dataset} was tokenized beyond the checkpoint's {gcfg.vocab_size} tokens: its tokenizer does not "
                         "match the model, or the text holds bytes the tokenizer lacks (e.g. control characters); remove them")
    validate(tc, grpo_cfg, gcfg, acfg, pcfg)
    tc.dtype, why = pick_dtype(tc.dtype, run.device, run.init is not None)
    C, T = grpo_cfg.context_len, grpo_cfg.rollout_len
    need = C + T + 1 if run.init else max(C + T + 1, gcfg.block_size + 1)  # a pretraining window only if we pretrain
    for split, data in run.splits.items():
        if min(len(d) for d in texts(data)) < need:
            raise UsageError(f"the {split} split of {tc.dataset} has {min(len(d) for d in texts(data))} tokens, fewer than one episode"
                             f"{'' if run.init else ' or pretraining window'} ({need}); use a longer text or a smaller --context_len/--block_size")
    torch.manual_seed(tc.seed)
    run.rng = np.random.default_rng(tc.seed)
    print(f"seed {tc.seed} | dataset {tc.dataset} ({', '.join(f'{s} {n_tokens(d):,}' for s, d in run.splits.items())} tokens) | device {run.device} "
          f"| dtype {tc.dtype} ({why})")
    return run


def check_out_dir(run):
    """--resume needs a run in out_dir; a run there is continued only with --resume, or evaluated again if finished."""
    if run.tc.resume and not run.ckpt_path.exists():
        raise UsageError(f"--resume: no checkpoint at {run.ckpt_path}; drop --resume to start a new run")
    if run.ckpt_path.exists() and not (run.tc.resume or run.tc.overwrite):
        done = load_checkpoint(run.ckpt_path, "policy")["iter"]
        if done < run.grpo_cfg.max_iters:
            raise UsageError(f"{run.out_dir} already holds a run, stopped at GRPO iteration {done} of {run.grpo_cfg.max_iters}; "
                             "pass --resume to continue it, --overwrite to start over, or another --out_dir")
        run.tc.resume = True  # a finished run goes straight to evaluation, its config checked as for --resume
    run.parent = next(p for p in (run.out_dir.absolute(), *run.out_dir.absolute().parents) if p.exists())
    if not (run.parent.is_dir() and os.access(run.parent, os.W_OK)):
        raise UsageError(f"cannot write to --out_dir={run.out_dir} ({run.parent} is not a writable folder); choose another --out_dir")


def start_processes(run):
    """Data parallel under torchrun: one process per GPU (or several on a CPU), each taking an equal share of every
    batch; gradients are averaged, and rank 0 alone prepares data, pretrains, saves, logs and evaluates."""
    run.ddp = int(os.environ.get("RANK", -1)) != -1
    run.rank, run.local, run.world = (int(os.environ[v]) for v in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) if run.ddp else (0, 0, 1)
    run.master = run.rank == 0
    if not run.ddp:
        return
    if run.grpo_cfg.batch_size % run.world:
        b = run.grpo_cfg.batch_size
        raise UsageError(f"--batch_size={b} is the batch of all {run.world} processes together and must "
                         f"divide evenly among them; e.g. --batch_size={b // run.world * run.world or run.world}")
    if run.device not in ("cuda", "cpu"):
        raise UsageError(f"data-parallel training runs on cuda (nccl) or cpu (gloo), not {run.device}; pass --device=cpu")
    if run.device == "cuda":
        torch.cuda.set_device(run.local)  # from here on "cuda" is this process's own GPU
    dist.init_process_group("nccl" if run.device == "cuda" else "gloo")
    if not run.master:
        sys.stdout = open(os.devnull, "w")  # one log: rank 0's


def stop(run, saved, then):
    """After SIGINT/SIGTERM: say what was saved and how to continue, and exit."""
    if run.master:
        print(f"{signal.Signals(STOP['signal']).name}: saved {saved}; to continue, run {then}", file=sys.stderr)
    if run.ddp:
        dist.destroy_process_group()
    sys.exit(128 + STOP["signal"])


def base_gpt(run):
    """The frozen GPT: a pretrained checkpoint, the base shipped with the built-in corpus, or the small GPT pretrained
    here once per dataset and model config (cached next to the data, resumable from its .partial file)."""
    tc, gcfg, init = run.tc, run.gcfg, run.init
    shipped = init is None and tc.dataset == "synth" and not tc.pretrain
    key = json.dumps([gpt_config(gcfg), run.meta, tc.pretrain_iters, tc.pretrain_batch, tc.pretrain_lr, tc.seed], sort_keys=True)
    run.base_path = init or run.data_dir / ("base.pt" if shipped else f"base-{hashlib.sha1(key.encode()).hexdigest()[:10]}.pt")
    run.base_sha1 = pretrained.digest(init) if init else None
    if shipped:
        check_shipped(run)
    check_resources(run, pretraining=init is None and not run.base_path.exists())
    t0 = time.time()
    model = pretrained.load(init, getattr(torch, tc.dtype), run.device) if init else sol.GPT(gcfg).to(run.device)
    partial = Path(f"{run.base_path}.partial")
    STOP["defer"] = True
    if init:
        print(f"base GPT: {init} (sha1 {run.base_sha1[:10]}) loaded as {tc.dtype} in {time.time() - t0:.1f} s")
    elif run.base_path.exists():
        state = load_checkpoint(run.base_path, "base GPT")
        if state.get("corpus") != run.meta.get("sha256"):  # the built-in corpus's tokens; other datasets record none
            raise UsageError(f"{run.base_path} was pretrained on another build of the built-in corpus (sha256 {str(state.get('corpus'))[:12]}, "
                             f"this one {str(run.meta.get('sha256'))[:12]}); delete data/synth/meta.json to prepare it again, or pass "
                             "--pretrain=true to pretrain a base GPT here instead")
        if state.get("config") != gpt_config(gcfg):
            raise UsageError(f"the base checkpoint {run.base_path} was made for another model config; delete it to retrain")
        model.load_state_dict(state["model"])
        print(f"base GPT: {'the shipped one, ' if shipped else 'reusing '}{run.base_path} (val loss {state['val_loss']:.4f})")
    else:
        if not run.master:  # rank 0 pretrained it, on another machine
            raise UsageError(f"{run.base_path} is missing here: on several machines, data/ must be a folder they share")
        val = pretrain(model, run.splits, tc, run.device, partial, run.grpo_cfg.ckpt_interval)
        if val is None:
            stop(run, partial, f"the same command again: {run.cmd}")
        save_atomic({"model": {k: v.half() for k, v in model.state_dict().items()}, "config": gpt_config(gcfg), "val_loss": val,
                     "corpus": run.meta.get("sha256"), "command": run.cmd}, run.base_path)
        print(f"base GPT: saved to {run.base_path} after {time.time() - t0:.0f} s")
    partial.unlink(missing_ok=True)
    model.eval().requires_grad_(False).to(getattr(torch, tc.dtype))
    run.skills = None if init else report_skills(model, run)
    if run.ddp and run.master:
        dist.barrier()
    return model


BASE_SHA256 = "2744a27c726a5211897b09ac611985016ddd3ec0db781afd854ca55a785f8eaa"  # of data/synth/base.pt, as shipped (README)


def check_shipped(run):
    """The shipped base is the default model, as shipped: flags that would make another base ask for --pretrain=true,
    and a missing or altered file is refused (base_gpt refuses a base trained on other tokens, shipped or cached)."""
    tc, fix = run.tc, "pass --pretrain=true to pretrain a base GPT here instead"
    changed = [f"--{f.name}" for f in fields(run.gcfg) if f.name != "vocab_size" and getattr(run.gcfg, f.name) != getattr(GPTConfig, f.name)]
    changed += [f"--{n}" for n in ("pretrain_iters", "pretrain_batch", "pretrain_lr") if getattr(tc, n) != DEFAULTS[n]]
    if changed:
        raise UsageError(f"{', '.join(changed)} describe another base GPT than the one shipped with the built-in corpus; {fix}")
    if not run.base_path.exists():
        raise UsageError(f"the shipped base GPT {run.base_path} is missing; restore it (git checkout data/synth/base.pt) or {fix}")
    if hashlib.sha256(run.base_path.read_bytes()).hexdigest() != BASE_SHA256:
        raise UsageError(f"{run.base_path} is not the file shipped with this version (its sha256 differs); restore it "
                         f"(git checkout data/synth/base.pt) or {fix}")


def report_skills(model, run):
    """On the built-in corpus: the base GPT's validation loss on recall answers and on copies, beside the loss of a
    model without the skill (data/synth/prepare.py), and a notice for a skill that did not form."""
    flags = run.data_dir / "val_skill.bin"
    if not flags.exists():
        return None
    T = model.cfg.block_size
    x = episodes(run.splits["val"], 64, T + 1).to(run.device)
    f = episodes(np.memmap(flags, dtype=np.uint8, mode="r"), 64, T + 1)[:, 1:]  # the flag of each predicted token
    with torch.no_grad():
        logits, _ = model(x[:, :-1])
    nll = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten(), reduction="none").view(f.shape).cpu()
    skills = synth_skills(nll, f, run.meta["chance"]["val"])
    print("base GPT skills, val loss (without the skill): " + ", ".join(
        f"{name} {s['loss']:.3f} ({s['chance']:.3f}){'' if s['formed'] else ' NOT FORMED'}" for name, s in skills.items()))
    missing = [name for name, s in skills.items() if not s["formed"]]
    if missing:
        print(f"notice: the base GPT has not learned to {' or '.join(missing)}: its dense perplexity is higher, and what a schedule "
              "can win differs from a base that has: compare figures only between runs whose bases have the same skills; "
              "another --seed or more --pretrain_iters gives another base")
    return skills


def new_policy(run, model):
    """The policy, its optimizer and (for the KL term) a frozen copy of its initial weights: fresh, or as saved in
    out_dir when resuming, after checking that the saved run was trained on the same model, grid and data."""
    gcfg, pcfg, grpo_cfg, A = run.gcfg, run.pcfg, run.grpo_cfg, len(run.grid.values)
    run.grid = run.grid._replace(values=run.grid.values.to(run.device), budget=run.grid.budget.to(run.device))  # indexed on device
    policy = sol.Policy(pcfg, gcfg.n_embd, A).to(run.device)
    opt = torch.optim.AdamW(policy.parameters(), lr=grpo_cfg.lr, weight_decay=0.0)
    run.config = {"train": asdict(run.tc), "grpo": asdict(grpo_cfg), "gpt": gpt_config(gcfg), "action": asdict(run.acfg),
                  "policy": asdict(pcfg), "base": str(run.base_path.resolve() if run.init else run.base_path), "base_sha1": run.base_sha1}
    run.start, run.skipped, run.price, run.recent, state = 0, 0, torch.zeros(3), [], None
    if run.tc.resume:
        state = load_checkpoint(run.ckpt_path, "policy")
        check_resumable(run, state["config"])
        policy.load_state_dict(state["policy"])
        opt.load_state_dict(state["optimizer"])
        run.start, run.skipped = state["iter"], state.get("skipped", 0)
        run.price, run.recent = state.get("price", run.price), state.get("recent", [])
        print(f"resuming {run.ckpt_path} at iteration {run.start}")
    initial = None
    if grpo_cfg.kl_coef > 0:
        initial = sol.Policy(pcfg, gcfg.n_embd, A).to(run.device).requires_grad_(False)
        initial.load_state_dict(state["initial_policy"] if state and state.get("initial_policy") else policy.state_dict())
    if state:  # last, so nothing above draws from the restored generators
        set_rng_state(state["rng"], run.rng)
    C, T = grpo_cfg.context_len, grpo_cfg.rollout_len
    share = sol.matmul_flops(policy, T, pcfg.depth, pcfg.width) / sol.matmul_flops(model, C + T, gcfg.n_layer, gcfg.n_embd)
    print(f"LM {sum(p.numel() for p in model.parameters()):,} params | policy {sum(p.numel() for p in policy.parameters()):,} params "
          f"| {A} actions | policy/LM FLOPs per decode step {share:.1%}")
    r = run.requested
    print(f"target: keep {r[0]} prune {r[1]} bits {None if r[2] is None else r[2] * 16:g}"
          + (" (training targets sampled per sequence from ranges)" if grpo_cfg.sample_budgets else ""))
    return policy, opt, initial


def check_resumable(run, saved):
    """A run is continued only on the model, grid and policy it was trained with, and the same base GPT."""
    for part in ("gpt", "action", "policy"):
        if saved[part] != run.config[part]:
            diff = [k for k in {**saved[part], **run.config[part]} if saved[part].get(k) != run.config[part].get(k)]
            raise UsageError(f"{run.ckpt_path} was trained with another {part} config ({', '.join(diff)}); use its settings or a new --out_dir")
    # another --dataset, --seed or --pretrain_*, or another checkpoint (the same one moved is fine: same hash)
    if saved.get("base_sha1") != run.base_sha1 or (run.init is None and Path(saved["base"]).name != run.base_path.name):
        raise UsageError(f"{run.ckpt_path} was trained on another base GPT ({saved['base']}); use its settings or a new --out_dir")


def train_policy(run, model, policy, opt, initial):
    """The GRPO loop: grpo.iteration after iteration, a checkpoint every --ckpt_interval, and on SIGINT/SIGTERM
    one at the end of the iteration, then exit. Every process draws the whole batch (all generators stay in
    step, so the rank-0 checkpoint resumes any of them) and keeps its own rows: W processes train as one would."""
    cfg, device, K = run.grpo_cfg, run.device, run.grpo_cfg.rollouts
    B = cfg.batch_size // run.world  # this process's sequences
    rows = slice(run.rank * B, (run.rank + 1) * B)
    draw = lambda: (random_windows(run.splits["train"], cfg.batch_size, cfg.context_len + cfg.rollout_len + 1, run.rng)[rows].to(device),
                    grpo.sample_targets(cfg, run.requested, cfg.batch_size, run.rng)[rows].to(device))  # (B, C+T+1), (B, 3)
    trained = DDP(policy, device_ids=[run.local] if device == "cuda" else None) if run.ddp else policy
    compiled = grpo.compile_steps(model, policy, run.acfg) if run.tc.compile == "true" else None  # opt-in: not yet run on a GPU

    def save(it):
        if run.master:
            save_atomic({"policy": policy.state_dict(), "optimizer": opt.state_dict(), "iter": it, "config": run.config, "skipped": run.skipped,
                         "price": run.price, "recent": run.recent, "rng": rng_state(run.rng), "command": run.cmd,
                         "initial_policy": None if initial is None else initial.state_dict()}, run.ckpt_path)
    run.out_dir.mkdir(parents=True, exist_ok=True)
    pbar = tqdm(range(run.start, cfg.max_iters), desc="grpo", dynamic_ncols=True, initial=run.start, total=cfg.max_iters,
                disable=not run.master or run.start >= cfg.max_iters)
    for it in pbar:
        roll, target, dense_logp, applied, run.price = grpo.iteration(model, policy, opt, draw, run.grid, run.acfg, cfg, run.enabled,
                                                                      run.price, trained, initial, (run.rank, run.world), compiled)
        if not applied:
            run.skipped += 1
            tqdm.write(f"warning: iteration {it + 1}: non-finite reward, advantage or loss; update skipped ({run.skipped} so far)")
        ach, gap = roll["achieved"].mean(0), roll["achieved"] - target.repeat_interleave(K, 0)
        run.recent = (run.recent + [[ach.tolist(), gap.mean(0).tolist()]])[-20:]  # the sampled budget, for the end-of-training line
        pbar.set_postfix(reward=f"{grpo.rewards(roll, cfg).mean():.3f}", logp=f"{roll['logp'].mean():.3f}", dense=f"{dense_logp.mean():.3f}",
                         keep=f"{ach[0]:.2f}", prune=f"{ach[1]:.2f}", bits=f"{ach[2] * 16:.1f}", gap=f"{gap.abs().mean():.3f}",
                         **({"price": ",".join(f"{p:.2f}" for p in run.price.tolist())} if cfg.dual_lr else {}), skipped=run.skipped)
        if run.ddp:  # a signal reaches the processes at different moments: all stop after the same iteration
            flag = torch.tensor(STOP["signal"], device=device)
            dist.all_reduce(flag, dist.ReduceOp.MAX)
            STOP["signal"] = int(flag)
        if (it + 1) % cfg.ckpt_interval == 0 or it + 1 == cfg.max_iters or STOP["signal"]:
            save(it + 1)
        if STOP["signal"]:
            pbar.close()
            stop(run, f"{run.ckpt_path} at iteration {it + 1}", run.cmd if run.tc.resume else f"{run.cmd} --resume")
    STOP["defer"] = False
    if run.skipped:
        print(f"warning: {run.skipped} of {cfg.max_iters} GRPO updates were skipped for non-finite rewards, advantages or losses")
    if run.master:
        say_sampled_budget(run)
    if run.ddp:  # the last collectives done and DDP's reducer gone before the group: else exit can abort (gloo)
        dist.barrier()
        del trained
        dist.destroy_process_group()


def sampled_budget(run):
    """What GRPO's sampled schedules spent over the last (up to 20) iterations, their mean gap to the target, and the
    budget's price at the end (grpo.dual_ascent): did the policy learn to spend the budget itself?"""
    if not run.recent:
        return None
    ach, gap = (torch.tensor([r[i] for r in run.recent]).mean(0).tolist() for i in (0, 1))
    return {"iterations": len(run.recent), "achieved": schedules.axes(ach), "gap": schedules.axes(gap), "price": run.price.tolist()}


def say_sampled_budget(run):
    sampled = sampled_budget(run)
    if sampled:
        a, g = sampled["achieved"], sampled["gap"]
        print(f"GRPO's sampled schedules, last {sampled['iterations']} iterations: keep {a['keep']:.3f} prune {a['prune']:.3f} "
              f"bits {a['bits']:.2f}, mean gap to target {g['keep']:+.3f} {g['prune']:+.3f} {g['bits']:+.2f} bits"
              + (f"; budget price {' '.join(f'{p:.2f}' for p in sampled['price'])}" if run.grpo_cfg.dual_lr else ""))


def final_evaluation(run, model, policy):
    """SOL greedy under the budget controller, dense, static at SOL's achieved budget and the oracle, on test; the
    table, and eval.json. Interrupted, it leaves no eval.json half-written and says how to evaluate again."""
    policy.eval()
    try:
        if run.start >= run.grpo_cfg.max_iters:  # said inside the try: a signal right after it is handled as one during evaluation
            print(f"{run.ckpt_path} already finished {run.start} iterations; evaluating it (--overwrite trains a new one)")
        evaluate_and_report(model, policy, run)
    except KeyboardInterrupt:
        print(f"{signal.Signals(STOP['signal'] or signal.SIGINT).name}: stopped during the final evaluation, {run.out_dir / 'eval.json'} "
              f"not (re)written; {run.ckpt_path} holds the finished policy: {run.rerun} evaluates it again", file=sys.stderr)
        sys.exit(128 + (STOP["signal"] or signal.SIGINT))
    print(f"wrote {run.out_dir / 'eval.json'} and {run.ckpt_path}")


def evaluate_and_report(model, policy, run):
    tc, C, T = run.tc, run.grpo_cfg.context_len, run.grpo_cfg.rollout_len
    eps = episodes(run.splits["test"], tc.eval_episodes, C + T + 1).to(run.device)
    results, nll, multipliers = evaluate(model, policy, eps, run.requested, run.grid, run.acfg, C, tc.eval_batch, tc.oracle)
    print(f"\ntest split, {len(eps)} episodes x {T} controlled steps, greedy policy, its budget held by the controller as it decodes "
          "(mean multipliers " + ", ".join(f"{name} {lam:+.2f}" for name, v, lam in zip(schedules.AXES, run.requested, multipliers["sol"])
                                          if v is not None) + f"), seed {tc.seed}")
    print(f"{'method':<8} {'nll':>7} {'ppl':>8} {'keep':>6} {'prune':>6} {'bits':>6}")
    for r in results:
        a = r["achieved"]
        flag = f"  OFF BUDGET: {', '.join(r['off_budget'])}" if r["off_budget"] else ""
        print(f"{r['method']:<8} {r['nll']:7.4f} {r['ppl']:8.3f} {a['keep']:6.3f} {a['prune']:6.3f} {a['bits']:6.2f}{flag}")
    if any(r["off_budget"] for r in results):
        print(f"OFF BUDGET: achieved more than {schedules.BUDGET_TOL} (bits {schedules.BUDGET_TOL * 16:g}) away from what the method was "
              "asked for (sol, oracle: the target; static: sol's achieved budget)")
    room = schedules.headroom(nll, 1000, torch.Generator().manual_seed(tc.seed)) if tc.oracle else None
    if room:
        print(schedules.headroom_line(room))
    report = {"dataset": tc.dataset, "seed": tc.seed, "config": run.config, "budget_control": {"controller": "on", "mean_multipliers": multipliers},
              "episodes": {"test": len(eps)}, "training": sampled_budget(run),
              "base_skills": run.skills, "results": results, "headroom": room}
    save_atomic(json.dumps(report, indent=2), run.out_dir / "eval.json")


def main(argv):
    run = setup(argv)  # flags and checks, the processes, the data
    model = base_gpt(run)  # loaded, or pretrained here once; frozen
    policy, opt, initial = new_policy(run, model)  # fresh, or resumed from out_dir
    train_policy(run, model, policy, opt, initial)  # GRPO
    if run.master:
        final_evaluation(run, model, policy)  # on the test split, every method on budget

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
