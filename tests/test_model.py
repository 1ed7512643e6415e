"""model.py against transformers' Llama, and the LongGen layouts against their own definitions."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import needs_cuda
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import longgen
from loading import weights
from errors import UserError
from model import Config, RopeScaling, build, preset


def hf_tiny(tmp_path, **overrides):
    """A random transformers Llama saved as safetensors, and ours loaded from that directory."""
    torch.manual_seed(0)
    hf_cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **overrides)
    hf = LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path)
    cfg, state_dict = weights.read_checkpoint(tmp_path)
    return hf, build(cfg, state_dict)


@pytest.mark.parametrize("overrides", [
    {},
    {"tie_word_embeddings": True},
    {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 50000.0}},
    {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64, "rope_theta": 500000.0}},
])
def test_logits_match_transformers_on_random_weights(tmp_path, overrides):
    hf, ours = hf_tiny(tmp_path, **overrides)
    tokens = torch.randint(0, 300, (2, 200))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, atol=2e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    """(ours, transformers') SmolLM2-135M-Instruct, both dequantised from the same GGUF."""
    cfg, state_dict = weights.read_checkpoint(smollm2_gguf)
    hf = AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name,
                                              dtype=torch.float32).eval()
    return build(cfg, state_dict), hf


PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "1, 2, 3, 5, 8, 13,",
           "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"]


def test_logits_match_transformers_on_smollm2(smollm2):
    ours, hf = smollm2
    tokens = torch.randint(0, ours.cfg.vocab_size, (1, 300))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_continuation_matches_transformers(smollm2, smollm2_gguf, prompt):
    from transformers import AutoTokenizer

    from generate import generate

    ours, hf = smollm2
    prompt = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name).encode(prompt)
    mine = [int(t) for t in generate(ours, [prompt], 24)]
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                         pad_token_id=0)[0, len(prompt):].tolist()
    assert mine == theirs


@pytest.mark.parametrize("sparse", ["sink_window", "strided"])
def test_longgen_equals_full_below_the_window(smollm2, sparse):
    """Shorter than the window (2,048) and the local blocks (16 x 64), every sparse pattern is plain causal."""
    ours, _ = smollm2
    tokens = torch.randint(0, ours.cfg.vocab_size, (1, 700))
    with torch.no_grad():
        full = ours(tokens)
        longgen.convert(ours, sparse=sparse)
        try:
            assert ours.cfg.layer_kinds.count("full") == 10 and ours.cfg.layer_kinds.count(sparse) == 20
            torch.testing.assert_close(ours(tokens), full, atol=1e-5, rtol=1e-5)
        finally:
            longgen.full_attention(ours)


def tiny_longgen(sparse="sink_window", **overrides):
    torch.manual_seed(0)
    cfg = longgen.convert(preset("tiny", **overrides), sparse=sparse)
    return build(cfg)


@pytest.mark.parametrize("sparse", ["sink_window", "strided"])
def test_sparse_layers_really_are_sparse(sparse):
    """Past the window, the sparse model differs from the same weights with full attention."""
    model = tiny_longgen(sparse)
    tokens = torch.randint(0, 512, (1, 200))
    with torch.no_grad():
        sparse_logits = model(tokens)
        full_logits = longgen.full_attention(model)(tokens)
    assert torch.allclose(sparse_logits[:, :16], full_logits[:, :16], atol=1e-5)  # inside the window: the same
    assert not torch.allclose(sparse_logits[:, 100:], full_logits[:, 100:], atol=1e-3)  # far past it: not


@pytest.mark.parametrize("sparse", ["sink_window", "strided"])
def test_cpu_fallback_has_gradients(sparse):
    model = tiny_longgen(sparse)
    tokens = torch.randint(0, 512, (2, 120))
    loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("chunk", [0, 16, 45, 500])
def test_chunked_loss_equals_the_whole_logits_loss(chunk):
    """The loss made chunk by chunk (logits recomputed in backward) has the loss and gradients of the plain one, for
    chunks that do and do not divide the sequence, with ignored targets."""
    model = tiny_longgen("sink_window")
    tokens = torch.randint(0, 512, (2, 121))
    targets = tokens[:, 1:].clone()
    targets[0, 30:50] = -100
    plain = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), targets.flatten(),
                                              ignore_index=-100, reduction="sum")
    plain.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    chunked = model(tokens[:, :-1], targets=targets, loss_chunk=chunk)
    chunked.backward()
    torch.testing.assert_close(chunked, plain, atol=1e-4, rtol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("sparse", ["sink_window", "strided"])
def test_packed_documents_equal_separate_sequences(sparse):
    """Every kind supports packing: each document gets the logits it would get alone."""
    model = tiny_longgen(sparse)
    lengths = [37, 90, 1, 60]
    tokens = torch.randint(0, 512, (1, sum(lengths)))
    doc_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    with torch.no_grad():
        packed = model(tokens, doc_ids=doc_ids)
        alone = torch.cat([model(part) for part in tokens.split(lengths, dim=1)], dim=1)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


@needs_cuda
@pytest.mark.parametrize("sparse", ["sink_window", "strided"])
def test_flex_on_gpu_equals_dense_fallback(sparse):
    model = tiny_longgen(sparse).cuda()
    tokens = torch.randint(0, 512, (2, 300), device="cuda")
    doc_ids = torch.sort(torch.randint(0, 3, (2, 300), device="cuda"), dim=-1).values
    for docs in (None, doc_ids):
        model.use_flex = True
        flex_logits = model(tokens, doc_ids=docs)
        flex_logits.float().sum().backward()  # flex has a backward on GPU
        model.use_flex = False
        with torch.no_grad():
            torch.testing.assert_close(flex_logits, model(tokens, doc_ids=docs), atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("bad, message", [
    (dict(pattern_params=dict(window=-1)), "window"),
    (dict(pattern_params=dict(stride=0)), "stride"),
    (dict(pattern_params=dict(windw=8)), "unknown pattern parameter windw"),
    (dict(n_heads=4, n_kv_heads=3), "divisible"),
    (dict(layer_kinds=("full", "nope")), "layer_kinds"),
    (dict(rope_scaling=RopeScaling("yarn", 2.0)), "rope"),
])
def test_bad_config_values_are_one_clear_sentence(bad, message):
    with pytest.raises(UserError, match=message):
        Config(**{**dict(dim=64, n_layers=2, n_heads=4), **bad})


def test_unknown_preset_names_the_choices():
    with pytest.raises(UserError, match="smollm2-135m"):
        preset("llama-9")


def test_prompt_longer_than_the_model_is_refused():
    model = tiny_longgen()
    with pytest.raises(UserError, match="max_seq_len"):
        model(torch.zeros(1, 1025, dtype=torch.long))


def test_layout_matches_the_paper():
    assert longgen.longgen_layout(32).count("full") == 12  # Llama-2-7B: 12 full layers, the -62% KV figure
    layout = longgen.longgen_layout(32)
    assert layout[:10] == ("sink_window",) * 10 and layout[22:] == ("sink_window",) * 10
    assert longgen.longgen_layout(30, sparse="strided") == ("strided",) * 10 + ("full",) * 10 + ("strided",) * 10
    assert longgen.longgen_layout(6, placement="top") == ("sink_window",) * 4 + ("full",) * 2
    assert longgen.longgen_layout(6, placement="bottom") == ("full",) * 2 + ("sink_window",) * 4
    inter = longgen.longgen_layout(32, placement="interleave")
    assert inter.count("full") == 12 and max(len(run) for run in "".join(
        "F" if k == "full" else "s" for k in inter).split("F")) <= 2
    with pytest.raises(UserError, match="placement"):
        longgen.longgen_layout(32, placement="sideways")


STANDALONE = """
import os, sys
sys.modules["kernels"] = None  # the fused decoding kernels: importing them now fails
import torch
from cache import Cache
from model import build, preset

torch.manual_seed(0)
model = build(preset("tiny", layer_kinds=("sink_window", "strided", "full") * 2))
tokens = torch.randint(0, 512, (1, 40))
model(tokens, targets=tokens).backward()  # a training step's forward and backward
with torch.no_grad():
    logits = model(tokens)
    cache = Cache(model.cfg, 1, 40)
    cache.start_prefill(torch.tensor([39]))
    model(tokens[:, :39], cache=cache)
    cache.start_decoding()
    step = model(tokens[:, 39:], cache=cache)  # a cached decoding step
torch.testing.assert_close(step[0, -1], logits[0, -1], atol=1e-5, rtol=1e-5)
ours = {name for name, m in sys.modules.items() if os.path.dirname(getattr(m, "__file__", None) or "/") == os.getcwd()}
print(sorted(ours))
"""


def test_model_runs_with_torch_and_masks_alone(tmp_path):
    """model.py copied out on its own, with masks.py (the attention patterns) and no other file of the project, builds
    and trains, and decodes through the cache (cache.py, copied too): the fused decoding kernels are installed from
    outside (decoding.kernels.use_fused_decoding), never imported by the model."""
    root = Path(__file__).resolve().parents[1]
    for name in ("model.py", "masks.py", "cache.py"):
        shutil.copy(root / name, tmp_path / name)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", STANDALONE], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[-2] == "['cache', 'masks', 'model']"


def test_importing_the_model_changes_no_compiler_setting():
    """Dynamo's settings are the entry points' to choose (model.compile_settings); importing the model, its kernels,
    the cache or the generation code leaves them as torch has them."""
    script = ("import torch._dynamo\n"
              "before = torch._dynamo.config.get_config_copy()\n"
              "import cache, generate, model\nfrom decoding import kernels\n"
              "after = torch._dynamo.config.get_config_copy()\n"
              "print(sorted(k for k in before if before[k] != after[k]))\n"
              "model.compile_settings()\n"
              "print(torch._dynamo.config.recompile_limit >= 32, torch._dynamo.config.fail_on_recompile_limit_hit)\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[:2] == ["[]", "True True"]
