"""Which dataset specs may reach beyond storage: `pipe:` commands and http(s):// URLs are off unless enabled.

A dataset spec is input (a CLI flag, a KFP parameter anyone with the UI edits, an MLflow tag anyone with write
access plants), and the pods that read it hold the S3 and MLflow Secrets. So by default a spec names storage
only (a path, file://, s3://); the trust model is docs/security.md. A stage config enables more in its
`data_access` field (DataAccess):

    allow_http: true                 http(s):// shards and HEAD checks
    pipe_commands: [curl, aws]       pipe: commands whose program (argv[0], exactly as written) is named here

A `pipe:` command is split into an argument list (shlex) and run without a shell; a shell or a launcher that
runs its arguments as a command (sh, bash, env, xargs, python, ...) is refused like any program not named,
with its own message, and runs only if the list names it. Checks happen where a spec enters: a config's
validation (check_spec, with the field named), a rerun's MLflow tags (pipeline_support.resolve_earlier_run), and again
when a spec is resolved or a shard opened (specs.py), under the process's policy, which run_stage sets from
the stage's config for the whole stage (granted; a program calling the library directly sets it the same way).
"""

import shlex
from contextlib import contextmanager
from pathlib import PurePosixPath
from typing import Iterator

from pydantic import BaseModel, ConfigDict, Field, field_validator

from flexi_jest.errors import BadInput

ENABLE_PIPE = "data_access.pipe_commands"
ENABLE_HTTP = "data_access.allow_http"
SECURITY_DOC = "docs/security.md"
# programs that run their arguments (or stdin) as a command: named in errors, refused unless listed
SHELLS = {"sh", "bash", "dash", "zsh", "ksh", "mksh", "fish", "csh", "tcsh", "ash", "busybox", "env", "xargs",
          "nohup", "timeout", "nice", "ionice", "setsid", "stdbuf", "sudo", "su", "doas", "chroot", "flock", "script",
          "watch", "eval", "exec", "python", "python3", "perl", "ruby", "node", "php", "lua", "awk", "gawk", "tclsh"}


class SpecError(ValueError, BadInput):
    """A dataset spec that names nothing readable, or that the data-access policy refuses; the message (one line)
    names the spec and why (and, when refused, the setting that would allow it)."""


class DataAccess(BaseModel):
    """What a stage's dataset specs may reach besides storage (paths, file://, s3://). Off by default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    allow_http: bool = Field(False, description="http(s):// specs: shards read with GET, checked with HEAD")
    pipe_commands: tuple[str, ...] = Field((), description=(
        "programs a pipe: spec may run, each matched exactly against the command's first argument (`curl` "
        "allows `pipe:curl -s ...`, not `pipe:/tmp/curl ...`); empty: pipe: specs are refused. Commands run "
        "as argument lists, never through a shell, with the stage's environment (its credentials)"))

    @field_validator("pipe_commands", mode="before")
    @classmethod
    def _names(cls, value):
        if isinstance(value, str):  # `--set data_access.pipe_commands=curl`
            value = [value]
        return value

    @field_validator("pipe_commands")
    @classmethod
    def _plain_programs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            if not name.strip() or name != name.strip() or any(c in name for c in " \t\n\0"):
                raise ValueError(f"pipe_commands: {name!r} is not a program name (one word: `curl`, `/usr/bin/aws`)")
        return value


def _pipe_problem(spec: str, command: str, access: DataAccess) -> str | None:
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        return f"dataset spec {spec!r}: the pipe: command cannot be split into arguments ({exc})"
    if not argv:
        return f"dataset spec {spec!r}: the pipe: command is empty"
    program = argv[0]
    if program in access.pipe_commands:
        return None
    enable = f"name {program!r} in {ENABLE_PIPE} to allow it ({SECURITY_DOC})"
    if PurePosixPath(program).name in SHELLS or program.split("/")[-1].startswith("python"):
        return (f"dataset spec {spec!r} runs {program!r}, which runs its arguments as a command: pipe: commands "
                f"run as argument lists, never through a shell, and {program!r} is not allowed; {enable}")
    if not access.pipe_commands:
        return f"dataset spec {spec!r} runs a command (pipe:), and pipe: specs are off; {enable}"
    return (f"dataset spec {spec!r} runs {program!r}, which is not among the allowed pipe: programs "
            f"{list(access.pipe_commands)}; {enable}")


def spec_problem(spec: str, access: DataAccess) -> str | None:
    """Why access refuses spec (one line naming the spec and the setting that would allow it), or None."""
    if not isinstance(spec, str):
        return None
    for part in spec.split("::"):
        part = part.strip()
        if part.startswith("pipe:"):
            problem = _pipe_problem(spec, part[len("pipe:"):], access)
            if problem:
                return problem
        elif part.startswith(("http://", "https://")) and not access.allow_http:
            return (f"dataset spec {spec!r} reads over http(s), and http(s) specs are off; set {ENABLE_HTTP}: true "
                    f"to allow it ({SECURITY_DOC})")
    return None


def check_spec(spec: str, access: "DataAccess | None" = None, where: str = "") -> None:
    """Raise SpecError if access (default: the process's policy, current()) refuses spec; where: its source
    (a config field, an MLflow tag), put first in the message."""
    problem = spec_problem(spec, access if access is not None else current())
    if problem:
        raise SpecError(f"{where}: {problem}" if where else problem)


# ---- the process's policy --------------------------------------------------------------------------------------

_policy = DataAccess()


def current() -> DataAccess:
    """The data-access policy specs are resolved and shards opened under in this process (default: storage only)."""
    return _policy


@contextmanager
def granted(access: "DataAccess | None") -> Iterator[DataAccess]:
    """Resolve and read specs under access for the block (the whole process and its threads: one stage runs in a
    process); the previous policy afterwards."""
    global _policy
    previous, _policy = _policy, access if access is not None else DataAccess()
    try:
        yield _policy
    finally:
        _policy = previous
