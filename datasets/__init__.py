"""Datasets: one module each (`datasets/<name>.py`), found and imported here, so registering a dataset in its own
module is all it takes to add one. `base`, `download` and `transforms` are shared and register nothing.

Call `register_dataset(INFO, prepare)` with `INFO = DatasetInfo(name="...", description="...", ...)` written in the
module: `bench.py list` reads both literals from the source without importing torch (pipelines/discovery.py)."""
import importlib
import pkgutil

from datasets.base import (  # noqa: F401
    DatasetError,
    DatasetInfo,
    DecodeCache,
    PreparedDataset,
    get_dataset,
    list_datasets,
)

for _module in pkgutil.iter_modules(__path__):
    if not _module.ispkg and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
