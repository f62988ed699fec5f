rule embed_shard:
    """Packed ESM-2 forward of one shard (its parts, in order) on one GPU (the CPU if none): duplicates of
    earlier rows skipped, packs planned, written chunk by chunk (a killed job resumes from its last chunk);
    then, on the same model, the spot-check: a length-stratified sample re-embedded unpacked and compared.
    """
    input:
        parts=shard_parts,
        earlier=earlier_keys,
        model=MODEL_FILE,
    output:
        embeddings=temp(L.shard_embeddings("{shard}")),
        dups=temp(L.shard_dups("{shard}")),
        stats=L.shard_stats("{shard}"),
        plan=L.plan("{shard}"),
        plan_stats=L.plan_stats("{shard}"),
        spot_check=L.spot_check("{shard}"),
        spot_check_summary=L.spot_check_summary("{shard}"),
    log:
        L.log("embed_shard", "{shard}"),
    benchmark:
        L.benchmark("embed_shard", "{shard}")
    conda:
        "../../envs/virnucpro.yaml"
    threads: 2
    resources:
        gpu=1,
        mem_mb=embed_mem_mb,
        runtime=OPTIONS.embedding.runtime,
    params:
        progress=L.progress("{shard}"),
    script:
        STAGE
