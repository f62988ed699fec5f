checkpoint shard_fasta:
    """Validate the FASTA inputs; cut kept records into residue-balanced shards."""
    input:
        input_fastas(),
    output:
        shards=directory(f"{OUT}/shards"),
    log:
        f"{OUT}/logs/shard_fasta.log",
    benchmark:
        f"{OUT}/benchmarks/shard_fasta.tsv"
    conda:
        "../../envs/virnucpro.yaml"
    resources:
        mem_mb=8000,
        runtime=120,
    params:
        shards=shard_count_arg(),
        on_invalid=config["on_invalid"],
        translate=translate_args(),
    shell:
        "python -m virnucpro_core shard {input:q} --outdir {output.shards} "
        "{params.shards} --on-invalid {params.on_invalid} {params.translate} > {log} 2>&1"
