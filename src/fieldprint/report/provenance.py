"""Where the numbers came from: the machine and software versions the paper's measurements ran
on, as macros."""

from __future__ import annotations

from pathlib import Path

from fieldprint.report import latex_escape
from fieldprint.results import read_manifest


def environment_macros(gpu_manifest: Path, local_manifest: Path) -> dict[str, str]:
    """``env.*`` keys from the manifest of a GPU experiment and of a locally run one."""
    gpu, local = read_manifest(gpu_manifest), read_manifest(local_manifest)
    values = {
        "env.gpu": gpu["gpu"] or "no GPU",
        "env.date": gpu["date"][:10],
        "env.driver": gpu["driver"],
        "env.cuda": gpu["cuda"],
        "env.torch": gpu["torch"],
        "env.triton": gpu["triton"],
        "env.python": gpu["python"],
        "env.commit": gpu["commit"][:10],
        "env.local_cpu_count": local["cpu_count"],
        "env.local_torch": local["torch"],
        "env.local_date": local["date"][:10],
    }
    return {key: latex_escape(value) for key, value in values.items()}
