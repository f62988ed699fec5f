rule spot_check:
    """Re-embed a length-stratified sample unpacked and compare with the packed result."""
    input:
        shard=L.shard("{shard}"),
        embeddings=L.shard_embeddings("{shard}"),
        model=model_file(),
    output:
        tsv=L.spot_check("{shard}"),
        json=L.spot_check_summary("{shard}"),
    log:
        L.log("spot_check", "{shard}"),
    benchmark:
        L.benchmark("spot_check", "{shard}")
    conda:
        "../../envs/virnucpro.yaml"
    threads: 1
    resources:
        gpu=1,
        mem_mb=OPTIONS.embedding.mem_mb,
        runtime=60,
    script:
        STAGE
