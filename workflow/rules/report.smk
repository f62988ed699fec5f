rule report_figures:
    """Figures and tables for `snakemake --report report.html`."""
    input:
        rules.merge.output,
        stats=per_shard("shard_stats"),
        plans=per_shard("plan_stats"),
    output:
        input=report(
            L.figure("input.png"),
            caption="../report/input.rst",
            category="1. Input",
        ),
        packing=report(
            L.figure("packing.png"),
            caption="../report/packing.rst",
            category="2. Packing",
        ),
        packing_table=report(
            L.figure("packing.html"),
            caption="../report/packing_table.rst",
            category="2. Packing",
        ),
        embedding=report(
            L.figure("embedding.png"),
            caption="../report/embedding.rst",
            category="3. Embedding",
        ),
        embedding_table=report(
            L.figure("embedding.html"),
            caption="../report/embedding_table.rst",
            category="3. Embedding",
        ),
        equivalence=report(
            L.figure("equivalence.png"),
            caption="../report/equivalence.rst",
            category="4. Equivalence",
        ),
        worst=report(
            L.figure("spot_check_worst.html"),
            caption="../report/worst.rst",
            category="4. Equivalence",
        ),
        projection=report(
            L.figure("projection.png"),
            caption="../report/projection.rst",
            category="5. Embeddings",
        ),
        provenance=report(
            L.figure("provenance.html"),
            caption="../report/provenance.rst",
            category="6. Provenance",
        ),
    log:
        L.log("report_figures"),
    benchmark:
        L.benchmark("report_figures")
    conda:
        "../../envs/virnucpro.yaml"
    resources:
        mem_mb=8000,
        runtime=30,
    script:
        STAGE
