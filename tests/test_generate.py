"""generate.py: the README command, the Python API on the same path as the command line, sampling, and one clear
sentence for each user mistake."""
import argparse
import dataclasses
import re
import runpy
import subprocess
import sys

import pytest
import torch

import cli
import generate as gen
import longgen
import masks
from conftest import ROOT
from errors import UserError
from generate import sample
from model import Transformer, preset


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "generate.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_readme_command_answers_sensibly():
    done = run("--prompt", "The capital of France is", "--max-new-tokens", "8")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("The capital of France is") and "Paris" in done.stdout
    assert "new at" in done.stderr and "KV cache" in done.stderr


def test_chat_with_longgen_layout_streams_an_answer():
    done = run("--prompt", "What is the capital of France?", "--chat", "--layout", "longgen", "--sparse", "strided",
               "--max-new-tokens", "12")
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout and "<|im_end|>" not in done.stdout
    assert "20 strided" in done.stderr and "10 full" in done.stderr


@pytest.mark.parametrize("args, message", [
    (["--prompt", "   "], "prompt is empty"),
    (["--prompt-file", "/definitely/not/here.txt"], "does not exist"),
    (["--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["--prompt", "hi", "--temperature", "-1"], "--temperature"),
    (["--prompt", "hi", "--top-p", "1.5"], "--top-p"),
    (["--prompt", "hi", "--checkpoint", "/no/such/model.gguf"], "does not exist"),
    (["--prompt", "hi", "--max-new-tokens", "9000"], "exceeds the model's context"),
    # issue 17: values that were accepted or gave torch's own errors
    (["--prompt", "hi", "--temperature", "nan"], "--temperature"),
    (["--prompt", "hi", "--temperature", "inf"], "--temperature"),
    (["--prompt", "hi", "--device", "tpu"], "--device tpu"),
    (["--prompt", "hi", "--temperature", "0.7", "--seed", str(2**70)], "--seed"),
    (["--prompt", "hi", "--threads", "0"], "--threads"),
    # options that used to be ignored
    (["--prompt", "hi", "--sparse", "strided"], "--sparse applies only with --layout longgen"),
    (["--prompt", "hi", "--layout", "full", "--window", "512"], "--window applies only with --layout longgen"),
    (["--prompt", "hi", "--layout", "longgen", "--stride", "8"], "--stride shapes the strided pattern"),
    (["--prompt", "hi", "--layout", "longgen", "--full-fraction", "0"], "--full-fraction"),
    (["--prompt", "hi", "--top-k", "5"], "--top-k applies only when sampling"),
    (["--prompt", "hi", "--seed", "3"], "--seed applies only when sampling"),
])
def test_user_mistakes_are_one_sentence(args, message):
    done = run(*args)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("error: ") and message in done.stderr and done.stderr.count("\n") == 1


def test_non_utf8_prompt_file(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    done = run("--prompt-file", str(tmp_path / "latin1.txt"))
    assert done.returncode == 2 and "not UTF-8" in done.stderr


def test_greedy_and_degenerate_sampling_pick_the_argmax():
    logits = torch.randn(4, 100)
    best = logits.argmax(-1)
    assert torch.equal(sample(logits), best)
    assert torch.equal(sample(logits, temperature=1.0, top_k=1), best)
    assert torch.equal(sample(logits, temperature=1.0, top_p=1e-6), best)


def test_sampling_follows_the_distribution():
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -8.0]]).expand(20000, -1)
    gen = torch.Generator().manual_seed(1)
    counts = torch.bincount(sample(logits, temperature=1.0, generator=gen), minlength=5).float()
    torch.testing.assert_close(counts / counts.sum(), logits[0].softmax(-1), atol=0.01, rtol=0)
    # top-k 2 keeps only the two best, renormalised
    counts = torch.bincount(sample(logits, temperature=1.0, top_k=2, generator=gen), minlength=5).float()
    torch.testing.assert_close(counts / counts.sum(), torch.tensor([0.731, 0.269, 0, 0, 0]), atol=0.01, rtol=0)
    # top-p 0.8: p = .644, .237, .087, ... -> the nucleus is the first two
    counts = torch.bincount(sample(logits, temperature=1.0, top_p=0.8, generator=gen), minlength=5).float()
    assert counts[2:].sum() == 0 and counts[1] > 0


# ------------------------------------------------------------------------------------------------ one path
@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return longgen.load(smollm2_gguf)


def test_api_and_command_line_encode_and_answer_alike(smollm2):
    """The same prompt gives the same continuation from generate_text, stream_text and generate.py (the CLI used to
    add a BOS that the API did not, and the two continued differently)."""
    model, tok = smollm2
    prompt = "The capital of France is"
    assert gen.encode_prompt(tok, prompt) == tok.encode(prompt)  # the checkpoint's own BOS setting, as in training
    [api] = gen.generate_text(model, tok, [prompt], 10)
    assert "".join(gen.stream_text(model, tok, prompt, 10)) == api
    done = run("--prompt", prompt, "--max-new-tokens", "10")
    assert done.returncode == 0, done.stderr
    assert done.stdout == prompt + api + "\n"


def test_chat_prompts_are_one_path(smollm2):
    model, tok = smollm2
    ids = gen.encode_prompt(tok, "Hi", chat=True)
    assert tok.decode(ids) == tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    [answer] = gen.generate_text(model, tok, ["What is the capital of France?"], 12, chat=True)
    assert "Paris" in answer


def test_api_mistakes_are_one_sentence(smollm2):
    model, tok = smollm2
    with pytest.raises(UserError, match="exceeds the model's context"):
        gen.stream_text(model, tok, "hi", 9000)  # raised at the call, before the first piece is asked for
    with pytest.raises(UserError, match="prompt is empty"):
        gen.generate_text(model, tok, [""], 4)


def tiny_model(**overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(preset("tiny", **overrides)).eval()


def test_long_prefill_shows_progress_over_chunks(capsys):
    model = tiny_model()
    prompts = [list(range(1, 200))]
    list(gen.generate(model, prompts, 2, chunk=64, progress=True))
    err = capsys.readouterr().err
    assert "prefill" in err and "/4 " in err  # a bar over the 4 chunks, on stderr
    list(gen.generate(model, prompts, 2, chunk=256, progress=True))  # one chunk: no bar
    list(gen.generate(model, prompts, 2, chunk=64))  # the API stays quiet unless asked
    assert "prefill" not in capsys.readouterr().err


def test_stats_line_says_the_saving_grows_with_length():
    cfg = longgen.convert(preset("smollm2-135m"), sparse="sink_window")
    assert gen.kv_saving(cfg, 6000) < gen.kv_saving(cfg, 32768) < gen.kv_saving(cfg, 131072)
    model = torch.nn.Module()
    model.cfg = cfg
    stats = dict(prompt_tokens=6000, new_tokens=19, prefill_s=1.0, decode_s=1.0, kv_bytes=57, kv_full_bytes=100,
                 kv_bytes_by_kind={"sink_window": 20, "full": 37})
    line = gen.stats_line(model, stats)
    assert "-43% here, -62% at 32K, -66% at 128K; the saving grows with length" in line
    assert f"; full layers {gen.layer_ranges([i for i, k in enumerate(cfg.layer_kinds) if k == 'full'])};" in line
    assert gen.layer_ranges([5, 6, 7, 14, 17, 18, 20]) == "5-7,14,17-18,20"
    model.cfg = longgen.full_attention(cfg)
    assert "every layer full" in gen.stats_line(model, dict(stats, kv_bytes=100))


def test_help_answers_without_importing_torch():
    """--help is parsed before torch and its compiler are imported (5-15 s), so it answers at once."""
    for script in ("generate.py", "eval.py"):
        code = (f"import runpy, sys; sys.argv = [{script!r}, '--help']\n"
                f"try: runpy.run_path({script!r}, run_name='__main__')\n"
                "except SystemExit: pass\n"
                "print('torch imported:', 'torch' in sys.modules)")
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert "torch imported: False" in done.stdout, done.stdout + done.stderr
        assert "--layout" in done.stdout and "--window" in done.stdout


# ------------------------------------------------------------------------------------------------ layout options
def layout_args(*argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_model_args(parser)
    args = parser.parse_args(argv)
    cli.check_model_args(args)
    return args


def test_layout_options_reach_the_model():
    model = tiny_model()
    cli.apply_layout(model, layout_args("--layout", "longgen", "--sparse", "strided", "--stride", "8",
                                        "--local-blocks", "3", "--placement", "top", "--full-fraction", "0.5"))
    assert model.cfg.layer_kinds == ("strided",) * 2 + ("full",) * 4  # 1 sparse layer per side of the half, all at the bottom
    assert (model.cfg.pattern_params["stride"], model.cfg.pattern_params["local_blocks"]) == (8, 3)
    cli.apply_layout(model, layout_args("--layout", "longgen", "--window", "32", "--sinks", "0"))
    assert model.cfg.layer_kinds == ("sink_window",) * 2 + ("full",) * 2 + ("sink_window",) * 2
    assert (model.cfg.pattern_params["window"], model.cfg.pattern_params["n_sink"]) == (32, 0)


def test_any_declared_pattern_parameter_from_the_command_line():
    model = tiny_model()
    cli.apply_layout(model, layout_args("--layout", "longgen", "--sparse", "strided", "--pattern", "block=32",
                                        "--pattern", "stride=2"))
    assert (model.cfg.pattern_params["block"], model.cfg.pattern_params["stride"]) == (32, 2)
    with pytest.raises(UserError, match="unknown pattern parameter blok"):
        cli.apply_layout(tiny_model(), layout_args("--layout", "longgen", "--pattern", "blok=32"))
    with pytest.raises(UserError, match="window is given twice"):
        layout_args("--layout", "longgen", "--window", "8", "--pattern", "window=16")
    with pytest.raises(UserError, match="--pattern applies only with --layout longgen"):
        layout_args("--pattern", "window=16")


def test_pattern_flags_are_the_declared_parameters():
    """cli.PATTERN_OPTIONS is written out (so that checking the options needs no torch): each flag must name a parameter
    that masks.py declares, for the kind that declares it, with its minimum."""
    for flag, (_, name, kind, least) in cli.PATTERN_OPTIONS.items():
        [declared] = [f for f in dataclasses.fields(masks.PATTERNS[kind]) if f.name == name]
        assert declared.metadata.get("min", 1) == least, flag


def test_calibrated_layers_from_the_command_line():
    model = tiny_model()
    cli.apply_layout(model, layout_args("--layout", "longgen", "--placement", "calibrated", "--full-layers", "1,4"))
    assert model.cfg.layer_kinds == ("sink_window", "full", "sink_window", "sink_window", "full", "sink_window")
    assert layout_args("--layout", "longgen", "--placement", "calibrated", "--full-layers", "[1, 4]").full_layers == [1, 4]


@pytest.mark.parametrize("argv, message", [
    (("--layout", "longgen", "--placement", "calibrated"), "--placement calibrated and --full-layers go together"),
    (("--layout", "longgen", "--full-layers", "1,4"), "--placement calibrated and --full-layers go together"),
    (("--full-layers", "1,4"), "--full-layers applies only with --layout longgen"),
    (("--layout", "longgen", "--placement", "calibrated", "--full-layers", "1", "--full-fraction", "0.5"),
     "--full-fraction has no effect"),
])
def test_calibrated_layer_options_refused_where_they_do_nothing(argv, message):
    with pytest.raises(UserError, match=re.escape(message)):
        layout_args(*argv)


def test_placement_choices_come_from_longgen():
    """--help lists longgen.PLACEMENTS (and the sparse kinds) read from the source, without importing it."""
    assert cli.names("longgen", "PLACEMENTS") == longgen.PLACEMENTS
    assert cli.sparse_kinds() == longgen.sparse_kinds()
    from evaluation import kv_policies

    assert cli.names("evaluation.kv_policies", "POLICIES") == kv_policies.POLICIES


def test_untrained_conversion_warns_once(capsys):
    """Converting a model to a layout it was not trained with warns (once); a model trained with the layout, or
    --layout full / checkpoint, does not."""
    model = tiny_model()
    cli.apply_layout(model, layout_args("--layout", "longgen"))
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "every layer full" in err and "retrieval breaks" in err
    cli.apply_layout(model, layout_args("--layout", "longgen"))  # already that layout: as trained
    cli.apply_layout(tiny_model(), layout_args("--layout", "full"))
    cli.apply_layout(tiny_model(), layout_args())
    assert capsys.readouterr().err == ""
    cli.apply_layout(model, layout_args("--layout", "longgen", "--window", "16"))  # another window than trained
    assert "another layout" in capsys.readouterr().err


def test_untrained_conversion_warns_on_the_command_line():
    done = run("--prompt", "The capital of France is", "--max-new-tokens", "4", "--layout", "longgen")
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("warning: --layout longgen converts a model trained with every layer full") == 1


def test_threads_default_and_option():
    """generate.py decodes with one thread unless told otherwise; eval.py keeps torch's default unless told."""
    before = torch.get_num_threads()
    try:
        assert gen.parse_args(["--prompt", "hi"]).threads == cli.DECODING_THREADS == 1
        assert gen.parse_args(["--prompt", "hi", "--threads", "2"]).threads == 2
        cli.set_threads(1)
        assert torch.get_num_threads() == 1
        cli.set_threads(None)
        assert torch.get_num_threads() == 1  # unchanged
    finally:
        torch.set_num_threads(before)


def test_masks_command_draws_the_readme_picture(tmp_path, monkeypatch):
    out = tmp_path / "patterns.png"
    monkeypatch.setattr(sys, "argv", ["masks.py", "--out", str(out)])
    runpy.run_path(str(ROOT / "masks.py"), run_name="__main__")
    assert out.read_bytes()[:4] == b"\x89PNG"
