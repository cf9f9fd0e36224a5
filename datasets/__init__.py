"""Datasets: one module each, registered by name. Importing this package registers them all."""
from datasets import synthetic  # noqa: F401  (registers synthetic)
from datasets.base import (  # noqa: F401
    DatasetError,
    DatasetInfo,
    PreparedDataset,
    get_dataset,
    list_datasets,
)
