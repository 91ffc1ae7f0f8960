"""
Self-Optimizing Language Models (SOL), in one file.

A frozen GPT whose every decode step takes one efficiency action per batch row -- the fraction
of past tokens attention keeps (keep), the fraction of gated-MLP channels kept (prune) and the
bit-width of the MLP output (bits) -- and the small causal-transformer policy that picks those
actions. The episode runner at the bottom decodes a teacher-forced episode under any scheduler:
the policy, dense, or static allocation.
"""
import itertools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # optional: fake quantization as one fused kernel on CUDA; the plain PyTorch fake_quant is the reference
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# -----------------------------------------------------------------------------
# configs


@dataclass
class GPTConfig:
    block_size: int = 256
    vocab_size: int = 512
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    mlp_hidden: int = 384  # gated MLP width, ~8/3 of 4*n_embd as in SwiGLU models
    rope_theta: float = 10000.0
    # the architecture of a pretrained checkpoint (pretrained.load); the defaults are the small model above
    n_kv_head: int = None  # grouped-query attention: key/value heads; None = n_head
    norm: str = "rms"  # rms | layer (LayerNorm with bias, GPT-2)
    norm_eps: float = 1e-6
    mlp: str = "gated"  # gated (SwiGLU) | gelu (GPT-2)
    pos: str = "rope"  # rope | learned (GPT-2)
    bias: bool = False  # biases in every linear layer but the head (GPT-2)
    tie_embeddings: bool = True
    rope_scaling: dict = None  # Llama-3: factor, low_freq_factor, high_freq_factor, original_max_position_embeddings


@dataclass
class ActionConfig:
    # the grid is the product of these three lists; each must contain its dense value (1, 1, 16).
    # The reference uses 0.1..1.0 step 0.1, 0.40..1.00 step 0.05 and 5..16 (1560 actions);
    # these coarser lists (80 actions) learn in minutes on a CPU.
    keep: tuple = (0.1, 0.25, 0.5, 0.75, 1.0)
    prune: tuple = (0.4, 0.6, 0.8, 1.0)
    bits: tuple = (5, 8, 12, 16)
    # reference default: quest. On the default corpus quest finds the fact page even at keep 0.1, so
    # attention sparsity costs almost nothing there; recency makes far-context tokens need a large keep.
    criterion: str = "recency"  # recency | relevancy | relevancy_layer | quest
    sinks: int = 4  # first positions always attended
    window: int = 2  # last positions always attended (plus the query itself)
    page_size: int = 8  # quest page size


@dataclass
class PolicyConfig:
    width: int = 64
    heads: int = 4
    depth: int = 1  # transformer blocks
    act_emb: int = 32
    scalar_hidden: int = 32
    max_steps: int = 64  # longest rollout the position embedding covers
    temperature: float = 1.3  # sampling temperature of the rollouts


CRITERIA = ("recency", "relevancy", "relevancy_layer", "quest")

# -----------------------------------------------------------------------------
# the three efficiency knobs


def topn_mask(score, n):
    """Boolean mask of the n[r] largest entries along the last dim of score (N, ..., M), per row r; of equal
    entries the earlier ones first, as one stable sort would keep them. Built without sorting: row r, padded
    with M - n[r] entries above every score and n[r] below, has its n[r]-th largest score as its M-th largest,
    so one selection finds every row's threshold, whatever the n; the entries above it are kept, and of those
    equal to it the first few, by a running count."""
    M = score.size(-1)
    n = n.view(-1, *[1] * (score.dim() - 1))
    pad = torch.where(torch.arange(M, device=score.device) < M - n, float("inf"), float("-inf")).to(score.dtype)
    nth = torch.cat([score, pad.expand_as(score)], -1).kthvalue(M + 1, -1, keepdim=True).values
    above, tie = score > nth, score == nth
    return above | (tie & (tie.cumsum(-1) <= n - above.sum(-1, keepdim=True)))


def fake_quant(x, bits):
    """Symmetric per-token absmax fake quantization of x (N, T, C) to bits[r] bits per row; 16 = identity. On CUDA
    with Triton, one fused kernel; elsewhere the same math in PyTorch ops."""
    if triton is not None and x.is_cuda:
        return fake_quant_triton(x, bits)
    return fake_quant_torch(x, bits)


def fake_quant_torch(x, bits):
    bits = bits.view(-1, *[1] * (x.dim() - 1))
    qmax = 2.0 ** (bits - 1) - 1
    scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / qmax  # clamp: an all-zero token stays 0
    xq = (x / scale).round().clamp(-qmax, qmax) * scale
    return torch.where(bits >= 16, x, xq.to(x.dtype))


if triton is not None:
    @triton.jit
    def fake_quant_kernel(x_ptr, bits_ptr, out_ptr, C, BLOCK: tl.constexpr):
        row = tl.program_id(0)  # one token per program: load it, find its absmax, round, store
        offs = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * C + offs, mask=offs < C, other=0.0)
        b = tl.load(bits_ptr + row)
        qmax = tl.exp2(b - 1.0) - 1.0
        scale = tl.maximum(tl.max(tl.abs(x), 0), 1e-12) / qmax
        y = x / scale
        r = tl.floor(y + 0.5)
        r = tl.where((r - y == 0.5) & (r - 2.0 * tl.floor(r * 0.5) != 0.0), r - 1.0, r)  # ties to even, as torch.round
        xq = tl.minimum(tl.maximum(r, -qmax), qmax) * scale
        tl.store(out_ptr + row * C + offs, tl.where(b >= 16.0, x, xq), mask=offs < C)

    def fake_quant_triton(x, bits):
        rows = x.reshape(-1, x.size(-1)).contiguous()  # (N*T, C)
        b = bits.float().repeat_interleave(rows.size(0) // bits.numel()).contiguous()
        out = torch.empty_like(rows)
        fake_quant_kernel[(rows.size(0),)](rows, b, out, rows.size(1), BLOCK=triton.next_power_of_2(rows.size(1)))
        return out.view_as(x)


def controllable(past, acfg):
    """A step is controllable ("eff") only if there are past keys beyond the sinks and window."""
    return past > acfg.sinks + acfg.window + 1


def n_kept(keep, M):
    """How many of M keys (or channels) a keep fraction keeps: at least one."""
    return torch.ceil(keep * M * (1 - 1e-6)).long().clamp(1, M)  # float32 0.3 > 0.3: 0.3*170 must not round up to 52


def page_bounds(keys, S):
    """Keys (..., L, hd) in pages of S -> each page's bounding box, its centre then its radius, (..., ceil(L/S), 2 hd)."""
    P = math.ceil(keys.size(-2) / S)
    pad = keys[..., -1:, :].expand(*keys.shape[:-2], P * S - keys.size(-2), -1)  # repeating a key leaves max/min as they are
    pages = torch.cat([keys, pad], -2).unflatten(-2, (P, S))
    hi, lo = pages.amax(-2), pages.amin(-2)
    return torch.cat([hi + lo, hi - lo], -1) / 2


def page_scores(q, box):
    """The largest q.k any key in a page's box can reach, sum_d max(q_d kmax_d, q_d kmin_d) = q.centre + |q|.radius:
    one product of [q, |q|] (..., T, 2 hd) with the boxes (..., P, 2 hd)."""
    return torch.cat([q, q.abs()], -1) @ box.transpose(-2, -1)


def middle_scores(q, k, acfg):
    """What the criterion ranks the M middle keys by (those between the sinks and the window), for one query
    q (N, H, 1, hd) at position L-1 over its keys k (N, H, L, hd): relevancy, their q.k (N, H, 1, M), or its
    mean over the heads; quest, the upper bound of q.k over each page of S keys (N, H, 1, ceil(M/S))."""
    Ts, M = acfg.sinks, k.size(2) - 1 - acfg.window - acfg.sinks
    mid = k[:, :, Ts:Ts + M]
    if acfg.criterion == "quest":
        return page_scores(q, page_bounds(mid, acfg.page_size))
    score = q @ mid.transpose(-2, -1)
    return score.mean(1, keepdim=True).expand_as(score) if acfg.criterion == "relevancy_layer" else score


def around(mid, acfg):
    """A mask over the M middle keys (..., M) -> over all L: the sinks before them, the window and the query after,
    all kept. (A cat, not F.pad: torch 2.13's inductor emits C++ that does not compile for a padded boolean mask.)"""
    ones = lambda n: torch.ones(*mid.shape[:-1], n, dtype=torch.bool, device=mid.device)
    return torch.cat([ones(acfg.sinks), mid, ones(acfg.window + 1)], -1)


def kept_keys(keep, L, acfg):
    """What keep fractions (N,) keep of a query's L keys, the same in every layer (so a decode step resolves
    it once): under recency the mask itself, the sinks, the most recent of the M middle keys and the window,
    (N, 1, 1, L); under the other criteria how many middle keys each row keeps (quest: pages of S), (N,).
    None when there is no middle to choose from (M <= 1): every key is kept."""
    M = L - 1 - acfg.window - acfg.sinks
    if acfg.criterion not in CRITERIA:
        raise ValueError(f"unknown attention criterion {acfg.criterion!r}; use one of {', '.join(CRITERIA)}")
    if M <= 1:
        return None
    if acfg.criterion == "quest":
        return torch.ceil(keep * M / acfg.page_size * (1 - 1e-6)).long().clamp(1, math.ceil(M / acfg.page_size))
    n = n_kept(keep, M)
    if acfg.criterion != "recency":
        return n
    return around(torch.arange(M, device=keep.device) >= M - n.view(-1, 1, 1, 1), acfg)  # (N, 1, 1, M) -> (N, 1, 1, L)


def key_mask(q, k, n, acfg, k0=None, qk=None):
    """The keys one query per row keeps under a ranking criterion (relevancy, relevancy_layer, quest): q (N, H, 1, hd)
    at position L-1 over its keys k (N, H, L, hd) -> (N, H, 1, L). n: kept_keys's count per row. With k0, the keys
    are the shared prefix k0 then k (the fast path, see middle_scores_shared), and qk, when given, their q.k."""
    M = k.size(2) + (0 if k0 is None else k0.size(2)) - 1 - acfg.window - acfg.sinks
    score = middle_scores(q, k, acfg) if k0 is None else middle_scores_shared(q, k0, k, acfg, qk)
    mid = topn_mask(score, n)
    if acfg.criterion == "quest":  # whole pages
        mid = mid.repeat_interleave(acfg.page_size, -1)[..., :M]
    return around(mid, acfg)


def sparse_mask(q, k, keep, acfg, k0=None):
    """Keys kept by one query per row: q (N, H, 1, hd) at position L-1 over its keys k (N, H, L, hd)
    -> (N, H, 1, L). Sinks and window are always kept; of the M keys between them a fraction keep[r] is
    kept. With k0, the keys are the shared prefix k0 then k. The model resolves kept_keys once per decode step
    and calls key_mask per layer; this is the two together."""
    N, H, L = k.size(0), k.size(1), k.size(2) + (0 if k0 is None else k0.size(2))
    keys = kept_keys(keep, L, acfg)
    if keys is None:
        return torch.ones(N, H, 1, L, dtype=torch.bool, device=k.device)
    return (keys if acfg.criterion == "recency" else key_mask(q, k, keys, acfg, k0)).expand(N, H, 1, L)


class Knobs(NamedTuple):
    """One decode step's actions (N, 3), resolved once for every layer: none of this depends on the layer."""
    keep: torch.Tensor  # (N,) the fraction of middle keys kept
    keys: torch.Tensor  # kept_keys: recency's mask (N, 1, 1, L), or how many keys each row keeps (N,); or None
    channels: torch.Tensor  # (N,) how many MLP hidden channels each row keeps
    bits: torch.Tensor  # (N,) the bit-width of the MLP output


def resolve(act, L, acfg, hidden):
    """Knobs for actions act (N, 3) at a decode step whose query sees L keys, in an MLP of `hidden` channels."""
    return Knobs(act[:, 0], kept_keys(act[:, 0], L, acfg), n_kept(act[:, 1], hidden), act[:, 2])


class Grid(NamedTuple):
    values: torch.Tensor  # (A, 3) keep, prune, bits of every action
    budget: torch.Tensor  # (A, 3) the same as fractions of the dense action: keep, prune, bits/16
    dense: int  # index of the dense action


def action_grid(acfg):
    values = torch.tensor(list(itertools.product(acfg.keep, acfg.prune, acfg.bits)), dtype=torch.float32)
    top = torch.tensor([1.0, 1.0, 16.0])
    hits = (values == top).all(1).nonzero()
    if len(hits) != 1:
        raise ValueError("the action grid must contain the dense action exactly once: keep 1.0, prune 1.0 and bits 16 each once")
    if values.min() <= 0 or (values > top).any():
        raise ValueError("action grid values must lie in keep (0, 1], prune (0, 1], bits [2, 16]")
    return Grid(values, values / top, int(hits[0]))

# -----------------------------------------------------------------------------
# the GPT


class KVCache:
    """Keys and values of every layer for N rows and up to `size` positions, filled left to right.
    A cache forked from a parent holds only the positions after the fork: its N = B*K rows read the
    parent's B rows in place (row r*K+j reads parent row r), so K rollouts never copy their prefix."""

    def __init__(self, n_layer, N, n_head, size, head_dim, device, parent=None, dtype=torch.float32):
        self.k = torch.zeros(n_layer, N, n_head, size, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.parent, self.start = parent, parent.len if parent is not None else 0  # start: first position held here
        self.len = self.start

    def copy(self):
        """An independent copy (its own keys and values; the parent, if any, still shared)."""
        c = KVCache.__new__(KVCache)
        c.k, c.v, c.parent, c.start, c.len = self.k.clone(), self.v.clone(), self.parent, self.start, self.len
        return c

    def rows(self, idx):
        """A view of some rows (no copy), to fork from."""
        assert self.parent is None, "a view of a cache that holds its own prefix"
        c = KVCache.__new__(KVCache)
        c.k, c.v, c.parent, c.start, c.len = self.k[:, idx], self.v[:, idx], None, self.start, self.len
        return c

    def fork(self, K, size):
        """K rows per row, sharing the positions cached so far, each with room for `size` more."""
        assert self.parent is None, "fork a cache that holds its own prefix"
        n_layer, N, n_head, _, head_dim = self.k.shape
        return KVCache(n_layer, N * K, n_head, size, head_dim, self.k.device, self, self.k.dtype)

    def shared(self, layer):
        """The parent's keys and values this cache reads, (B, H, start, hd) each; None without a parent."""
        if self.parent is None:
            return None, None
        return self.parent.k[layer, :, :, :self.start], self.parent.v[layer, :, :, :self.start]


def rope_tables(T, head_dim, theta, scaling=None):
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    if scaling:  # Llama-3: slow the low frequencies by `factor`, keep the high ones, blend in between
        s = scaling
        wavelen = 2 * math.pi / inv_freq
        ratio = s["original_max_position_embeddings"] / wavelen
        blend = ((ratio - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])).clamp(0, 1)
        inv_freq = (1 - blend) * inv_freq / s["factor"] + blend * inv_freq
    f = torch.outer(torch.arange(T).float(), inv_freq)
    return f.cos(), f.sin()  # (T, head_dim/2)


def causal_mask(start, T, device):
    """(T, start + T): T new tokens after `start` cached ones see the cache and each other causally."""
    pos = torch.arange(start + T, device=device)
    return pos[None, :] <= pos[start:, None]


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, -1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


def attention(q, k, v, mask=None, fused=True):
    """Softmax attention of q (N, H, Tq, hd) over k, v (N, H, Tk, hd); mask is boolean (True = attend),
    broadcast to (N, H, Tq, Tk), None = plain causal. The fused path is one scaled_dot_product_attention
    call with causality and sparsity in the same mask (no Triton, CPU or CUDA); the manual path is the same math."""
    if fused:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
    att = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    if mask is None:
        mask = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool, device=q.device).tril(k.size(-2) - q.size(-2))
    return F.softmax(att.masked_fill(~mask, float("-inf")), dim=-1) @ v


def recent_attention(q, k, v, keep, acfg):
    """attention(q, k, v, sparse_mask(q, k, keep, acfg)) for one row's decode step under the recency
    criterion, computed on the kept keys only: the sinks and the most recent run are two slices of the
    cache, read in place, so the cost scales with keep (the masked path reads every key, then drops some).
    q (1, H, 1, hd), k and v (1, H, L, hd), keep a 0-dim tensor."""
    Ts, M = acfg.sinks, k.size(2) - 1 - acfg.window - acfg.sinks
    start = Ts + M - int(n_kept(keep, M)) if M > 1 else Ts
    att = torch.cat([q @ k[:, :, :Ts].transpose(-2, -1), q @ k[:, :, start:].transpose(-2, -1)], -1)
    p = F.softmax(att / math.sqrt(q.size(-1)), -1)  # (1, H, 1, Ts + L - start)
    return p[..., :Ts] @ v[:, :, :Ts] + p[..., Ts:] @ v[:, :, start:]


# the fast path of the GRPO rollouts: the K rows forked from one sequence read its prefix cache in place.
# Each function here is its plain twin above (sparse_mask's middle_scores, attention) over the keys k0 then k,
# tested equal to it.


def fold(x, B):
    """(B*K, H, T, d) -> (B, H, K*T, d): the K rows that share a prefix become K*T queries of one row."""
    return x.unflatten(0, (B, -1)).transpose(1, 2).flatten(2, 3)


def unfold(y, K):
    """(B, H, K*T, d) -> (B*K, H, T, d), the inverse of fold."""
    return y.unflatten(2, (K, -1)).transpose(1, 2).flatten(0, 1)


def qk_shared(q, k0, k):
    """q.k for q (N, H, T, hd) and every key: first the prefix k0 (B, H, L0, hd) shared by the K = N/B rows of
    each sequence, then the row's own keys k (N, H, L1, hd) -> (N, H, T, L0+L1)."""
    return torch.cat([unfold(fold(q, k0.size(0)) @ k0.transpose(-2, -1), q.size(0) // k0.size(0)), q @ k.transpose(-2, -1)], -1)


def attention_shared(q, k0, v0, k, v, mask, qk=None):
    """attention(q, keys k0 then k, values v0 then v, mask), where the prefix k0, v0 (B, H, L0, hd) is shared by
    the K = N/B rows of each sequence and read in place: the fast path of the GRPO rollouts. qk: qk_shared(q, k0, k),
    when the caller has it already."""
    att = (qk_shared(q, k0, k) if qk is None else qk) / math.sqrt(q.size(-1))
    p0, p1 = F.softmax(att.masked_fill(~mask, float("-inf")), dim=-1).split([k0.size(2), k.size(2)], -1)
    return unfold(fold(p0, k0.size(0)) @ v0, q.size(0) // k0.size(0)) + p1 @ v


def middle_scores_shared(q, k0, k, acfg, qk=None):
    """middle_scores over the keys k0 then k (N, H, L1, hd), where the prefix k0 (B, H, L0, hd) is shared by
    the K = N/B rows of each sequence: it is read once per sequence, never copied per row (the fast path of
    the GRPO rollouts, see KVCache.fork). qk: qk_shared(q, k0, k), when the caller has it already."""
    B, K, L0 = k0.size(0), q.size(0) // k0.size(0), k0.size(2)
    Ts, S, M = acfg.sinks, acfg.page_size, L0 + k.size(2) - 1 - acfg.window - acfg.sinks
    if acfg.criterion != "quest":
        score = (qk_shared(q, k0, k) if qk is None else qk)[..., Ts:Ts + M]
        return score.mean(1, keepdim=True).expand_as(score) if acfg.criterion == "relevancy_layer" else score
    # pages wholly in the prefix are bounded once per sequence; the page that holds the prefix's last key
    # and the pages after it are bounded per row, from the row's own keys
    F0 = max(0, min(L0, Ts + M) - Ts - 1) // S
    a = Ts + F0 * S  # where the per-row pages begin
    rest = k[:, :, max(a - L0, 0):max(Ts + M - L0, 0)]
    if a < L0:
        rest = torch.cat([k0[:, :, a:min(L0, Ts + M)].repeat_interleave(K, 0), rest], 2)
    score = page_scores(q, page_bounds(rest, S))
    if F0:
        score = torch.cat([unfold(page_scores(fold(q, B), page_bounds(k0[:, :, Ts:a], S)), K), score], -1)
    return score


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # in float32 even for a bfloat16 model, as Llama does
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def make_norm(cfg):
    return RMSNorm(cfg.n_embd, cfg.norm_eps) if cfg.norm == "rms" else nn.LayerNorm(cfg.n_embd, cfg.norm_eps)


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head, n_kv_head=None, bias=False):
        super().__init__()
        self.n_head, self.n_kv_head = n_head, n_kv_head or n_head
        self.kv_dim = n_embd // n_head * self.n_kv_head
        self.qkv = nn.Linear(n_embd, n_embd + 2 * self.kv_dim, bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.fused = True
        self.realized = True  # one row under recency: read only the kept keys (see recent_attention)

    def forward(self, x, rope=None, mask=None, cache=None, layer=0, knobs=None, acfg=None):
        """rope: cos, sin at the new positions; mask: causal over the cache and the new tokens (None: no cache)."""
        B, T, C = x.shape
        hd = C // self.n_head
        q, k, v = (t.view(B, T, -1, hd).transpose(1, 2) for t in self.qkv(x).split([C, self.kv_dim, self.kv_dim], 2))  # (B, H or H_kv, T, hd)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        k0 = v0 = qk = None
        if cache is not None:
            i = cache.len - cache.start  # where this cache's own positions begin
            cache.k[layer, :, :, i:i + T], cache.v[layer, :, :, i:i + T] = k, v
            k, v = cache.k[layer, :, :, :i + T], cache.v[layer, :, :, :i + T]  # (B, H_kv, L1, hd)
            k0, v0 = cache.shared(layer)  # (B/K, H_kv, L0, hd) each, or None
        if self.n_kv_head != self.n_head:  # grouped-query attention: each key/value head serves H/H_kv query heads
            k, v, k0, v0 = (t if t is None else t.repeat_interleave(self.n_head // self.n_kv_head, 1) for t in (k, v, k0, v0))
        if knobs is not None and self.realized and B == 1 and k0 is None and acfg.criterion == "recency" and knobs.keep[0] < 1:
            return self.proj(recent_attention(q, k, v, knobs.keep[0], acfg).transpose(1, 2).reshape(B, T, C))
        if k0 is not None:
            qk = qk_shared(q, k0, k)  # (B, H, T, L0 + L1): the logits, which relevancy also ranks keys by
        if knobs is not None and knobs.keys is not None:  # the keys this step's actions keep
            assert T == 1, "efficiency actions apply to single-token decode steps"
            mask = mask & (knobs.keys if acfg.criterion == "recency" else key_mask(q, k, knobs.keys, acfg, k0, qk))
        y = attention(q, k, v, mask, self.fused) if k0 is None else attention_shared(q, k0, v0, k, v, mask, qk)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    """SwiGLU, down(silu(gate x) * up x), or GPT-2's down(gelu(up x)); the knobs act on the hidden channels."""

    def __init__(self, n_embd, hidden, gated=True, bias=False):
        super().__init__()
        self.gate = nn.Linear(n_embd, hidden, bias=bias) if gated else None
        self.up = nn.Linear(n_embd, hidden, bias=bias)
        self.down = nn.Linear(hidden, n_embd, bias=bias)

    def forward(self, x, knobs=None):
        h = F.silu(self.gate(x)) * self.up(x) if self.gate is not None else F.gelu(self.up(x), approximate="tanh")  # (B, T, hidden)
        if knobs is None:
            return self.down(h)
        h = h * topn_mask(h.abs(), knobs.channels)  # structured pruning: keep the largest |activation| channels
        return fake_quant(self.down(h), knobs.bits)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm1, self.norm2 = make_norm(cfg), make_norm(cfg)
        self.attn = CausalSelfAttention(cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.bias)
        self.mlp = MLP(cfg.n_embd, cfg.mlp_hidden, cfg.mlp == "gated", cfg.bias)

    def forward(self, x, rope=None, mask=None, cache=None, layer=0, knobs=None, acfg=None):
        x = x + self.attn(self.norm1(x), rope, mask, cache, layer, knobs, acfg)
        return x + self.mlp(self.norm2(x), knobs)


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos == "learned" else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.wte.weight = self.lm_head.weight  # tied, as in GPT-2
        if cfg.pos == "rope":
            for name, t in zip(("cos", "sin"), rope_tables(cfg.block_size, cfg.n_embd // cfg.n_head, cfg.rope_theta, cfg.rope_scaling)):
                self.register_buffer(name, t, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith(("proj.weight", "down.weight")):  # scaled residual init, as GPT-2
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)

    def new_cache(self, N, size):
        c, w = self.cfg, self.lm_head.weight
        return KVCache(c.n_layer, N, c.n_kv_head or c.n_head, size, c.n_embd // c.n_head, w.device, dtype=w.dtype)

    def forward(self, idx, cache=None, act=None, acfg=None):
        """idx (B, T) -> logits (B, T, V) and final hidden states (B, T, C). With a cache the T tokens are
        appended after the cached ones; act (B, 3) is one (keep, prune, bits) action per row, T must be 1."""
        h = self.hidden(idx, cache, act, acfg)
        return self.lm_head(h), h

    def hidden(self, idx, cache=None, act=None, acfg=None):
        """The final hidden states alone: a prefill needs no logits (for a 128k vocabulary, the largest tensor)."""
        start, T = cache.len if cache is not None else 0, idx.size(1)
        assert start + T <= self.cfg.block_size, "sequence longer than block_size"
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(start, start + T, device=idx.device))
        # what every layer shares is computed once: rope at the new positions, the causal mask, the actions resolved
        rope = (self.cos[start:start + T], self.sin[start:start + T]) if self.wpe is None else None
        mask = causal_mask(start, T, idx.device) if cache is not None else None
        knobs = resolve(act, start + T, acfg, self.cfg.mlp_hidden) if act is not None else None
        for i, block in enumerate(self.blocks):
            x = block(x, rope, mask, cache, i, knobs, acfg)
        if cache is not None:
            cache.len += T
        return self.norm(x)

# -----------------------------------------------------------------------------
# the policy


class Policy(nn.Module):
    """A small causal transformer over decode steps. Step t sees h(t-1), e(x_t), 8 budget scalars and
    the previous action; it outputs logits over the whole action grid."""

    def __init__(self, pcfg, d_lm, n_actions):
        super().__init__()
        self.pcfg, self.n_actions = pcfg, n_actions
        self.scalars = nn.Sequential(nn.Linear(8, pcfg.scalar_hidden), nn.GELU(), nn.Linear(pcfg.scalar_hidden, pcfg.scalar_hidden))
        self.act_emb = nn.Embedding(n_actions + 1, pcfg.act_emb)  # index n_actions is BOS
        self.inp = nn.Linear(2 * d_lm + pcfg.scalar_hidden + pcfg.act_emb, pcfg.width)
        self.pos = nn.Embedding(pcfg.max_steps, pcfg.width)
        block = GPTConfig(n_embd=pcfg.width, n_head=pcfg.heads, mlp_hidden=4 * pcfg.width)
        self.blocks = nn.ModuleList(Block(block) for _ in range(pcfg.depth))
        self.norm = RMSNorm(pcfg.width)
        self.head = nn.Linear(pcfg.width, n_actions)
        self.budget_head = nn.Linear(3, n_actions)  # lets the targets shift the logits directly

    def new_cache(self, N):
        p = self.pcfg
        return KVCache(p.depth, N, p.heads, p.max_steps, p.width // p.heads, self.head.weight.device)

    def forward(self, h_prev, emb, scalars, prev_action, cache=None):
        """(N, T, .) step inputs -> (N, T, A) logits. With a cache the T steps are appended (decoding);
        without, the whole sequence runs at once under a causal mask (training). Both agree."""
        start = cache.len if cache is not None else 0
        x = torch.cat([h_prev, emb, self.scalars(scalars), self.act_emb(prev_action)], -1)
        x = self.inp(x) + self.pos(torch.arange(start, start + x.size(1), device=x.device))
        mask = causal_mask(start, x.size(1), x.device) if cache is not None else None
        for i, block in enumerate(self.blocks):
            x = block(x, None, mask, cache, i)
        if cache is not None:
            cache.len += x.size(1)
        return self.head(self.norm(x)) + self.budget_head(scalars[..., TARGETS])


def matmul_flops(module, context, n_layer, d_attn):
    """Forward FLOPs of one decode step: 2 per linear weight, plus q.k and att.v over `context` keys."""
    linear = sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))
    return 2 * linear + 4 * n_layer * d_attn * context

# -----------------------------------------------------------------------------
# the episode runner: one teacher-forced decode under any scheduler (schedules.py holds them)


TARGETS = slice(2, 5)  # where the three targets sit among step_scalars


def step_scalars(t, T, eff, target, spent, n_eff):
    """The policy's eight scalars at step t of T, (N, 8): t/T, the controllable ("eff") flag, the targets (N, 3),
    and the running mean of the budget spent (N, 3, summed over n_eff earlier controllable steps) minus them.
    T and n_eff: numbers, or one per row (N, 1) where rows have lengths of their own."""
    T, n_eff = torch.as_tensor(T, dtype=torch.float64, device=target.device), torch.as_tensor(n_eff, dtype=spent.dtype, device=target.device)
    dev = torch.where(n_eff > 0, spent / n_eff.clamp_min(1), target) - target  # 0 before the first controllable step
    N = target.size(0)
    return torch.cat([(t / T).float().expand(N, 1), torch.full((N, 1), float(eff), device=target.device), target, dev], 1)


@torch.no_grad()
def rollout(model, cache, h0, x, target, scheduler, grid, acfg, ref_logprobs=None, bar=None, live=None):
    """Teacher-forced decode of T controlled steps under a schedule.
    cache: the LM's KV cache after a dense prefill of the context (N rows); h0 (N, C): its last hidden state.
    x (N, T+1): step t feeds x[:, t] and scores x[:, t+1]. target (N, 3): requested budget fractions.
    scheduler(t, obs) -> (N,) action indices. Returns the log-probs of the true tokens, the actions, the
    policy inputs of every step (to replay them at training time) and the achieved budget per row.
    ref_logprobs (N, T, V): the dense run's log-probs, to add KL(p_dense || p_sparse) per step. bar: a progress bar
    (tqdm) advanced once per step. live (N, T): False on the steps that pad a row past its own length (rows of
    different lengths in one batch): they are decoded, but neither counted in the row's budget nor, through
    obs["live"], by a budget controller; the policy's t/T is over the row's own steps. Their log-probs are the
    caller's to drop."""
    N, T = x.size(0), x.size(1) - 1
    h, prev = h0, torch.full((N,), len(grid.values), dtype=torch.long, device=x.device)  # BOS action
    live = torch.ones(N, T, dtype=torch.bool, device=x.device) if live is None else live
    steps = live.sum(1, keepdim=True)  # each row's own length
    spent, n_eff = torch.zeros(N, 3, device=x.device), torch.zeros(N, 1, device=x.device)
    out = {k: [] for k in ("h_prev", "emb", "scalars", "prev_action", "action", "logp", "kl")}
    logprobs = F.log_softmax(model.lm_head(h0).float(), -1)  # the prediction made before step 0
    for t in range(T):
        eff = controllable(cache.len, acfg)
        scalars = step_scalars(t, steps, eff, target, spent, n_eff)
        obs = dict(h_prev=h, emb=model.wte(x[:, t]), scalars=scalars, prev_action=prev, logprobs=logprobs, cache=cache, token=x[:, t],
                   live=live[:, t])  # logprobs: the previous prediction (N, V), whose entropy the heuristic reads
        a = scheduler(t, obs)
        logits, hs = model(x[:, t:t + 1], cache, grid.values[a] if eff else None, acfg)
        logprobs = F.log_softmax(logits[:, -1].float(), -1)  # (N, V)
        if eff:
            counts = live[:, t, None]
            spent, n_eff = spent + grid.budget[a] * counts, n_eff + counts
        for k in ("h_prev", "emb", "scalars", "prev_action"):  # the policy's inputs, replayed by its update
            out[k].append(obs[k])
        out["action"].append(a)
        out["logp"].append(logprobs.gather(1, x[:, t + 1:t + 2])[:, 0])
        if ref_logprobs is not None:  # KL(p_dense || p_sparse) at this step
            out["kl"].append((ref_logprobs[:, t].exp() * (ref_logprobs[:, t] - logprobs)).sum(-1))
        h, prev = hs[:, -1], a
        if bar is not None:
            bar.update()
    out = {k: torch.stack(v, 1) for k, v in out.items() if v}  # each (N, T, ...)
    out["achieved"] = spent / n_eff.clamp_min(1)  # (N, 3) mean budget over controllable live steps
    return out


def prefill(model, x, C, T):
    """Dense prefill of the context x[:, :C] into a cache with room for T more steps; returns the cache
    and the last hidden state."""
    cache = model.new_cache(x.size(0), C + T)
    return cache, model.hidden(x[:, :C], cache)[:, -1]


@torch.no_grad()
def prefill_batches(model, eps, C, batch, bar=None):
    """The dense prefill of every episode's context, batch by batch as decode takes them: an evaluation decodes
    the same episodes under many schedules (calibration, search), and each reuses these. bar: a progress bar,
    advanced once per batch."""
    out = []
    for i in range(0, len(eps), batch):
        out.append(prefill(model, eps[i:i + batch], C, eps.size(1) - C - 1))
        if bar is not None:
            bar.update()
    return out


@torch.no_grad()
def score_episodes(model, eps, target, make_scheduler, grid, acfg, C, batch, prefilled=None, bar=None):
    """Every episode eps (E, C+T+1) under a fresh scheduler per batch: the mean NLL over the T controlled
    steps of each episode (E,), the achieved budget (3,) and the actions (E, T). prefilled: prefill_batches
    of the same episodes, copied instead of recomputed (the context is dense whatever the schedule). bar: a progress
    bar, advanced once per decode step of a batch."""
    T = eps.size(1) - C - 1
    nll, spent, actions = [], 0, []
    for j, i in enumerate(range(0, len(eps), batch)):
        x = eps[i:i + batch]
        cache, h0 = prefill(model, x, C, T) if prefilled is None else (prefilled[j][0].copy(), prefilled[j][1])
        roll = rollout(model, cache, h0, x[:, C:], target.expand(len(x), 3), make_scheduler(), grid, acfg, bar=bar)
        nll.append(-roll["logp"].mean(1))
        spent = spent + roll["achieved"].sum(0)
        actions.append(roll["action"])
    return torch.cat(nll), spent / len(eps), torch.cat(actions)
