"""
Pretrained checkpoints and their tokenizers, without transformers: a Hugging Face folder (config.json and
safetensors or pytorch_model.bin, llama or gpt2) or a llama.cpp GGUF file (llama architecture, any tensor type the
`gguf` package dequantizes), loaded into a frozen sol.GPT; and their byte-level BPE tokenizers (a GGUF's
metadata, a tokenizer.json, Llama-3's tokenizer.model) as tiktoken Encodings.

    model = pretrained.load("SmolLM2-135M-Instruct.Q4_1.gguf")     # or a checkpoint folder
    enc = pretrained.encoding("SmolLM2-135M-Instruct.Q4_1.gguf")   # None: GPT-2's BPE (a gpt2 folder)
"""
import base64
import hashlib
import json
from pathlib import Path

import numpy as np
import tiktoken
import torch

import sol

# -----------------------------------------------------------------------------
# Hugging Face checkpoint folders: config.json and model.safetensors (or shards and their index, or pytorch_model.bin)


def hf_config(path):
    """The GPTConfig of a checkpoint folder's config.json (model_type llama or gpt2)."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise ValueError(f"{path} is not a checkpoint folder: it has no config.json")
    c = json.loads(file.read_text())
    try:
        if c.get("model_type") == "gpt2":
            if c.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
                raise ValueError(f"{file}: activation {c['activation_function']} is not supported (gelu_new only)")
            return sol.GPTConfig(block_size=c["n_positions"], vocab_size=c["vocab_size"], n_layer=c["n_layer"], n_head=c["n_head"],
                                 n_embd=c["n_embd"], mlp_hidden=c.get("n_inner") or 4 * c["n_embd"], norm="layer",
                                 norm_eps=c["layer_norm_epsilon"], mlp="gelu", pos="learned", bias=True,
                                 tie_embeddings=c.get("tie_word_embeddings", True))
        if c.get("model_type") == "llama":
            rope = {**(c.get("rope_scaling") or {}), **(c.get("rope_parameters") or {})}  # transformers 4 | 5
            kind = rope.get("rope_type", rope.get("type", "default"))
            head_dim = c["hidden_size"] // c["num_attention_heads"]
            if kind not in ("default", "llama3"):
                raise ValueError(f"{file}: rope type {kind!r} is not supported (default or llama3)")
            if c.get("hidden_act", "silu") != "silu" or c.get("head_dim", head_dim) != head_dim:
                raise ValueError(f"{file}: only silu MLPs with head_dim = hidden_size / num_attention_heads are supported")
            if c.get("attention_bias", False) != c.get("mlp_bias", False):
                raise ValueError(f"{file}: attention_bias and mlp_bias must agree")
            if c["num_attention_heads"] % (c.get("num_key_value_heads") or 1):
                raise ValueError(f"{file}: num_key_value_heads must divide num_attention_heads")
            return sol.GPTConfig(block_size=c["max_position_embeddings"], vocab_size=c["vocab_size"], n_layer=c["num_hidden_layers"],
                                 n_head=c["num_attention_heads"], n_embd=c["hidden_size"], mlp_hidden=c["intermediate_size"],
                                 rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
                                 n_kv_head=c.get("num_key_value_heads") or c["num_attention_heads"], norm_eps=c["rms_norm_eps"],
                                 bias=c.get("attention_bias", False), tie_embeddings=c.get("tie_word_embeddings", False),
                                 rope_scaling={k: float(rope[k]) for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                                         "original_max_position_embeddings")} if kind == "llama3" else None)
    except KeyError as e:
        raise ValueError(f"{file} lacks {e}, which a {c['model_type']} config needs") from None
    raise ValueError(f"{file}: model_type {c.get('model_type')!r} is not supported; use a llama or gpt2 checkpoint")


def checkpoint_names(cfg):
    """Where each checkpoint tensor goes: {name: (our parameter, its rows or None, stored transposed)}."""
    C, kv = cfg.n_embd, cfg.n_embd // cfg.n_head * (cfg.n_kv_head or cfg.n_head)
    kinds = ("weight", "bias") if cfg.bias else ("weight",)
    names = {} if cfg.tie_embeddings else {"lm_head.weight": ("lm_head.weight", None, False)}
    if cfg.pos == "learned":  # GPT-2, whose Conv1D layers store weights as (in, out)
        names |= {"wte.weight": ("wte.weight", None, False), "wpe.weight": ("wpe.weight", None, False),
                  "ln_f.weight": ("norm.weight", None, False), "ln_f.bias": ("norm.bias", None, False)}
        pairs = (("ln_1", "norm1"), ("ln_2", "norm2"), ("attn.c_attn", "attn.qkv"), ("attn.c_proj", "attn.proj"),
                 ("mlp.c_fc", "mlp.up"), ("mlp.c_proj", "mlp.down"))
        for i in range(cfg.n_layer):
            names |= {f"h.{i}.{theirs}.{k}": (f"blocks.{i}.{ours}.{k}", None, k == "weight" and not theirs.startswith("ln"))
                      for theirs, ours in pairs for k in kinds}
        return names
    names |= {"model.embed_tokens.weight": ("wte.weight", None, False), "model.norm.weight": ("norm.weight", None, False)}
    rows = {"q": slice(0, C), "k": slice(C, C + kv), "v": slice(C + kv, C + 2 * kv)}  # q, k, v fused into one qkv
    pairs = (("self_attn.o_proj", "attn.proj"), ("mlp.gate_proj", "mlp.gate"), ("mlp.up_proj", "mlp.up"), ("mlp.down_proj", "mlp.down"))
    for i in range(cfg.n_layer):
        p, b = f"model.layers.{i}.", f"blocks.{i}."
        names |= {p + "input_layernorm.weight": (b + "norm1.weight", None, False),
                  p + "post_attention_layernorm.weight": (b + "norm2.weight", None, False)}
        names |= {f"{p}self_attn.{x}_proj.{k}": (f"{b}attn.qkv.{k}", rows[x], False) for x in "qkv" for k in kinds}
        names |= {f"{p}{theirs}.{k}": (f"{b}{ours}.{k}", None, False) for theirs, ours in pairs for k in kinds}
    return names


def read_tensors(path):
    """(name, tensor) of every tensor in a checkpoint folder, one at a time."""
    index, single, pickled = path / "model.safetensors.index.json", path / "model.safetensors", path / "pytorch_model.bin"
    if index.is_file() or single.is_file():
        try:
            from safetensors import safe_open
        except ImportError:
            raise ValueError(f"{path} holds .safetensors weights: pip install safetensors to read them") from None
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [single.name]
        for f in files:
            with safe_open(path / f, framework="pt") as st:
                names = list(st.keys())
            for name in names:  # the file is mapped once per tensor, so only that tensor's pages stay resident
                with safe_open(path / f, framework="pt") as st:
                    t = st.get_tensor(name)
                yield name, t
    elif pickled.is_file():
        try:
            state = torch.load(pickled, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise ValueError(f"cannot read {pickled} as plain tensors ({type(e).__name__}); convert it to safetensors") from None
        yield from state.items()
    else:
        raise ValueError(f"no weights in {path}: expected model.safetensors, model.safetensors.index.json or pytorch_model.bin")


@torch.no_grad()
def load_weights(model, tensors, path, what="config.json"):
    """Copy (name, tensor) pairs in Hugging Face names into model (cast to its dtype, on its device), checking
    names and shapes against what the checkpoint's own config (`what`) implies."""
    cfg, names, params = model.cfg, checkpoint_names(model.cfg), dict(model.named_parameters())
    kind = "gpt2" if cfg.pos == "learned" else "llama"
    missing = set(names)
    for name, t in tensors:
        name = name.removeprefix("transformer.") if kind == "gpt2" else name
        if name not in names:
            if name.endswith((".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")) or name == "lm_head.weight":
                continue  # causal-mask and rope buffers, and the copy of the embedding a tied checkpoint may store
            raise ValueError(f"{path} holds {name}, which is no part of a {kind} model as its {what} describes")
        ours, rows, transposed = names[name]
        dst, t = params[ours] if rows is None else params[ours][rows], t.t() if transposed else t
        if t.shape != dst.shape:
            raise ValueError(f"{name} in {path} has shape {tuple(t.shape)}, but its {what} implies {tuple(dst.shape)}")
        dst.copy_(t)
        missing.discard(name)
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} tensors its {what} implies, e.g. {sorted(missing)[0]}")


# -----------------------------------------------------------------------------
# GGUF files (llama.cpp): one file with the config and tokenizer as metadata and the tensors, often quantized


def gguf_reader(path):
    """The gguf package's reader of a GGUF file (memory-mapped: tensors are read when touched)."""
    try:
        import gguf
    except ImportError:
        raise ValueError(f"{path} is a GGUF file: pip install gguf to read it") from None
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # a truncated or corrupt file fails in many ways inside the reader
        raise ValueError(f"cannot read {path} as a GGUF file ({type(e).__name__}: {str(e)[:80]}); is the file whole?") from None


def field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_config(reader, path):
    """The GPTConfig of a llama-architecture GGUF, from its metadata."""
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; use a llama one (Llama, SmolLM, ...)")
    get = lambda key, default=None: field(reader, f"llama.{key}", default)
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names or get("rope.scaling.type", "none") != "none":
        raise ValueError(f"{path}: scaled rope (Llama-3.1 style rope_freqs) is not read from GGUF; use the Hugging Face folder")
    try:
        n_embd, n_head = get("embedding_length"), get("attention.head_count")
        n_kv = get("attention.head_count_kv") or n_head
        if get("rope.dimension_count", n_embd // n_head) != n_embd // n_head or n_head % n_kv:
            raise ValueError(f"{path}: rope over part of a head, or key/value heads that do not divide the heads, are not supported")
        return sol.GPTConfig(block_size=get("context_length"), vocab_size=get("vocab_size") or len(field(reader, "tokenizer.ggml.tokens")),
                             n_layer=get("block_count"), n_head=n_head, n_embd=n_embd, mlp_hidden=get("feed_forward_length"),
                             rope_theta=float(get("rope.freq_base", 10000.0)), n_kv_head=n_kv,
                             norm_eps=float(get("attention.layer_norm_rms_epsilon")), tie_embeddings="output.weight" not in names)
    except TypeError:  # a missing key reads as None
        raise ValueError(f"{path}: the GGUF metadata lacks a llama.* key the model needs") from None


GGUF_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
              "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
              "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def unpermute(w, n_head):
    """llama.cpp stores each head's query/key rows interleaved (rotary pairs side by side); back to halves."""
    return w.view(n_head, w.size(0) // n_head // 2, 2, -1).transpose(1, 2).reshape(w.shape)


def read_gguf_tensors(reader, cfg, path, dtype):
    """(Hugging Face name, tensor in dtype) of every tensor of a llama GGUF, dequantized one at a time."""
    from gguf.quants import dequantize
    for t in reader.tensors:
        parts = t.name.split(".")  # blk.3.attn_q.weight | token_embd.weight
        layer, base = (f"model.layers.{parts[1]}.", parts[2]) if parts[0] == "blk" else ("", parts[0])
        if base not in GGUF_NAMES:
            raise ValueError(f"{path} holds {t.name}, which is no part of a llama model")
        try:
            w = torch.from_numpy(np.require(dequantize(t.data, t.tensor_type), requirements="W")).to(dtype)  # F32: a copy off the read-only map
        except NotImplementedError:
            raise ValueError(f"{path}: tensor {t.name} is of type {t.tensor_type.name}, which the gguf package cannot dequantize") from None
        except (ValueError, IndexError) as e:  # a tensor that runs past the end of a truncated file
            raise ValueError(f"cannot read tensor {t.name} of {path} ({type(e).__name__}); is the file whole?") from None
        if base in ("attn_q", "attn_k"):
            w = unpermute(w, cfg.n_head if base == "attn_q" else cfg.n_kv_head)
        yield f"{layer}{GGUF_NAMES[base]}.{parts[-1]}", w

# -----------------------------------------------------------------------------
# either kind


def is_gguf(path):
    return Path(path).suffix == ".gguf"


def config(path):
    """The GPTConfig of a checkpoint folder or GGUF file."""
    if is_gguf(path):
        if not Path(path).is_file():
            raise ValueError(f"no GGUF file at {path}")
        return gguf_config(gguf_reader(path), path)
    return hf_config(path)


def load(path, dtype=torch.float32, device="cpu"):
    """A frozen sol.GPT from a checkpoint folder or GGUF file. Built on the meta device, then each tensor is read
    and copied into place: one copy of the weights in memory, in dtype."""
    path = Path(path)
    reader = gguf_reader(path) if is_gguf(path) else None
    cfg = gguf_config(reader, path) if reader else hf_config(path)
    with torch.device("meta"):
        model = sol.GPT(cfg)
    model = model.to(dtype).to_empty(device=device)
    if cfg.tie_embeddings:
        model.wte.weight = model.lm_head.weight
    if cfg.pos == "rope":  # buffers are not in checkpoints: compute them (in float32, then cast, as Llama)
        tables = sol.rope_tables(cfg.block_size, cfg.n_embd // cfg.n_head, cfg.rope_theta, cfg.rope_scaling)
        model.cos, model.sin = (t.to(device, dtype) for t in tables)
    if reader:  # dequantized straight into dtype: a float32 copy of the largest tensor at most, never of the model
        load_weights(model, read_gguf_tensors(reader, cfg, path, dtype), path, "GGUF metadata")
    else:
        load_weights(model, read_tensors(path), path)
    return model.eval().requires_grad_(False)


def digest(path):
    """sha1 of a GGUF file, or of a folder's config.json and weight files: which checkpoint a run was trained on."""
    path = Path(path)
    if is_gguf(path):
        with open(path, "rb") as fh:
            return hashlib.file_digest(fh, "sha1").hexdigest()
    h = hashlib.sha1()
    for f in sorted(f for f in path.iterdir() if f.name == "config.json" or f.suffix in (".safetensors", ".bin")):
        with open(f, "rb") as fh:
            h.update(f.name.encode() + hashlib.file_digest(fh, "sha1").digest())
    return h.hexdigest()

# -----------------------------------------------------------------------------
# byte-level BPE tokenizers as tiktoken Encodings: the merges give the ranks, the pre-tokenizer's split a regex

GPT2_PAT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# StarCoder/SmolLM split every digit off first, then GPT-2's split runs on the rest: as one regex, the digit goes
# first, and a whitespace run before a digit ends there as it would at the end of a piece
DIGITS_PAT = r"\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"
LLAMA3_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
             r"\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) and the split each stands for
GGUF_PATTERNS = {"default": GPT2_PAT, "gpt2": GPT2_PAT, "smollm": DIGITS_PAT, "starcoder": DIGITS_PAT, "refact": DIGITS_PAT,
                 "llama-bpe": LLAMA3_PAT, "llama3": LLAMA3_PAT, "qwen2": QWEN2_PAT, "deepseek-r1-qwen": QWEN2_PAT}
# Llama-3's 256 special tokens, numbered after the BPE ranks (Meta's tokenizer.py)
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
                  "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
                  "<|eot_id|>", "<|python_tag|>"] + [f"<|reserved_special_token_{i}|>" for i in range(2, 247)]


def byte_alphabet():
    """GPT-2's printable stand-in for each byte, as byte-level BPE vocabularies spell their tokens: {char: byte}."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    return {chr(b): b for b in keep} | {chr(256 + i): b for i, b in enumerate(moved)}


def bpe_encoding(name, vocab, merges, pat, special):
    """A tiktoken Encoding of a byte-level BPE. vocab {spelled token: id}, merges [(left, right)] in priority order,
    special {text: id}. tiktoken merges the adjacent pair whose result has the lowest rank and emits ranks as ids, so
    the ids of the merge results must rise in merge order; single bytes may have any id."""
    alphabet = byte_alphabet()
    spell = lambda token: bytes(alphabet[c] for c in token)
    ranks, last = {}, -1
    for left, right in merges:
        token = left + right
        if token not in vocab or vocab[token] <= last:
            raise ValueError(f"tokenizer {name}: merge {left!r} {right!r} gives "
                             + ("no token of the vocabulary" if token not in vocab else "a token out of id order")
                             + ", which a tiktoken BPE cannot express")
        ranks[spell(token)] = last = vocab[token]
    for char, b in alphabet.items():  # bytes a vocabulary lacks get ids past its end: prepare_text refuses them
        ranks.setdefault(bytes([b]), vocab.get(char, len(vocab) + len(special) + b))
    return tiktoken.Encoding(name=name, pat_str=pat, mergeable_ranks=ranks, special_tokens=special)


def gguf_encoding(path):
    """The byte-level BPE of a GGUF file's metadata (tokenizer.ggml.model "gpt2")."""
    reader = gguf_reader(path)
    kind, pre = field(reader, "tokenizer.ggml.model"), field(reader, "tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise ValueError(f"{path}: its tokenizer is {kind!r}, not a byte-level BPE (\"gpt2\"); only those are supported")
    if pre not in GGUF_PATTERNS:
        raise ValueError(f"{path}: pre-tokenizer {pre!r} is not known here; known: {', '.join(GGUF_PATTERNS)}")
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    special = {t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind in (3, 4)}  # control, user-defined
    vocab = {t: i for i, t in enumerate(tokens) if t not in special}
    merges = [tuple(m.split(" ")) for m in field(reader, "tokenizer.ggml.merges")]
    return bpe_encoding(f"{Path(path).stem}", vocab, merges, GGUF_PATTERNS[pre], special)


def json_pattern(pre, path):
    """The split regex of a tokenizer.json pre_tokenizer: ByteLevel's own (GPT-2), Split(regex) then ByteLevel
    (Llama-3, Qwen2), or Digits then ByteLevel (SmolLM, StarCoder)."""
    steps = pre.get("pretokenizers", [pre]) if pre else []
    kinds = [s["type"] for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
        return GPT2_PAT
    if kinds == ["Split", "ByteLevel"] and "Regex" in steps[0]["pattern"] and not steps[1].get("use_regex", True):
        return steps[0]["pattern"]["Regex"]
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return DIGITS_PAT
    raise ValueError(f"{path}: pre-tokenizer {' + '.join(kinds) or 'none'} is not a byte-level split this code knows "
                     "(ByteLevel; Split then ByteLevel; Digits then ByteLevel)")


def json_encoding(path):
    """The byte-level BPE of a Hugging Face tokenizer.json (GPT-2, SmolLM/SmolLM2, Qwen2, Llama-3)."""
    tok = json.loads(Path(path).read_text(encoding="utf-8"))
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or (tok.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError(f"{path} is not a byte-level BPE tokenizer (sentencepiece and unigram ones are not supported)")
    if (tok.get("normalizer") or {}).get("type", "NFC") != "NFC":  # Qwen2 normalizes to NFC, which most text already is
        raise ValueError(f"{path}: normalizer {tok['normalizer']['type']} is not supported")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    special = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    vocab = {t: i for t, i in model["vocab"].items() if t not in special}
    return bpe_encoding(Path(path).parent.name, vocab, merges, json_pattern(tok.get("pre_tokenizer"), path), special)


def llama3_encoding(path):
    """A Llama-3 tokenizer.model: a tiktoken BPE file (base64 token and rank per line)."""
    try:
        ranks = {base64.b64decode(token, validate=True): int(rank)
                 for token, rank in (line.split() for line in Path(path).read_bytes().splitlines() if line)}
    except ValueError as e:  # binascii.Error is one
        raise ValueError(f"cannot read the tokenizer {path} ({type(e).__name__}): Llama-3's tokenizer.model is a tiktoken "
                         "BPE file, a base64 token and its rank per line; sentencepiece ones (Llama-2) are not supported") from None
    return tiktoken.Encoding(name="llama3", pat_str=LLAMA3_PAT, mergeable_ranks=ranks,
                             special_tokens={t: len(ranks) + i for i, t in enumerate(LLAMA3_SPECIAL)})


def tokenizer_file(checkpoint):
    """Where a checkpoint's tokenizer lives: the GGUF file itself, or a folder's tokenizer.json, else Llama-3's
    tokenizer.model there or in original/ (as Meta's repositories hold it); None for a gpt2 folder (GPT-2's BPE)."""
    ckpt = Path(checkpoint)
    if is_gguf(ckpt):
        return ckpt
    if json.loads((ckpt / "config.json").read_text()).get("model_type") == "gpt2":
        return None
    for path in (ckpt / "tokenizer.json", ckpt / "tokenizer.model", ckpt / "original" / "tokenizer.model"):
        if path.is_file():
            return path
    raise ValueError(f"no tokenizer in {ckpt}: expected tokenizer.json, or Llama-3's tokenizer.model there or in original/")


def encoding(checkpoint):
    """The tiktoken Encoding of a GGUF file or checkpoint folder; None for a gpt2 folder (GPT-2's BPE)."""
    path = tokenizer_file(checkpoint)
    if path is None:
        return None
    return gguf_encoding(path) if is_gguf(path) else json_encoding(path) if path.suffix == ".json" else llama3_encoding(path)
