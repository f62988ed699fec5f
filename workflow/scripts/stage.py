# The stage of the calling rule, run by Snakemake's `script:` directive: paths and options
# arrive as data in the `snakemake` object, never through a shell.
import sys
from pathlib import Path

# the core package of this checkout, installed or not (the conda env holds only its dependencies)
sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))  # noqa: F821
from virnucpro_core.cli import job  # noqa: E402

job(snakemake)  # noqa: F821
