"""The app's job parses its method once and passes that spec down: the pre-tokenisation max-length check in the
model loading sees the method as `by_method` adjusted it, not the method group as composed.

The job function runs in-process on a tiny BERT (128 positions) and stops where training would start."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

import unipelt.app.main as app
import unipelt.spec
from app_fixtures import SST2, make_small_sst2, make_tiny_model, tiny_overrides
from needs import need_data
from unipelt.optim import method_of


class StopBeforeTraining(Exception):
    """Raised by the stand-in for fit: everything a job does before training has run."""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    need_data(SST2 / "train.tsv")
    root = tmp_path_factory.mktemp("job_spec")
    return make_tiny_model(root / "model"), make_small_sst2(root / "sst2", n_train=32, n_eval=16)


@pytest.fixture
def job(tmp_path, monkeypatch):
    """run() driven without Hydra's launcher: its job description given, fit replaced; returns what was seen."""
    seen: dict = {"parses": 0, "tokenized": 0, "trained": None}
    build = unipelt.spec._build_method
    prepare = app.prepare_task

    def counting_build(raw):
        seen["parses"] += 1
        return build(raw)

    def counting_prepare(*args, **kwargs):
        seen["tokenized"] += 1
        return prepare(*args, **kwargs)

    def stop(model, *args, **kwargs):
        seen["trained"] = method_of(model)
        raise StopBeforeTraining

    monkeypatch.setattr(unipelt.spec, "_build_method", counting_build)
    monkeypatch.setattr(app, "prepare_task", counting_prepare)
    monkeypatch.setattr(app, "fit", stop)
    monkeypatch.setattr(app, "_job", lambda cfg: app.Job(output_dir=tmp_path, results_path=tmp_path / "results.jsonl",
                                                         choices={}, overrides=[], number=None))
    return seen


def _cfg(tiny: tuple[Path, Path], *overrides: str):
    with initialize_config_module(config_module="unipelt.conf", version_base="1.3"):
        return compose("train", overrides=tiny_overrides(*tiny, *overrides))


def test_a_job_parses_its_method_once(tiny, job):
    cfg = _cfg(tiny)
    job["parses"] = 0  # composing may read presets; the job starts here
    with pytest.raises(StopBeforeTraining):
        app.run(cfg)
    assert job["parses"] == 1 and job["trained"].name == "lora"


def test_an_ablation_cell_is_parsed_once_too(tiny, job):
    cfg = _cfg(tiny, "axes.insertion=sequential")
    job["parses"] = 0
    with pytest.raises(StopBeforeTraining):
        app.run(cfg)
    assert job["parses"] == 1 and job["trained"].modules[0].insertion == "sequential"


def test_by_method_lengthening_a_prompt_past_the_positions_is_refused_before_tokenizing(tiny, job, capsys):
    # 20 virtual tokens leave 108 of the 128 positions (trainer.max_length is 32); by_method makes it 100
    cfg = _cfg(tiny, "method=prompt_tuning", "+by_method.prompt_tuning.modules.m0.length=100")
    with pytest.raises(SystemExit) as stopped:
        app.run(cfg)
    assert stopped.value.code == 2 and job["tokenized"] == 0
    assert ("trainer.max_length 32 exceeds the 28 positions of model" in capsys.readouterr().err)


def test_by_method_shortening_a_prompt_to_fit_is_accepted(tiny, job):
    # as composed, 110 virtual tokens leave 18 positions (too few); by_method's 10 leave 118
    cfg = _cfg(tiny, "method=prompt_tuning", "method.modules.0.length=110",
               "+by_method.prompt_tuning.modules.m0.length=10")
    with pytest.raises(StopBeforeTraining):
        app.run(cfg)
    assert job["tokenized"] == 1 and job["trained"].modules[0].length == 10


def test_fit_checks_the_positions_the_attached_methods_forms_add(tiny, tmp_path):
    # the trainer's own check (for callers without the app): the prompt's tokens, read from the attached method
    from transformers import AutoModelForSequenceClassification

    from unipelt import attach, compat, load_method
    from unipelt.errors import UnipeltError
    from unipelt.train import TrainConfig, fit

    model = AutoModelForSequenceClassification.from_pretrained(tiny[0], **compat.MODEL_LOAD_KWARGS)
    attach(model, load_method("prompt_tuning").replace_module(0, length=100))
    with pytest.raises(UnipeltError, match=r"^trainer.max_length 32 exceeds the 28 positions of model .* after 100 "):
        fit(model, None, TrainConfig(max_length=32), tmp_path / "run")
    assert not (tmp_path / "run").exists()
