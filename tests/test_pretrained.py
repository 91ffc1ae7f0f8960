"""Pretrained checkpoints: tiny random Llama and GPT-2 models saved by transformers (test-only), loaded by
pretrained.load, must match transformers' logits, cached decode and greedy tokens; a Llama-3-style tokenizer
built here round-trips text; train.py and eval.py run a few GRPO steps on such a checkpoint. Nothing is downloaded."""
import base64
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
import schedules  # noqa: E402
import sol  # noqa: E402
from data.synth.prepare import train_bpe  # noqa: E402
from pretrained import LLAMA3_SPECIAL, llama3_encoding, tokenizer_file  # noqa: E402

SHARED = ROOT.parent / "shared"
WORDS = "the quick brown fox jumps over lazy dog and then runs far away into a deep green forest of tall old trees".split()


def hf():
    """transformers, test-only, and safetensors, the optional extra: a test that needs them skips without them."""
    pytest.importorskip("safetensors")
    return pytest.importorskip("transformers")


def randomize(model):
    """Weights large enough that attention is far from uniform and every part of the model shows in the logits."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if p.dim() == 1 and ("norm" in name or "ln" in name) else 0.2 * torch.randn_like(p))
    return model.eval()


def save_llama(path, vocab=600, tie=False, shard=True):
    transformers = hf()
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=tie,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64}, rope_theta=500000.0, bos_token_id=None, eos_token_id=None)
    model = randomize(transformers.LlamaForCausalLM(cfg))
    model.save_pretrained(path, max_shard_size="100KB" if shard else "1GB")
    return model


def save_gpt2(path):
    transformers = hf()
    cfg = transformers.GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=None,
                                  eos_token_id=None, attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0)
    model = randomize(transformers.GPT2LMHeadModel(cfg))
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    return save_llama(path), path


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2")
    return save_gpt2(path), path


def greedy(model, x, n):
    cache = model.new_cache(x.size(0), x.size(1) + n)
    logits, _ = model(x, cache)
    out = [logits[:, -1].argmax(-1)]
    for _ in range(n - 1):
        out.append(model(out[-1][:, None], cache)[0][:, -1].argmax(-1))
    return torch.stack(out, 1)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@torch.no_grad()
def test_parity_with_transformers(kind, request):
    ref, path = request.getfixturevalue(kind)
    if kind == "llama":
        assert len(list(path.glob("model-*.safetensors"))) > 1 and (path / "model.safetensors.index.json").exists()
    model = pretrained.load(path)
    torch.manual_seed(1)
    x = torch.randint(0, model.cfg.vocab_size, (3, 100))
    theirs = ref(x).logits
    ours, _ = model(x)
    assert theirs.std() > 1  # far from uniform: every weight matters
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    # the KV-cached decode agrees with the full forward; GQA caches only the key/value heads
    cache = model.new_cache(3, 100)
    assert cache.k.size(2) == (model.cfg.n_kv_head or model.cfg.n_head)
    steps = [model(x[:, :60], cache)[0]] + [model(x[:, t:t + 1], cache)[0] for t in range(60, 100)]
    torch.testing.assert_close(torch.cat(steps, 1), ours, atol=1e-4, rtol=1e-4)
    # 20 greedy tokens, as transformers generates them
    gen = ref.generate(x[:, :30], max_new_tokens=20, do_sample=False, pad_token_id=0)[:, 30:]
    assert torch.equal(greedy(model, x[:, :30], 20), gen)


@torch.no_grad()
def test_actions_on_pretrained_models(llama, gpt2):
    """The dense action reproduces the plain decode; sparse actions (keep, prune, bits) change it, on GQA and on
    GPT-2's plain GELU MLP, in float32 and in bfloat16."""
    acfg = sol.ActionConfig(criterion="relevancy")
    grid = sol.action_grid(acfg)
    for path in (llama[1], gpt2[1]):
        for dtype in (torch.float32, torch.bfloat16):
            model = pretrained.load(path, dtype)
            assert model.lm_head.weight.dtype == dtype and model.cfg.vocab_size in (600, 300)
            x = torch.randint(0, 300, (4, 60), generator=torch.Generator().manual_seed(0))
            cache, h0 = sol.prefill(model, x, 40, 19)
            policy = sol.Policy(sol.PolicyConfig(), model.cfg.n_embd, len(grid.values))
            target = torch.full((4, 3), 0.5)
            forked = cache.fork(2, 19)  # two rollouts per row read the shared prefix, as in GRPO
            sparse = sol.rollout(model, forked, h0.repeat_interleave(2, 0), x[:, 40:].repeat_interleave(2, 0), target.repeat(2, 1),
                                 schedules.policy_scheduler(policy, greedy=False), grid, acfg)
            shared = sol.rollout(model, cache.fork(1, 19), h0, x[:, 40:], target, schedules.dense_scheduler(grid), grid, acfg)
            dense = sol.rollout(model, cache, h0, x[:, 40:], target, schedules.dense_scheduler(grid), grid, acfg)
            assert torch.isfinite(sparse["logp"]).all() and not torch.equal(sparse["logp"][::2], dense["logp"])
            full = torch.log_softmax(model(x[:, :-1])[0].float(), -1)[:, 40:].gather(-1, x[:, 41:, None])[..., 0]
            tol = 1e-4 if dtype == torch.float32 else 0.1
            for run in (dense, shared):
                torch.testing.assert_close(run["logp"], full, atol=tol, rtol=tol)


def test_pytorch_bin_and_tied_embeddings(tmp_path):
    ref = save_llama(tmp_path / "tied", tie=True, shard=False)
    model = pretrained.load(tmp_path / "tied")
    assert model.cfg.tie_embeddings and model.wte.weight is model.lm_head.weight
    x = torch.randint(0, 600, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], ref(x).logits, atol=1e-4, rtol=1e-4)
    binary = tmp_path / "bin"
    binary.mkdir()
    (binary / "config.json").write_text((tmp_path / "tied" / "config.json").read_text())
    torch.save(ref.state_dict(), binary / "pytorch_model.bin")  # read with weights_only=True
    with torch.no_grad():
        torch.testing.assert_close(pretrained.load(binary)(x)[0], model(x)[0])


def test_bad_checkpoints_one_clear_error(gpt2, tmp_path, monkeypatch):
    path = gpt2[1]
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        pretrained.load(bad)
    cfg = json.loads((path / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type 'bert' is not supported"):
        pretrained.load(bad)
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="no weights"):
        pretrained.load(bad)
    (bad / "model.safetensors").symlink_to(path / "model.safetensors")
    (bad / "config.json").write_text(json.dumps({**cfg, "n_embd": 32}))
    with pytest.raises(ValueError, match="has shape .* config.json implies"):
        pretrained.load(bad)
    (bad / "config.json").write_text(json.dumps({**cfg, "n_layer": 3}))
    with pytest.raises(ValueError, match="lacks 12 tensors .* h.2."):
        pretrained.load(bad)
    (bad / "config.json").write_text(json.dumps({**cfg, "n_layer": 1}))
    with pytest.raises(ValueError, match="holds h.1.*no part of a gpt2 model"):
        pretrained.load(bad)
    monkeypatch.setitem(sys.modules, "safetensors", None)  # the optional extra, missing
    with pytest.raises(ValueError, match="pip install safetensors"):
        pretrained.load(path)


def write_tokenizer(path):
    """A Llama-3-style tokenizer.model: a tiny byte-level BPE in tiktoken's file format (base64 token, rank)."""
    ranks = train_bpe({" " + w: 5 for w in WORDS} | {w: 1 for w in WORDS} | {"123": 3, "\n": 2})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in sorted(ranks.items(), key=lambda kv: kv[1])))
    return len(ranks)


def test_llama3_tokenizer_round_trips(tmp_path):
    ckpt = tmp_path / "ckpt"
    n = write_tokenizer(ckpt / "original" / "tokenizer.model")  # where Meta's repositories keep it
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llama"}))
    enc = llama3_encoding(tokenizer_file(ckpt))
    assert enc.n_vocab == n + 256
    text = "The quick brown fox jumps over the lazy dog 1234567, then runs ÄWAY!\n\n  into a forest  of ünïcode ✓ trees\n"
    ids = enc.encode_ordinary(text)
    assert enc.decode(ids) == text and max(ids) < n
    assert enc.encode_ordinary(" quick brown") == [enc.encode_single_token(" quick"), enc.encode_single_token(" brown")]
    # Llama-3's split: digits in groups of three, so "1234567" is 123|456|7 before any merge
    assert [enc.decode([t]) for t in enc.encode_ordinary("1234567")][:1] == ["123"]
    ids = enc.encode("<|begin_of_text|>the fox<|eot_id|>", allowed_special="all")
    assert ids[0] == n and ids[-1] == n + 9 and enc.decode(ids[1:-1]) == "the fox"
    (ckpt / "original" / "tokenizer.model").write_bytes(b"\n\x0b<s>\x15\x00\x00\x00\x00 \x03\n\x07</s> \x00")  # sentencepiece
    with pytest.raises(ValueError, match="cannot read the tokenizer .* tiktoken BPE file"):
        llama3_encoding(tokenizer_file(ckpt))
    (ckpt / "original" / "tokenizer.model").unlink()
    with pytest.raises(ValueError, match="no tokenizer in"):
        tokenizer_file(ckpt)


def test_llama3_tokenizer_matches_transformers(tmp_path, monkeypatch):
    """transformers' own converter of Llama-3's tiktoken file (its pattern, its BPE) gives the same ids."""
    hf()
    from transformers.convert_slow_tokenizer import TikTokenConverter
    path = tmp_path / "tokenizer.model"
    n = write_tokenizer(path)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # transformers reads the file through tiktoken's cache otherwise
    theirs = TikTokenConverter(str(path), extra_special_tokens=LLAMA3_SPECIAL).converted()
    ours = llama3_encoding(path)
    for text in ("The quick brown fox's 1234567 jumps!!\n\n  over the lazy dog  ", "tall\ttrees, ünïcode ✓ and 3.14159 —"):
        assert ours.encode_ordinary(text) == theirs.encode(text, add_special_tokens=False).ids
    assert theirs.token_to_id("<|eot_id|>") == ours.encode_single_token("<|eot_id|>") == n + 9


def run(script, *args):
    env = dict(os.environ, TIKTOKEN_CACHE_DIR=str(SHARED / "tiktoken"))
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_train_and_eval_on_a_pretrained_llama(tmp_path):
    ckpt = tmp_path / "llama"
    n = write_tokenizer(ckpt / "tokenizer.model")
    save_llama(ckpt, vocab=n + 256, shard=False)
    rng = torch.Generator().manual_seed(0)
    text = tmp_path / "story.txt"
    text.write_text("\n".join(" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (12,), generator=rng)) for _ in range(400)))
    out = tmp_path / "out"
    grpo = ["--context_len=40", "--rollout_len=4", "--max_iters=2", "--batch_size=2", "--rollouts=2", "--width=16",
            "--eval_episodes=4", "--eval_batch=4"]
    p = run("train.py", f"--init_from={ckpt}", f"--dataset={text}", f"--out_dir={out}", *grpo)
    assert p.returncode == 0, p.stderr[-2000:]
    dtype = "bfloat16" if cli.native_bf16("cpu") else "float32"  # --dtype=auto, the default
    assert "pretrain" not in p.stderr and f"loaded as {dtype}" in p.stdout
    report = json.loads((out / "eval.json").read_text())
    assert report["config"]["base"] == str(ckpt.resolve()) and len(report["config"]["base_sha1"]) == 40
    assert report["config"]["gpt"]["n_kv_head"] == 2 and report["config"]["gpt"]["vocab_size"] == n + 256
    assert all(r["nll"] > 0 for r in report["results"])
    moved = ckpt.rename(tmp_path / "moved")  # eval.py finds a checkpoint that has moved by its hash
    p = run("eval.py", f"--out_dir={out}", f"--init_from={moved}", "--val_episodes=4", "--eval_episodes=4",
            "--search_schedules=2", "--bootstrap=20", "--plot=false")
    assert p.returncode == 0, p.stderr[-2000:]
    assert {r["method"] for r in json.loads((out / "eval.json").read_text())["results"]} >= {"sol", "static", "search"}
    # one clear line for a model flag next to --init_from, for a built-in dataset, and for another checkpoint
    for args, needle in ((["--n_embd=64"], "drop --n_embd"), (["--dataset=synth"], "needs a text dataset")):
        p = run("train.py", f"--init_from={moved}", f"--dataset={text}", f"--out_dir={tmp_path / 'x'}", *grpo, *args)
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and needle in p.stderr, p.stderr
    p = run("eval.py", f"--out_dir={out}", f"--init_from={tmp_path}")
    assert p.returncode == 2 and "is not the checkpoint" in p.stderr and p.stderr.count("\n") == 1, p.stderr
