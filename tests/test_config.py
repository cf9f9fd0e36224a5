"""params.yaml: one override order for every command, shared schedules, whole-config validation, `bench.py config`."""
from __future__ import annotations

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import REPO

from bench import cli
from pipelines.config import ConfigError, load_config


def run(*args):
    return CliRunner().invoke(cli, list(args))


def test_params_yaml_holds_deltas_only():
    # a line or two per generic network and its Cityscapes paper recipe; a dozen or two per UHR method
    assert len((REPO / "params.yaml").read_text().splitlines()) < 360
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    from pipelines.schema import constructor_keywords

    for method, block in raw["methods"].items():  # nothing restates a constructor default
        defaults, _ = constructor_keywords(method)
        same = [k for k, v in (block.get("model") or {}).items() if k in defaults and defaults[k] == v]
        assert same == [], (method, same)


def test_set_wins_over_the_recipe_for_training_and_evaluation():
    out = run("config", "--dataset", "deepglobe", "--method", "local", "--set", "profile=paper",
              "--set", "local.window=256")
    assert out.exit_code == 0, out.output
    resolved = yaml.safe_load(out.output)
    assert resolved["train"]["model"]["window"] == 256  # the paper recipe's model block says 612
    assert resolved["evaluate"]["model"]["window"] == 256 and resolved["measure"]["model"]["window"] == 256
    assert resolved["train"]["model"]["overlap"] == 112  # the rest of the recipe's model block still applies
    assert resolved["train"]["recipe"]["crop_size"] == 612 and resolved["train"]["recipe"]["iterations"] == 80000
    assert "code defaults < methods.<m>.model" in out.output.splitlines()[1]
    # the long form is the same override
    config = load_config(overrides=["profile=paper", "methods.local.model.window=300"])
    assert config.method_model("local", "deepglobe")["window"] == 300


def test_override_order_levels():
    config = load_config(overrides=["profile=paper"])
    assert config.method_model("local", "deepglobe")["window"] == 612  # dataset recipe over methods.local.model
    assert load_config().method_model("local", "synthetic")["window"] == 256  # methods.local.model over code
    assert "window" not in load_config().method_model("global", "synthetic")  # code default, not restated


def test_shared_schedule_is_named_once_and_refined():
    config = load_config(overrides=["profile=paper"])
    isdnet, rue = config.recipe("isdnet", "deepglobe"), config.recipe("rue", "deepglobe")
    assert (isdnet.optimizer, isdnet.lr, isdnet.iterations, isdnet.schedule.min_lr) == ("sgd", 0.01, 80000, 1e-4)
    assert (rue.optimizer, rue.lr, rue.schedule.min_lr, rue.schedule.power) == ("adam", 5e-5, 1e-5, 0.9)
    assert config.recipe("isdnet", "inria").iterations == 40000  # mmseg_40k_sgd uses mmseg_80k_sgd
    edited = load_config(overrides=["profile=paper", "schedules.mmseg_80k_sgd.lr=0.02"])
    assert edited.recipe("global", "deepglobe").lr == edited.recipe("isdnet", "deepglobe").lr == 0.02


def test_smoke_recipe_serves_a_new_dataset_and_paper_recipes_are_per_dataset():
    smoke = load_config()
    assert smoke.recipe("isdnet", "inria") == smoke.recipe("isdnet", "synthetic")
    with pytest.raises(ConfigError, match=r"no recipe at methods.isdnet.recipes.paper.datasets.cityscapes"):
        load_config(overrides=["profile=paper"]).recipe("isdnet", "cityscapes")


def test_phase_recipes_share_the_common_fields():
    config = load_config()
    phase1, phase2 = config.recipe("glnet", "synthetic", "phase1"), config.recipe("glnet", "synthetic", "phase2")
    assert (phase1.optimizer, phase1.weight_decay, phase1.rot90) == (phase2.optimizer, 0.0005, True)
    assert (phase1.lr, phase2.lr) == (0.001, 0.0002)


@pytest.mark.parametrize(("override", "fragment"), [
    ("profle=paper", "unknown top-level key 'profle'"),
    ("seed=abc", "seed: input should be a valid integer"),
    ("evaluate.num_visualizations=many", "evaluate.num_visualizations: input should be a valid integer"),
    ("train.workers=two", "train.workers: input should be a valid integer"),
    ("methods=[global, local]", "methods: input should be a valid dictionary"),
    ("measure.source=fake", "measure.source"),
    ("evaluate.tile_size=-5", "evaluate.tile_size"),
    ("local.windw=3", "unknown key(s) windw for method 'local'"),
    ("local.window=big", "local.window must be int, got 'big'"),
    ("methods.global.recipes.smoke.hflip=sometimes", "methods.global.recipes.smoke.hflip"),
    ("methods.global.recipes.smoke.use=nope", "unknown schedule 'nope'"),
    ("methods.isdnet.recipes.paper.datasets.deepglobe.model.aux_weigth=1", "unknown key(s) aux_weigth"),
    ("schedules.smoke_adamw.use=smoke_adamw", "uses itself"),
    ("methods.nope.recipes={}", "methods.nope: no registered method"),
])
def test_every_config_mistake_is_one_line(override, fragment):
    out = run("config", "--dataset", "synthetic", "--method", "local", "--set", override)
    assert out.exit_code == 1 and "Traceback" not in out.output
    lines = out.output.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], out.output


def test_a_wrong_type_in_the_file_names_the_file(tmp_path):
    text = (REPO / "params.yaml").read_text().replace("seed: 0", "seed: zero")
    path = tmp_path / "params.yaml"
    path.write_text(text)
    out = run("config", "--dataset", "synthetic", "--method", "local", "--params", str(path))
    assert out.exit_code == 1 and "seed" in out.output and "params.yaml" in out.output


def test_dataset_conventions_set_normalisation_for_every_profile():
    """RUE's DeepGlobe config normalises with DeepGlobe's own statistics, not ImageNet's (spec rue §5): the
    per-dataset layer applies in both profiles, below the recipes, and the built model normalises with it."""
    from methods import build_method

    for profile in ("smoke", "paper"):
        config = load_config(overrides=[f"profile={profile}"])
        model_kw = config.method_model("rue", "deepglobe")
        assert model_kw["pixel_mean"] == [103.275, 95.888, 70.868], profile
        assert model_kw["pixel_std"] == [17.122, 11.602, 11.299], profile
        assert model_kw["suppress_class"] == 0 and model_kw["entropy_divisor"] == 1.946
    assert "pixel_mean" not in config.method_model("rue", "inria")  # Inria's config: ImageNet, the default
    assert config.method_model("rue", "inria")["patch_num"] == 20
    model = build_method("rue", 7, **{k: v for k, v in model_kw.items() if k != "pretrained"})
    image = torch.full((1, 3, 2, 2), 103.275)
    image[:, 1], image[:, 2] = 95.888, 70.868
    assert model.normalize(image).abs().max() < 1e-5
    # a --set still wins over the dataset layer
    config = load_config(overrides=["rue.pixel_mean=[0,0,0]"])
    assert config.method_model("rue", "deepglobe")["pixel_mean"] == [0, 0, 0]


def test_bench_config_shows_the_source_of_the_conventions():
    out = run("config", "--dataset", "deepglobe", "--method", "rue")
    assert out.exit_code == 0, out.output
    resolved = yaml.safe_load(out.output)
    assert "deepglobe_1224x1224.py" in resolved["conventions"]["source"]
    assert resolved["evaluate"]["model"]["pixel_std"] == [17.122, 11.602, 11.299]
    out = run("config", "--dataset", "synthetic", "--method", "rue")
    resolved = yaml.safe_load(out.output)
    assert resolved["conventions"]["source"].startswith("none")
    assert resolved["train"]["model"]["pixel_mean"] == [123.675, 116.28, 103.53]  # the method's default
    out = run("config", "--dataset", "synthetic", "--method", "glnet")
    assert yaml.safe_load(out.output)["train"]["model"]["pixel_std"] == [255.0, 255.0, 255.0]  # ToTensor()


@pytest.mark.parametrize("edit, fragment", [
    ("methods.rue.datasets.nowhere={source: x}", "methods.rue.datasets.nowhere: unknown dataset"),
    ("methods.rue.datasets.inria={model: {patch_num: 4}}", "source: missing"),
    ("methods.rue.datasets.inria={source: x, model: {pixel_mean: [1, 2]}}", "pixel_mean must be"),
    ("methods.rue.datasets.inria={source: x, model: {patchnum: 4}}", "unknown key(s) patchnum"),
])
def test_bad_dataset_conventions_are_one_line(edit, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[edit])
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_bad_normalisation_value_names_the_fix():
    from methods import MethodError, build_method

    with pytest.raises(MethodError, match="pixel_std must be 3 numbers"):
        build_method("isdnet", 7, pixel_std=[1.0, 0.0, 1.0])
