rule embed_shard:
    """Packed ESM-2 forward of one shard on one GPU (the CPU if none)."""
    input:
        shard=L.shard("{shard}"),
        plan=L.plan("{shard}"),
        model=model_file(),
    output:
        L.shard_embeddings("{shard}"),
    log:
        L.log("embed_shard", "{shard}"),
    benchmark:
        L.benchmark("embed_shard", "{shard}")
    conda:
        "../../envs/virnucpro.yaml"
    threads: 2
    resources:
        gpu=1,
        mem_mb=OPTIONS.embedding.mem_mb,
        runtime=OPTIONS.embedding.runtime,
    script:
        STAGE
