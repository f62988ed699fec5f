rule spot_check:
    """Re-embed a length-stratified sample unpacked and compare with the packed result."""
    input:
        shard=f"{OUT}/shards/{{shard}}.parquet",
        embeddings=f"{OUT}/embeddings/{{shard}}.parquet",
        model=model_file(),
    output:
        tsv=f"{OUT}/spot_check/{{shard}}.tsv",
        json=f"{OUT}/spot_check/{{shard}}.json",
    log:
        f"{OUT}/logs/spot_check/{{shard}}.log",
    benchmark:
        f"{OUT}/benchmarks/spot_check/{{shard}}.tsv"
    conda:
        "../../envs/virnucpro.yaml"
    threads: 1
    resources:
        gpu=1,
        mem_mb=config["embedding"]["mem_mb"],
        runtime=60,
    params:
        emb=config["embedding"],
        check=config["spot_check"],
        policy=config["long_sequences"]["policy"],
        overlap=config["long_sequences"]["overlap"],
        thresholds=" ".join(
            f"--{flag} {config['spot_check'][key]}"
            for flag, key in (
                ("pooled-threshold", "pooled_cosine"),
                ("residue-threshold", "min_residue_cosine"),
            )
            if config["spot_check"][key] is not None
        ),
    shell:
        "python -m virnucpro_core spot-check {input.shard} --embeddings {input.embeddings} "
        "--out {output.tsv} --model {input.model} --device {params.emb[device]} "
        "--dtype {params.emb[dtype]} --lock-dir {params.emb[lock_dir]} "
        "--sample {params.check[sample]} --long-policy {params.policy} "
        "--overlap {params.overlap} {params.thresholds} --on-fail {params.check[on_fail]} "
        "> {log} 2>&1"
