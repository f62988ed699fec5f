"""A run on disk and on the machine: the input's parts, where files live, memory requests, the outdir claim, GPUs,
progress, the terminal summary, and `virnucpro extract` (the whole pipeline in one process)."""
