"""
Real text with the GPT-2 BPE, or a pretrained checkpoint's tokenizer: split a UTF-8 file 90/5/5 (contiguous,
by characters) into train/val/test, tokenize with tiktoken, write .bin files and meta.json (nanoGPT style).
Offline, tiktoken needs its cached BPE file: set TIKTOKEN_CACHE_DIR to a folder holding r50k_base.
"""
import base64
import json
from pathlib import Path

import numpy as np
import tiktoken

from data.synth.prepare import load_tokenizer as load_synth_tokenizer, write


def gpt2_encoding():
    """The GPT-2 BPE; r50k_base has the same tokens and is the one an offline cache may hold."""
    errors = []
    for name in ("gpt2", "r50k_base"):
        try:
            return tiktoken.get_encoding(name)
        except Exception as e:  # offline without a cache tiktoken raises a requests error
            errors.append(f"{name}: {type(e).__name__}")
    raise ValueError("cannot load the GPT-2 BPE (tiktoken needs to download it once, or point "
                       "TIKTOKEN_CACHE_DIR at a folder holding r50k_base); tried " + ", ".join(errors))


# Llama-3's pre-tokenizer split and its 256 special tokens, numbered after the BPE ranks (Meta's tokenizer.py)
LLAMA3_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
                  "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
                  "<|eot_id|>", "<|python_tag|>"] + [f"<|reserved_special_token_{i}|>" for i in range(2, 247)]


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
    """The Llama-3 tokenizer.model of a checkpoint folder (there or in original/, as Meta's repositories hold it);
    None for a gpt2 checkpoint, whose BPE tiktoken has."""
    ckpt = Path(checkpoint)
    if json.loads((ckpt / "config.json").read_text()).get("model_type") == "gpt2":
        return None
    for path in (ckpt / "tokenizer.model", ckpt / "original" / "tokenizer.model"):
        if path.is_file():
            return path
    raise ValueError(f"no tokenizer in {ckpt}: expected Llama-3's tokenizer.model (a tiktoken BPE file) there or in original/")


def read_text(text_path):
    path = Path(text_path)
    if not path.is_file():
        raise FileNotFoundError(f"no text file at {path}; pass the path of an existing UTF-8 text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (bad byte at offset {e.start}); "
                         "convert it to UTF-8 or pass another file") from None
    if not text.strip():
        raise ValueError(f"{path} is empty; pass a file with some text in it")
    return text


def prepare_text(text_path, out_dir, tokenizer=None):
    """Tokenize text_path into out_dir/{train,val,test}.bin and write meta.json (last); with GPT-2's BPE, or the
    Llama-3 tokenizer.model file given, which is copied next to the tokens."""
    text = read_text(text_path)
    n = len(text)
    cuts = {"train": [0, int(0.9 * n)], "val": [int(0.9 * n), int(0.95 * n)], "test": [int(0.95 * n), n]}
    enc = gpt2_encoding() if tokenizer is None else llama3_encoding(tokenizer)
    dtype = np.uint16 if enc.n_vocab <= 2 ** 16 else np.uint32  # Llama-3's 128k tokens need 32 bits
    splits = {split: enc.encode_ordinary(text[a:b]) for split, (a, b) in cuts.items()}
    if not all(splits.values()):
        raise ValueError(f"{text_path} is too short to split 90/5/5 ({n} characters); use a longer file")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, ids in splits.items():
        write(out_dir / f"{split}.bin", np.array(ids, dtype=dtype).tobytes())
    if tokenizer is not None:
        write(out_dir / "tokenizer.model", Path(tokenizer).read_bytes())
    meta = {"vocab_size": 50304 if tokenizer is None else enc.n_vocab, "tokenizer": "gpt2" if tokenizer is None else "llama3",  # GPT-2's 50257 padded
            "encoding": enc.name, "dtype": np.dtype(dtype).name,
            "source": str(Path(text_path).resolve()), "n_tokens": {s: len(ids) for s, ids in splits.items()},
            "char_splits": cuts}
    write(out_dir / "meta.json", json.dumps(meta, indent=1).encode())
    return meta


def load_tokenizer(data_dir):
    """The tiktoken.Encoding that made the .bin files in data_dir, as named in its meta.json."""
    meta_path = Path(data_dir) / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"no meta.json in {data_dir}; run the data preparation first")
    kind = json.loads(meta_path.read_text())["tokenizer"]
    if kind == "synth":
        return load_synth_tokenizer(data_dir)
    if kind == "gpt2":
        return gpt2_encoding()
    if kind == "llama3":
        return llama3_encoding(Path(data_dir) / "tokenizer.model")
    raise ValueError(f"unknown tokenizer {kind!r} in {meta_path}; expected 'synth', 'gpt2' or 'llama3'")
