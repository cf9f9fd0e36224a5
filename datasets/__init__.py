"""Datasets: one module each, registered by name. Importing this package registers them all."""
from datasets import (  # noqa: F401  (importing a dataset module registers it)
    cityscapes,
    deepglobe,
    inria,
    synthetic,
    urur,
)
from datasets.base import (  # noqa: F401
    DatasetError,
    DatasetInfo,
    PreparedDataset,
    get_dataset,
    list_datasets,
)
