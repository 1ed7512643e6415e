"""Benchmarks beside bench.py, run from the repository root with `python -m benchmarks.NAME`: several GPUs
(bench_cp.py, under torchrun), the data pipeline on a CPU (bench_data.py), FlexAttention's tile size (bench_masks.py)
and the decoding kernels' tiles (bench_tiles.py)."""
