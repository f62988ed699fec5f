rule fetch_model:
    """Download a named fair-esm model once, so GPU nodes load it from disk."""
    output:
        os.path.join(OPTIONS.model_dir, "{name}.pt"),
    log:
        os.path.join(OPTIONS.model_dir, "{name}.fetch.log"),
    benchmark:
        os.path.join(OPTIONS.model_dir, "{name}.fetch.benchmark.tsv")
    localrule: True
    conda:
        "../../envs/virnucpro.yaml"
    script:
        STAGE
