checkpoint shard_fasta:
    """Validate the FASTA inputs; cut kept records into residue-balanced shards."""
    input:
        input_fastas(),
    output:
        shards=directory(L.shards),
    log:
        L.log("shard_fasta"),
    benchmark:
        L.benchmark("shard_fasta")
    conda:
        "../../envs/virnucpro.yaml"
    resources:
        mem_mb=lambda wildcards, input: resources.shard_mb(input.size_mb),
        runtime=120,
    params:
        residues_per_shard=residues_per_shard(),
    script:
        STAGE
