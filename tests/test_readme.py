"""The README tells the truth on a fresh clone: every registered method is in its Methods table (and nothing else),
every command in its Commands table, the options it says commands take are the ones they take, and nothing in the
repository points at a file a user does not have."""
from __future__ import annotations

import re
import subprocess

import pytest
from conftest import REPO

README = (REPO / "README.md").read_text()


def section(title: str) -> str:
    """The text of the README's `## title` section (up to the next `## `)."""
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else None]


def table_names(text: str) -> list[str]:
    """The first cell of each row of the markdown tables in `text`, when it starts with a `code` name."""
    return [m.group(1) for m in re.finditer(r"^\| `([a-z0-9_]+)[` ]", text, flags=re.M)]


def test_methods_table_is_the_registry():
    from pipelines.discovery import method_catalog

    assert sorted(table_names(section("Methods"))) == sorted(method_catalog())


def test_commands_table_is_the_cli():
    import bench

    assert sorted(table_names(section("Commands"))) == sorted(bench.cli.commands)


def test_the_options_the_readme_promises():
    """'These take `--params FILE` and `--set ...`: a, b; `x` and `y` take `--params`.' must match the CLI."""
    import bench

    match = re.search(r"take `--params FILE` and `--set key=value` \(repeatable\): ([^;]+); ([^.]+) take "
                      r"`--params`", section("Commands"))
    assert match, "the sentence about --params/--set is missing"
    both = set(re.findall(r"`([a-z]+)`", match.group(1)))
    params_only = set(re.findall(r"`([a-z]+)`", match.group(2)))
    options = {name: {o for p in cmd.params for o in p.opts} for name, cmd in bench.cli.commands.items()}
    assert both == {n for n, o in options.items() if {"--params", "--set"} <= o}
    assert params_only == {n for n, o in options.items() if "--params" in o and "--set" not in o}


OUTSIDE = ("../" + "shared", "/" + "work/", "DESIGN" + ".md", "closing " + "notes", "the " + "tracker")


def tracked_text_files() -> list:
    names = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    return [REPO / n for n in names if n.endswith((".py", ".md", ".yaml", ".yml", ".txt", ".toml", ".cfg", ".lock"))
            or n in (".ci/run", ".gitignore", ".dvcignore")]


@pytest.mark.parametrize("pattern", OUTSIDE)
def test_nothing_points_outside_the_repository(pattern):
    """The product never points at the authors' machine or at files a clone does not have."""
    hits = [f"{path.relative_to(REPO)}:{n}" for path in tracked_text_files() if path.is_file()
            for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if pattern in line]
    assert not hits, hits


def test_specs_are_cited_inside_the_repository():
    """Method and protocol specs are cited as docs/specs/<file>.md, which the repository has."""
    bare = re.compile(r"(?<!docs/)(?<![\w/])specs/[a-z]+\.md")
    hits = [f"{path.relative_to(REPO)}:{n}" for path in tracked_text_files() if path.is_file()
            for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if bare.search(line)]
    assert not hits, hits
    for cited in {m for path in tracked_text_files() if path.is_file()
                  for m in re.findall(r"docs/specs/[a-z]+\.md", path.read_text(errors="replace"))}:
        assert (REPO / cited).is_file(), cited


def test_docs_the_readme_links_exist():
    """Every repository path the README names in backticks or links exists (docs/, benchmarks/, tests/, ...)."""
    paths = set(re.findall(r"`((?:docs|benchmarks|tests|methods|pipelines|datasets)/[A-Za-z0-9_./-]+)`", README))
    paths |= set(re.findall(r"\]\(((?:docs|benchmarks|tests)/[^)#]+)\)", README))
    missing = [p for p in sorted(paths) if "<" not in p and "*" not in p and not (REPO / p).exists()]
    assert not missing, missing
