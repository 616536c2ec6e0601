"""Write images/constraints.txt: the exact version of every package the images install besides torch.

    .venv/bin/pip install -e ".[data,pipeline]" psycopg2-binary boto3    # the environment to lock
    .venv/bin/python images/lock.py

The roots are the project's dependencies with the extras the images install (read from pyproject.toml)
plus SERVER_PACKAGES; the versions are the ones installed in the running environment, so the images get
what the tests ran against. torch and torchvision are left out (pinned in pyproject.toml; the CUDA image
takes them from its base image, the CPU image from the PyTorch CPU index), and so is everything that only
they pull in (CUDA libraries, triton): `pip install -c` constrains, it never adds a package.
"""

import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = ("data", "pipeline")
SERVER_PACKAGES = ["psycopg2-binary", "boto3"]  # the MLflow server's PostgreSQL backend and S3 artifact store
FROM_TORCH = {"torch", "torchvision", "flexi-jest"}  # never pinned here


def image_requirements() -> list[Requirement]:
    """The project's dependencies with EXTRAS, and SERVER_PACKAGES."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    raw = list(project["dependencies"])
    for extra in EXTRAS:
        raw += project["optional-dependencies"][extra]
    return [Requirement(line) for line in raw + SERVER_PACKAGES]


def installed_closure(roots: list[Requirement]) -> dict[str, str]:
    """name -> installed version for the roots and everything they require here (markers evaluated for
    this interpreter and the requested extras), without descending into FROM_TORCH."""
    versions: dict[str, str] = {}
    visited: set[tuple[str, frozenset[str]]] = set()
    pending = list(roots)
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        key = (name, frozenset(requirement.extras))
        if name in FROM_TORCH or key in visited:
            continue
        visited.add(key)
        try:
            distribution = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"{requirement} is required but not installed here; install it, then lock again") from None
        versions[name] = distribution.version
        for line in distribution.requires or []:
            dependency = Requirement(line)
            wanted = {""} | set(requirement.extras)
            if dependency.marker is None or any(dependency.marker.evaluate({"extra": extra}) for extra in wanted):
                pending.append(dependency)
    return versions


def main() -> int:
    versions = installed_closure(image_requirements())
    header = [f"# Written by images/lock.py (Python {sys.version_info.major}.{sys.version_info.minor}): "
              "exact versions for `pip install -c` in images/Dockerfile*.",
              "# torch and torchvision are pinned in pyproject.toml and installed before these."]
    lines = header + [f"{name}=={version}" for name, version in sorted(versions.items())]
    out = ROOT / "images" / "constraints.txt"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {len(versions)} pins to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
