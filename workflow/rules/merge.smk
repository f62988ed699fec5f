rule merge:
    """All shards into one Parquet in input order, with skipped.tsv and accounting."""
    input:
        shards=f"{OUT}/shards",
        embeddings=shard_embeddings,
        spot_checks=shard_spot_checks,
    output:
        embeddings=f"{OUT}/embeddings.parquet",
        skipped=f"{OUT}/skipped.tsv",
        spot_check=f"{OUT}/spot_check.tsv",
        summary=f"{OUT}/summary.json",
    log:
        f"{OUT}/logs/merge.log",
    benchmark:
        f"{OUT}/benchmarks/merge.tsv"
    conda:
        "../../envs/virnucpro.yaml"
    resources:
        mem_mb=16000,
        runtime=60,
    params:
        outdir=lambda wildcards, output: os.path.dirname(output.embeddings) or ".",
    shell:
        "python -m virnucpro_core merge --manifest {input.shards}/manifest.json "
        "--skipped {input.shards}/skipped.tsv --embeddings {input.embeddings} "
        "--spot-checks {input.spot_checks} --outdir {params.outdir} > {log} 2>&1"
