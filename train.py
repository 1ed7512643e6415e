"""LongGen's length-extension recipe on FSDP2: fine-tune a pretrained Llama on long documents while switching it to the
hybrid layout (middle third full attention, the rest sink + window or strided), or, with `baseline=full`, extend the
same model with every layer full (the comparison).

    torchrun --nproc_per_node=8 train.py --config configs/smollm2-32k.yaml [key=value ...] [--resume] [--baseline full]
    python train.py --config configs/tiny.yaml          # one process works the same

Steps: load the checkpoint, convert it (layout, sparse pattern, new RoPE base), wrap every block (activation
checkpointing -> compile -> fully_shard), then train with AdamW, warm-up and a constant or cosine schedule, gradient
accumulation and clipping. Checkpoints (torch.distributed.checkpoint) hold the model, optimizer, schedule, data position
and RNG; one is written to `step_N.tmp` and renamed when complete, so a crash mid-save leaves the last one intact, and
`--resume` continues bit for bit. At the end the model is exported as one longgen checkpoint that `generate.py
--checkpoint` loads, and with `--export-hf DIR` also as a Hugging Face Llama directory.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import longgen
import tokenizer as tokenizers
import weights
from config import load_config
from context_parallel import cp_forward, cp_mean, shard
from data import DataConfig, PackedStream, load_documents
from errors import UserError, run_cli
from model import build, preset

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, for MFU


@dataclass
class PatternConfig:
    """The sparse layers' pattern. Unset keys keep model.Config's defaults: sink 64 + window 2,048; strided blocks of
    64 tokens, 16 local blocks, every 64th block kept."""
    n_sink: int | None = None
    window: int | None = None
    block: int | None = None
    local_blocks: int | None = None
    stride: int | None = None

    def __post_init__(self):
        given = self.overrides()
        if any(v < (k != "n_sink") for k, v in given.items()):
            raise UserError(f"Bad config: pattern values must be positive integers (n_sink may be 0), not {given}.")

    def overrides(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class TrainConfig:
    # the model
    checkpoint: str | None = None  # pretrained model: .gguf, HF directory or longgen checkpoint (default: SmolLM2)
    preset: str | None = None  # instead, random weights of a model.py preset (smoke tests, benchmarks)
    tokenizer: str | None = None  # default: the checkpoint's own (or the default model's, with a preset)
    # the recipe
    baseline: str = "longgen"  # longgen: convert to the hybrid layout; full: extend with every layer full
    sparse: str = "sink_window"
    pattern: PatternConfig = field(default_factory=PatternConfig)  # e.g. pattern.window=4096
    full_fraction: float = 1 / 3
    placement: str = "middle"
    rope_theta: float | None = None  # new RoPE base for the longer context (e.g. 10,000 -> 5,000,000); None keeps it
    seq_len: int = 32768
    doc_masking: bool = True  # each packed document attends only to itself
    separator: str | None = None  # special token after each document (default: the tokenizer's EOS)
    data: DataConfig = field(default_factory=DataConfig)
    # optimisation
    batch_size: int = 1  # sequences per rank per micro-step
    grad_accum: int = 1
    steps: int = 100
    lr: float = 2e-5
    warmup_steps: int = 10
    schedule: str = "constant"  # constant or cosine (to 10% of lr)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    # systems
    dtype: str = "bfloat16"  # compute dtype (FSDP2 mixed precision; master weights and reductions stay fp32)
    activation_checkpointing: bool = True
    loss_chunk: int = 4096  # tokens whose logits exist at once in the loss (0: the whole sequence)
    float8: bool = False  # torchao float8 training of the blocks' linear layers (GPUs of compute capability 8.9+)
    cp_degree: int = 1  # context parallel: ranks that split each sequence between them (divides the world size)
    compile: bool = True
    peak_tflops: float | None = None  # for MFU; default: from the GPU's name
    # bookkeeping
    out_dir: str = "runs/longgen"
    export_hf: str | None = None  # also write the final model here as a Hugging Face Llama directory (--export-hf)
    save_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    eval_every: int = 0  # 0: never (needs data.eval_fraction > 0)
    eval_batches: int = 4
    log_every: int = 1

    def __post_init__(self):
        checks = [(self.baseline in ("longgen", "full"), "baseline must be longgen or full"),
                  (self.schedule in ("constant", "cosine"), "schedule must be constant or cosine"),
                  (self.dtype in ("bfloat16", "float32"), "dtype must be bfloat16 or float32"),
                  (not (self.checkpoint and self.preset), "give checkpoint or preset, not both"),
                  (min(self.seq_len, self.batch_size, self.grad_accum, self.steps, self.cp_degree) >= 1,
                   "seq_len, batch_size, grad_accum, steps and cp_degree must be at least 1"),
                  (self.cp_degree == 1 or self.seq_len % (2 * self.cp_degree) == 0,
                   "seq_len must be a multiple of 2 * cp_degree (each rank holds two equal chunks)"),
                  (self.loss_chunk >= 0, "loss_chunk must be >= 0 (0: the whole sequence at once)"),
                  (self.lr > 0 and self.warmup_steps >= 0 and self.grad_clip >= 0, "lr must be > 0, warmup_steps and "
                                                                                   "grad_clip >= 0")]
        for ok, message in checks:
            if not ok:
                raise UserError(f"Bad config: {message}.")


# ------------------------------------------------------------------------------------------------ setup
def init_distributed() -> tuple[int, int, torch.device]:
    """Join torchrun's process group (or make a one-process one); NCCL on GPUs, gloo on CPUs."""
    if "RANK" not in os.environ:  # plain `python train.py`
        with socket.socket() as s:
            s.bind(("localhost", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="localhost", MASTER_PORT=str(port))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def model_config(cfg: TrainConfig, tok):
    """The converted config, and the pretrained weights (None for a preset)."""
    if cfg.preset:
        base, state_dict = preset(cfg.preset, vocab_size=tok.n_vocab), None
    else:
        base, state_dict = weights.read_checkpoint(cfg.checkpoint or weights.default_checkpoint())
    new = longgen.convert(base, sparse=cfg.sparse, full_fraction=cfg.full_fraction, placement=cfg.placement,
                          rope_theta=cfg.rope_theta, max_seq_len=max(cfg.seq_len, base.max_seq_len),
                          **cfg.pattern.overrides())
    return (longgen.full_attention(new) if cfg.baseline == "full" else new), state_dict


def convert_float8(model, device) -> int:
    """torchao's float8 training: every linear layer inside the blocks (sides multiples of 16) becomes a Float8Linear,
    whose products run in float8 with dynamic per-tensor scales (inputs and weights e4m3, gradients e5m2); master
    weights, optimizer and everything else are unchanged. The output layer stays in 16 bits, as in torchtitan. On a
    CPU it runs too (emulated, slowly): the tests use that. Returns the number of layers converted."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise UserError(f"float8=true needs a GPU with float8 matrix units (compute capability 8.9+, e.g. H100); "
                        f"{torch.cuda.get_device_name(device)} has none: set float8=false.")
    try:
        from torchao.float8 import convert_to_float8_training
        from torchao.float8.float8_linear import Float8Linear
    except ImportError:
        raise UserError("float8=true needs torchao: pip install torchao (or set float8=false).") from None
    convert_to_float8_training(model, module_filter_fn=lambda module, fqn: fqn.startswith("layers.")
                               and module.in_features % 16 == 0 and module.out_features % 16 == 0)
    return sum(isinstance(m, Float8Linear) for m in model.modules())


def shard_model(model, cfg: TrainConfig, mesh):
    """torchtitan's order: activation checkpointing -> compile -> fully_shard per block, then the root."""
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if cfg.dtype == "bfloat16" else MixedPrecisionPolicy()
    for i, block in enumerate(model.layers):
        block = wrap_block(block, cfg.activation_checkpointing, cfg.compile)
        fully_shard(block, mesh=mesh, mp_policy=mp)
        model.layers[i] = block
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def wrap_block(block, activation_checkpointing: bool, compile: bool):
    """A block that recomputes its activations in the backward pass and runs compiled (bench.py times this too)."""
    if activation_checkpointing:
        block = checkpoint_wrapper(block, preserve_rng_state=False)
    if compile:
        block.compile()
    return block


def lr_lambda(cfg: TrainConfig):
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor


# ------------------------------------------------------------------------------------------------ the step
def lm_loss(model, tokens, doc_ids, doc_masking: bool, cp_group=None, loss_chunk: int = 4096) -> torch.Tensor:
    """Next-token cross-entropy of a packed batch (B, S + 1). With document masking each document is attended to on
    its own, and the token after a document's last one (another document's first) is not predicted. The logits are
    made loss_chunk tokens at a time (model.chunked_cross_entropy; 0: all at once). With a context-parallel group,
    this rank's share, from its shard's logits (chunked the same way): the group's mean of it is the loss of the whole
    sequence."""
    inputs, targets, docs = tokens[:, :-1], tokens[:, 1:].clone(), doc_ids[:, :-1]
    if doc_masking:
        targets[doc_ids[:, 1:] != docs] = -100
    if cp_group is not None:
        targets = shard(targets, cp_group)  # (B, S/cp), this rank's
        loss_sum = cp_forward(model, shard(inputs, cp_group), cp_group, docs if doc_masking else None, targets,
                              loss_chunk)
        return cp_mean(loss_sum, targets, cp_group)
    loss_sum = model(inputs, doc_ids=docs if doc_masking else None, targets=targets, loss_chunk=loss_chunk)
    return loss_sum / (targets != -100).sum().clamp(min=1)


def step_flops(model_cfg, n_params: int, doc_ids, doc_masking: bool) -> float:
    """Training FLOPs of one batch: 6 per parameter per token, plus attention counted by the pairs each layer's mask
    actually allows (forward 4 H E per pair, backward twice that)."""
    lengths = [torch.bincount(row).tolist() if doc_masking else [row.numel()] for row in doc_ids[:, :-1]]
    pairs = {kind: sum(model_cfg.pattern(kind).pairs(n) for row in lengths for n in row if n)
             for kind in set(model_cfg.attn)}
    attention = sum(12 * pairs[kind] * model_cfg.n_heads * model_cfg.head_dim for kind in model_cfg.attn)
    return 6 * n_params * doc_ids[:, :-1].numel() + attention


# ------------------------------------------------------------------------------------------------ checkpoints
def checkpoint_dirs(out_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. `step_N.tmp` (a save that did not finish) and directories without their
    metadata are not checkpoints."""
    dirs = [d for d in out_dir.glob("step_*") if re.fullmatch(r"step_\d+", d.name)
            and (d / ".metadata").is_file() and (d / "train.json").is_file()]
    return sorted(dirs, key=lambda d: int(d.name[5:]))


def save_checkpoint(out_dir: Path, step: int, model, optimizer, scheduler, stream, cfg: TrainConfig) -> None:
    rank = dist.get_rank()
    final, tmp = out_dir / f"step_{step}", out_dir / f"step_{step}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)},
             checkpoint_id=tmp)
    (tmp / f"rank{rank}.json").write_text(json.dumps({"data": stream.state_dict(),
                                                      "rng": torch.get_rng_state().tolist()}))
    dist.barrier()
    if rank == 0:
        (tmp / "train.json").write_text(json.dumps({"step": step, "scheduler": scheduler.state_dict(),
                                                    "world_size": dist.get_world_size(), "config": asdict(cfg)}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # the checkpoint exists only once it is whole
        for old in checkpoint_dirs(out_dir)[:-cfg.keep_checkpoints]:
            shutil.rmtree(old)
    dist.barrier()


def load_checkpoint(directory: Path, model, optimizer, scheduler, stream) -> int:
    meta = json.loads((directory / "train.json").read_text())
    if meta["world_size"] != dist.get_world_size():
        raise UserError(f"{directory} was written by {meta['world_size']} processes; resume it with "
                        f"--nproc_per_node={meta['world_size']}.")
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=directory)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    scheduler.load_state_dict(meta["scheduler"])
    mine = json.loads((directory / f"rank{dist.get_rank()}.json").read_text())
    stream.load_state_dict(mine["data"])
    torch.set_rng_state(torch.tensor(mine["rng"], dtype=torch.uint8))
    return meta["step"]


def export(out_dir: Path, model, model_cfg, tok, step: int, cfg: TrainConfig) -> Path:
    """Gather the full weights on rank 0 and write one longgen checkpoint (layout included) for generate.py, and the
    Hugging Face export if cfg.export_hf names a directory."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    target = out_dir / "final"
    if dist.get_rank() == 0:
        weights.save_checkpoint(target, model_cfg, state, tok, extra={"trained_steps": step, "recipe": asdict(cfg)})
        if cfg.export_hf:
            weights.export_hf(cfg.export_hf, model_cfg, state, tok)
    dist.barrier()
    return target


# ------------------------------------------------------------------------------------------------ the loop
def train(cfg: TrainConfig, resume: bool = False, export_only: bool = False) -> None:
    rank, world, device = init_distributed()
    try:
        run(cfg, rank, world, device, resume, export_only)
    finally:
        dist.destroy_process_group()


def run(cfg, rank, world, device, resume, export_only):
    if world % cfg.cp_degree:
        raise UserError(f"cp_degree={cfg.cp_degree} must divide the number of processes ({world}); change one.")
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    found = checkpoint_dirs(out_dir)
    if (resume or export_only) and not found:
        raise UserError(f"No complete checkpoint in {out_dir} to resume from; run without --resume.")
    if found and not (resume or export_only):
        raise UserError(f"{out_dir} already holds checkpoints; pass --resume to continue, or set out_dir elsewhere.")
    log = (lambda record: None) if rank else _jsonl(out_dir / "metrics.jsonl")
    tok = tokenizers.load(cfg.tokenizer or cfg.checkpoint or weights.default_checkpoint())
    prefix = [tok.bos_id] if tok.add_bos else []  # documents are wrapped as prefix + text + separator
    separator = tok.encode(cfg.separator, add_bos=False) if cfg.separator else [tok.eos_id]
    model_cfg, state_dict = model_config(cfg, tok)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = build(model_cfg, state_dict)  # fp32 master weights
    float8_layers = convert_float8(model, device) if cfg.float8 else 0
    n_params = sum(p.numel() for name, p in model.named_parameters() if name != "tok_embeddings.weight")
    mesh = init_device_mesh(device.type, (world,))  # FSDP shards over every rank
    dp_world = world // cfg.cp_degree  # ranks that read different data; each group of cp_degree shares sequences
    grid = init_device_mesh(device.type, (dp_world, cfg.cp_degree), mesh_dim_names=("dp", "cp"))
    dp_rank, cp_group = grid.get_local_rank("dp"), grid.get_group("cp") if cfg.cp_degree > 1 else None
    model = shard_model(model, cfg, mesh)
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay,
                                  fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    if rank == 0:  # rank 0 tokenises and caches the corpus; the others then read the cache
        docs = load_documents(cfg.data, tok, "train")
    dist.barrier()
    if rank != 0:
        docs = load_documents(cfg.data, tok, "train")
    stream = PackedStream(docs, cfg.seq_len, seed=cfg.seed, upsample_long=cfg.data.upsample_long,
                          long_doc_tokens=cfg.data.long_doc_tokens, prefix=prefix, suffix=separator, rank=dp_rank,
                          world_size=dp_world)
    step = load_checkpoint(found[-1], model, optimizer, scheduler, stream) if found else 0
    local = sum(p.to_local().numel() for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    log(dict(event="setup", world_size=world, device=str(device), params=total, local_params=local,
             layout=list(model_cfg.attn), float8_layers=float8_layers, resumed_at=step, data=stream.stats()))
    if export_only:
        export(out_dir, model, model_cfg, tok, step, cfg)
        return
    peak = cfg.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if device.type == "cuda"
                                    and k in torch.cuda.get_device_name(device)), None)
    bar = _progress(cfg.steps, step, rank)
    model.train()
    while step < cfg.steps:
        t0 = time.perf_counter()
        loss_sum, flops = torch.zeros((), device=device), 0.0
        for _ in range(cfg.grad_accum):
            tokens, doc_ids = stream.next_batch(cfg.batch_size)
            loss = lm_loss(model, tokens.to(device), doc_ids.to(device), cfg.doc_masking, cp_group,
                           cfg.loss_chunk)
            (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach()
            flops += step_flops(model_cfg, n_params, doc_ids, cfg.doc_masking) / cfg.cp_degree  # this rank's
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        lr = scheduler.get_last_lr()[0]  # the rate this step uses
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
        loss_value = loss_sum.item() / cfg.grad_accum  # waits for the step's GPU work: the time below is all of it
        elapsed = time.perf_counter() - t0
        if step % cfg.log_every == 0 or step == cfg.steps:
            tokens_step = cfg.grad_accum * cfg.batch_size * cfg.seq_len * dp_world
            record = dict(step=step, loss=loss_value, lr=lr,
                          grad_norm=float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm),
                          tokens_per_s=tokens_step / elapsed, step_s=elapsed)
            if peak:
                record["mfu"] = flops * world / elapsed / (peak * 1e12 * world)
            if device.type == "cuda":
                record["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            log(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        bar.update(1)
        if cfg.eval_every and step % cfg.eval_every == 0:
            loss_eval = evaluate(model, cfg, tok, prefix, separator, dp_rank, dp_world, device, cp_group)
            log(dict(step=step, eval_loss=loss_eval))
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
            save_checkpoint(out_dir, step, model, optimizer, scheduler, stream, cfg)
    bar.close()
    save_checkpoint(out_dir, step, model, optimizer, scheduler, stream, cfg)
    target = export(out_dir, model, model_cfg, tok, step, cfg)
    if rank == 0:
        print(f"Trained {step} steps; checkpoint {out_dir}/step_{step}, model {target} "
              f"(python generate.py --checkpoint {target} --prompt ...).")


@torch.no_grad()
def evaluate(model, cfg: TrainConfig, tok, prefix, separator, rank: int, world: int, device, cp_group=None) -> float:
    """Mean loss on the same held-out windows every time."""
    stream = PackedStream(load_documents(cfg.data, tok, "eval"), cfg.seq_len, seed=cfg.seed, prefix=prefix,
                          suffix=separator, rank=rank, world_size=world)
    model.eval()
    total = torch.zeros((), device=device)
    for _ in range(cfg.eval_batches):
        tokens, doc_ids = stream.next_batch(cfg.batch_size)
        total += lm_loss(model, tokens.to(device), doc_ids.to(device), cfg.doc_masking, cp_group, cfg.loss_chunk)
    model.train()
    dist.all_reduce(total, op=dist.ReduceOp.AVG)
    return total.item() / cfg.eval_batches


def _jsonl(path: Path):
    def log(record: dict) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    return log


def _progress(total: int, done: int, rank: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=done, disable=rank != 0, desc="training", unit="step")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file of TrainConfig keys (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value settings that override the file, e.g. lr=1e-5 "
                                                "data.paths=[data/corpus/books]")
    p.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint in out_dir")
    p.add_argument("--baseline", choices=("longgen", "full"), help="shorthand for baseline=...")
    p.add_argument("--export", action="store_true", help="only export the last checkpoint as a longgen model")
    p.add_argument("--export-hf", metavar="DIR", help="also write the final model to DIR as a Hugging Face Llama "
                   "(config.json + model.safetensors; transformers runs every layer full, longgen keeps the layout)")
    args = p.parse_args(argv)
    overrides = list(args.overrides) + ([f"baseline={args.baseline}"] if args.baseline else []) + \
        ([f"export_hf={args.export_hf}"] if args.export_hf else [])
    train(load_config(TrainConfig, args.config, overrides), args.resume, args.export)


if __name__ == "__main__":
    run_cli(main)
