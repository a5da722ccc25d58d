"""AdapterHub's side of tests/test_composition_reference.py: composition blocks and AdapterFusion computed by
AdapterHub `adapters` itself, on weights handed over in a file. It runs in a second environment, because `adapters`
pins transformers 4.x:

    python3 -m venv .venv-adapterhub && .venv-adapterhub/bin/pip install torch==2.13.0 adapters==1.3.0
    .venv-adapterhub/bin/python benchmarks/adapterhub_composition.py IN.pt OUT.pt

IN.pt (torch.save, plain dicts / lists / tensors) holds a list of scenarios, each with
- `model_type` ("bert" or "roberta") and `config` (the config's to_dict()), and `base`: the base model's state dict;
- `adapters`: name -> {"config": "seq_bn" (Pfeiffer) or "double_seq_bn" (Houlsby), "reduction_factor",
  "non_linearity"}; `fusions`: a list of {"adapters": [...], "config": {DynamicAdapterFusionConfig fields}};
- `tensors`: every adapter and fusion parameter under AdapterHub's own names (the caller maps the names);
- `inputs`: {"input_ids", "attention_mask"}; `cases`: a list of {"id", "setup"} with setup in the YAML shape of
  AdapterHub's blocks: a name, {"stack": [...]}, {"fuse": [...]}, {"parallel": [...]}, {"average": [...],
  "weights": [...], "normalize_weights": bool}, {"batch_split": [...], "batch_sizes": [...]}; "repeat": n repeats
  the input rows n times first (a Parallel block's output rows are n copies).
OUT.pt: {scenario index: {case id: {"hidden_states": [...], "logits": tensor}}, "versions": {...}}.

Nothing is downloaded: the model is built from its config, in eval mode, with eager attention.
"""

from __future__ import annotations

import sys
from typing import Any

import torch


def _block(setup: Any) -> Any:
    from adapters.composition import Average, BatchSplit, Fuse, Parallel, Stack

    if isinstance(setup, str):
        return setup
    kinds = {"stack": Stack, "fuse": Fuse, "parallel": Parallel, "average": Average, "batch_split": BatchSplit}
    (kind,) = [k for k in setup if k in kinds]
    members = [_block(m) for m in setup[kind]]
    options = {k: v for k, v in setup.items() if k != kind}
    return kinds[kind](*members, **options)


def _model(scenario: dict) -> torch.nn.Module:
    import adapters
    from adapters import DoubleSeqBnConfig, SeqBnConfig
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.for_model(scenario["model_type"], **scenario["config"])
    config._attn_implementation = "eager"
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation="eager")
    missing, unexpected = model.load_state_dict(scenario["base"], strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]  # a buffer in some versions only
    if missing or unexpected:
        raise SystemExit(f"adapterhub side: base weights do not fit: missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}")
    adapters.init(model)
    kinds = {"seq_bn": SeqBnConfig, "double_seq_bn": DoubleSeqBnConfig}
    for name, spec in scenario["adapters"].items():
        config = kinds[spec["config"]](reduction_factor=spec["reduction_factor"],
                                       non_linearity=spec["non_linearity"])
        model.add_adapter(name, config=config)
    for fusion in scenario.get("fusions", []):
        model.add_adapter_fusion(_block({"fuse": fusion["adapters"]}), config=fusion["config"])
    own = {n for n, _ in model.named_parameters() if "adapter" in n}
    given = set(scenario["tensors"])
    if own != given:
        raise SystemExit(f"adapterhub side: adapter tensors do not match: not given {sorted(own - given)[:3]}, "
                         f"unknown {sorted(given - own)[:3]}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in scenario["tensors"].items():
            params[name].copy_(value)
    return model.eval()


def run(scenarios: list[dict]) -> dict:
    import adapters
    import transformers

    out: dict[Any, Any] = {"versions": {"adapters": adapters.__version__, "transformers": transformers.__version__,
                                        "torch": str(torch.__version__)}}
    for index, scenario in enumerate(scenarios):
        model = _model(scenario)
        results = {}
        for case in scenario["cases"]:
            inputs = dict(scenario["inputs"])
            if case.get("repeat", 1) > 1:
                inputs = {k: v.repeat(case["repeat"], 1) for k, v in inputs.items()}
            model.set_active_adapters(_block(case["setup"]))
            with torch.no_grad():
                result = model(**inputs, output_hidden_states=True)
            results[case["id"]] = {"hidden_states": [h.clone() for h in result.hidden_states],
                                   "logits": result.logits.clone()}
        out[index] = results
    return out


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit("usage: adapterhub_composition.py IN.pt OUT.pt")
    torch.manual_seed(0)
    scenarios = torch.load(argv[0], weights_only=True)
    torch.save(run(scenarios), argv[1])


if __name__ == "__main__":
    main(sys.argv[1:])
