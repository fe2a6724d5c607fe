"""The built-in default model: its corpus, tokenizer and training."""
