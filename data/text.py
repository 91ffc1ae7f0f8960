"""
Real text with the GPT-2 BPE, or a pretrained checkpoint's tokenizer (pretrained.encoding): split a UTF-8 file
90/5/5 (contiguous, by characters) into train/val/test, tokenize with tiktoken, write .bin files and meta.json.
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


def prepare_text(text_path, out_dir, enc=None):
    """Tokenize text_path into out_dir/{train,val,test}.bin and write meta.json (last); with GPT-2's BPE, or the
    tiktoken Encoding of a pretrained checkpoint (pretrained.encoding)."""
    text = read_text(text_path)
    n = len(text)
    cuts = {"train": [0, int(0.9 * n)], "val": [int(0.9 * n), int(0.95 * n)], "test": [int(0.95 * n), n]}
    checkpoint, enc = enc is not None, enc or gpt2_encoding()
    dtype = np.uint16 if enc.n_vocab <= 2 ** 16 else np.uint32  # Llama-3's 128k tokens need 32 bits
    splits = {split: enc.encode_ordinary(text[a:b]) for split, (a, b) in cuts.items()}
    if not all(splits.values()):
        raise ValueError(f"{text_path} is too short to split 90/5/5 ({n} characters); use a longer file")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, ids in splits.items():
        write(out_dir / f"{split}.bin", np.array(ids, dtype=dtype).tobytes())
    meta = {"vocab_size": enc.n_vocab if checkpoint else 50304, "tokenizer": "checkpoint" if checkpoint else "gpt2",  # GPT-2's 50257 padded
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
    if kind == "checkpoint":
        raise ValueError(f"{data_dir} was tokenized with a pretrained checkpoint's tokenizer: pretrained.encoding(checkpoint) gives it")
    raise ValueError(f"unknown tokenizer {kind!r} in {meta_path}; expected 'synth', 'gpt2' or 'checkpoint'")
