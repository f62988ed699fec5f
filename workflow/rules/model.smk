rule fetch_model:
    """Download a named fair-esm model once, so GPU nodes load it from disk."""
    output:
        f"{config['model_dir']}/{{name}}.pt",
    log:
        f"{config['model_dir']}/{{name}}.fetch.log",
    benchmark:
        f"{config['model_dir']}/{{name}}.fetch.benchmark.tsv"
    localrule: True
    conda:
        "../../envs/virnucpro.yaml"
    params:
        model_dir=lambda wildcards, output: os.path.dirname(output[0]),
    shell:
        "python -m virnucpro_core fetch-model {wildcards.name} "
        "--model-dir {params.model_dir} > {log} 2>&1"
