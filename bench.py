"""
Benchmarks, nanoGPT-style: what the pieces of SOL cost on this machine. Timings are medians of several
runs after a warm-up; nothing here is asserted by the tests.

    python bench.py                 # the default GPT config
    python bench.py --large         # and a larger one
    python bench.py --json          # one JSON object instead of the table
    python bench.py --compare=true  # only the GRPO step at the shape of the side-by-side with the authors' loop
    python bench.py --init_from path/to/model.gguf --context_len 128 --rollout_len 8 --batch_size 4
                                    # and a pretrained model's architecture (random weights: the timings do not
                                    # depend on them), without the pretraining figure

1. pretraining tokens/s and model FLOPs utilization against a measured matmul peak;
2. one GRPO step (prefill, dense reference, K sampled rollouts, policy update): episodes/s and peak memory
   for K = 1 and K = 16 (the K rollouts read one shared prefix cache);
3. decode latency per step at batch 1, by action: dense, a keep sweep, a prune sweep, bits; and the
   attention and MLP of one layer alone, where the savings are decided;
4. the policy's share of the FLOPs of a decode step;
5. the aten operations of one rollout decode step, dense and sampled, per layer, for every attention criterion:
   on a CPU each is one dispatch, on a GPU each but the views is one kernel launch.
"""
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import cli
import grpo
import pretrained
import sol
from cli import UsageError, parse_args
from sol import ActionConfig, GPTConfig, PolicyConfig


@dataclass
class BenchConfig:
    device: str = "auto"
    seed: int = 1337
    large: bool = False  # also run the larger config below
    json: bool = False
    reps: int = 7  # timed runs per figure (median), after one warm-up
    batch_size: int = 8  # GRPO sequences per step
    context_len: int = 512  # GRPO prefix C
    rollout_len: int = 16  # GRPO controlled steps T
    decode_context: int = 4096  # keys in the cache for the decode latencies
    init_from: str = ""  # also a checkpoint folder's or GGUF file's architecture
    dtype: str = "auto"  # of the GPT: auto (cli.pick_dtype, as train.py) | float32 | bfloat16 (the policy stays float32)
    compare: bool = False  # instead: the GRPO step at COMPARE's shape, per criterion
    compile: bool = False  # with --compare: also with the rollouts' decode steps compiled (grpo.compile_steps)


LARGE = dict(n_layer=4, n_head=8, n_embd=512, mlp_hidden=1408)
# the shape at which this GRPO step was measured beside the authors' own loop (docs/performance.md): a tiny
# Llama-style GPT, B 4 sequences x K 16 rollouts, context 256, 16 steps, 420 actions, a policy 128 wide
COMPARE = dict(gpt=GPTConfig(vocab_size=512, n_layer=4, n_head=4, n_embd=128, mlp_hidden=352),
               actions=ActionConfig(keep=tuple(i / 10 for i in range(1, 11)), prune=tuple(i / 10 for i in range(4, 11)),
                                    bits=(5, 6, 8, 10, 12, 16)),
               policy=PolicyConfig(width=128), batch_size=4, context_len=256, rollout_len=16)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timeit(fn, reps, device):
    """Median seconds of fn() over reps runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_peak(device, reps):
    """FLOP/s of a large square float32 matmul: the yardstick for model FLOPs utilization."""
    n = 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    return 2 * n ** 3 / timeit(lambda: a @ b, reps, device)


def pretrain_speed(gcfg, bc, device):
    """Tokens/s of a forward, backward and AdamW step of the base GPT at batch 16, and its FLOPs per token."""
    model = sol.GPT(gcfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, gcfg.vocab_size, (16, gcfg.block_size + 1), device=device)

    def step():
        logits, _ = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    n_params = sum(p.numel() for p in model.parameters())
    flops_per_token = 6 * n_params + 12 * gcfg.n_layer * gcfg.n_embd * gcfg.block_size  # as nanoGPT's estimate_mfu
    return x[:, :-1].numel() / timeit(step, max(bc.reps // 2, 2), device), flops_per_token


def grpo_setup(gcfg, bc, device, K, acfg=ActionConfig(), pcfg=PolicyConfig(), compiled=False):
    """A frozen GPT, a fresh policy and grpo.iteration, the training step itself, on random token sequences."""
    torch.manual_seed(bc.seed)
    cfg = grpo.GRPOConfig(rollouts=K, batch_size=bc.batch_size, context_len=bc.context_len, rollout_len=bc.rollout_len)
    grid, requested = sol.action_grid(acfg), grpo.targets(cfg, acfg)
    grid = grid._replace(values=grid.values.to(device), budget=grid.budget.to(device))
    model = sol.GPT(gcfg).to(device, getattr(torch, bc.dtype)).eval().requires_grad_(False)
    policy = sol.Policy(pcfg, gcfg.n_embd, len(grid.values)).to(device)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr)
    B, C, T = bc.batch_size, bc.context_len, bc.rollout_len
    gen = torch.Generator().manual_seed(bc.seed)
    draw = lambda: (torch.randint(0, gcfg.vocab_size, (B, C + T + 1), generator=gen).to(device),
                    torch.tensor([requested]).expand(B, 3).to(device))
    steps = grpo.compile_steps(model, policy, acfg) if compiled else None
    return lambda: grpo.iteration(model, policy, opt, draw, grid, acfg, cfg, [True] * 3, torch.zeros(3), compiled=steps)


class OpCounter(TorchDispatchMode):
    """Counts the aten operations run inside it, and of those the views (no kernel of their own on a GPU)."""

    def __init__(self):
        super().__init__()
        self.ops = self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.views += func.is_view
        return func(*args, **(kwargs or {}))


def step_ops(gcfg, acfg, bc, device, K=16):
    """Aten operations of one rollout decode step of the GPT, on B*K rows forked from B prefilled sequences: dense
    (no actions) and sampled (a random action per row). A 2-layer model less a 1-layer one gives the operations of
    a layer; the rest (embedding, the step's shared work, the final norm) are the step's own."""
    B, C, T = bc.batch_size, bc.context_len, bc.rollout_len
    grid, counts = sol.action_grid(acfg), {}
    for n_layer in (1, 2):
        torch.manual_seed(bc.seed)
        model = sol.GPT(replace(gcfg, n_layer=n_layer, block_size=C + T)).to(device, getattr(torch, bc.dtype)).eval()
        x = torch.randint(0, gcfg.vocab_size, (B, C + 1), device=device)
        with torch.no_grad():
            cache = sol.prefill(model, x, C, T)[0]
            for name, a in (("dense", None), ("sampled", torch.randint(0, len(grid.values), (B * K,), device=device))):
                with OpCounter() as c:
                    model(x[:, C:].repeat_interleave(K, 0), cache.fork(K, T), None if a is None else grid.values.to(device)[a], acfg)
                counts[name, n_layer] = (c.ops, c.views)
    out = {}
    for name in ("dense", "sampled"):
        (ops1, views1), (ops2, views2) = counts[name, 1], counts[name, 2]
        out[name] = {"per_layer": ops2 - ops1, "per_layer_views": views2 - views1, "per_step": 2 * ops1 - ops2}
    return out


def rss(field):
    """Resident memory in bytes from /proc/self/status: VmRSS now, VmHWM the peak since the last reset."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def grpo_peak_memory(gcfg, bc, device, K):
    """Bytes a GRPO step holds at its peak, above what was held before it. On the CPU: the peak resident
    size of a fresh process (run it in one), reset just before the step (Linux 4.0+: clear_refs 5)."""
    torch.set_num_threads(1)
    step = grpo_setup(gcfg, bc, device, K)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        return torch.cuda.max_memory_allocated() - base
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = rss("VmRSS")
    step()
    return rss("VmHWM") - base


def decode_latency(gcfg, bc, device):
    """Seconds per decode step at batch 1 with decode_context keys cached, whole model and one layer's parts."""
    torch.manual_seed(bc.seed)
    acfg = ActionConfig()
    L = bc.decode_context
    gcfg = replace(gcfg, block_size=L + 1)
    model = sol.GPT(gcfg).to(device, getattr(torch, bc.dtype)).eval()
    x = torch.randint(0, gcfg.vocab_size, (1, L + 1), device=device)
    cache = model.new_cache(1, L + 1)
    cache.k.normal_()  # a full cache of random keys and values: the timings do not depend on their values
    cache.v.normal_()
    cache.len = L
    act = lambda keep=1.0, prune=1.0, bits=16.0: torch.tensor([[keep, prune, bits]], device=device)

    def model_step(a):
        model(x[:, L:], cache, a, acfg)
        cache.len = L  # take the token back out: every run decodes at the same length

    actions = {"dense": None, **{f"keep {k:g}": act(keep=k) for k in acfg.keep},
               **{f"prune {p:g}": act(prune=p) for p in acfg.prune}, **{f"bits {b:g}": act(bits=b) for b in acfg.bits}}
    out = {"step": {}, "attention": {}, "mlp": {}}
    with torch.no_grad():
        for name, a in actions.items():
            out["step"][name] = timeit(lambda: model_step(a), bc.reps, device)
        hd = gcfg.n_embd // gcfg.n_head
        q, k, v = (torch.randn(1, gcfg.n_head, n, hd, device=device, dtype=getattr(torch, bc.dtype)) for n in (1, L + 1, L + 1))
        out["attention"]["dense"] = timeit(lambda: sol.attention(q, k, v, torch.ones(1, L + 1, dtype=torch.bool, device=device)), bc.reps, device)
        for keep in acfg.keep[:-1]:  # realized: recent_attention reads the kept keys only
            out["attention"][f"keep {keep:g}"] = timeit(lambda: sol.recent_attention(q, k, v, torch.tensor(keep), acfg), bc.reps, device)
        for keep in (0.25,):  # the masked path, as the GRPO rollouts run it: every key is read
            masked = lambda: sol.attention(q, k, v, sol.sparse_mask(q, k, torch.tensor([keep], device=device), acfg))
            out["attention"][f"masked keep {keep:g}"] = timeit(masked, bc.reps, device)
        mlp, h = model.blocks[0].mlp, torch.randn(1, 1, gcfg.n_embd, device=device, dtype=getattr(torch, bc.dtype))
        out["mlp"]["dense"] = timeit(lambda: mlp(h), bc.reps, device)
        for prune in acfg.prune:
            out["mlp"][f"prune {prune:g}"] = timeit(lambda: mlp(h, sol.resolve(act(prune=prune), 1, acfg, gcfg.mlp_hidden)), bc.reps, device)
    return out


def bench(name, gcfg, bc, device, peak, pretrain=True):
    print(f"[{name}] {gcfg}", file=sys.stderr)
    r = {"config": asdict(gcfg), "grpo": {}}
    if pretrain:  # a pretrained checkpoint is not pretrained here
        tok_s, flops_per_token = pretrain_speed(gcfg, bc, device)
        r |= {"pretrain_tokens_per_s": tok_s, "mfu": tok_s * flops_per_token / peak}
    C, T = bc.context_len, bc.rollout_len
    gcfg_grpo = replace(gcfg, block_size=C + T)
    for K in (1, 16):
        step = grpo_setup(gcfg_grpo, bc, device, K)
        if device == "cpu":  # a fresh process per run, see grpo_peak_memory; the median of three (fewer for --reps < 3)
            with ProcessPoolExecutor(1, mp_context=get_context("spawn"), max_tasks_per_child=1) as pool:
                memory = statistics.median(pool.submit(grpo_peak_memory, gcfg_grpo, bc, device, K).result() for _ in range(min(3, bc.reps)))
        else:
            memory = grpo_peak_memory(gcfg_grpo, bc, device, K)
        r["grpo"][f"K={K}"] = {"episodes_per_s": bc.batch_size * K / timeit(step, max(bc.reps // 2, 2), device),
                              "peak_memory_mb": memory / 2 ** 20}
    r["decode_s"] = decode_latency(gcfg, bc, device)
    grid = sol.action_grid(ActionConfig())
    pcfg = PolicyConfig()
    policy = sol.Policy(pcfg, gcfg.n_embd, len(grid.values))
    lm = sol.GPT(replace(gcfg, block_size=C + T))
    r["policy_flops_share"] = sol.matmul_flops(policy, T, pcfg.depth, pcfg.width) / sol.matmul_flops(lm, C + T, gcfg.n_layer, gcfg.n_embd)
    r["ops"] = {c: step_ops(gcfg, replace(ActionConfig(), criterion=c), bc, device) for c in sol.CRITERIA}
    return r


def compare(bc, device):
    """The GRPO step at COMPARE's shape, for quest and recency: episodes/s eager and, with --compile, compiled (its
    first iteration, which compiles, timed apart); and the aten operations of a rollout step for every criterion."""
    bc = replace(bc, batch_size=COMPARE["batch_size"], context_len=COMPARE["context_len"], rollout_len=COMPARE["rollout_len"])
    gcfg = replace(COMPARE["gpt"], block_size=bc.context_len + bc.rollout_len)
    out = {"config": asdict(gcfg), "ops": {}, "grpo": {}}
    for c in sol.CRITERIA:
        out["ops"][c] = step_ops(gcfg, replace(COMPARE["actions"], criterion=c), bc, device)
    for c in ("quest", "recency"):
        for mode in ("eager", "compiled") if bc.compile else ("eager",):
            print(f"[compare] {c}, {mode}", file=sys.stderr)
            step = grpo_setup(gcfg, bc, device, 16, replace(COMPARE["actions"], criterion=c), COMPARE["policy"], mode == "compiled")
            sync(device)
            t0 = time.perf_counter()
            step()
            first = time.perf_counter() - t0
            out["grpo"][f"{c}, {mode}"] = {"episodes_per_s": bc.batch_size * 16 / timeit(step, bc.reps, device), "first_iteration_s": first}
    return out


def report_ops(ops):
    print("aten operations of one rollout decode step on a shared prefix, per layer (kernels: those that are not views) "
          "| per step, outside the layers")
    for c, o in ops.items():
        d, s = o["dense"], o["sampled"]
        print(f"  {c:<16} dense {d['per_layer']} ({d['per_layer'] - d['per_layer_views']} kernels) | sampled {s['per_layer']} "
              f"({s['per_layer'] - s['per_layer_views']} kernels), {s['per_layer'] / d['per_layer']:.2f}x "
              f"| per step: dense {d['per_step']}, sampled {s['per_step']}")


def report(results, machine):
    print(f"machine: {machine['cpu']} | {machine['threads']} threads | torch {machine['torch']} | {machine['device']} "
          f"| matmul peak {machine['matmul_gflops']:.1f} GFLOP/s")
    print(f"grpo: batch {machine['batch_size']} sequences, context {machine['context_len']}, {machine['rollout_len']} steps | "
          f"decode: batch 1, {machine['decode_context']} cached keys | median of {machine['reps']} runs")
    for name, r in results.items():
        c = r["config"]
        print(f"\n[{name}] n_layer {c['n_layer']}, n_head {c['n_head']}, n_embd {c['n_embd']}, mlp_hidden {c['mlp_hidden']}")
        if "mfu" in r:
            print(f"pretraining: {r['pretrain_tokens_per_s']:,.0f} tokens/s, MFU {r['mfu']:.1%}")
        g1, g16 = r["grpo"]["K=1"], r["grpo"]["K=16"]
        print(f"grpo step: K=1 {g1['episodes_per_s']:.1f} episodes/s, peak {g1['peak_memory_mb']:.1f} MB | "
              f"K=16 {g16['episodes_per_s']:.1f} episodes/s, peak {g16['peak_memory_mb']:.1f} MB "
              f"({g16['peak_memory_mb'] / g1['peak_memory_mb']:.2f}x)")
        print(f"policy share of a decode step's FLOPs: {r['policy_flops_share']:.1%}")
        for part, times in r["decode_s"].items():
            dense = times["dense"]
            print(f"decode {part:<9} " + "  ".join(f"{a} {t * 1e3:.3f} ms ({t / dense:.2f}x)" if a != "dense" else f"dense {t * 1e3:.3f} ms"
                                                  for a, t in times.items()))
        report_ops(r["ops"])


def report_compare(r, machine):
    c = r["config"]
    print(f"machine: {machine['cpu']} | {machine['threads']} threads | torch {machine['torch']} | {machine['device']}")
    print(f"GRPO step at the comparison's shape: n_layer {c['n_layer']}, n_embd {c['n_embd']}, mlp_hidden {c['mlp_hidden']}, "
          f"vocabulary {c['vocab_size']}, B {COMPARE['batch_size']} x K 16, C {COMPARE['context_len']}, T {COMPARE['rollout_len']}, "
          f"{len(sol.action_grid(COMPARE['actions']).values)} actions, policy width {COMPARE['policy'].width} | median of {machine['reps']} runs")
    for name, g in r["grpo"].items():
        print(f"  {name:<18} {g['episodes_per_s']:.1f} episodes/s (first iteration {g['first_iteration_s']:.1f} s)")
    report_ops(r["ops"])


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main(argv):
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"  # CPU: large tensors leave the resident set when freed, not cached
    bc = BenchConfig()
    parse_args(argv, (bc,))
    if bc.dtype not in ("auto", "float32", "bfloat16"):
        raise UsageError(f"--dtype={bc.dtype} is not one of auto, float32, bfloat16")
    device = bc.device if bc.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    own, pre = (cli.pick_dtype(bc.dtype, device, p) for p in (False, True))  # (dtype, why) of each kind of GPT
    print(f"dtype {own[0]} for the built-in GPT ({own[1]})" + (f", {pre[0]} for {bc.init_from} ({pre[1]})" if bc.init_from else ""), file=sys.stderr)
    torch.manual_seed(bc.seed)
    machine = {**asdict(bc), "cpu": cpu_name(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "device": torch.cuda.get_device_name() if device == "cuda" else device}
    if bc.compile and not bc.compare:
        raise UsageError("--compile=true times the compiled rollout step of the comparison: add --compare=true")
    if bc.compare:
        r = compare(replace(bc, dtype=own[0]), device)
        if bc.json:
            print(json.dumps({"machine": machine, "compare": r}, indent=2))
        else:
            report_compare(r, machine)
        return
    machine["matmul_gflops"] = matmul_peak(device, bc.reps) / 1e9
    configs = {"default": GPTConfig(vocab_size=640)}  # the synth corpus's vocabulary
    if bc.large:
        configs["large"] = GPTConfig(vocab_size=640, **LARGE)
    results = {name: bench(name, gcfg, replace(bc, dtype=own[0]), device, machine["matmul_gflops"] * 1e9) for name, gcfg in configs.items()}
    if bc.init_from:
        gcfg = replace(pretrained.config(bc.init_from), block_size=max(bc.decode_context, bc.context_len + bc.rollout_len) + 1)
        results[Path(bc.init_from).stem] = bench(Path(bc.init_from).stem, gcfg, replace(bc, dtype=pre[0]), device, machine["matmul_gflops"] * 1e9, pretrain=False)
    if bc.json:
        print(json.dumps({"machine": machine, "results": results}, indent=2))
    else:
        report(results, machine)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (UsageError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
