"""ESM-2 models: which file a model spec names, fair-esm checkpoints read and checked, Hugging Face conversion."""
