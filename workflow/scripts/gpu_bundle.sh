#!/usr/bin/env bash
# Prepare .whl/: the Python packages the GPU machine lacks (hydra-core, snakemake, blake3 and their
# dependencies, gguf for the SmolLM2 file), as wheels for its Python 3.12 / x86-64, minus what its image already has.
# Run here (with network); then workflow/scripts/gpu_run.sh runs on the GPU machine with .whl carried.
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .whl && mkdir -p .whl
# 1. Resolve and build every dependency here: pure-Python ones (some only exist as sdists, e.g.
#    antlr4-python3-runtime 4.9.3 that hydra-core pins) come out as py3-none-any wheels.
python3 -m pip wheel --quiet -w .whl hydra-core==1.3.8 omegaconf==2.3.1 blake3==1.0.11 gguf==0.19.0 snakemake==9.27.1
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
IMAGE_HAS="numpy PyYAML Jinja2 MarkupSafe packaging psutil requests urllib3 idna certifi charset_normalizer
  tabulate wrapt attrs Pygments typing_extensions filelock setuptools six python_dateutil tqdm"
for have in $IMAGE_HAS; do
  rm -f .whl/"$have"-*.whl .whl/"${have,,}"-*.whl
done
# 4. Every dependency of every carried wheel is carried or on the image (a missing one, such as
#    platformdirs once, only shows on the GPU machine, where nothing can be installed).
python3 - "$IMAGE_HAS" <<'PY'
import re, sys, zipfile, pathlib
from packaging.markers import Marker
from packaging.requirements import Requirement
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
       "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
have = {norm(n) for n in sys.argv[1].split()}
wheels = list(pathlib.Path(".whl").glob("*.whl"))
have |= {norm(w.name.split("-")[0]) for w in wheels}
missing = set()
for w in wheels:
    meta = next(n for n in zipfile.ZipFile(w).namelist() if n.endswith(".dist-info/METADATA"))
    for line in zipfile.ZipFile(w).read(meta).decode().splitlines():
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if (req.marker is None or req.marker.evaluate(env)) and norm(req.name) not in have:
                missing.add(f"{req.name} (needed by {w.name.split('-')[0]})")
if missing:
    sys.exit("missing from the bundle and the image: " + ", ".join(sorted(missing)))
print(f"bundle closed: {len(wheels)} wheels")
PY
ls .whl | cut -d- -f1 | tr '\n' ' '; echo
du -sh .whl
