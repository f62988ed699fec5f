rule report_figures:
    """Figures and tables for `snakemake --report report.html`."""
    input:
        rules.merge.output,
    output:
        input=report(
            f"{OUT}/report/input.png",
            caption="../report/input.rst",
            category="1. Input",
        ),
        packing=report(
            f"{OUT}/report/packing.png",
            caption="../report/packing.rst",
            category="2. Packing",
        ),
        packing_table=report(
            f"{OUT}/report/packing.html",
            caption="../report/packing_table.rst",
            category="2. Packing",
        ),
        embedding=report(
            f"{OUT}/report/embedding.png",
            caption="../report/embedding.rst",
            category="3. Embedding",
        ),
        embedding_table=report(
            f"{OUT}/report/embedding.html",
            caption="../report/embedding_table.rst",
            category="3. Embedding",
        ),
        equivalence=report(
            f"{OUT}/report/equivalence.png",
            caption="../report/equivalence.rst",
            category="4. Equivalence",
        ),
        worst=report(
            f"{OUT}/report/spot_check_worst.html",
            caption="../report/worst.rst",
            category="4. Equivalence",
        ),
        projection=report(
            f"{OUT}/report/projection.png",
            caption="../report/projection.rst",
            category="5. Embeddings",
        ),
        provenance=report(
            f"{OUT}/report/provenance.html",
            caption="../report/provenance.rst",
            category="6. Provenance",
        ),
    log:
        f"{OUT}/logs/report_figures.log",
    benchmark:
        f"{OUT}/benchmarks/report_figures.tsv"
    conda:
        "../../envs/virnucpro.yaml"
    resources:
        mem_mb=8000,
        runtime=30,
    params:
        outdir=lambda wildcards, input: os.path.dirname(input[0]) or ".",
        figdir=lambda wildcards, output: os.path.dirname(output.input),
        config=json.dumps(config, sort_keys=True),
    shell:
        "python -m virnucpro_core report --outdir {params.outdir} --figdir {params.figdir} "
        "--config-json {params.config:q} > {log} 2>&1"
