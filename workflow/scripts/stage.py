# The stage of the calling rule, run by Snakemake's `script:` directive: paths and options
# arrive as data in the `snakemake` object, never through a shell.
from virnucpro_core.cli import job

job(snakemake)  # noqa: F821
