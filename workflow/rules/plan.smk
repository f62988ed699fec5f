rule packing_plan:
    """First-fit-decreasing packs of one shard, with padding-free efficiency."""
    input:
        f"{OUT}/shards/{{shard}}.parquet",
    output:
        plan=f"{OUT}/plans/{{shard}}.parquet",
        stats=f"{OUT}/plans/{{shard}}.json",
    log:
        f"{OUT}/logs/packing_plan/{{shard}}.log",
    benchmark:
        f"{OUT}/benchmarks/packing_plan/{{shard}}.tsv"
    conda:
        "../../envs/virnucpro.yaml"
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        budget=config["packing"]["token_budget"],
        policy=config["long_sequences"]["policy"],
        overlap=config["long_sequences"]["overlap"],
    shell:
        "python -m virnucpro_core plan {input} --out {output.plan} --stats {output.stats} "
        "--budget {params.budget} --long-policy {params.policy} --overlap {params.overlap} "
        "> {log} 2>&1"
