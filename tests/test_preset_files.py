"""Where presets are read from (unipelt.package_files), and presets in sub-folders of conf/method (`glue/mam`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tiny_models import tiny_model

import unipelt
from unipelt import package_files
from unipelt.cli import count
from unipelt.optim import method_of

REPO = Path(__file__).resolve().parents[1]

ONLY_IN_COPY = {"name": "only_in_copy", "modules": [
    {"form": "bottleneck", "at": ["attn.q"], "insertion": "parallel", "compose": "scale", "scale": 1.0, "dim": 3,
     "activation": "none", "init": "lora"}]}

# Run in a child whose PYTHONPATH is the copy: every reader of conf/ and experiments/ must answer from the copy.
CHILD = """
import json, sys
import unipelt
from unipelt.app.schema import experiment_files
from unipelt.cli.count import model_config
from unipelt.package_files import conf_dir
from unipelt.tasks.config import task_dir
print(json.dumps({
    "package": unipelt.__file__,
    "presets": unipelt.list_presets(),
    "loaded": unipelt.load_method("only_in_copy").name,
    "conf": str(conf_dir()),
    "tasks": str(task_dir()),
    "experiments": sorted({str(p.parent) for p in experiment_files()}),
    "model_layers": model_config("roberta_base").num_hidden_layers,
}))
import unipelt.app.main
sys.argv = ["unipelt-train", "--cfg", "job", "method=only_in_copy"]
unipelt.app.main.main()
"""


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory) -> Path:
    """A source tree on PYTHONPATH, not installed: the package linked in, conf/ copied with one preset more
    and the roberta_base model entry changed, so that an answer read from the installed checkout shows."""
    root = tmp_path_factory.mktemp("copy")
    for name in ("unipelt", "hydra_plugins", "experiments"):
        (root / name).symlink_to(REPO / name, target_is_directory=True)
    shutil.copytree(REPO / "conf", root / "conf")
    (root / "conf" / "method" / "only_in_copy.yaml").write_text(yaml.safe_dump(ONLY_IN_COPY))
    model = root / "conf" / "model" / "roberta_base.yaml"
    raw = yaml.safe_load(model.read_text())
    raw["config"]["num_hidden_layers"] = 5
    model.write_text(yaml.safe_dump(raw))
    return root


def test_a_source_copy_on_pythonpath_reads_its_own_presets(source_copy):
    env = {**os.environ, "PYTHONPATH": str(source_copy), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    done = subprocess.run([sys.executable, "-c", CHILD], cwd=source_copy, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    first, job = done.stdout.split("\n", 1)
    seen = json.loads(first)
    assert seen["package"] == str(source_copy / "unipelt" / "__init__.py")
    assert "only_in_copy" in seen["presets"] and seen["loaded"] == "only_in_copy"
    assert seen["conf"] == str(source_copy / "conf")
    assert seen["tasks"] == str(source_copy / "conf" / "task")
    assert seen["experiments"] == [str(source_copy / "experiments")]
    assert seen["model_layers"] == 5  # unipelt-count's model entries
    assert yaml.safe_load(job)["method"]["name"] == "only_in_copy"  # Hydra's config dir (unipelt-train)


def test_the_installed_layout_wins_over_a_sibling_folder(tmp_path, monkeypatch):
    # A wheel: <site-packages>/unipelt/conf. A `conf` beside it in site-packages belongs to somebody else.
    (tmp_path / "unipelt" / "conf").mkdir(parents=True)
    (tmp_path / "conf").mkdir()
    monkeypatch.setattr(package_files, "PACKAGE_DIR", tmp_path / "unipelt")
    assert package_files.conf_dir() == tmp_path / "unipelt" / "conf"


def test_the_source_tree_layout(tmp_path, monkeypatch):
    (tmp_path / "unipelt").mkdir()
    (tmp_path / "experiments").mkdir()
    monkeypatch.setattr(package_files, "PACKAGE_DIR", tmp_path / "unipelt")
    assert package_files.experiments_dir() == tmp_path / "experiments"


def test_no_data_folder_is_one_line_naming_both_places(tmp_path, monkeypatch):
    (tmp_path / "unipelt").mkdir()
    monkeypatch.setattr(package_files, "PACKAGE_DIR", tmp_path / "unipelt")
    with pytest.raises(unipelt.UnipeltError) as error:
        package_files.conf_dir()
    message = str(error.value)
    assert "\n" not in message
    assert str(tmp_path / "unipelt" / "conf") in message and str(tmp_path / "conf") in message


def test_pyproject_ships_every_package_and_both_data_folders():
    # A package missing from the hand-written list is left out of a wheel (an editable install does not notice).
    tomllib = pytest.importorskip("tomllib")
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    sources = {".".join(init.parent.relative_to(REPO).parts)
               for top in ("unipelt", "hydra_plugins") for init in (REPO / top).rglob("__init__.py")}
    assert sources - set(setuptools["packages"]) == set(), "add these to pyproject.toml's packages"
    # where package_files looks in an installed package
    assert setuptools["package-dir"]["unipelt.conf"] == "conf"
    assert setuptools["package-dir"]["unipelt.experiments"] == "experiments"


# ---- presets in sub-folders ---------------------------------------------------------------------------------

def test_nested_presets_are_listed_and_every_listed_name_loads():
    presets = unipelt.list_presets()
    assert "glue/mam" in presets and "mam" in presets
    for name in presets:
        unipelt.load_method(name)


def test_load_method_reads_the_preset_of_a_sub_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing named glue/mam here
    spec = unipelt.load_method("glue/mam")
    assert spec.name == "mam_glue"
    assert [(m.form, m.options.length if m.form == "prefix" else m.options.dim) for m in spec.modules] == [
        ("prefix", 16), ("bottleneck", 16)]


def test_attach_takes_a_nested_preset():
    model = tiny_model("bert")
    unipelt.attach(model, "glue/mam")
    assert method_of(model) == unipelt.load_method("glue/mam")


def test_unipelt_count_takes_a_nested_preset(capsys):
    assert count.main(["method=glue/mam", "model=roberta_base"]) == 0
    table = capsys.readouterr().out
    # added: prefix 2·12·16·768, plus the adapter 12·(768·16 + 16 + 16·768 + 768)
    assert "mam_glue" in table and "599,232" in table


def test_an_existing_file_wins_over_a_nested_preset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "glue").mkdir()
    (tmp_path / "glue" / "mam").write_text(yaml.safe_dump(ONLY_IN_COPY))
    assert unipelt.load_method("glue/mam").name == "only_in_copy"


def test_a_missing_nested_name_names_the_file_and_the_preset_looked_for(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(unipelt.MethodConfigError) as error:
        unipelt.load_method("glue/maam")
    message = str(error.value)
    assert str(tmp_path / "glue" / "maam") in message
    assert str(unipelt.spec.preset_dir() / "glue" / "maam.yaml") in message
    assert "glue/mam" in message  # the presets there are


@pytest.mark.parametrize("name", ["../method/mam", str(REPO / "conf" / "method" / "nowhere")])
def test_a_path_outside_conf_method_is_never_a_preset(name):
    with pytest.raises(unipelt.MethodConfigError, match="method file not found"):
        unipelt.load_method(name)
