"""What the discovery commands (`bench.py list`, `bench.py env --no-torch`) print, found without importing torch.

Importing `methods` or `datasets` imports torch, timm and torchvision (tens of seconds on a loaded machine) only to
print a few strings. The catalogue here reads those strings from the source instead: `ast` finds each class
decorated with `register_method` and each `register_dataset(...)` call, and takes the literal values they register.
tests/test_cli_fast.py checks that the catalogue equals the imported registry, so the two cannot drift apart.
This module imports the standard library only; keep it that way.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
METHODS_DIR = REPO_ROOT / "methods"
DATASETS_DIR = REPO_ROOT / "datasets"
# what `env --no-torch` reports the installed version of (distribution names, as pip knows them)
PACKAGES = ("torch", "torchvision", "timm", "numpy", "mlflow", "dvc", "pydantic", "nvidia-ml-py")


class CatalogError(ValueError):
    """A registration the source does not spell out literally; `bench.py list` then imports the registry."""


@dataclass(frozen=True)
class MethodEntry:
    name: str
    description: str
    label: str = ""
    aliases: tuple[str, ...] = ()


def _modules(folder: Path) -> list[Path]:
    """The modules the package's `__init__` imports: top-level `*.py` files not starting with `_`."""
    return sorted(p for p in folder.glob("*.py") if not p.name.startswith("_"))


def _literal(node: ast.AST, where: str):
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise CatalogError(f"{where} is not a literal; `bench.py list` reads it from the source") from None


def _callee(node: ast.AST) -> str:
    """`f`, `m.f`, `f(...)` -> 'f'; anything else -> ''."""
    if isinstance(node, ast.Call):
        node = node.func
    if isinstance(node, ast.Attribute):
        return node.attr
    return node.id if isinstance(node, ast.Name) else ""


def _assignments(body: list[ast.stmt]) -> dict[str, ast.expr]:
    """name -> value of the plain `x = ...` / `x: T = ...` statements of a module or class body (last one wins)."""
    found: dict[str, ast.expr] = {}
    for stmt in body:
        if isinstance(stmt, ast.Assign):
            for target in stmt.targets:
                if isinstance(target, ast.Name):
                    found[target.id] = stmt.value
        elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value is not None:
            found[stmt.target.id] = stmt.value
    return found


def _methods_in(path: Path) -> list[MethodEntry]:
    entries = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.ClassDef):
            continue
        decorators = [d for d in node.decorator_list if _callee(d) == "register_method"]
        if not decorators:
            continue
        where = f"{path.name}: {node.name}"
        attrs = _assignments(node.body)
        for required in ("name", "description"):
            if required not in attrs:
                raise CatalogError(f"{where} sets no `{required}` in its class body")
        aliases: tuple[str, ...] = ()
        for decorator in decorators:
            if isinstance(decorator, ast.Call):
                for keyword in decorator.keywords:
                    if keyword.arg == "aliases":
                        aliases = tuple(_literal(keyword.value, f"{where} aliases"))
        entries.append(MethodEntry(name=_literal(attrs["name"], f"{where}.name"),
                                   description=_literal(attrs["description"], f"{where}.description"),
                                   label=_literal(attrs["label"], f"{where}.label") if "label" in attrs else "",
                                   aliases=aliases))
    return entries


def _datasets_in(path: Path) -> list[tuple[str, str]]:
    tree = ast.parse(path.read_text(), str(path))
    module_level = _assignments(tree.body)
    entries = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and _callee(node) == "register_dataset" and node.args):
            continue
        info = node.args[0]
        if isinstance(info, ast.Name) and info.id in module_level:
            info = module_level[info.id]
        where = f"{path.name}: register_dataset"
        if not (isinstance(info, ast.Call) and _callee(info) == "DatasetInfo"):
            raise CatalogError(f"{where} is not given a `DatasetInfo(...)` written in the module")
        fields = {k.arg: k.value for k in info.keywords if k.arg}
        fields.update(zip(("name", "description"), info.args, strict=False))
        if "name" not in fields or "description" not in fields:
            raise CatalogError(f"{where}: DatasetInfo without name and description")
        entries.append((_literal(fields["name"], f"{where} name"),
                        _literal(fields["description"], f"{where} description")))
    return entries


def _unique(pairs: list[tuple[str, object]], kind: str) -> dict:
    found: dict = {}
    for name, value in pairs:
        if name in found:  # the import raises the proper error; let it
            raise CatalogError(f"{kind} '{name}' is registered twice")
        found[name] = value
    return dict(sorted(found.items()))


def method_catalog(folder: Path = METHODS_DIR) -> dict[str, MethodEntry]:
    """name -> entry of every method `methods/__init__.py` would register, sorted by name."""
    return _unique([(e.name, e) for path in _modules(folder) for e in _methods_in(path)], "method")


def dataset_catalog(folder: Path = DATASETS_DIR) -> dict[str, str]:
    """name -> description of every dataset `datasets/__init__.py` would register, sorted by name."""
    return _unique([pair for path in _modules(folder) for pair in _datasets_in(path)], "dataset")


# The three helpers below repeat pipelines/tracking.py (which imports torch at module level); tests/test_cli_fast.py
# checks they agree.
def tracking_uri(root: Path = REPO_ROOT) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root / 'mlflow.db').resolve()}"


def git_commit(root: Path = REPO_ROOT) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10)
        commit = out.stdout.strip()
        if out.returncode != 0 or not commit:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(name: str) -> str:
    """The installed distribution's version from its metadata (nothing is imported), or 'not installed'."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def torch_build() -> dict[str, str]:
    """torch's full version (with the build tag, e.g. '+cu130') and the CUDA it was compiled for, read from
    `torch/version.py` as plain `env` reports them; {} when that file cannot be read so."""
    try:
        spec = importlib.util.find_spec("torch")  # a top-level name: found, not imported
        values = _assignments(ast.parse(Path(spec.origin).with_name("version.py").read_text()).body)
        return {"torch": _literal(values["__version__"], "torch.__version__"),
                "cuda_compiled": _literal(values["cuda"], "torch.version.cuda") or "none"}
    except (AttributeError, KeyError, OSError, SyntaxError, TypeError, CatalogError):
        return {}


def environment_info() -> dict[str, str]:
    """The part of `pipelines.tracking.environment_info` that needs no torch, plus more package versions."""
    return {
        "device": "not checked (--no-torch; plain `bench.py env` asks torch)",
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        **{name: package_version(name) for name in PACKAGES},
        **torch_build(),
        "git_commit": git_commit(),
        "platform": platform.platform(),
        "python_executable": sys.executable,
        "mlflow_tracking_uri": tracking_uri(),
    }
