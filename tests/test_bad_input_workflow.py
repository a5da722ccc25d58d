"""Bad input to the research workflow (the Hydra app and its trainer config) that tests/test_app_*.py does not pin
down: each names the culprit (and the allowed options), and a config error stops the app before it writes anything.

Hydra's own errors (unknown group option, misspelt key) are Hydra's multi-line messages: the culprit on the first
line, then the options. unipelt's trainer checks are one line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

import unipelt
import unipelt.app.main as app
from unipelt.errors import UnipeltError
from unipelt.tasks import list_tasks
from unipelt.train import TrainConfig
from unipelt.train.config import check


@pytest.fixture(scope="module")
def hydra_module():
    with initialize_config_module(config_module="unipelt.conf", version_base="1.3"):
        yield


def first_line(exc_info) -> str:
    return str(exc_info.value).splitlines()[0]


def options(exc_info) -> list[str]:
    """The 'Available options' block of a Hydra MissingConfigException."""
    lines = str(exc_info.value).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Available options")) + 1
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("\t"))
    return [line.strip() for line in lines[start:end]]


def test_unknown_launcher_lists_the_launchers(hydra_module):
    with pytest.raises(MissingConfigException) as e:
        compose("train", overrides=["hydra/launcher=foo"], return_hydra_config=True)
    assert first_line(e) == "In 'hydra/config': Could not find 'hydra/launcher/foo'"
    assert {"basic", "gpus", "slurm"} <= set(options(e))


@pytest.mark.parametrize(
    "group, expected",
    [("method", unipelt.list_presets()), ("task", list_tasks()), ("model", None), ("trainer", None)],
)
def test_unknown_group_option_lists_the_options(hydra_module, group, expected):
    with pytest.raises(MissingConfigException) as e:
        compose("train", overrides=[f"{group}=nonexistent"])
    assert first_line(e) == f"In 'train': Could not find '{group}/nonexistent'"
    found = options(e)
    assert found  # the options are listed
    if expected is not None:
        # every preset / task of the group's folder; Hydra does not list a sub-folder's options (glue/mam)
        assert [o for o in found if "/" not in o] == sorted(o for o in expected if "/" not in o)


def test_misspelt_trainer_key_is_named(hydra_module):
    with pytest.raises(ConfigCompositionException) as e:
        compose("train", overrides=["trainer.lr_rate=1"])
    assert first_line(e) == "Could not override 'trainer.lr_rate'."


def test_wrong_type_for_a_trainer_key(hydra_module):
    with pytest.raises(ConfigCompositionException) as e:
        compose("train", overrides=["trainer.lr=abc"])
    assert first_line(e) == "Error merging override trainer.lr=abc"
    assert "could not be converted to Float" in str(e.value.__cause__)


TRAINER_CASES = [
    ({"lr": -1.0}, "trainer.lr must be positive, got -1.0"),
    ({"batch_size": 0}, "trainer.batch_size must be positive, got 0"),
    ({"epochs": 0, "max_steps": 0}, "trainer: epochs (0) or max_steps (0) must be positive"),
    ({"warmup_ratio": 1.5}, "trainer.warmup_ratio must be in [0, 1), got 1.5"),
    ({"scheduler": "cosine_restarts"},
     "trainer.scheduler: unknown value 'cosine_restarts' (allowed: linear, cosine, constant, constant_with_warmup, "
     "inverse_sqrt, polynomial)"),
    ({"precision": "fp8"}, "trainer.precision: unknown value 'fp8' (allowed: fp32, bf16, fp16)"),
    ({"label_smoothing": 1.0}, "trainer.label_smoothing must be in [0, 1), got 1.0"),
    ({"adam_epsilon": 0.0}, "trainer.adam_epsilon must be positive, got 0.0"),
]


@pytest.mark.parametrize("changes, message", TRAINER_CASES,
                         ids=["lr-negative", "batch-zero", "no-steps", "warmup-ratio", "scheduler", "precision",
                              "label-smoothing", "adam-epsilon"])
def test_bad_trainer_values(changes, message):
    with pytest.raises(UnipeltError) as e:
        check(TrainConfig(**changes))
    assert str(e.value) == message  # one line, the key and the allowed values


def test_unknown_model_dtype_before_any_download():
    cfg = OmegaConf.create({"model": {"name_or_path": "nowhere/never", "dtype": "fp8"}})
    with pytest.raises(UnipeltError) as e:
        app._load_model(cfg, None, TrainConfig(), seed=0)
    assert str(e.value) == "model.dtype: unknown value 'fp8' (allowed: float32, bfloat16, float16)"


def test_a_config_error_writes_nothing(tmp_path):
    # The whole command line: Hydra refuses the override before the job starts, so no output folder appears.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline"}
    result = subprocess.run([sys.executable, "-m", "unipelt.app.main", "trainer.lr_rate=1"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "Could not override 'trainer.lr_rate'." in result.stderr
    assert list(Path(tmp_path).iterdir()) == []


def test_a_bad_value_in_a_single_run_is_one_line_and_no_record(tmp_path):
    # Composition succeeds (lr is a float) but the value is refused: one line on stderr, exit 2, no results record.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline"}
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "unipelt.app.main", "trainer.lr=-1", "logger=none",
                             f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: trainer.lr must be positive, got -1.0"
    assert "Traceback" not in result.stderr
    assert not (run_dir / "results.jsonl").exists()


@pytest.mark.parametrize("value", [-1, 0, True])
def test_max_new_tokens_must_be_a_positive_count(value):
    from unipelt.train import TrainConfig
    from unipelt.train.config import check

    with pytest.raises(unipelt.UnipeltError, match=r"trainer.max_new_tokens must be a positive number of tokens"):
        check(TrainConfig(max_new_tokens=value))
    check(TrainConfig(max_new_tokens=None))
    check(TrainConfig(max_new_tokens=3))


def test_the_length_check_reserves_room_for_anchor_tokens():
    """P-tuning's template anchors are tokens inserted into every sequence, like its virtual tokens: once attach
    has made them token ids they count against the model's positions."""
    from tiny_models import tiny_model
    from unipelt.attach import state_of
    from unipelt.train import TrainConfig
    from unipelt.train.config import check_max_length

    model = tiny_model("bert")
    method = {"name": "anchored", "modules": [{"form": "prompt", "at": "embeddings", "insertion": "parallel",
                                               "compose": "gate", "length": 4, "template": [
                                                   "input_first", {"prompt": 2}, {"anchor": [5, 6, 7]},
                                                   "input_rest", {"prompt": 2}]}]}
    unipelt.attach(model, method)
    reserved = state_of(model).method.input_tokens()
    assert reserved == 4 + 3
    limit = model.config.max_position_embeddings
    check_max_length(TrainConfig(max_length=limit - 7), model.config, reserved)
    with pytest.raises(unipelt.UnipeltError, match=rf"exceeds the {limit - 7} positions .* after 7 inserted"):
        check_max_length(TrainConfig(max_length=limit - 6), model.config, reserved)
