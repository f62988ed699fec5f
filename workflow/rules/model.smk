rule fetch_model:
    """Download a named fair-esm model once, so GPU nodes load it from disk."""
    output:
        os.path.join(OPTIONS.model_dir, "{name}.pt"),
    log:
        os.path.join(OPTIONS.model_dir, "{name}.fetch.log"),
    benchmark:
        os.path.join(OPTIONS.model_dir, "{name}.fetch.benchmark.tsv")
    wildcard_constraints:
        name="[^/]+",
    localrule: True
    conda:
        "../../envs/virnucpro.yaml"
    script:
        STAGE


rule convert_hf_model:
    """Convert a Hugging Face ESM-2 folder once into a fair-esm-format checkpoint."""
    input:
        unpack(hf_source),
    output:
        os.path.join(OPTIONS.model_dir, "converted", "{name}.pt"),
    log:
        os.path.join(OPTIONS.model_dir, "converted", "{name}.log"),
    benchmark:
        os.path.join(OPTIONS.model_dir, "converted", "{name}.benchmark.tsv")
    localrule: True
    conda:
        "../../envs/virnucpro.yaml"
    script:
        STAGE
