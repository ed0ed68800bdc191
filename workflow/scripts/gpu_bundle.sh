#!/usr/bin/env bash
# Prepare .whl/: the Python packages the GPU machine lacks (hydra-core, snakemake, blake3 and their
# dependencies), as wheels for its Python 3.12 / x86-64, minus what its image already has.
# Run here (with network); then workflow/scripts/gpu_run.sh runs on the GPU machine with .whl carried.
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .whl && mkdir -p .whl
# 1. Resolve and build every dependency here: pure-Python ones (some only exist as sdists, e.g.
#    antlr4-python3-runtime 4.9.3 that hydra-core pins) come out as py3-none-any wheels.
python3 -m pip wheel --quiet -w .whl hydra-core==1.3.8 omegaconf==2.3.1 blake3==1.0.11 snakemake==9.27.1
# 2. Swap the compiled wheels built for this Python for the GPU machine's CPython 3.12 builds.
for whl in .whl/*-cp3*.whl; do
  [ -e "$whl" ] || continue
  spec=$(basename "$whl" | cut -d- -f1,2 | sed 's/-/==/')
  rm "$whl"
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$spec"
done
# 3. Packages the GPU image already holds (device/KINDS.md): keep its versions, carry none of them.
for have in numpy PyYAML pyyaml Jinja2 jinja2 MarkupSafe markupsafe packaging psutil requests urllib3 idna \
    certifi charset_normalizer tabulate wrapt attrs Pygments pygments typing_extensions \
    filelock setuptools six python_dateutil; do  # (platformdirs is not in the image: carried)
  rm -f .whl/"$have"-*.whl
done
ls .whl | cut -d- -f1 | tr '\n' ' '; echo
du -sh .whl
