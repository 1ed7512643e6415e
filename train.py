"""LongGen's length-extension recipe on FSDP2: fine-tune a pretrained Llama on long documents while switching it to the
hybrid layout (middle third full attention, the rest sink + window or strided), or, with `baseline=full`, extend the
same model with every layer full (the comparison).

    torchrun --nproc_per_node=8 train.py --config configs/smollm2-32k.yaml [key=value ...] [--resume] [--baseline full]
    python train.py --config configs/tiny.yaml          # one process works the same

Steps: load the checkpoint, convert it (layout, sparse pattern, new RoPE base), wrap every block (activation
checkpointing -> compile -> fully_shard), then train with AdamW, warm-up and a constant or cosine schedule, gradient
accumulation and clipping. Checkpoints (torch.distributed.checkpoint, training/checkpoint.py) hold the model, optimizer,
schedule, data position and RNG; one is written to `step_N.tmp` and renamed when complete, so a crash mid-save leaves
the last one intact, and `--resume` continues bit for bit. At the end the model is exported as one longgen checkpoint
that `generate.py --checkpoint` loads, and with `--export-hf DIR` also as a Hugging Face Llama directory. A run locks
its out_dir: a second one on the same out_dir is refused.
"""
from __future__ import annotations

import argparse
import errno
import json
import math
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import calibrate
from training import checkpoint
import longgen
import masks
from loading import tokenizer
from loading import weights
from training.config import load_config
from training.context_parallel import cp_forward, cp_mean, exchange_report, shard
from training.data import DataConfig, PackedStream, load_documents
from errors import UserError, run_cli, write_atomic
from model import build, compile_settings, preset

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, for MFU


@dataclass
class CalibrationConfig:
    """placement=calibrated without full_layers: how step 0 picks the full layers (calibrate.py). The probe reads the
    held-out documents (data.eval_fraction > 0), else the training documents; never an evaluation task."""
    rule: str = "greedy"  # greedy (sees interactions between layers) or single (one layer at a time)
    samples: int = 16  # probe windows
    length: int = 0  # probe window in tokens; 0: 3x the pattern's reach + 2 spans, within the model's context
    seed: int = 0


@dataclass
class TrainConfig:
    # the model
    checkpoint: str | None = None  # pretrained model: .gguf, HF directory or longgen checkpoint (default: SmolLM2)
    preset: str | None = None  # instead, random weights of a model.py preset (smoke tests, benchmarks)
    tokenizer: str | None = None  # default: the checkpoint's own (or the default model's, with a preset)
    # the recipe
    baseline: str = "longgen"  # longgen: convert to the hybrid layout; full: extend with every layer full
    sparse: str = "sink_window"
    # the sparse layers' pattern parameters, by the names masks.py declares (n_sink, window; block, local_blocks,
    # stride): e.g. pattern.window=4096; unset ones keep the defaults (sink 64 + window 2,048; strided blocks of 64
    # tokens, 16 local blocks, every 64th block kept)
    pattern: dict[str, int] = field(default_factory=dict)
    full_fraction: float = 1 / 3
    placement: str = "middle"  # middle (the paper's), top, bottom, interleave, or calibrated (calibrate.py)
    full_layers: list[int] = field(default_factory=list)  # calibrated: the layers kept full; empty: calibrate first
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)  # how step 0 calibrates
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
    reshard_after_forward: bool = True  # FSDP2: free a block's gathered weights after its forward (false: keep them
    #                                     for the backward: fewer all-gathers, more memory; small models)
    loss_chunk: int = 4096  # tokens whose logits exist at once in the loss (0: the whole sequence)
    float8: bool = False  # torchao float8 training of the blocks' linear layers (GPUs of compute capability 8.9+)
    cp_degree: int = 1  # context parallel: ranks that split each sequence between them (divides the world size)
    cp_exchange: str = "pattern"  # pattern: sparse layers fetch only the keys their masks reach; allgather: all keys
    compile: bool = True
    peak_tflops: float | None = None  # for MFU; default: from the GPU's name
    # bookkeeping
    out_dir: str = "runs/longgen"
    export_hf: str | None = None  # also write the final model here as a Hugging Face Llama directory (--export-hf)
    save_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2  # the newest complete checkpoints kept; 0: all
    eval_every: int = 0  # 0: never (needs data.eval_fraction > 0)
    eval_batches: int = 4
    log_every: int = 1

    def __post_init__(self):
        try:
            masks.check_parameters(self.pattern, prefix="pattern.")
        except ValueError as e:
            raise UserError(f"Bad config: {e}.") from None
        checks = [(self.baseline in ("longgen", "full"), "baseline must be longgen or full"),
                  (self.schedule in ("constant", "cosine"), "schedule must be constant or cosine"),
                  (self.dtype in ("bfloat16", "float32"), "dtype must be bfloat16 or float32"),
                  (not (self.checkpoint and self.preset), "give checkpoint or preset, not both"),
                  (min(self.seq_len, self.batch_size, self.grad_accum, self.steps, self.cp_degree) >= 1,
                   "seq_len, batch_size, grad_accum, steps and cp_degree must be at least 1"),
                  (self.cp_exchange in ("pattern", "allgather"), "cp_exchange must be pattern or allgather"),
                  (self.cp_degree == 1 or self.seq_len % (2 * self.cp_degree) == 0,
                   "seq_len must be a multiple of 2 * cp_degree (each rank holds two equal chunks)"),
                  (self.loss_chunk >= 0, "loss_chunk must be >= 0 (0: the whole sequence at once)"),
                  (self.lr > 0 and self.warmup_steps >= 0 and self.grad_clip >= 0, "lr must be > 0, warmup_steps and "
                                                                                   "grad_clip >= 0"),
                  (min(self.log_every, self.eval_batches) >= 1, "log_every and eval_batches must be at least 1"),
                  (min(self.save_every, self.eval_every, self.keep_checkpoints) >= 0,
                   "save_every, eval_every and keep_checkpoints must be 0 or more (keep_checkpoints=0 keeps all)"),
                  (not self.eval_every or self.data.eval_fraction > 0,
                   "eval_every needs held-out documents: set data.eval_fraction above 0 (e.g. 0.01), or eval_every=0")]
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
        if int(os.environ["LOCAL_RANK"]) >= torch.cuda.device_count():
            raise UserError(f"{os.environ.get('LOCAL_WORLD_SIZE', 'More')} processes on this machine but only "
                            f"{torch.cuda.device_count()} GPUs; start at most --nproc_per_node="
                            f"{torch.cuda.device_count()}.")
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def base_model(cfg: TrainConfig, tok):
    """The pretrained config and weights (random-weight presets: None for the weights)."""
    if cfg.preset:
        return preset(cfg.preset, vocab_size=tok.n_vocab), None
    base, state_dict = weights.read_checkpoint(source := cfg.checkpoint or weights.default_checkpoint())
    longgen.check_vocab(base, tok, source)
    return base, state_dict


def model_config(cfg: TrainConfig, base, full_layers: list[int] | None = None):
    """The converted config: LongGen's layout (full_layers for placement=calibrated), pattern and new RoPE base, or
    every layer full with baseline=full."""
    new = longgen.convert(base, sparse=cfg.sparse, full_fraction=cfg.full_fraction, placement=cfg.placement,
                          full_layers=full_layers or cfg.full_layers or None, rope_theta=cfg.rope_theta,
                          max_seq_len=max(cfg.seq_len, base.max_seq_len), **cfg.pattern)
    return longgen.full_attention(new) if cfg.baseline == "full" else new


def rank0_first(load):
    """load() on rank 0 first (it tokenises and caches the corpus), then on the others (they read the cache): two ranks
    writing one token store at once would race."""
    if dist.get_rank() == 0:
        result = load()
    dist.barrier()
    if dist.get_rank() != 0:
        result = load()
    return result


def calibrated_layers(cfg: TrainConfig, base, state_dict, tok, device, out_dir: Path) -> list[int]:
    """placement=calibrated without full_layers: the layers to keep full, measured on the pretrained model at its own
    context and RoPE base (calibrate.py), as many as the paper's rule keeps. Every rank runs the same calibration and
    rank 0's pick is used by all; it is written to out_dir/calibration.json (and .png), which a resumed run reads."""
    n_full = longgen.n_full_layers(base.n_layers, cfg.full_fraction)
    path = out_dir / "calibration.json"
    if path.is_file():
        cal = calibrate.read_calibration(path)
        if (cal.sparse, cal.n_full, len(cal.layout)) != (cfg.sparse, n_full, base.n_layers):
            raise UserError(f"{path} is a calibration of {cal.n_full} full layers of {len(cal.layout)} for "
                            f"{cal.sparse}, but this run needs {n_full} of {base.n_layers} for {cfg.sparse}; "
                            "delete it or use another out_dir.")
        return cal.full_layers
    dtype = torch.bfloat16 if device.type == "cuda" and cfg.dtype == "bfloat16" else torch.float32
    full = longgen.full_attention(base).with_pattern(**cfg.pattern)
    model = build(full, state_dict, device=device, dtype=dtype).eval()
    split = "eval" if cfg.data.eval_fraction > 0 else "train"
    docs = [d for ds in rank0_first(lambda: load_documents(cfg.data, tok, split)).values() for d in ds]
    c = cfg.calibration
    probe = calibrate.Probe(samples=c.samples, length=c.length, seed=c.seed)
    cal = calibrate.calibrate(model, docs, n_full, sparse=cfg.sparse, rule=c.rule, probe=probe,
                              progress=dist.get_rank() == 0)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    picked = [cal.full_layers]
    dist.broadcast_object_list(picked, src=0)  # one layout for every rank, even if their GPUs rounded differently
    if dist.get_rank() == 0:
        calibrate.write(cal, out_dir)
    dist.barrier()
    return picked[0]


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
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=cfg.reshard_after_forward)
        model.layers[i] = block
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=cfg.reshard_after_forward)
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
def lm_loss(model, tokens, doc_ids, doc_masking: bool, cp_group=None, loss_chunk: int = 4096,
            cp_exchange: str = "pattern", stats: dict | None = None) -> torch.Tensor:
    """Next-token cross-entropy of a packed batch (B, S + 1). With document masking each document is attended to on
    its own, and the token after a document's last one (another document's first) is not predicted. The logits are
    made loss_chunk tokens at a time (model.chunked_cross_entropy; 0: all at once). With a context-parallel group,
    this rank's share, from its shard's logits (chunked the same way): the group's mean of it is the loss of the whole
    sequence; cp_exchange and stats go to context_parallel.cp_forward."""
    inputs, targets, docs = tokens[:, :-1], tokens[:, 1:].clone(), doc_ids[:, :-1]
    if doc_masking:
        targets[doc_ids[:, 1:] != docs] = -100
    if cp_group is not None:
        targets = shard(targets, cp_group)  # (B, S/cp), this rank's
        loss_sum = cp_forward(model, shard(inputs, cp_group), cp_group, docs if doc_masking else None, targets,
                              loss_chunk, cp_exchange, stats)
        return cp_mean(loss_sum, targets, cp_group)
    loss_sum = model(inputs, doc_ids=docs if doc_masking else None, targets=targets, loss_chunk=loss_chunk)
    return loss_sum / (targets != -100).sum().clamp(min=1)


def step_flops(model_cfg, n_params: int, doc_ids, doc_masking: bool) -> float:
    """Training FLOPs of one batch: 6 per parameter per token, plus attention counted by the pairs each layer's mask
    actually allows (forward 4 H E per pair, backward twice that)."""
    lengths = [torch.bincount(row).tolist() if doc_masking else [row.numel()] for row in doc_ids[:, :-1]]
    pairs = {kind: sum(model_cfg.pattern(kind).pairs(n) for row in lengths for n in row if n)
             for kind in set(model_cfg.layer_kinds)}
    attention = sum(12 * pairs[kind] * model_cfg.n_heads * model_cfg.head_dim for kind in model_cfg.layer_kinds)
    return 6 * n_params * doc_ids[:, :-1].numel() + attention


# ------------------------------------------------------------------------------------------------ export
def export(out_dir: Path, model, model_cfg, tok, step: int, cfg: TrainConfig) -> Path:
    """Gather the full weights on rank 0 and write one longgen checkpoint (layout included) for generate.py, and the
    Hugging Face export if cfg.export_hf names a directory."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    target, full = out_dir / "final", None
    if dist.get_rank() == 0:
        try:
            weights.save_checkpoint(target, model_cfg, state, tok, extra={"trained_steps": step, "recipe": asdict(cfg)})
            if cfg.export_hf:
                weights.export_hf(cfg.export_hf, model_cfg, state, tok)
        except Exception as e:
            if not checkpoint.disk_full(e, out_dir):
                raise
            full = UserError(f"The disk holding {out_dir} is full: the model could not be exported to {target} (the "
                             f"previous export, if any, is intact), and step_{step} is intact: free some space and run "
                             "train.py --export with the same config.")
    dist.barrier()
    if full:
        raise full
    return target


# ------------------------------------------------------------------------------------------------ the loop
def train(cfg: TrainConfig, resume: bool = False, export_only: bool = False, fall_back: bool = False) -> None:
    """`fall_back`: if the newest checkpoint is damaged, continue from the newest whole one (implies resume)."""
    rank, world, device = init_distributed()
    try:
        run(cfg, rank, world, device, resume or fall_back, export_only, fall_back)
    except OSError as e:  # a full disk elsewhere than in a save (metrics, the token cache)
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise UserError(f"The disk is full: {e.filename or 'a file'} could not be written, and "
                        f"{checkpoint.last_complete(Path(cfg.out_dir))}.") from None
    finally:
        dist.destroy_process_group()


def run(cfg, rank, world, device, resume, export_only, fall_back=False):
    if world % cfg.cp_degree:
        raise UserError(f"cp_degree={cfg.cp_degree} must divide the number of processes ({world}); change one.")
    out_dir = Path(cfg.out_dir)
    _lock, latest = checkpoint.open_run(out_dir, resume or export_only, fall_back)  # held until run returns
    log = (lambda record: None) if rank else _jsonl(out_dir / "metrics.jsonl")
    tok = tokenizer.load(cfg.tokenizer or cfg.checkpoint or weights.default_checkpoint())
    prefix = [tok.bos_id] if tok.add_bos else []  # documents are wrapped as prefix + text + separator
    separator = tok.encode(cfg.separator, add_bos=False) if cfg.separator else [tok.eos_id]
    base, state_dict = base_model(cfg, tok)
    full_layers = None
    if cfg.baseline == "longgen" and cfg.placement == "calibrated" and not cfg.full_layers:
        full_layers = calibrated_layers(cfg, base, state_dict, tok, device, out_dir)
    model_cfg = model_config(cfg, base, full_layers)
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
    docs, eval_docs = rank0_first(lambda: (load_documents(cfg.data, tok, "train"),  # eval checked before any step
                                           load_documents(cfg.data, tok, "eval") if cfg.eval_every else None))
    stream = PackedStream(docs, cfg.seq_len, seed=cfg.seed, upsample_long=cfg.data.upsample_long,
                          long_doc_tokens=cfg.data.long_doc_tokens, prefix=prefix, suffix=separator, rank=dp_rank,
                          world_size=dp_world)
    step = start = checkpoint.load_checkpoint(latest, model, optimizer, scheduler, stream) if latest else 0
    if rank == 0:
        _drop_records_after(out_dir / "metrics.jsonl", step)  # one record per step: these steps run again
    local = sum(p.to_local().numel() for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    log(dict(event="setup", world_size=world, device=str(device), params=total, local_params=local,
             layout=list(model_cfg.layer_kinds), float8_layers=float8_layers, resumed_at=step, data=stream.stats()))
    if export_only:
        export(out_dir, model, model_cfg, tok, step, cfg)
        return
    peak = cfg.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if device.type == "cuda"
                                    and k in torch.cuda.get_device_name(device)), None)
    bar = _progress(cfg.steps, step, rank)
    model.train()
    while step < cfg.steps:
        t0 = time.perf_counter()
        loss_sum, flops, exchanged = torch.zeros((), device=device), 0.0, {}
        for _ in range(cfg.grad_accum):
            tokens, doc_ids = stream.next_batch(cfg.batch_size)
            loss = lm_loss(model, tokens.to(device), doc_ids.to(device), cfg.doc_masking, cp_group,
                           cfg.loss_chunk, cfg.cp_exchange, exchanged)
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
            if exchanged:  # K/V rows and bytes the CP ranks exchanged, per attention kind
                record["exchange"] = exchange_report(exchanged, 2 if cfg.dtype == "bfloat16" else 4)
            log(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        bar.update(1)
        if cfg.eval_every and step % cfg.eval_every == 0:
            loss_eval = evaluate(model, cfg, eval_docs, prefix, separator, dp_rank, dp_world, device, cp_group)
            log(dict(step=step, eval_loss=loss_eval))
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
            checkpoint.save_checkpoint(out_dir, step, model, optimizer, scheduler, stream, cfg)
    bar.close()
    if step > start:  # a finished run resumed has its checkpoint already: never replace it with itself
        checkpoint.save_checkpoint(out_dir, step, model, optimizer, scheduler, stream, cfg)
    target = export(out_dir, model, model_cfg, tok, step, cfg)
    if rank == 0:
        print(f"Trained {step} steps; checkpoint {out_dir}/step_{step}, model {target} "
              f"(python generate.py --checkpoint {target} --prompt ...).")


@torch.no_grad()
def evaluate(model, cfg: TrainConfig, docs, prefix, separator, rank: int, world: int, device, cp_group=None) -> float:
    """Mean loss on the same held-out windows every time."""
    stream = PackedStream(docs, cfg.seq_len, seed=cfg.seed, prefix=prefix, suffix=separator, rank=rank,
                          world_size=world)
    model.eval()
    total = torch.zeros((), device=device)
    for _ in range(cfg.eval_batches):
        tokens, doc_ids = stream.next_batch(cfg.batch_size)
        total += lm_loss(model, tokens.to(device), doc_ids.to(device), cfg.doc_masking, cp_group, cfg.loss_chunk,
                         cfg.cp_exchange)
    model.train()
    dist.all_reduce(total, op=dist.ReduceOp.AVG)
    return total.item() / cfg.eval_batches


def _jsonl(path: Path):
    def log(record: dict) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    return log


def _drop_records_after(path: Path, step: int) -> None:
    """Keep metrics.jsonl at one record per step: a run that starts at `step` (0, or the checkpoint it resumes)
    runs the steps after it again, so their earlier records go (rewritten atomically). Its setup record, whose
    `resumed_at` is `step`, marks the restart."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line.rstrip("\n") + "\n" for line in lines if _step_of(line) <= step]
    if kept != lines:
        write_atomic(path, "".join(kept))


def _step_of(line: str) -> float:
    """A record's step (0 for the setup records); infinite for a line a killed run left half-written."""
    try:
        record = json.loads(line)
    except ValueError:
        return math.inf
    return record.get("step", 0) if isinstance(record, dict) else math.inf


def _progress(total: int, done: int, rank: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=done, disable=rank != 0, desc="training", unit="step")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file of TrainConfig keys (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value settings that override the file, e.g. lr=1e-5 "
                                                "data.paths=[data/corpus/books]")
    p.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint in out_dir")
    p.add_argument("--resume-from-last-good", action="store_true",
                   help="as --resume, but if the newest checkpoint is damaged, continue from the newest whole one (the "
                        "damaged ones are renamed step_N.damaged)")
    p.add_argument("--baseline", choices=("longgen", "full"), help="shorthand for baseline=...")
    p.add_argument("--export", action="store_true", help="only export the last checkpoint as a longgen model")
    p.add_argument("--export-hf", metavar="DIR", help="also write the final model to DIR as a Hugging Face Llama "
                   "(config.json + model.safetensors; transformers runs every layer full, longgen keeps the layout)")
    args = p.parse_args(argv)
    overrides = list(args.overrides) + ([f"baseline={args.baseline}"] if args.baseline else []) + \
        ([f"export_hf={args.export_hf}"] if args.export_hf else [])
    compile_settings()
    train(load_config(TrainConfig, args.config, overrides), args.resume, args.export, args.resume_from_last_good)


if __name__ == "__main__":
    run_cli(main)
