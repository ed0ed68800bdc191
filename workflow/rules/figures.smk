# Figures: the paper's from the results it quotes; smoke figures from this machine's smoke runs.


rule figure:
    input:
        csv=lambda wc: paper_source(wc.exp),
        manifest=lambda wc: manifest(paper_source(wc.exp)),
        code=lambda wc: plot_code(wc.exp),
    output:
        pdf="figures/{exp}.pdf",
        png="figures/{exp}.png",
    wildcard_constraints:
        exp="|".join(PAPER_EXPERIMENTS),
    params:
        python=PYTHON,
    resources:
        mem_mb=2000,
        runtime=15,
    log:
        f"{RESULTS}/logs/figure.{{exp}}.log",
    conda:
        ENV_FILE
    shell:
        "{params.python} -m fieldprint.plots {wildcards.exp} {input.csv} figures/{wildcards.exp} > {log} 2>&1"


rule smoke_figure:
    input:
        csv=lambda wc: result(wc.exp, "smoke"),
        manifest=lambda wc: manifest(result(wc.exp, "smoke")),
        code=lambda wc: plot_code(wc.exp),
    output:
        pdf="figures/smoke/{exp}.pdf",
        png="figures/smoke/{exp}.png",
    wildcard_constraints:
        exp="|".join(PAPER_EXPERIMENTS),
    params:
        python=PYTHON,
    resources:
        mem_mb=2000,
        runtime=15,
    log:
        f"{RESULTS}/logs/smoke_figure.{{exp}}.log",
    conda:
        ENV_FILE
    shell:
        "{params.python} -m fieldprint.plots {wildcards.exp} {input.csv} figures/smoke/{wildcards.exp} > {log} 2>&1"
