# virnucpro: protein FASTA -> packed ESM-2 embeddings in Parquet.
# FASTA -> parts (read at once) -> shards: packed embedding and spot-check (one GPU per job) -> merge.
from snakemake.utils import min_version

min_version("9.0")


include: "workflow/rules/preflight.smk"


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/shard.smk"
include: "workflow/rules/embed.smk"
include: "workflow/rules/merge.smk"
include: "workflow/rules/report.smk"


onstart:
    claim_outdir()


onsuccess:
    summarise(True)


onerror:
    summarise(False)


rule all:
    default_target: True
    input:
        rules.merge.output,
        rules.report_figures.output,
