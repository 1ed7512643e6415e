"""Checkpoint formats: every reader gives the same model, and damaged input is one clear sentence."""
import json
import shutil

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import longgen
import weights
from errors import UserError
from model import RopeScaling, build, preset


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
    assert cfg2 == cfg and cfg2.attn.count("strided") == 4
    for name, w in model.state_dict().items():
        assert torch.equal(state_dict[name], w), name
    assert json.loads((tmp_path / "ckpt" / "longgen.json").read_text())["step"] == 7


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

    import tokenizer as tokenizers

    tok = tokenizers.load(smollm2_gguf)
    torch.manual_seed(0)
    cfg = longgen.convert(preset("tiny", vocab_size=tok.n_vocab), sparse="strided", rope_theta=40000.0, window=40,
                          stride=8, local_blocks=2, block=8)
    model = build(cfg)
    weights.export_hf(tmp_path / "hf", cfg, model.state_dict(), tok)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["longgen"]["attn"] == list(cfg.attn) and config["longgen"]["stride"] == 8
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
