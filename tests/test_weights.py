"""Checkpoint formats: every reader gives the same model, and damaged input is one clear sentence."""
import json
import re
import shutil
import signal
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import longgen
from loading import tokenizer
from loading import weights
from conftest import ROOT
from errors import UserError
from model import Config, RopeScaling, Transformer, build, preset


@pytest.fixture
def hf_dir(tmp_path):
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2))
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB")  # several shards and an index
    return tmp_path / "hf", hf


def test_sharded_hf_checkpoint_loads_every_tensor(hf_dir):
    directory, hf = hf_dir
    assert (directory / "model.safetensors.index.json").is_file()
    cfg, state_dict = weights.read_checkpoint(directory)
    assert cfg.n_kv_heads == 2 and cfg.vocab_size == 300
    theirs = hf.state_dict()
    wq, wk, wv = (theirs[f"model.layers.1.self_attn.{n}_proj.weight"] for n in "qkv")
    assert torch.equal(state_dict["layers.1.attention.wqkv.weight"], torch.cat([wq, wk, wv]))
    assert torch.equal(state_dict["output.weight"], theirs["lm_head.weight"])
    assert set(state_dict) == set(build(cfg).state_dict())


def test_own_checkpoint_round_trip_keeps_layout_and_weights(tmp_path):
    cfg = longgen.convert(preset("tiny"), sparse="strided", rope_theta=40000.0)
    model = build(cfg)
    weights.save_checkpoint(tmp_path / "ckpt", cfg, model.state_dict(), extra={"step": 7})
    cfg2, state_dict = weights.read_checkpoint(tmp_path / "ckpt")
    assert cfg2 == cfg and cfg2.layer_kinds.count("strided") == 4
    for name, w in model.state_dict().items():
        assert torch.equal(state_dict[name], w), name
    assert json.loads((tmp_path / "ckpt" / "longgen.json").read_text())["step"] == 7


def test_format_1_checkpoints_and_hf_exports_still_load(tmp_path):
    """Format 1 named each layer's attention kind "attn"; its longgen.json and exported config.json load unchanged."""
    cfg = longgen.convert(preset("tiny"), sparse="strided")
    state = build(cfg).state_dict()
    weights.save_checkpoint(tmp_path / "ckpt", cfg, state)
    weights.export_hf(tmp_path / "hf", cfg, state)
    for path, key in ((tmp_path / "ckpt" / "longgen.json", "config"), (tmp_path / "hf" / "config.json", "longgen")):
        meta = json.loads(path.read_text())
        entry = meta[key] if key == "config" else meta["longgen"]
        entry["attn"] = entry.pop("layer_kinds")
        (meta if key == "config" else entry)["format"] = 1
        path.write_text(json.dumps(meta))
    for directory in ("ckpt", "hf"):
        assert weights.read_checkpoint(tmp_path / directory)[0].layer_kinds == cfg.layer_kinds
    meta = json.loads((tmp_path / "ckpt" / "longgen.json").read_text())
    meta["config"]["layer_kinds"] = meta["config"]["attn"]
    (tmp_path / "ckpt" / "longgen.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="has both 'attn' and 'layer_kinds'; keep 'layer_kinds' only"):
        weights.read_checkpoint(tmp_path / "ckpt")


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    cfg = preset("tiny")
    weights.save_checkpoint(tmp_path / "ckpt", cfg, build(cfg).state_dict())
    before = (tmp_path / "ckpt" / "model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # the user pressed ctrl-c mid-save
    monkeypatch.setattr(weights, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        weights.save_checkpoint(tmp_path / "ckpt", cfg, build(cfg).state_dict())
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no half-written leftovers


def test_missing_checkpoint(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        weights.read_checkpoint(tmp_path / "nope.gguf")


def test_truncated_gguf(tmp_path, smollm2_gguf):
    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(smollm2_gguf.read_bytes()[:5_000_000])
    with pytest.raises(UserError, match="not a readable GGUF"):
        weights.read_checkpoint(damaged)


def test_garbage_gguf(tmp_path):
    (tmp_path / "garbage.gguf").write_bytes(b"definitely not a gguf file" * 100)
    with pytest.raises(UserError, match="not a readable GGUF"):
        weights.read_checkpoint(tmp_path / "garbage.gguf")


def test_truncated_safetensors(hf_dir):
    directory, _ = hf_dir
    shard = sorted(directory.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(UserError, match="damaged or truncated"):
        weights.read_checkpoint(directory)


def test_pickled_weights_are_never_loaded(hf_dir):
    directory, _ = hf_dir
    for f in directory.glob("*.safetensors*"):
        f.unlink()
    (directory / "pytorch_model.bin").write_bytes(b"\x80\x04pickle that would run code")
    with pytest.raises(UserError, match="never loads"):
        weights.read_checkpoint(directory)


def test_broken_config_json(hf_dir):
    directory, _ = hf_dir
    (directory / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        weights.read_checkpoint(directory)


def test_unknown_keys_in_own_config(tmp_path):
    cfg = preset("tiny")
    weights.save_checkpoint(tmp_path / "ckpt", cfg, build(cfg).state_dict())
    meta = json.loads((tmp_path / "ckpt" / "longgen.json").read_text())
    meta["config"]["windw"] = 3
    (tmp_path / "ckpt" / "longgen.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="windw"):
        weights.read_checkpoint(tmp_path / "ckpt")


def test_default_model_comes_from_the_cache_without_network(tmp_path, monkeypatch, smollm2_gguf):
    """Once cached, the default model needs no network: pip is never called."""
    monkeypatch.setenv("LONGGEN_CACHE", str(tmp_path))
    shutil.copy(smollm2_gguf, tmp_path / smollm2_gguf.name)
    monkeypatch.setattr(weights.subprocess, "run", lambda *a, **k: pytest.fail("tried to download"))
    assert weights.default_checkpoint() == tmp_path / smollm2_gguf.name


def test_failed_download_is_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGGEN_CACHE", str(tmp_path))
    monkeypatch.setattr(weights.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(weights.subprocess, "run", lambda *a, **k: type("Done", (), {"returncode": 1})())
    with pytest.raises(UserError, match="--checkpoint"):
        weights.default_checkpoint()


# ------------------------------------------------------------------------------------------------ kill -9 mid-save
KILL_AT = """
import os, signal, sys
sys.path.insert(0, ".")
import torch
from loading import weights
from model import build, preset
target, moment = sys.argv[1], sys.argv[2]
cfg = preset("tiny")
torch.manual_seed(1)
state = build(cfg).state_dict()
real_replace = os.replace

def replace(src, dst):
    if moment == "written" or str(dst) == target:  # the temporary copy is whole / the old one was just moved aside
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)
os.replace = replace
weights.save_checkpoint(target, cfg, state)
"""


@pytest.mark.parametrize("moment", ["written", "old_moved_aside"])
def test_a_save_killed_at_any_moment_leaves_a_loadable_checkpoint_and_no_debris(tmp_path, moment):
    """kill -9 during an export (train.py --export) left `.final.old` and a temporary folder but no `final`, and a
    later export left the debris behind."""
    cfg = preset("tiny")
    target = tmp_path / "final"
    weights.save_checkpoint(target, cfg, build(cfg).state_dict())
    old = (target / "model.safetensors").read_bytes()
    done = subprocess.run([sys.executable, "-c", KILL_AT, str(target), moment], cwd=ROOT, capture_output=True,
                          timeout=120)
    assert done.returncode == -signal.SIGKILL
    cfg_read, state_dict = weights.read_checkpoint(target)  # the old one: the new one never got into place
    assert cfg_read == cfg and (weights.resolve(target) / "model.safetensors").read_bytes() == old
    torch.manual_seed(2)
    new = build(cfg).state_dict()
    weights.save_checkpoint(target, cfg, new)  # the next save cleans up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    assert (target / "model.safetensors").read_bytes() != old
    assert torch.equal(weights.read_checkpoint(target)[1]["norm.weight"], new["norm.weight"])


# ------------------------------------------------------------------------------------------------ bad checkpoints
def tiny_gguf(path, with_tokenizer: bool):
    """A small Llama GGUF (2 layers), with or without its tokenizer keys."""
    cfg = Config(vocab_size=260, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=64)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.n_layers)
    writer.add_embedding_length(cfg.dim)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_feed_forward_length(cfg.ffn_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    if with_tokenizer:
        writer.add_tokenizer_model("gpt2")
    shapes = weights.weight_shapes(cfg, fused=False)
    names = {v: k for k, v in weights.GGUF_NAMES.items()}
    for name, shape in shapes.items():
        if name.startswith("layers."):
            _, layer, rest = name.split(".", 2)
            gguf_name = f"blk.{layer}.{names[rest.rsplit('.', 1)[0]]}.weight"
        else:
            gguf_name = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
                         "output.weight": "output.weight"}[name]
        writer.add_tensor(gguf_name, np.random.default_rng(0).standard_normal(shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return cfg


def test_gguf_without_tokenizer_keys(tmp_path):
    cfg = tiny_gguf(tmp_path / "m.gguf", with_tokenizer=False)
    assert weights.read_checkpoint(tmp_path / "m.gguf")[0].vocab_size == cfg.vocab_size  # the weights still read
    with pytest.raises(UserError, match="holds no tokenizer .* convert the model again"):
        longgen.load(tmp_path / "m.gguf")


def test_hf_config_missing_a_key(hf_dir):
    directory, _ = hf_dir
    config = json.loads((directory / "config.json").read_text())
    del config["vocab_size"]
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="config.json lacks 'vocab_size'; restore the config.json"):
        weights.read_checkpoint(directory)


def test_safetensors_missing_a_weight(hf_dir):
    directory, _ = hf_dir
    name = "model.layers.1.mlp.up_proj.weight"
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    shard = directory / index["weight_map"][name]
    tensors = load_file(shard)
    del tensors[name]
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(UserError, match=f"lacks the weight {name}; the checkpoint is incomplete"):
        weights.read_checkpoint(directory)


def test_weights_of_the_wrong_shape(hf_dir):
    directory, _ = hf_dir
    config = json.loads((directory / "config.json").read_text())
    config["intermediate_size"] = 100
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=re.escape("holds model.layers.0.mlp.gate_proj.weight of shape (96, 64), but "
                                                  "its config makes it (100, 64)")):
        weights.read_checkpoint(directory)


def test_own_checkpoint_with_a_wrong_shape(tmp_path):
    cfg = preset("tiny")
    weights.save_checkpoint(tmp_path / "ckpt", cfg, build(cfg).state_dict())
    meta = json.loads((tmp_path / "ckpt" / "longgen.json").read_text())
    meta["config"]["dim"] = 128
    (tmp_path / "ckpt" / "longgen.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="holds tok_embeddings.weight of shape"):
        weights.read_checkpoint(tmp_path / "ckpt")


def test_a_vocabulary_smaller_than_the_tokenizers(tmp_path):
    """It failed with an IndexError at the first token."""
    cfg = preset("tiny")  # 512 rows
    tok = tokenizer.Tokenizer({bytes([b]): b for b in range(256)}, {"<|endoftext|>": 600}, tokenizer.GPT2)
    weights.save_checkpoint(tmp_path / "ckpt", cfg, build(cfg).state_dict(), tok)
    with pytest.raises(UserError, match="has 601 tokens but the weights only 512; .* use the tokenizer that came"):
        longgen.load(tmp_path / "ckpt")


def test_own_checkpoint_without_its_config(tmp_path):
    cfg = preset("tiny")
    weights.save_checkpoint(tmp_path / "ckpt", cfg, build(cfg).state_dict())
    (tmp_path / "ckpt" / "longgen.json").write_text(json.dumps({"format": weights.FORMAT_VERSION}))
    with pytest.raises(UserError, match="longgen.json lacks the model's config; the checkpoint is damaged: export it"):
        weights.read_checkpoint(tmp_path / "ckpt")


def test_weight_shapes_are_the_models():
    for cfg in (preset("tiny"), preset("smollm2-135m"), longgen.convert(preset("llama-3-8b"))):
        with torch.device("meta"):
            model = Transformer(cfg)
        assert weights.weight_shapes(cfg) == {k: tuple(v.shape) for k, v in model.state_dict().items()
                                              if not (cfg.tie_embeddings and k == "output.weight")}


# ------------------------------------------------------------------------------------------------ Hugging Face out
@pytest.mark.parametrize("overrides", [
    {},
    {"tie_embeddings": True, "n_kv_heads": 4},
    {"rope_scaling": RopeScaling("linear", 4.0), "rope_theta": 50000.0},
    {"rope_scaling": RopeScaling("llama3", 8.0, 1.0, 4.0, 64), "rope_theta": 500000.0},
])
def test_hf_export_loads_in_transformers_with_our_logits(tmp_path, overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=300, **overrides)
    ours = build(cfg)
    with torch.no_grad():  # random norms, so that a swapped norm weight shows
        for name, p in ours.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    weights.export_hf(tmp_path / "hf", cfg, ours.state_dict())
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    tokens = torch.randint(0, 300, (2, 200))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours(tokens), atol=2e-5, rtol=1e-4)
    cfg2, state_dict = weights.read_checkpoint(tmp_path / "hf")
    assert cfg2 == cfg  # and back, exactly
    back = build(cfg2, state_dict).state_dict()
    assert all(torch.equal(back[name], w) for name, w in ours.state_dict().items())


def test_hf_export_of_a_longgen_model_keeps_its_layout(tmp_path, smollm2_gguf):
    """transformers computes full attention in every layer of an exported LongGen model: its logits are those of our
    model with the layout made full. longgen.load reads the layout, pattern, weights and tokenizer back exactly."""
    from transformers import AutoModelForCausalLM

    from loading import tokenizer

    tok = tokenizer.load(smollm2_gguf)
    torch.manual_seed(0)
    cfg = longgen.convert(preset("tiny", vocab_size=tok.n_vocab), sparse="strided", rope_theta=40000.0, window=40,
                          stride=8, local_blocks=2, block=8)
    model = build(cfg)
    weights.export_hf(tmp_path / "hf", cfg, model.state_dict(), tok)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["longgen"]["layer_kinds"] == list(cfg.layer_kinds) and config["longgen"]["stride"] == 8
    loaded, tok2 = longgen.load(tmp_path / "hf")
    assert loaded.cfg == cfg and tok2.encode("The long context") == tok.encode("The long context")
    for name, w in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], w), name
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    tokens = torch.randint(0, tok.n_vocab, (1, 160))
    with torch.no_grad():
        sparse, full = model(tokens), longgen.full_attention(build(cfg, model.state_dict()))(tokens)
        theirs = hf(tokens).logits
    torch.testing.assert_close(theirs, full, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(theirs[:, 100:], sparse[:, 100:], atol=1e-3)  # past the window: not LongGen's


def test_hf_export_with_a_foreign_longgen_entry_is_one_sentence(tmp_path):
    cfg = preset("tiny")
    weights.export_hf(tmp_path / "hf", cfg, build(cfg).state_dict())
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["longgen"]["format"] = 99
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="remove it to load the model with every layer full"):
        weights.read_checkpoint(tmp_path / "hf")
