"""The Dockerfile, without a Docker engine: what it copies exists and reaches the build context, its requirement
list installs what the container's own torch, Megatron-Core and Triton do not replace, and what
`scripts/gpu_check.sh` runs is in the image."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = (REPO / "Dockerfile").read_text()
LOGICAL_LINES = DOCKERFILE.replace("\\\n", "")     # Docker joins a line ending in a backslash with the next


def copied_paths() -> list[str]:
    return [source for line in LOGICAL_LINES.splitlines() if line.startswith("COPY ")
            for source in line.split()[1:-1]]


def dockerignored() -> set[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return {line.strip() for line in lines if line.strip() and not line.startswith("#")}


def requirements() -> list[str]:
    """The requirement list the RUN step writes, by running its `python -c` program in the repository."""
    program = re.search(r'python -c "(.*?)" > /tmp/requirements\.txt', LOGICAL_LINES, re.S).group(1)
    return subprocess.run([sys.executable, "-c", program], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.split()


def test_every_copied_path_exists_and_is_in_the_build_context():
    sources = copied_paths()
    assert {"umtrain", "pyproject.toml", "configs", "scripts", "benchmarks", "tests"} <= set(sources)
    for source in sources:
        assert (REPO / source).exists(), source
        assert source not in dockerignored(), source


def test_requirements_leave_the_containers_torch_megatron_and_triton_alone():
    names = [re.split(r"[<>=\[ ]", requirement)[0] for requirement in requirements()]
    assert not {"torch", "megatron-core", "triton"} & set(names)
    assert {"numpy", "sentencepiece", "transformers", "pytest"} <= set(names)    # pytest: gpu_check.sh's tests


def test_what_gpu_check_runs_is_copied_into_the_image():
    script = (REPO / "scripts" / "gpu_check.sh").read_text()
    used = set(re.findall(r"\b((?:benchmarks|tests|configs)/[\w./-]+\.(?:py|yaml))", script))
    used |= {f"configs/paper/{model}.yaml" for model in re.search(r"for model in ([\w\s-]+); do", script)
             .group(1).split()}
    assert used
    for path in used:
        assert (REPO / path).exists(), path
        assert path.split("/")[0] in copied_paths(), path
