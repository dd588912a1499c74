"""Print the requirements of streamguard's base dependencies plus EXTRA..., one a line, from pyproject.toml.

The image builds install these first, from pyproject.toml alone, so that the dependency layer is reused
while only the code changes; the package itself is installed afterwards with --no-deps. An extra that
names streamguard itself (``streamguard[inprocess]``) is expanded. An unknown extra is an error: pip would
only warn and quietly build an image without it.

    python requirements_from_pyproject.py [--pyproject FILE] [--exclude NAME]... [--only NAME]... EXTRA...
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[([^\]]*)\])?")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(project: dict, extras: list[str]) -> list[str]:
    own = canonical(project["name"])
    optional = project.get("optional-dependencies", {})
    out: list[str] = []
    seen: set[str] = set()

    def add(requirement: str) -> None:
        match = NAME.match(requirement)
        if match and canonical(match.group(1)) == own:
            for extra in (match.group(3) or "").split(","):
                if extra.strip():
                    expand(extra.strip())
        elif requirement not in out:
            out.append(requirement)

    def expand(extra: str) -> None:
        if extra in seen:
            return
        if extra not in optional:
            raise SystemExit(f"pyproject.toml has no extra {extra!r} (it has: {', '.join(sorted(optional))})")
        seen.add(extra)
        for requirement in optional[extra]:
            add(requirement)

    for requirement in project.get("dependencies", []):
        add(requirement)
    for extra in extras:
        expand(extra)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("extras", nargs="*")
    parser.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    parser.add_argument("--exclude", action="append", default=[], help="leave out this distribution")
    parser.add_argument("--only", action="append", default=[], help="print only this distribution")
    args = parser.parse_args(argv)
    project = tomllib.loads(args.pyproject.read_text())["project"]
    exclude = {canonical(n) for n in args.exclude}
    only = {canonical(n) for n in args.only}
    for requirement in requirements(project, args.extras):
        name = canonical(NAME.match(requirement).group(1))  # type: ignore[union-attr]
        if name in exclude or (only and name not in only):
            continue
        print(requirement)
    return 0


if __name__ == "__main__":
    sys.exit(main())
