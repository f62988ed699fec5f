rule shard:
    """Validate one part of the input (a byte range of one file) and write its records to embed."""
    input:
        part_input,
    output:
        rows=L.part("{part}"),
        manifest=L.part("{part}", "manifest"),
        ids=L.part("{part}", "ids"),
        skipped=L.part("{part}", "skipped"),
        sequence_keys=L.part("{part}", "keys"),
    log:
        L.log("shard", "{part}"),
    benchmark:
        L.benchmark("shard", "{part}")
    conda:
        "../../envs/virnucpro.yaml"
    resources:
        mem_mb=lambda wildcards: memory.part_mb(PART[wildcards.part]),
        runtime=60,
    params:
        part=part_spec,
    script:
        STAGE


rule shard_index:
    """The parts checked together (while the GPUs work): record numbers, ids used twice, per-file counts."""
    input:
        manifests=part_files("manifest"),
        ids=part_files("ids"),
        skipped=part_files("skipped"),
    output:
        manifest=L.manifest,
        skipped=L.shard_skipped,
    log:
        L.log("shard_index"),
    benchmark:
        L.benchmark("shard_index")
    conda:
        "../../envs/virnucpro.yaml"
    resources:
        mem_mb=lambda wildcards, input: memory.index_mb(input.size_mb),
        runtime=30,
    params:
        parts=[p.to_dict() for p in PARTS],
        inputs=input_fastas(),
    script:
        STAGE
