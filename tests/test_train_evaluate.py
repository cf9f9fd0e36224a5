"""Training, evaluation and MLflow logging on the tiny synthetic dataset."""
import json

import mlflow
import pytest
import torch
from conftest import tiny_params

from pipelines.config import ConfigError, load_config
from pipelines.evaluate import evaluate
from pipelines.schema import Recipe
from pipelines.train import TrainingError, build_optimizer, build_scheduler, train


def test_poly_schedule_matches_mmseg_formula():
    recipe = Recipe.from_dict({"iterations": 100, "batch_size": 1, "lr": 0.01,
                               "schedule": {"name": "poly", "power": 0.9, "min_lr": 1e-4}}, "r")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    scheduler = build_scheduler(recipe, optimizer)
    for _ in range(50):
        optimizer.step()
        scheduler.step()
    expected = (0.01 - 1e-4) * (1 - 50 / 100) ** 0.9 + 1e-4
    assert optimizer.param_groups[0]["lr"] == pytest.approx(expected)


def test_multistep_schedule_matches_torch_multisteplr():
    """CascadePSP's recipe: x0.1 at 22,500 and 37,500 iterations, stepped per iteration (torch MultiStepLR)."""
    recipe = Recipe.from_dict({"iterations": 60, "batch_size": 1, "lr": 2.25e-4, "optimizer": "adam",
                               "schedule": {"name": "multistep", "milestones": [20, 45], "gamma": 0.1}}, "r")
    ours = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=2.25e-4)
    theirs = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=2.25e-4)
    mine, reference = build_scheduler(recipe, ours), torch.optim.lr_scheduler.MultiStepLR(theirs, [20, 45], 0.1)
    for _ in range(60):
        assert ours.param_groups[0]["lr"] == pytest.approx(theirs.param_groups[0]["lr"])
        for opt, sched in ((ours, mine), (theirs, reference)):
            opt.step()
            sched.step()
    assert ours.param_groups[0]["lr"] == pytest.approx(2.25e-6)


def test_linear_warmup_matches_mmcv_and_param_groups_scale_lr_and_decay():
    """mmseg Segformer: AdamW 6e-5, warm-up 1500 its from ratio 1e-6, head lr x10, norms without weight decay."""
    recipe = Recipe.from_dict({"iterations": 160000, "batch_size": 1, "lr": 6e-5, "optimizer": "adamw",
                               "weight_decay": 0.01,
                               "schedule": {"name": "poly", "power": 1.0, "min_lr": 0.0, "warmup_iters": 1500,
                                            "warmup_ratio": 1e-6},
                               "param_groups": {"head": {"lr_mult": 10.0}, "norm": {"decay_mult": 0.0},
                                                "head.norm": {"lr_mult": 2.0}}}, "r")
    model = torch.nn.ModuleDict({"backbone": torch.nn.ModuleDict({"conv": torch.nn.Conv2d(1, 1, 1),
                                                                  "norm1": torch.nn.LayerNorm(1)}),
                                 "decode_head": torch.nn.ModuleDict({"conv": torch.nn.Conv2d(1, 1, 1),
                                                                     "norm": torch.nn.LayerNorm(1)})})
    optimizer = build_optimizer(recipe, model.named_parameters())
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    settings = {n: (group_of[id(p)]["lr"], group_of[id(p)]["weight_decay"]) for n, p in model.named_parameters()}
    assert settings["backbone.conv.weight"] == (pytest.approx(6e-5), 0.01)
    assert settings["backbone.norm1.weight"] == (pytest.approx(6e-5), 0.0)
    assert settings["decode_head.conv.weight"] == (pytest.approx(6e-4), 0.01)  # "head" in the name
    assert settings["decode_head.norm.bias"] == (pytest.approx(1.2e-4), 0.01)  # the longest key wins
    scheduler = build_scheduler(recipe, optimizer)
    lrs = {}
    for it in range(1501):
        lrs[it] = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
    regular = lambda it: 6e-5 * (1 - it / 160000)  # noqa: E731
    assert lrs[0] == pytest.approx(regular(0) * 1e-6)
    assert lrs[750] == pytest.approx(regular(750) * (1 - 0.5 * (1 - 1e-6)))
    assert lrs[1500] == pytest.approx(regular(1500))
    with pytest.raises(TrainingError, match="param_groups: 'pos_block' matches no trainable parameter"):
        build_optimizer(Recipe.from_dict({"iterations": 1, "batch_size": 1, "lr": 1.0,
                                          "param_groups": {"pos_block": {"decay_mult": 0.0}}}, "r"),
                        model.named_parameters())


@pytest.mark.parametrize(("fields", "message"), [
    ({"resize_ratio": [2.0, 0.5]}, "resize_ratio must be a positive number or \\[low, high\\]"),
    ({"crop_size": [512, 4]}, "crop_size must be null, an integer >= 8 or \\[height, width\\]"),
    ({"schedule": {"warmup_iters": 10, "warmup_ratio": 0}}, "warmup_ratio in \\(0, 1\\]"),
    ({"param_groups": {"head": {"lr_multiplier": 10}}}, "param_groups"),
])
def test_bad_recipe_fields_get_one_line(fields, message):
    with pytest.raises(ConfigError, match=message):
        Recipe.from_dict({"iterations": 1, "batch_size": 1, "lr": 0.1, **fields}, "methods.m.recipes.paper")


def test_short_training_run_loss_falls_and_is_tracked(tmp_path, tiny_synthetic, mlflow_store):
    params = tiny_params(tmp_path, tiny_synthetic, iterations=60)
    # whole images: a steadier loss than random 64 px crops
    config = load_config(params, ["methods.local.recipes.smoke.crop_size=128"])
    path = train(config, "synthetic", "local")
    checkpoint = torch.load(path, weights_only=False)
    losses = checkpoint["loss_history"]["main"]
    assert len(losses) == 60
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.8 * first, f"loss did not fall: {first:.3f} -> {last:.3f}"

    # the run is in the MLflow store, tagged and with the logged loss curve
    client = mlflow.tracking.MlflowClient(mlflow_store)
    experiment = client.get_experiment_by_name("uhrbench-synthetic")
    runs = client.search_runs([experiment.experiment_id], "tags.stage = 'train'")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags["method"] == "local" and run.data.tags["profile"] == "smoke"
    assert run.data.tags["git_commit"] and run.data.tags["params_hash"] == config.params_hash("local", "synthetic")
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == list(range(5, 61, 5))
    assert run.data.params["model.window"] == "64"

    result = evaluate(config, "synthetic", "local")
    saved = json.loads((tmp_path / "results" / "metrics" / "synthetic" / "local.json").read_text())
    assert saved["miou"] == pytest.approx(result["miou"])
    assert set(saved["iou"]) == {"unknown", "urban", "agriculture", "rangeland", "forest", "water", "barren"}
    assert saved["counted_classes"] == ["urban", "agriculture", "rangeland", "forest", "water", "barren"]
    assert saved["pixels"] == 2 * 128 * 128

    evaluation = client.search_runs([experiment.experiment_id], "tags.stage = 'evaluate'")[0]
    assert evaluation.data.metrics["miou"] == pytest.approx(result["miou"])
    artifacts = {a.path for a in client.list_artifacts(evaluation.info.run_id)}
    assert {"confusion_matrix.json", "predictions", "local.json"} <= artifacts
    matrix = mlflow.artifacts.load_dict(f"{evaluation.info.artifact_uri}/confusion_matrix.json")["matrix"]
    assert sum(map(sum, matrix)) == 2 * 128 * 128
    panels = client.list_artifacts(evaluation.info.run_id, "predictions")
    assert len(panels) == 1 and panels[0].path.endswith(".png")


def test_training_is_seeded(tmp_path, tiny_synthetic, mlflow_store):
    params = tiny_params(tmp_path, tiny_synthetic, iterations=3)
    first = torch.load(train(load_config(params), "synthetic", "global"), weights_only=False)
    second = torch.load(train(load_config(params), "synthetic", "global"), weights_only=False)
    assert first["loss_history"] == second["loss_history"]


def test_a_refiners_base_trains_the_same_whichever_refiner_is_built_after_it(tmp_path, tiny_synthetic, mlflow_store):
    """DGF builds a learned guide after its base, DenseCRF nothing: the same base recipe and seed must still give the
    same base (a phase's randomness comes from (seed, phase), not from how much randomness the model build took),
    so base -> refined comparisons across refiners start from one model."""
    params = tiny_params(tmp_path, tiny_synthetic)
    base = {"iterations": 3, "batch_size": 2, "crop_size": 64}
    overrides = [f"methods.densecrf.recipes.smoke.base={base}", f"methods.dgf.recipes.smoke.base={base}",
                 "methods.dgf.recipes.smoke.refiner={iterations: 1, batch_size: 2, crop_size: 64}"]
    config = load_config(params, [o.replace("'", "") for o in overrides])
    trained = {name: torch.load(train(config, "synthetic", name), weights_only=False)["model"]
               for name in ("densecrf", "dgf")}
    bases = [{k: v for k, v in trained[name].items() if k.startswith("base.")} for name in ("densecrf", "dgf")]
    assert bases[0].keys() == bases[1].keys() and len(bases[0]) > 10
    assert all(torch.equal(bases[0][k], bases[1][k]) for k in bases[0])


def test_evaluate_without_checkpoint_names_the_fix(tmp_path, tiny_synthetic):
    config = load_config(tiny_params(tmp_path, tiny_synthetic))
    with pytest.raises(ConfigError, match="bench.py train --dataset synthetic --method global"):
        evaluate(config, "synthetic", "global")


def test_missing_prepared_dataset_names_the_fix(tmp_path):
    from datasets import DatasetError

    config = load_config(tiny_params(tmp_path, tmp_path / "nowhere"))
    with pytest.raises(DatasetError, match="bench.py prepare --dataset synthetic"):
        train(config, "synthetic", "global")


def test_gradient_accumulation_reaches_the_recipe_batch():
    from pipelines.train import accumulation_steps

    recipe = Recipe.from_dict({"iterations": 1, "batch_size": 8, "lr": 0.01}, "r")
    assert accumulation_steps(recipe, world_size=4, batch_per_device=None) == (2, 1)
    assert accumulation_steps(recipe, world_size=2, batch_per_device=1) == (1, 4)  # 2 processes x 1 x 4 steps
    with pytest.raises(ConfigError, match="not a multiple"):
        accumulation_steps(recipe, world_size=3, batch_per_device=None)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_recipe_amp_on_cpu_runs_bf16_and_refuses_fp16(tmp_path, tiny_synthetic, amp):
    """amp: bf16 autocasts training on CPU (the smoke recipes use it); fp16 on CPU is one clear error."""
    from datasets import PreparedDataset
    from datasets.transforms import training_transform
    from methods import build_method
    from pipelines.distributed import DistContext
    from pipelines.train import Position, SeededSamples, train_phase

    params = tiny_params(tmp_path, tiny_synthetic, iterations=1)
    config = load_config(params, [f"methods.local.recipes.smoke.amp={amp}"])
    recipe = config.recipe("local", "synthetic")
    assert recipe.amp == amp
    model = build_method("local", 7, **config.method_model("local", "synthetic"))
    seen = []
    model.decode_head.classifier.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    samples = SeededSamples(PreparedDataset(tiny_synthetic / "synthetic", "train",
                                            transform=training_transform(64, hflip=False)), seed=0)
    if amp == "fp16":
        with pytest.raises(ConfigError, match="amp: fp16 needs a CUDA device; on cpu use amp: bf16"):
            train_phase(model, model.phases[0], recipe, samples, DistContext(), Position())
        return
    losses = train_phase(model, model.phases[0], recipe, samples, DistContext(), Position())
    assert seen == [torch.bfloat16] and torch.isfinite(torch.tensor(losses)).all()
    assert model.decode_head.classifier.weight.dtype == torch.float32  # autocast: weights stay fp32


def test_amp_modules_autocast_only_the_named_parts(tmp_path, tiny_synthetic):
    """`amp_modules`: bf16 inside the listed submodules, fp32 elsewhere and on their outputs; restored after the
    phase; a name that is not a submodule is one line before any work."""
    from datasets import PreparedDataset
    from datasets.transforms import training_transform
    from methods import build_method
    from pipelines.distributed import DistContext
    from pipelines.train import Position, SeededSamples, train_phase

    params = tiny_params(tmp_path, tiny_synthetic, iterations=1)
    config = load_config(params, ["methods.local.recipes.smoke.amp=bf16",
                                  "methods.local.recipes.smoke.amp_modules=[decode_head]"])
    recipe = config.recipe("local", "synthetic")
    model = build_method("local", 7, **config.method_model("local", "synthetic"))
    seen = {}
    for name in ("decode_head", "decode_head.classifier", "backbone.layer1"):
        model.get_submodule(name).register_forward_hook(  # (input dtype, output dtypes)
            lambda module, args, out, name=name: seen.setdefault(
                name, (args[0].dtype, tuple(t.dtype for t in out) if isinstance(out, tuple) else out.dtype)) and None)
    samples = SeededSamples(PreparedDataset(tiny_synthetic / "synthetic", "train",
                                            transform=training_transform(64, hflip=False)), seed=0)
    train_phase(model, model.phases[0], recipe, samples, DistContext(), Position())
    assert seen["decode_head.classifier"] == (torch.bfloat16, torch.bfloat16)  # inside: bf16
    assert seen["decode_head"] == (torch.float32, (torch.float32, torch.float32))  # handed on in fp32
    assert seen["backbone.layer1"] == (torch.float32, torch.float32)
    assert "forward" not in vars(model.decode_head)  # the class's forward again
    bad = load_config(params, ["methods.local.recipes.smoke.amp=bf16",
                               "methods.local.recipes.smoke.amp_modules=[nope]"])
    with pytest.raises(ConfigError, match="amp_modules: 'nope' is not a submodule of local"):
        train(bad, "synthetic", "local")


def test_accumulated_step_equals_one_big_batch(tmp_path, tiny_synthetic):
    """One step over a batch of 2 == one step over 2 accumulated micro-batches of 1 (with the
    batch-dependent layers, BN and dropout, taken out so the two are comparable)."""
    from datasets import PreparedDataset
    from datasets.transforms import training_transform
    from methods import build_method
    from pipelines.distributed import DistContext
    from pipelines.train import Position, SeededSamples, train_phase

    config = load_config(tiny_params(tmp_path, tiny_synthetic, iterations=1))
    recipe = config.recipe("local", "synthetic")
    weights = []
    for per_device in (2, 1):
        torch.manual_seed(0)
        model = build_method("local", 7, **config.method_model("local", "synthetic"))
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, (torch.nn.BatchNorm2d, torch.nn.Dropout2d)):
                    setattr(module, name, torch.nn.Identity())
        samples = SeededSamples(PreparedDataset(tiny_synthetic / "synthetic", "train",
                                                transform=training_transform(64, hflip=False)), seed=0)
        initial = model.decode_head.classifier.weight.detach().clone()
        train_phase(model, model.phases[0], recipe, samples, DistContext(), Position(), batch_per_device=per_device)
        weights.append(model.decode_head.classifier.weight.detach().clone())
        assert not torch.equal(weights[-1], initial)
    assert torch.allclose(weights[0], weights[1], atol=1e-6)


def test_multi_phase_training_checkpoints_and_logs_each_phase(tmp_path, tiny_synthetic, mlflow_store):
    """GLNet's three phases run from one train call: one checkpoint and one nested MLflow run per phase."""
    overrides = [f"methods.glnet.recipes.smoke.phase{i}.{key}={value}" for i in (1, 2, 3)
                 for key, value in (("iterations", 1), ("batch_size", 2), ("log_every", 1))]
    overrides += ["methods.glnet.recipes.smoke.model.global_size=64",
                  "methods.glnet.recipes.smoke.model.patch_size=64",
                  "methods.glnet.recipes.smoke.model.min_overlap=16"]
    config = load_config(tiny_params(tmp_path, tiny_synthetic), overrides)
    final = torch.load(train(config, "synthetic", "glnet"), weights_only=False)
    phases = ["global", "global2local", "local2global"]
    assert list(final["loss_history"]) == phases
    out_dir = tmp_path / "checkpoints" / "synthetic" / "glnet"
    for name in phases:
        assert torch.load(out_dir / f"phase_{name}.pt", weights_only=False)["phase"] == name

    client = mlflow.tracking.MlflowClient(mlflow_store)
    experiment = client.get_experiment_by_name("uhrbench-synthetic")
    runs = client.search_runs([experiment.experiment_id], "tags.stage = 'train'")
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert len(parent) == 1 and sorted(r.data.tags["phase"] for r in children) == sorted(phases)


def test_evaluate_scores_an_official_checkpoint_with_the_dataset_conventions(tmp_path, tiny_synthetic, mlflow_store):
    """`bench.py evaluate --official PATH`: the upstream-layout file is loaded into the model built with the
    method's configuration for the dataset (its normalisation included), scored, and filed as a labelled variant
    beside, never over, the default result."""
    from click.testing import CliRunner
    from golden.seeded import seed_weights

    from bench import cli
    from datasets import PreparedDataset, get_dataset
    from methods import build_method
    from pipelines.metrics import ConfusionMatrix, segmentation_scores

    params = tiny_params(tmp_path, tiny_synthetic)
    stats = ["methods.isdnet.datasets.synthetic={source: test, model: {pixel_mean: [90, 100, 110], "
             "pixel_std: [20, 30, 40]}}"]
    load_config(params, stats)  # valid as written
    model = seed_weights(build_method("isdnet", 7), 3).eval()
    model.save_official(str(tmp_path / "release.pth"))
    model.set_normalization([90, 100, 110], [20, 30, 40])  # what the dataset layer must give the loaded model
    matrix = ConfusionMatrix(7, 255, "cpu")
    data = PreparedDataset(tiny_synthetic / "synthetic", "test")
    with torch.inference_mode():
        for index in range(len(data)):
            image, label, _ = data[index]
            matrix.update(model.predict(image[None]).argmax(1)[0], label)
    info = get_dataset("synthetic").info
    expected = segmentation_scores(matrix.matrix, info.class_names, info.counted_classes)["miou"]

    out = CliRunner().invoke(cli, ["evaluate", "--dataset", "synthetic", "--method", "isdnet", "--params", str(params),
                                   "--official", str(tmp_path / "release.pth"), "--set", stats[0]])
    assert out.exit_code == 0, out.output
    saved = json.loads((tmp_path / "results" / "metrics" / "synthetic" / "isdnet__official.json").read_text())
    assert saved["variant"] == "official" and saved["weights"] == str((tmp_path / "release.pth").resolve())
    assert saved["model_config"]["pixel_mean"] == [90, 100, 110]
    assert saved["miou"] == pytest.approx(expected, abs=1e-12)
    assert not (tmp_path / "results" / "metrics" / "synthetic" / "isdnet.json").exists()

    out = CliRunner().invoke(cli, ["evaluate", "--dataset", "synthetic", "--method", "isdnet", "--params", str(params),
                                   "--official", str(tmp_path / "missing.pth")])
    assert out.exit_code != 0 and "no official checkpoint at" in out.output and "Traceback" not in out.output


def test_random_rescale_then_non_square_crop_as_mmseg_cityscapes():
    """Resize(ratio_range=(0.5, 2.0)) then RandomCrop(512 x 1024), on a 64 x 128 stand-in: a ratio per sample,
    labels resized by nearest (no new class ids), the crop padded with ignore where the image came out smaller."""
    from datasets.transforms import training_transform

    transform = training_transform((32, 64), resize_ratio=(0.5, 2.0), hflip=False)
    image = torch.randint(0, 256, (3, 64, 128), dtype=torch.uint8)
    label = torch.randint(0, 3, (64, 128))
    sizes, padded = set(), 0
    torch.manual_seed(0)
    for _ in range(40):
        out_image, out_label = transform(image, label)
        assert out_image.shape == (3, 32, 64) and out_label.shape == (32, 64)
        assert set(out_label.unique().tolist()) <= {0, 1, 2, 255}
        padded += int((out_label == 255).any())
    for _ in range(40):
        scaled, _ = training_transform(None, resize_ratio=(0.5, 2.0), hflip=False)(image, label)
        assert 32 <= scaled.shape[1] <= 128 and abs(scaled.shape[2] - 2 * scaled.shape[1]) <= 1
        sizes.add(scaled.shape[1])
    assert len(sizes) > 20 and padded == 0  # ratio >= 0.5: the 32 x 64 crop always fits


def test_amp_modules_a_configuration_lacks_mean_no_autocast_there():
    """ISDNet's smoke recipe autocasts its SR decoder; an ablation row without one trains in fp32, not in bf16."""
    from methods.isdnet import ISDNet
    from pipelines.train import scoped_amp

    recipe = Recipe.from_dict({"iterations": 1, "batch_size": 1, "lr": 0.1, "amp": "bf16",
                               "amp_modules": ["refine_head.sr_decoder"]}, "r")
    assert scoped_amp(recipe, ISDNet(7), "isdnet", 7) == recipe
    without_sr = scoped_amp(recipe, ISDNet(7, recon_weight=0.0, fa_weight=0.0), "isdnet", 7)
    assert without_sr.amp is None and without_sr.amp_modules is None
