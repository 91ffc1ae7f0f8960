import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from data.synth.prepare import CATEGORIES, COPY, NOISE, PIECES, RECALL, load_tokenizer as load_synth, prepare, skills  # noqa: E402
from data.text import load_tokenizer, prepare_text  # noqa: E402

SHARED = ROOT.parent / "shared"
SIZES = dict(n_train=20_000, n_val=3_000, n_test=3_000)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    return out, prepare(out, seed=7, **SIZES)


def files(d):
    return {p.name: p.read_bytes() for p in sorted(Path(d).iterdir())}


def scenes(d, split):
    """(ids, skill flags) per scene of a split; scenes end with the newline token."""
    ids = np.fromfile(d / f"{split}.bin", dtype=np.uint16)
    flags = np.fromfile(d / f"{split}_skill.bin", dtype=np.uint8)
    assert len(ids) == len(flags)
    ends = np.flatnonzero(ids == load_synth(d).encode_single_token("\n")) + 1
    assert ends[-1] == len(ids)
    return list(zip(np.split(ids, ends[:-1]), np.split(flags, ends[:-1])))


def test_synth_deterministic(synth, tmp_path):
    out, meta = synth
    prepare(tmp_path / "a", seed=7, **SIZES)
    prepare(tmp_path / "b", seed=8, **SIZES)
    assert files(tmp_path / "a") == files(out)
    other = files(tmp_path / "b")
    assert other["train.bin"] != files(out)["train.bin"]
    assert other["synth.tiktoken"] == files(out)["synth.tiktoken"]  # tokenizer depends on words only
    assert not any(name.endswith(".tmp") for name in files(out))


def test_synth_meta_and_splits(synth):
    out, meta = synth
    assert json.loads((out / "meta.json").read_text()) == meta
    assert meta["tokenizer"] == "synth" and meta["seed"] == 7
    assert meta["vocab_size"] % 64 == 0 and meta["vocab_size"] >= load_synth(out).n_vocab
    splits = {s: (out / f"{s}.bin").read_bytes() for s in ("train", "val", "test")}
    for s, n in meta["n_tokens"].items():
        assert len(splits[s]) == 2 * n and n >= SIZES[f"n_{s}"]
    assert splits["val"][:400] != splits["test"][:400]  # different streams


def test_synth_tokenizer(synth):
    out, _ = synth
    enc = load_synth(out)
    assert all(len(enc.encode_ordinary(p)) == 1 for p in PIECES)
    text = "hello WORLD 123 ünïcode\n\t  tabs 🙂 facts : zorb is blue ."
    assert enc.decode(enc.encode_ordinary(text)) == text
    ids = np.fromfile(out / "val.bin", dtype=np.uint16)
    assert enc.encode_ordinary(enc.decode(ids.tolist())) == ids.tolist()
    assert load_tokenizer(out).encode_ordinary(text) == enc.encode_ordinary(text)  # dispatch


def test_synth_scenes_and_recall(synth):
    out, _ = synth
    enc = load_synth(out)
    n_answers = n_copies = n_tokens = 0
    for ids, flags in scenes(out, "train"):
        assert len(ids) < 120
        words = [enc.decode([t]).strip() for t in ids]
        assert words[0] == "facts"
        head = words[:words.index("ask")]  # the fact list comes before the first question
        facts = {head[i - 1]: (head[i], i) for i in range(3, len(head)) if head[i + 1:i + 2] == ["."] and head[i - 2] in (":", ".")}
        for i in np.flatnonzero(flags == RECALL):
            assert words[i - 2] == "ask"
            value, at = facts[words[i - 1]]  # the asked name was stated in this scene's facts
            assert words[i] == value and i - at > 8
            assert value not in words[i - 8:i]  # not answerable from local context
        asks = [i + 2 for i in range(len(words)) if words[i] == "ask"]
        assert asks == list(np.flatnonzero(flags == RECALL))
        copies = []  # "say w1 .. wk again w1 .. wk .": the second w1 .. wk
        for i in (i for i, w in enumerate(words) if w == "again"):
            said = words[words[:i].index("say", max(0, i - 7)) + 1:i]
            assert words[i + 1:i + 1 + len(said)] == said and words[i + 1 + len(said)] == "." and set(said) <= set(NOISE)
            copies += range(i + 1, i + 1 + len(said))
        assert copies == list(np.flatnonzero(flags == COPY)) and set(flags) <= {0, RECALL, COPY}
        n_answers += len(asks)
        n_copies += len(copies)
        n_tokens += len(ids)
    assert 1 / 10 < n_answers / n_tokens < 1 / 6
    assert 1 / 25 < n_copies / n_tokens < 1 / 10


def test_synth_chance_and_skills(synth):
    out, meta = synth
    # a recall answer guessed among its category's values, by hand from the scenes; a copy among the noise words
    enc, logs = load_synth(out), []
    values = {c: len(v) for c, v in CATEGORIES.items()}
    for ids, flags in scenes(out, "val"):
        logs += [np.log(values[enc.decode([ids[i - 1]]).strip()]) for i in np.flatnonzero(flags == RECALL)]
    assert meta["chance"]["val"]["recall"] == pytest.approx(np.mean(logs))
    assert meta["chance"]["val"]["copy"] == pytest.approx(np.log(len(NOISE))) == pytest.approx(2.7726, abs=1e-4)
    # skills(): the mean over each skill's tokens, formed at half of chance or below
    nll = np.array([[0.1, 2.0, 0.3, 9.0], [1.0, 1.5, 0.5, 9.0]])
    flags = np.array([[RECALL, COPY, RECALL, 0], [RECALL, COPY, 0, 0]])
    got = skills(torch.tensor(nll), torch.tensor(flags), {"recall": 2.0, "copy": 2.8})
    assert got["recall"]["loss"] == pytest.approx((0.1 + 0.3 + 1.0) / 3) and got["recall"]["formed"]
    assert got["copy"]["loss"] == pytest.approx(1.75) and not got["copy"]["formed"]  # 1.75 > 2.8 / 2


@pytest.fixture
def gpt2_env(monkeypatch):
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken"))


def test_text_prepare(gpt2_env, tmp_path):
    src = SHARED / "text" / "tinyshakespeare.txt"
    meta = prepare_text(src, tmp_path)
    text = src.read_text(encoding="utf-8")
    assert json.loads((tmp_path / "meta.json").read_text()) == meta
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50304
    enc = load_tokenizer(tmp_path)
    assert enc.n_vocab == 50257
    for split, (a, b) in meta["char_splits"].items():
        ids = np.fromfile(tmp_path / f"{split}.bin", dtype=np.uint16)
        assert len(ids) == meta["n_tokens"][split] > 0
        if split == "val":
            assert enc.decode(ids.tolist()) == text[a:b]
    n = len(text)
    assert meta["char_splits"]["val"] == [int(0.9 * n), int(0.95 * n)]
    assert meta["n_tokens"]["train"] > 15 * meta["n_tokens"]["val"]


@pytest.mark.parametrize("content, error, words", [
    (None, FileNotFoundError, "no text file"),
    (b" \n", ValueError, "is empty"),
    ("caf\xe9 au lait".encode("latin-1"), ValueError, "not UTF-8"),
])
def test_text_errors(tmp_path, content, error, words):
    src = tmp_path / "input.txt"
    if content is not None:
        src.write_bytes(content)
    with pytest.raises(error, match=words):
        prepare_text(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_text_too_short(gpt2_env, tmp_path):
    (tmp_path / "input.txt").write_text("tiny")
    with pytest.raises(ValueError, match="too short"):
        prepare_text(tmp_path / "input.txt", tmp_path / "out")


def test_text_no_bpe_offline(tmp_path):
    """The script, offline with no BPE cache, exits 2 with one clear line (fresh process: tiktoken
    keeps loaded encodings in memory)."""
    (tmp_path / "input.txt").write_text("some text " * 100)
    env = {k: v for k, v in os.environ.items() if k.lower() != "no_proxy"}
    env.update(TIKTOKEN_CACHE_DIR=str(tmp_path / "empty-cache"),
               HTTPS_PROXY="http://127.0.0.1:9")  # a closed port: no download possible
    script = ROOT / "data" / "shakespeare" / "prepare.py"
    r = subprocess.run([sys.executable, script, "--input", tmp_path / "input.txt"],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.startswith("error: cannot load the GPT-2 BPE") and r.stderr.count("\n") == 1


# several texts as one dataset: windows never span two texts


def test_windows_of_one_text_unchanged():
    """One array: the same windows as before several texts were allowed (evenly spaced starts, uniform random starts)."""
    from data import episodes, random_windows
    data = np.arange(1000, dtype=np.uint16)
    starts = np.linspace(0, 1000 - 10, 7).astype(np.int64)  # by hand: 0, 165, 330, ..., 990
    assert episodes(data, 7, 10).tolist() == [list(range(s, s + 10)) for s in starts]
    drawn = np.random.default_rng(3).integers(0, 1000 - 10 + 1, 5)
    assert random_windows(data, 5, 10, np.random.default_rng(3)).tolist() == [list(range(s, s + 10)) for s in drawn]


def test_windows_of_several_texts_stay_inside_one():
    from data import episodes, n_tokens, random_windows
    a, b = np.arange(0, 100, dtype=np.uint16), np.arange(1000, 1300, dtype=np.uint16)  # 91 and 291 starts of length 10
    both = [a, b]
    assert n_tokens(both) == 400
    for w in (episodes(both, 50, 10), random_windows(both, 4000, 10, np.random.default_rng(0))):
        assert ((w[:, 1:] - w[:, :-1]) == 1).all()  # consecutive tokens of one text: no window spans the boundary
        assert ((w < 100) | (w >= 1000)).all()
    ep = episodes(both, 2, 10)  # the first and the last start over both texts
    assert ep[0].tolist() == list(range(10)) and ep[1].tolist() == list(range(1290, 1300))
    share_a = (random_windows(both, 4000, 10, np.random.default_rng(0))[:, 0] < 100).float().mean().item()
    assert abs(share_a - 91 / 382) < 0.03  # each text in proportion to its starts (0.238)


def test_dataset_of_several_texts(gpt2_env, tmp_path, monkeypatch):
    """--dataset=a.txt,b.txt: each text split and tokenized on its own; the splits are lists, the first's meta."""
    import data
    monkeypatch.setattr(data, "ROOT", tmp_path)  # the token cache goes under tmp_path/data/cache
    words = "the quick brown fox jumps over the lazy dog and runs far away from here . "
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(words * 200), b.write_text(words.upper() * 300)
    _, meta_a, alone = data.load_dataset(str(a))
    _, meta, splits = data.load_dataset(f"{a},{b}")
    assert meta == meta_a
    for s in ("train", "val", "test"):
        assert isinstance(splits[s], list) and len(splits[s]) == 2
        assert np.array_equal(splits[s][0], alone[s])
        assert data.n_tokens(splits[s]) == len(splits[s][0]) + len(splits[s][1])
    assert json.loads(next((tmp_path / "data" / "cache").glob("b-*/meta.json")).read_text())["source"] == str(b.resolve())
