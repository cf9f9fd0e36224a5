"""params.yaml: one override order for every command, shared schedules, whole-config validation, `bench.py config`."""
from __future__ import annotations

import pytest
import yaml
from click.testing import CliRunner
from conftest import REPO

from bench import cli
from pipelines.config import ConfigError, load_config


def run(*args):
    return CliRunner().invoke(cli, list(args))


def test_params_yaml_holds_deltas_only():
    assert len((REPO / "params.yaml").read_text().splitlines()) < 200
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
    assert (phase1.lr, phase2.lr) == (0.0005, 0.0002)


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
