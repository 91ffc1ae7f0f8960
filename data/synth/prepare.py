"""
Built-in synthetic corpus: short "scenes" whose tokens differ in how much context they need.

    facts : color blue . name zorb . food rice . tree oak .
    count five six seven eight . ask name zorb . pick fox . say owl cat yak again owl cat yak . ...

- count runs, fixed phrases and `beat` patterns are predictable from the last few tokens;
- the word after `pick` is uniformly random (irreducible: compute can't help);
- a repeated phrase (`say ... again ...`) is predictable by copying from a few tokens back;
- the answer after `ask <category>` is only predictable by looking back at the fact list (far
  context).
The *_skill.bin files flag every token by the skill that predicts it: RECALL for the answers, COPY for the
repeats, 0 for the rest; a base GPT that has not learned both is a weaker base (train.py reports them).
Every word (with its leading space) is one token of a tiny byte-level BPE trained right here,
saved in tiktoken's file format, so nothing is downloaded.

    python data/synth/prepare.py    # writes train/val/test .bin, *_skill.bin, meta.json
"""
import base64
import hashlib
import json
import math
import os
import random
import time
from collections import Counter
from pathlib import Path

import numpy as np
import tiktoken

CATEGORIES = {  # a scene states one value per category; asking a category recalls it
    "name": ("zorb mip kel tov dax fen gub hask jol krin lum nax pim quor rask sib tuv vel wub yad "
             "zek bryn clo drun fip glim hov ith jub kav lorp mek nib oog prax quib rilt sav tam").split(),
    "color": "red blue green gold black white pink grey brown orange purple silver".split(),
    "thing": "cup key lamp box coin ring rope bell drum hat shoe kite".split(),
    "food": "apple bread cheese rice soup cake pie plum".split(),
    "tree": "oak elm ash pine fir yew".split(),
    "place": "hill lake cave farm town shore".split(),
}
NOISE = "fox owl cat dog elk bat ant bee yak cow hen pig rat eel ram emu".split()
NUMBERS = ("one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
           "fifteen sixteen seventeen eighteen nineteen twenty").split()
BEATS = "ta ka do re mi la".split()
PHRASES = [p.split() for p in ("the sun rises in the east", "we go up and then we come down",
           "all good things come to an end", "slow and steady wins the race",
           "look before you leap", "time and tide wait for no man")]
KEYWORDS = "facts : . ask count pick beat say again".split()
WORDS = sorted(set(list(CATEGORIES) + sum(CATEGORIES.values(), []) + NOISE + NUMBERS + BEATS + KEYWORDS + sum(PHRASES, [])))
PIECES = ["facts", "\n"] + [" " + w for w in WORDS]  # a scene starts a line: "facts" has no space
PAT_STR = r""" ?[^\s]+|\s+"""
MAX_SCENE = 120  # tokens; a scene must fit in a 128-token context
RECALL, COPY = 1, 2  # the skill flags of the *_skill.bin files
VERSION = 3  # of the corpus, in meta.json: a folder prepared by another version is prepared again


def scene(rng):
    """One scene as a list of words (newline last), the indices of its recall answers and of its copies."""
    cats = rng.sample(sorted(CATEGORIES), rng.randint(4, 6))
    facts = [(c, rng.choice(CATEGORIES[c])) for c in cats]
    head = ["facts", ":"] + [w for name, value in facts for w in (name, value, ".")]
    recalls = [f for f in facts for _ in range(rng.randint(2, 3))]  # each fact 2-3 times
    items = [["ask", cat, value, "."] for cat, value in recalls]  # the answer follows the category, as in the facts
    length, target = len(head) + 4 * len(items) + 1, rng.randint(80, 110)
    while length < target or len(items) < len(recalls) + 2:
        kind = min(rng.randrange(6), 4)  # repeats twice as often: they teach the copying that recall needs
        if kind == 0:
            k = rng.randint(4, 7)
            a = rng.randrange(len(NUMBERS) - k + 1)
            item = ["count"] + NUMBERS[a:a + k] + ["."]
        elif kind == 1:
            item = rng.choice(PHRASES) + ["."]
        elif kind == 2:
            item = ["beat"] + rng.sample(BEATS, 2) * rng.randint(2, 3) + ["."]
        elif kind == 3:
            item = ["pick", rng.choice(NOISE), "."]
        else:  # a random phrase said twice: the repeat is predictable by copying from a few tokens back
            said = rng.sample(NOISE, rng.randint(3, 6))
            item = ["say"] + said + ["again"] + said + ["."]
        if length + len(item) >= MAX_SCENE:
            break
        items.append(item)
        length += len(item)
    while True:  # reshuffle until no answer is among the 8 tokens before it (needs far context)
        rng.shuffle(items)
        words = head + sum(items, []) + ["\n"]
        answers = [i for i in range(2, len(words)) if words[i - 2] == "ask"]
        if all(words[i] not in words[i - 8:i] for i in answers):
            again = [i for i, w in enumerate(words) if w == "again"]
            return words, answers, [j for i in again for j in range(i + 1, words.index(".", i))]


def generate(n_tokens, seed, enc):
    """Whole scenes until at least n_tokens: token ids (uint16) and skill flags (uint8: RECALL, COPY or 0)."""
    rng, scenes, flags, total = random.Random(seed), [], [], 0
    while total < n_tokens:
        words, answers, copies = scene(rng)
        scenes.append("".join(w if i == 0 or w == "\n" else " " + w for i, w in enumerate(words)))
        f = np.zeros(len(words), dtype=np.uint8)
        f[answers], f[copies] = RECALL, COPY
        flags.append(f)
        total += len(words)
    ids = np.concatenate([np.array(t, dtype=np.uint16) for t in enc.encode_ordinary_batch(scenes)])
    flags = np.concatenate(flags)
    assert len(ids) == len(flags) == total, "a corpus word did not encode to exactly one token"
    return ids, flags


def multiple_choice(n, seed):
    """n questions whose answer needs far context: a scene cut just before the answer of a category's
    first `ask`, the right value and three others of the same category as choices."""
    rng, out = random.Random(seed), []
    while len(out) < n:
        words, answers, _ = scene(rng)
        firsts = [i for i in answers if words[i - 1] not in [words[j - 1] for j in answers if j < i]]
        i = rng.choice(firsts)
        cat, value = words[i - 1], words[i]
        choices = [value] + rng.sample([v for v in CATEGORIES[cat] if v != value], 3)
        rng.shuffle(choices)
        question = "".join(w if k == 0 else " " + w for k, w in enumerate(words[:i]))
        out.append({"question": question, "choices": [" " + c for c in choices], "answer": choices.index(value)})
    return out


def train_bpe(counts):
    """Byte-level BPE over {piece: count}: merge the most frequent pair until each piece is one token."""
    ranks = {bytes([b]): b for b in range(256)}  # all bytes, so any text still encodes
    parts = {p: [bytes([b]) for b in p.encode()] for p in counts}
    while True:
        pairs = Counter()
        for p, toks in parts.items():
            for pair in zip(toks, toks[1:]):
                pairs[pair] += counts[p]
        if not pairs:
            return ranks
        best = max(pairs, key=lambda q: (pairs[q], q))  # ties broken by the bytes: deterministic
        ranks.setdefault(best[0] + best[1], len(ranks))
        for toks in parts.values():
            i = 0
            while i < len(toks) - 1:
                if (toks[i], toks[i + 1]) == best:
                    toks[i:i + 2] = [best[0] + best[1]]
                i += 1


def make_encoding(ranks, pat_str=PAT_STR):
    return tiktoken.Encoding(name="synth", pat_str=pat_str, mergeable_ranks=ranks, special_tokens={})


def load_tokenizer(data_dir):
    """The synth tiktoken.Encoding saved by prepare() in data_dir."""
    data_dir = Path(data_dir)
    meta = json.loads((data_dir / "meta.json").read_text())
    ranks = {}
    for line in (data_dir / "synth.tiktoken").read_text().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return make_encoding(ranks, meta["pat_str"])


def write(path, data):
    """Write to a temp name then rename, so a half-written file never looks complete."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def chance(ids, flags, enc):
    """The loss of a model without the skill, in nats per token: a recall answer guessed among its category's values
    (the category is the token before it), a copy among the noise words."""
    values = {enc.encode_single_token(" " + c): len(v) for c, v in CATEGORIES.items()}
    recall = np.log([values[t] for t in ids[np.flatnonzero(flags == RECALL) - 1]]).mean()
    return {"recall": float(recall), "copy": math.log(len(NOISE))}


def skills(nll, flags, chance):
    """Per skill, the mean loss (nats) of the tokens it predicts, its chance level, and whether it formed: the loss at
    most half of chance. nll and flags: per predicted token, of the same shape."""
    out = {}
    for name, flag in (("recall", RECALL), ("copy", COPY)):
        loss = nll[flags == flag].mean().item()
        out[name] = {"loss": loss, "chance": chance[name], "formed": loss <= chance[name] / 2}
    return out


def prepare(out_dir=Path(__file__).parent, seed=1337, n_train=2_000_000, n_val=100_000, n_test=100_000):
    """Write the tokenizer, the three splits and their skill flags, then meta.json (last)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ranks = train_bpe(Counter(PIECES))
    enc = make_encoding(ranks)
    assert all(len(enc.encode_ordinary(p)) == 1 for p in PIECES)
    write(out_dir / "synth.tiktoken", "".join(
        f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()).encode())
    sizes, recall, copy, chances, digest = {}, {}, {}, {}, hashlib.sha256()
    for i, (split, n) in enumerate((("train", n_train), ("val", n_val), ("test", n_test))):
        ids, flags = generate(n, seed + i, enc)  # a different stream per split
        write(out_dir / f"{split}.bin", ids.tobytes())
        digest.update(ids.tobytes())
        write(out_dir / f"{split}_skill.bin", flags.tobytes())
        sizes[split], recall[split], copy[split] = len(ids), float((flags == RECALL).mean()), float((flags == COPY).mean())
        chances[split] = chance(ids, flags, enc)
    meta = {"vocab_size": (enc.n_vocab + 63) // 64 * 64, "n_vocab": enc.n_vocab,
            "tokenizer": "synth", "pat_str": PAT_STR, "n_tokens": sizes,
            "recall_frac": recall, "copy_frac": copy, "chance": chances, "seed": seed, "version": VERSION,
            "sha256": digest.hexdigest()}  # of the three splits' tokens: the shipped base GPT was trained on these
    write(out_dir / "meta.json", json.dumps(meta, indent=1).encode())
    return meta


if __name__ == "__main__":
    t0 = time.time()
    meta = prepare()
    print(f"wrote {Path(__file__).parent} in {time.time() - t0:.1f}s")
    for split, n in meta["n_tokens"].items():
        print(f"{split}: {n:,} tokens, {meta['recall_frac'][split]:.1%} recall answers, {meta['copy_frac'][split]:.1%} copies")
    print(f"vocab: {meta['n_vocab']} tokens, padded to {meta['vocab_size']}")
