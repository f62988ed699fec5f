rule embed_shard:
    """Packed ESM-2 forward of one shard on one GPU (the CPU if none)."""
    input:
        shard=f"{OUT}/shards/{{shard}}.parquet",
        plan=f"{OUT}/plans/{{shard}}.parquet",
        model=model_file(),
    output:
        f"{OUT}/embeddings/{{shard}}.parquet",
    log:
        f"{OUT}/logs/embed_shard/{{shard}}.log",
    benchmark:
        f"{OUT}/benchmarks/embed_shard/{{shard}}.tsv"
    conda:
        "../../envs/virnucpro.yaml"
    threads: 2
    resources:
        gpu=1,
        mem_mb=config["embedding"]["mem_mb"],
        runtime=config["embedding"]["runtime"],
    params:
        emb=config["embedding"],
        layers=csv(config["embedding"]["layers"]),
        poolings=csv(config["embedding"]["poolings"]),
        per_residue=csv(config["embedding"]["per_residue_layers"]),
    shell:
        "python -m virnucpro_core embed {input.shard} --plan {input.plan} --out {output} "
        "--model {input.model} --device {params.emb[device]} --dtype {params.emb[dtype]} "
        "--backend {params.emb[attention]} --layers={params.layers} "
        "--poolings={params.poolings} --per-residue-layers={params.per_residue} "
        "--output-dtype {params.emb[output_dtype]} --lock-dir {params.emb[lock_dir]} "
        "> {log} 2>&1"
