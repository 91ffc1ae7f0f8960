"""
The datasets as token files, prepared on first use, and the windows of tokens that become episodes.
"""
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from cli import UsageError

ROOT = Path(__file__).resolve().parents[1]


def load_dataset(name, checkpoint=None):
    """Token splits of a dataset, prepared on first use: returns (data_dir, meta, {split: token memmap}). A text file
    is tokenized with the checkpoint's tokenizer if given (a folder or GGUF file), else with GPT-2's BPE."""
    text = name.endswith(".txt") or os.path.sep in name
    if checkpoint is not None and not text:
        raise UsageError(f"--init_from needs a text dataset (--dataset=path/to/file.txt) to tokenize with the checkpoint's "
                         f"tokenizer; {name} comes tokenized for the small model")
    if name == "synth":
        from data.synth.prepare import VERSION, prepare
        data_dir = ROOT / "data" / "synth"
        meta = data_dir / "meta.json"
        if not meta.exists() or json.loads(meta.read_text()).get("version") != VERSION:  # missing, or made by older code
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
        import pretrained
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
    """n windows of `length` tokens at random places (training sequences)."""
    starts = rng.integers(0, len(data) - length + 1, n)
    return torch.from_numpy(np.stack([data[s:s + length].astype(np.int64) for s in starts]))
