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
    is tokenized with the checkpoint's tokenizer if given (a folder or GGUF file), else with GPT-2's BPE. Several text
    files, comma-separated, are one dataset (load_texts)."""
    if "," in name:
        return load_texts(name, checkpoint)
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


def load_texts(names, checkpoint):
    """Several text files as one dataset: each is split 90/5/5 and tokenized on its own (so each keeps its own test
    split, to evaluate on alone), and a split is the list of the texts' token arrays; data_dir and meta are the first's."""
    parts = [load_dataset(n, checkpoint) for n in names.split(",")]
    if any(p[1]["vocab_size"] != parts[0][1]["vocab_size"] or p[1]["tokenizer"] != parts[0][1]["tokenizer"] for p in parts):
        raise UsageError(f"the texts of --dataset={names} were tokenized differently; give texts of one tokenizer")
    return parts[0][0], parts[0][1], {s: [p[2][s] for p in parts] for s in ("train", "val", "test")}


def texts(data):
    """A split as a list of token arrays: the list of a dataset of several texts, or [the one array]."""
    return data if isinstance(data, list) else [data]


def n_tokens(data):
    return sum(len(d) for d in texts(data))


def windows(data, starts, length):
    """Windows of `length` tokens (n, length) at starts, numbered over every start a split has: one array's, or over
    a list of arrays (several texts) the first text's starts, then the second's, ...: a window never spans two texts."""
    first = np.cumsum([0] + [len(d) - length + 1 for d in texts(data)])  # the number of each text's first start
    which = np.searchsorted(first, starts, side="right") - 1
    return torch.from_numpy(np.stack([texts(data)[k][s - first[k]:s - first[k] + length].astype(np.int64) for k, s in zip(which, starts)]))


def n_starts(data, length):
    return sum(len(d) - length + 1 for d in texts(data))


def episodes(data, n, length):
    """n evenly spaced windows of `length` tokens (fixed held-out episodes)."""
    return windows(data, np.linspace(0, n_starts(data, length) - 1, n).astype(np.int64), length)


def random_windows(data, n, length, rng):
    """n windows of `length` tokens at random places (training sequences); of several texts, each in proportion to its length."""
    return windows(data, rng.integers(0, n_starts(data, length), n), length)
