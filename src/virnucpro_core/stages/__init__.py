"""One module per workflow stage: shard -> plan -> embed -> spot_check -> merge.

Each stage is ``run(paths..., options)``: it reads and writes files only, so it runs the
same from Snakemake (``workflow/scripts/stage.py``), the command line
(``python -m virnucpro_core <stage>``) or Python.
"""
