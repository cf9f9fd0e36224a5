"""Methods: one module each, named after the method (`methods/<name>.py`), found and imported here so that
registering a class is all it takes to add one. Shared building blocks live in `methods/blocks/`.

Write `name`, `description` (and `label`, `aliases=`) as literals in the registered class itself: `bench.py list` reads
them from the source without importing torch (pipelines/discovery.py; tests/test_cli_fast.py checks they agree)."""
import importlib
import pkgutil

from methods.base import (  # noqa: F401
    Ablation,
    Knob,
    MethodError,
    Output,
    ParamCount,
    Phase,
    UHRMethod,
    Variant,
    build_method,
    count_parameters,
    display_name,
    list_methods,
    method_class,
    register_method,
    resolve_method_name,
    run_names,
    split_variant,
)

# `methods/global.py` cannot be named in an import statement (`global` is a keyword); importlib takes it.
for _module in pkgutil.iter_modules(__path__):
    if not _module.ispkg and _module.name != "base" and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
