"""
What the scripts share that is not the method: `--key=value` flags, the one-line usage error, checkpoint files
written whole or not at all, memory estimates checked before anything is allocated, and --dtype=auto.
"""
import io
import os
import sys
from dataclasses import fields
from pathlib import Path

import torch


class UsageError(Exception):
    """Bad input: printed as one line, exit code 2."""


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


def parse_args(argv, cfgs, hidden=()):
    """Set the fields of the config dataclasses cfgs from argv, --name=value or --name value; hidden: fields that
    are no flag (they come from the data or a checkpoint)."""
    flags = {f.name: cfg for cfg in cfgs for f in fields(cfg) if f.name not in hidden}
    names = [f.name for cfg in cfgs for f in fields(cfg)]
    assert len(names) == len(set(names)), "two configs share a field name: one flag would set both"
    if any(a in ("-h", "--help") for a in argv):
        print((sys.modules["__main__"].__doc__ or "").strip() + "\n")  # the script's usage, then its flags
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


# -----------------------------------------------------------------------------
# files


DTYPES = ("auto", "float32", "bfloat16", "float16")


def native_bf16(device):
    """Whether the device computes bfloat16 in hardware: a CUDA GPU that supports it, a CPU with AMX or AVX-512 BF16.
    Elsewhere torch emulates it, about 5x slower than float32 on an AVX2 CPU."""
    if device == "cuda":
        return torch.cuda.is_bf16_supported()
    return device == "cpu" and (torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def pick_dtype(dtype, device, pretrained):
    """The frozen GPT's dtype for --dtype, and why. auto: bfloat16 for a pretrained checkpoint where the device computes
    it natively, float32 elsewhere, and always for the built-in GPT, which is small enough that float32 costs little
    and gives the same figures on every machine."""
    if dtype != "auto":
        return dtype, "as asked"
    if not pretrained:
        return "float32", "auto: the built-in GPT is small, and float32 gives the same figures on every machine"
    if native_bf16(device):
        return "bfloat16", f"auto: this {device} computes bfloat16 natively"
    return "float32", f"auto: this {device} has no native bfloat16, which it would emulate several times slower than float32"


def load_checkpoint(path, what):
    if not Path(path).exists():
        raise UsageError(f"the {what} checkpoint {path} is missing; rerun the train.py command that made it")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"cannot read the {what} checkpoint {path}: truncated or corrupt ({type(e).__name__}); delete it to start over")


def save_atomic(obj, path):
    """Write obj (bytes, text, or anything torch.save takes) to path through a temporary file and a rename: an
    interrupted or failed write (a full disk) leaves any earlier file whole and nothing half-written beside it."""
    if isinstance(obj, (str, bytes)):
        data = obj.encode() if isinstance(obj, str) else obj
    else:
        buf = io.BytesIO()
        torch.save(obj, buf)  # in memory first: torch.save reports a full disk as an opaque RuntimeError
        data = buf.getvalue()
    tmp = Path(f"{path}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OSError(f"cannot write {path} ({e.strerror or e}); any earlier {Path(path).name} is intact: "
                          "free some space or write elsewhere") from None
        raise

# -----------------------------------------------------------------------------
# memory, estimated from the flags before allocating


def n_params(make):
    """Parameters of the module make() builds, counted on the meta device: nothing is allocated."""
    with torch.device("meta"):
        return sum(p.numel() for p in make().parameters())


def episode_bytes(cfg, B, K, C, T, lm_bytes=4, keep_logprobs=False):
    """A rough upper bound on the memory one batch of episodes takes beyond the weights: B rows prefilled over C
    tokens, then T decode steps of B*K rows that read that prefix (KVCache.fork); keep_logprobs: every step's
    log-probs over the vocabulary kept (the KL reward)."""
    kv = 2 * cfg.n_layer * (cfg.n_embd // cfg.n_head) * (cfg.n_kv_head or cfg.n_head) * lm_bytes  # one position's keys and values
    act = 4 * (10 * cfg.n_embd + 4 * cfg.mlp_hidden + 2 * cfg.n_head * (C + T))  # one token in one layer, attention scores included
    prefill = B * C * (kv + act + 8)
    steps = B * K * (T * kv + act + 16 * cfg.vocab_size + 4 * T * (4 * cfg.n_embd + 16 + cfg.vocab_size * keep_logprobs))
    return prefill + steps  # steps: the rows' own cache, a step's logits and log-softmax, the inputs kept per step


def pretrain_bytes(cfg, n, B):
    """Pretraining's peak: weights, gradients and AdamW's two moments of n float32 parameters, and the activations
    of B windows of block_size tokens kept for the backward pass."""
    per_token = 4 * (cfg.n_layer * (16 * cfg.n_embd + 6 * cfg.mlp_hidden + 2 * cfg.n_head * cfg.block_size) + 4 * cfg.vocab_size)
    return 16 * n + B * cfg.block_size * per_token


def free_memory(device):
    """Bytes free for new allocations: the GPU's free memory under CUDA, else what the OS reports as available
    (Linux's MemAvailable, elsewhere the free or else the total physical pages); None if nothing says."""
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        pass
    for pages in ("SC_AVPHYS_PAGES", "SC_PHYS_PAGES"):
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf(pages)
        except (ValueError, OSError, AttributeError):
            pass
    return None


def check_memory(needs, device):
    """needs: (what, bytes, fix) for each phase. Raises ValueError, one line, for the first that cannot fit."""
    free = free_memory(device)
    for what, need, fix in needs:
        if free is not None and need > free:
            raise ValueError(f"{what} needs about {need / 2**30:.1f} GiB of memory, more than the {free / 2**30:.1f} GiB "
                             f"free on {device}; {fix}")
