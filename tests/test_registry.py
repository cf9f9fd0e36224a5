"""Method and dataset registries: discovery and clear errors."""
import pytest

from datasets import DatasetError, get_dataset, list_datasets
from methods import MethodError, build_method, list_methods, resolve_method_name


def test_registered_names_have_descriptions():
    methods = list_methods()
    assert {"global", "local"} <= set(methods)
    assert all(text for text in methods.values())
    assert "synthetic" in list_datasets()


def test_unknown_method_names_the_fix():
    with pytest.raises(MethodError, match=r"unknown method 'nope'.*registered methods: .*global.*bench.py list"):
        resolve_method_name("nope")


def test_unknown_dataset_names_the_fix():
    with pytest.raises(DatasetError, match=r"unknown dataset 'nope'.*synthetic"):
        get_dataset("nope")


def test_bad_model_config_is_reported():
    with pytest.raises(MethodError, match="methods.local.model"):
        build_method("local", 7, not_a_knob=1)
    with pytest.raises(MethodError, match="overlap"):
        build_method("local", 7, window=64, overlap=64)
