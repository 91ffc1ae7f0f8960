"""
Real text with the GPT-2 BPE: split a UTF-8 file 90/5/5 (contiguous, by characters) into
train/val/test, tokenize with tiktoken, write uint16 .bin files and meta.json (nanoGPT style).
Offline, tiktoken needs its cached BPE file: set TIKTOKEN_CACHE_DIR to a folder holding r50k_base.
"""
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


def prepare_text(text_path, out_dir):
    """Tokenize text_path into out_dir/{train,val,test}.bin and write meta.json (last)."""
    text = read_text(text_path)
    n = len(text)
    cuts = {"train": [0, int(0.9 * n)], "val": [int(0.9 * n), int(0.95 * n)], "test": [int(0.95 * n), n]}
    enc = gpt2_encoding()
    splits = {split: enc.encode_ordinary(text[a:b]) for split, (a, b) in cuts.items()}
    if not all(splits.values()):
        raise ValueError(f"{text_path} is too short to split 90/5/5 ({n} characters); use a longer file")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, ids in splits.items():
        write(out_dir / f"{split}.bin", np.array(ids, dtype=np.uint16).tobytes())
    meta = {"vocab_size": 50304, "tokenizer": "gpt2", "encoding": enc.name,  # 50257 padded to 64s
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
    raise ValueError(f"unknown tokenizer {kind!r} in {meta_path}; expected 'synth' or 'gpt2'")
