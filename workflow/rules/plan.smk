rule packing_plan:
    """First-fit-decreasing packs of one shard, with padding-free efficiency."""
    input:
        shard=L.shard("{shard}"),
    output:
        plan=L.plan("{shard}"),
        stats=L.plan_stats("{shard}"),
    log:
        L.log("packing_plan", "{shard}"),
    benchmark:
        L.benchmark("packing_plan", "{shard}")
    conda:
        "../../envs/virnucpro.yaml"
    resources:
        mem_mb=lambda wildcards, input: resources.plan_mb(input.size_mb),
        runtime=30,
    script:
        STAGE
