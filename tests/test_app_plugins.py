"""The app's Hydra plugins (hydra/launcher=gpus, hydra/sweeper=ablation) import the app, so the app never imports
them: it registers what the entry-point group `unipelt.plugins` names (pyproject.toml), which every install carries,
editable or not (Hydra's own scan of its plugin namespace misses an editable install)."""

from __future__ import annotations

import ast
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
from hydra.core.plugins import Plugins
from hydra.plugins.launcher import Launcher

import unipelt.app.main as app
from unipelt.errors import UnipeltError

PACKAGE = Path(app.__file__).resolve().parents[1]
OWN = {"gpus": "hydra_plugins.unipelt_launcher.gpus:GpuLauncher",
       "ablation": "hydra_plugins.unipelt_launcher.ablation_sweeper:AblationSweeper"}


class ToyLauncher(Launcher):
    def setup(self, **kwargs) -> None:
        pass

    def launch(self, job_overrides, initial_job_idx):
        return []


def _imported(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.append(node.module)
    return names


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_package_never_imports_the_plugins(path):
    assert not [n for n in _imported(path) if n.split(".")[0] == "hydra_plugins"], path


def test_the_installed_metadata_names_the_apps_plugins_and_they_are_registered():
    from importlib.metadata import entry_points

    found = {point.name: point.value for point in entry_points(group=app.PLUGIN_GROUP)}
    assert found == OWN, "the install's metadata predates pyproject.toml's entry points: reinstall (pip install -e .)"
    registered = Plugins.instance().class_name_to_class
    assert {value.replace(":", ".") for value in OWN.values()} <= set(registered)


@pytest.fixture
def forget_toy_launcher():
    yield
    plugins = Plugins.instance()  # Hydra's registry lives for the whole session: leave it as found
    for classes in plugins.plugin_type_to_subclass_list.values():
        if ToyLauncher in classes:
            classes.remove(ToyLauncher)
    plugins.class_name_to_class.pop(f"{__name__}.ToyLauncher", None)


def test_a_plugin_named_only_by_an_entry_point_is_registered(monkeypatch, forget_toy_launcher):
    point = EntryPoint(name="toy", value=f"{__name__}:ToyLauncher", group=app.PLUGIN_GROUP)
    monkeypatch.setattr(app, "entry_points", lambda group: [point] if group == app.PLUGIN_GROUP else [])
    app.register_plugins()
    assert ToyLauncher in Plugins.instance().discover(Launcher)


def test_an_entry_point_that_is_no_plugin_is_named(monkeypatch):
    point = EntryPoint(name="oops", value="collections:OrderedDict", group=app.PLUGIN_GROUP)
    monkeypatch.setattr(app, "entry_points", lambda group: [point])
    with pytest.raises(UnipeltError, match=r"^entry point 'oops = collections:OrderedDict' \(unipelt.plugins\) is "
                                           r"not a Hydra plugin class$"):
        app.register_plugins()
