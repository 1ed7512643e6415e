"""What train.py stands on: its YAML config with key=value overrides (config.py), corpora tokenised once into
memory-mapped token files (token_store.py), documents packed into training windows (data.py), resumable checkpoints
(checkpoint.py), and context parallelism that exchanges only the keys each pattern can reach
(context_parallel.py)."""
