# Generated LaTeX (numbers and tables), the claims report, the reproduction report, the PDF.


rule macros:
    input:
        csv=lambda wc: paper_source(wc.exp),
        manifest=lambda wc: manifest(paper_source(wc.exp)),
        code=lambda wc: report_code(wc.exp),
    output:
        "paper/generated/{exp}.tex",
    wildcard_constraints:
        exp="|".join(PAPER_EXPERIMENTS),
    params:
        python=PYTHON,
    resources:
        mem_mb=2000,
        runtime=15,
    log:
        f"{RESULTS}/logs/macros.{{exp}}.log",
    conda:
        ENV_FILE
    shell:
        "{params.python} -m fieldprint.report macros {wildcards.exp} {input.csv} {output} > {log} 2>&1"


rule environment_macros:
    input:
        gpu=manifest(paper_source("e1_throughput")),
        local=manifest(paper_source("e0_unfused")),
    output:
        "paper/generated/env.tex",
    params:
        python=PYTHON,
    resources:
        mem_mb=2000,
        runtime=15,
    log:
        f"{RESULTS}/logs/env_macros.log",
    conda:
        ENV_FILE
    shell:
        "{params.python} -m fieldprint.report environment {input.gpu} {input.local} {output} > {log} 2>&1"


rule ceiling_macros:
    input:
        hash=paper_source("e3_hash"),
        hash_manifest=manifest(paper_source("e3_hash")),
        sass=SASS_RESULT,
        sass_manifest=manifest(SASS_RESULT),
    output:
        "paper/generated/e3_ceiling.tex",
    params:
        python=PYTHON,
    resources:
        mem_mb=2000,
        runtime=15,
    log:
        f"{RESULTS}/logs/ceiling_macros.log",
    conda:
        ENV_FILE
    shell:
        "{params.python} -m fieldprint.report ceiling {input.hash} {input.sass} {output} > {log} 2>&1"


# One committed run of every experiment on a 2-core CPU: the artifact appendix's CPU run times and
# the expected verdicts of the studies without an H200 reference.
CPU_REFERENCE = "data/reference/cpu"


rule artifact_macros:
    input:
        h200=sorted(glob.glob(f"{REFERENCE}/*.csv") + glob.glob(f"{REFERENCE}/*.manifest.json")),
        cpu=sorted(glob.glob(f"{CPU_REFERENCE}/*.csv") + glob.glob(f"{CPU_REFERENCE}/*.manifest.json")),
        code=verdict_code(),
    output:
        "paper/generated/artifact.tex",
    params:
        python=PYTHON,
        h200=lambda w, input: os.path.dirname(input.h200[0]),
        cpu=lambda w, input: os.path.dirname(input.cpu[0]),
    resources:
        mem_mb=2000,
        runtime=15,
    log:
        f"{RESULTS}/logs/artifact_macros.log",
    conda:
        ENV_FILE
    shell:
        "{params.python} -m fieldprint.report artifact {output} {params.h200} {params.cpu} > {log} 2>&1"


rule all_macros:
    input:
        expand("paper/generated/{exp}.tex", exp=PAPER_EXPERIMENTS),
        "paper/generated/env.tex",
        "paper/generated/e3_ceiling.tex",
        "paper/generated/artifact.tex",
    output:
        "paper/generated/all.tex",
    params:
        python=PYTHON,
    resources:
        mem_mb=2000,
        runtime=15,
    log:
        f"{RESULTS}/logs/all_macros.log",
    conda:
        ENV_FILE
    shell:
        "{params.python} -m fieldprint.report index {output} {input} > {log} 2>&1"


rule claims:
    input:
        results=[with_manifest(paper_source(exp)) for exp in PAPER_EXPERIMENTS],
        code=verdict_code(),
    output:
        f"{RESULTS}/claims.md",
    params:
        python=PYTHON,
        pairs=" ".join(f"{exp}={paper_source(exp)}" for exp in PAPER_EXPERIMENTS),
    resources:
        mem_mb=2000,
        runtime=15,
    log:
        f"{RESULTS}/logs/claims.log",
    conda:
        ENV_FILE
    shell:
        "{params.python} -m fieldprint.report claims {output} {params.pairs} > {log} 2>&1"


# The experiments this machine measures: with a GPU all of them, else those whose numbers every
# machine measures (the report says NOT RUN for the claims of the rest).
FRESH = PAPER_EXPERIMENTS if HAS_CUDA else list(LOCAL_EXPERIMENTS)


rule reproduction:
    input:
        fresh=[with_manifest(paper_source(exp)) for exp in FRESH],
        reference=[with_manifest(f"{REFERENCE}/{exp}.csv") for exp in GPU_EXPERIMENTS],
        code=verdict_code(),
    output:
        f"{RESULTS}/reproduction.md",
    params:
        python=PYTHON,
        reference=lambda w, input: os.path.dirname(input.reference[0]),
        pairs=" ".join(f"{exp}={paper_source(exp)}" for exp in FRESH),
    resources:
        mem_mb=2000,
        runtime=15,
    log:
        f"{RESULTS}/logs/reproduction.log",
    conda:
        ENV_FILE
    shell:
        "{params.python} -m fieldprint.report reproduction {output} {params.reference} {params.pairs} > {log} 2>&1"


rule paper:
    input:
        "paper/main.tex",
        "paper/refs.bib",
        "paper/latexmkrc",
        "paper/generated/all.tex",
        sorted(glob.glob("paper/sections/*.tex")),
        expand("figures/{exp}.pdf", exp=PAPER_EXPERIMENTS),
    output:
        PAPER_PDF,
    resources:
        mem_mb=2000,
        runtime=15,
    log:
        f"{RESULTS}/logs/paper.log",
    conda:
        ENV_FILE
    # Each build runs in a fresh folder, removed on exit: an interrupted build (Ctrl-C) leaves
    # no latexmk state behind that would make the next run refuse ("gave an error"), and folders
    # a killed build could not remove are cleared first (one build at a time: Snakemake's lock).
    # The PDF is moved into place in one rename.
    shell:
        "cd paper && rm -rf .latex-* && build=$(mktemp -d .latex-XXXXXX) && "
        "trap 'rm -rf \"$build\"' EXIT && "
        "latexmk -pdf -outdir=\"$build\" main.tex > ../{log} 2>&1 && mv -f \"$build/main.pdf\" main.pdf"
