"""A small reader for the Dockerfile: instructions, stages, ARG defaults and .dockerignore rules.

Enough of Docker's syntax for the checks in test_dockerfile.py (line continuations, comments,
`FROM image AS name`, `${VAR}` substitution from ARG defaults); the real parser is hadolint's.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Stage:
    """One FROM ... AS name block."""

    base: str  # as written, ${VAR} unresolved
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Dockerfile:
    """Global ARG defaults and the stages, in file order."""

    global_args: dict[str, str]
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def resolve(self, text: str, args: dict[str, str]) -> str:
        """Substitute ${VAR} / $VAR with build-arg values."""
        values = {**self.global_args, **args}
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m.group(1) or m.group(2), m.group(0)), text)

    def chain(self, target: str, args: dict[str, str]) -> list[Stage]:
        """The stages an image built for `target` consists of, base first (stages it only COPYs from excluded)."""
        names = {s.name for s in self.stages}
        out, current = [], self.stage(target)
        while True:
            out.insert(0, current)
            base = self.resolve(current.base, args)
            if base not in names:
                return out
            current = self.stage(base)


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuations joined and comments dropped."""
    out, buffer = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not buffer):
            continue
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        line, buffer = buffer + line, ""
        if line:
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def parse(path: Path) -> Dockerfile:
    """Read a Dockerfile into global ARGs and stages."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for keyword, rest in instructions(path.read_text()):
        if keyword == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(base=parts[0], name=name))
        elif not stages and keyword == "ARG":
            key, _, value = rest.partition("=")
            global_args[key] = value
        elif stages:
            stages[-1].instructions.append((keyword, rest))
    return Dockerfile(global_args, stages)


def dockerignored(relpath: str, patterns: list[str]) -> bool:
    """Whether .dockerignore patterns exclude a path (last matching pattern wins, `!` re-includes)."""
    excluded = False
    parts = relpath.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = fnmatch.translate(pattern).replace(".*.*/", "(.*/)?")
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


def dockerignore_patterns(path: Path) -> list[str]:
    """The non-comment lines of a .dockerignore file."""
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
