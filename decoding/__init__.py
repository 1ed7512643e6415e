"""Fused Triton kernels for batch-1 decoding on a GPU (kernels.py), installed into a model from outside with
`kernels.use_fused_decoding(model)`, and their tile sizes per GPU model (tiles.json, written by
benchmarks/bench_tiles.py)."""
