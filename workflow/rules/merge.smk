rule merge:
    """All shards into one Parquet in input order, with skipped.tsv and accounting."""
    input:
        shards=L.shards,
        embeddings=shard_embeddings,
        spot_checks=shard_spot_checks,
    output:
        embeddings=merged_embeddings(),
        skipped=L.skipped,
        spot_check=L.spot_checks,
        summary=L.summary,
    log:
        L.log("merge"),
    benchmark:
        L.benchmark("merge")
    conda:
        "../../envs/virnucpro.yaml"
    resources:
        mem_mb=resources.MERGE_MB,
        runtime=60,
    script:
        STAGE
