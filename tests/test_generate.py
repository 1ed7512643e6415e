"""generate.py: the README command, sampling, and one clear sentence for each user mistake."""
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from generate import sample


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
