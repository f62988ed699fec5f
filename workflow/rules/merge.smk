rule merge:
    """All shards in input order (moved into place, rewritten only where duplicates are filled or rows
    dropped), with skipped.tsv and the accounting; the shards' own copies are removed after it.
    """
    input:
        manifest=L.manifest,
        skipped=L.shard_skipped,
        parts=part_files(),
        embeddings=per_shard("shard_embeddings"),
        dups=per_shard("shard_dups"),
        spot_checks=per_shard("spot_check"),
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
    threads: 2
    resources:
        mem_mb=lambda wildcards, input: memory.merge_mb(input.size_mb),
        runtime=60,
    script:
        STAGE
