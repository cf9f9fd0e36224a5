"""One contract over every registered method and dataset: registering one is what puts it under test.

Each method is built with its smoke configuration from params.yaml (code defaults where it has no block), predicts
at two sizes (one not divisible by anything), trains every phase with finite losses that reach the phase's
parameters, and matches the parameter counts its spec declares. Its declarations (knobs, outputs, ablation rows,
published rows) must name real keywords and real rows."""
from __future__ import annotations

import inspect

import pytest
import torch

from datasets import get_dataset, list_datasets
from methods import UHRMethod, build_method, list_methods, method_class, run_names
from pipelines.config import check_model, load_config
from pipelines.published import published_ablations, tables

METHODS = sorted(list_methods())
RUNS = run_names()  # each method, or each of its variants (`unet-global`, `unet-local`)


def first_run(name: str) -> str:
    """What a method builds as: itself, or its first variant."""
    variants = method_class(name).variants
    return f"{name}-{variants[0].name}" if variants else name
SIZES = [(320, 320), (300, 262)]  # the smoke patch sizes fit; 300 x 262 divides by nothing useful


def smoke_config(name: str) -> dict:
    config = load_config()
    if method_class(name).name not in (config.raw.get("methods") or {}):
        return {}
    return config.method_model(name, "synthetic")


def build(name: str, **extra):
    torch.manual_seed(0)
    name = first_run(name) if name in METHODS else name
    return build_method(name, 7, **{**smoke_config(name), **extra})


@pytest.mark.parametrize("name", METHODS)
def test_method_lives_in_its_own_module(name):
    cls = method_class(name)
    assert cls.__module__ == f"methods.{name}"  # what DVC's per-method dependency relies on
    assert cls.description and cls.name == name


@pytest.mark.parametrize("name", RUNS)
def test_predict_at_two_sizes(name):
    model = build(name).eval()
    for h, w in SIZES:
        images = torch.randint(0, 256, (1, 3, h, w), dtype=torch.uint8)
        with torch.inference_mode():
            logits = model.predict(images)
            assert logits.shape == (1, 7, h, w) and torch.isfinite(logits).all()
            for output in model.outputs:
                value = model.predict_output(images, output.name)
                channels = 7 if output.kind == "logits" else 1
                assert value.shape == (1, channels, h, w) and torch.isfinite(value).all(), output


@pytest.mark.parametrize("name", RUNS)
def test_every_phase_trains(name):
    model = build(name).train()
    images = torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8)
    labels = torch.randint(0, 7, (2, 256, 256))
    labels[:, :8] = 255  # ignored pixels are allowed
    for phase in model.phases:
        model.set_phase(phase.name)
        model.zero_grad(set_to_none=True)
        terms = model.forward_train(images, labels)
        assert terms and all(t.dim() == 0 and torch.isfinite(t) for t in terms.values()), terms
        sum(terms.values()).backward()
        reached = [p for p in model.phase_parameters(phase) if p.grad is not None and p.grad.abs().sum() > 0]
        assert reached, f"{name}/{phase.name}: no trained parameter got a gradient"


FROZEN = [name for name in RUNS if any(p.frozen_eval for p in build(name).phases)]


@pytest.mark.parametrize("name", FROZEN)
def test_frozen_submodules_stay_in_eval_mode(name):
    """A phase's frozen_eval submodules keep eval mode (BN statistics, dropout) whenever the model is put in train mode,
    by the trainer or after an evaluation."""
    model = build(name)
    for phase in model.phases:
        model.set_phase(phase.name)
        model.eval()
        model.train()
        for sub in phase.frozen_eval:
            assert not any(m.training for m in model.get_submodule(sub).modules()), (phase.name, sub)
        trained = [n for n in (phase.trainable or ()) if n not in phase.frozen_eval]
        assert all(model.get_submodule(n).training for n in trained), phase.name


def _inference_parameters(model, size: int = 512) -> int:
    ran, hooks = set(), []
    for module_name, module in model.named_modules():
        hooks.append(module.register_forward_hook(lambda m, i, o, n=module_name: ran.add(n)))
    try:
        with torch.inference_mode():
            model.predict(torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8))
    finally:
        for hook in hooks:
            hook.remove()
    return sum(p.numel() for n, m in model.named_modules() if n in ran for p in m.parameters(recurse=False))


COUNTED = [(name, i) for name in METHODS for i in range(len(method_class(name).param_counts))]


@pytest.mark.parametrize(("name", "index"), COUNTED)
def test_declared_parameter_counts(name, index):
    declared = method_class(name).param_counts[index]
    # the variant the configuration names (`inference: isd` -> pspnet-isd), else the first
    run = next((f"{name}-{v.name}" for v in method_class(name).variants
                if v.model.items() <= declared.config.items()), first_run(name))
    model = build_method(run, declared.num_classes, **declared.config).eval()
    if declared.total is not None:
        assert sum(p.numel() for p in model.parameters()) == declared.total, declared.source
    if declared.inference is not None:
        assert _inference_parameters(model) == declared.inference, declared.source
    for key, value in declared.named.items():
        assert model.parameter_counts()[key] == value, (key, declared.source)


def test_methods_with_a_spec_declare_counts():
    assert {n for n, _ in COUNTED} >= {"isdnet", "rue", "glnet"}


@pytest.mark.parametrize("name", METHODS)
def test_declarations_name_real_keywords_and_rows(name):
    cls = method_class(name)
    keywords = inspect.signature(cls.__init__).parameters
    for knob in cls.knobs:
        assert knob.name in keywords and knob.sweep
        for value in knob.sweep:
            knob.check(value)
    for row in cls.ablations:
        check_model(name, row.model, f"{name} ablation {row.key}")
    rows = set()  # every way a row can be named: "UNet", "Local inference: UNet", "UNet [local]"
    for spec in tables().values():
        for r in spec["rows"]:
            rows |= {r["method"], f"{r.get('group')}: {r['method']}"}
            rows |= {f"{r['method']} [{c['key']}]" for c in spec.get("columns", []) if isinstance(c, dict)}
    assert set(cls.published) <= rows, "a published row the tables do not have"
    for settings in cls.published.values():
        assert set(settings) <= {k.name for k in cls.knobs} | {"variant"}
        assert settings.get("variant", cls.variants[0].name if cls.variants else None) in \
            [v.name for v in cls.variants] + ([None] if not cls.variants else [])
    for table, spec in (published_ablations().get(name, {}).get("tables") or {}).items():
        assert set(spec["rows"]) <= {r.key for r in cls.ablations if r.table == table}, table
    first = {}
    for row in cls.ablations:  # a row printed in several tables: one key, one model, one table each
        assert first.setdefault(row.key, row).model == row.model, row.key
    assert len({(r.key, r.table) for r in cls.ablations}) == len(cls.ablations)


@pytest.mark.parametrize("name", METHODS)
def test_ablation_rows_build(name):
    for row in method_class(name).ablations:
        build(name, **row.model)


@pytest.mark.parametrize("name", sorted(list_datasets()))
def test_dataset_declares_its_contract(name):
    info = get_dataset(name).info
    assert info.name == name and info.description
    assert len(info.palette) == info.num_classes >= 2 and all(len(c) == 3 for c in info.palette)
    assert set(info.counted_classes) <= set(range(info.num_classes)) and info.counted_classes
    assert set(info.fine_classes) <= set(range(info.num_classes))
    assert info.ignore_index == 255 and len(info.native_size) == 2
    assert info.headline == "miou" or info.headline.split(":", 1)[1] in info.class_names
    assert name in load_config().raw["datasets"], "every dataset has a datasets.<name> block in params.yaml"
    assert "source" in inspect.signature(get_dataset(name).prepare).parameters


ROUND_TRIP = [n for n in METHODS if method_class(n).save_official is not UHRMethod.save_official]


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_upstream_checkpoint_round_trip(name, tmp_path):
    """Methods with an upstream layout write it (`save_official`) and read it back (`load_official`) exactly;
    BN statistics are perturbed so that a mapping that drops or swaps them shows."""
    source = build(name).eval()
    with torch.no_grad():
        for module in source.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.3, 0.3)
                module.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "official"
    source.save_official(str(path))
    torch.manual_seed(1)
    target = build_method(first_run(name), 7, **smoke_config(name)).eval()
    target.load_official(str(path))
    theirs = target.state_dict()
    scope = method_class(name).official_scope
    compared = [k for k, v in source.state_dict().items() if v.is_floating_point() and k.startswith(scope)]
    assert compared and [k for k in compared if not torch.equal(source.state_dict()[k], theirs[k])] == []


def test_round_trips_cover_the_methods_with_official_code():
    assert set(ROUND_TRIP) >= {"isdnet", "rue", "glnet"}
