"""unipelt-count method=<preset|yaml> model=<conf name|local dir|hub id>: parameter table, no weights loaded."""

from __future__ import annotations

import sys
from typing import Any

import yaml

from ..api import count_parameters
from ..budget import solve
from ..errors import UnipeltError
from ..package_files import conf_dir
from ..spec import load_method

USAGE = ("usage: unipelt-count method=<preset or YAML path> model=<conf/model name, local dir or hub id> "
         "[budget=<0.5% or a parameter count>]")


def model_config(model: str) -> Any:
    """A transformers config from a conf/model entry (offline), a local directory, or a hub id."""
    from transformers import AutoConfig

    model_dir = conf_dir() / "model"
    entry = model_dir / f"{model}.yaml"
    if entry.is_file():
        raw = yaml.safe_load(entry.read_text())
        arch = dict(raw.get("config") or {})
        if arch:
            return AutoConfig.for_model(arch.pop("model_type"), **arch)
        model = raw["name_or_path"]
    try:
        return AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        known = sorted(p.stem for p in model_dir.glob("*.yaml"))
        raise UnipeltError(f"model '{model}': no config found ({first}); known names: {', '.join(known)}") from None


def parse_overrides(argv: list[str]) -> dict[str, str]:
    args = {}
    for item in argv:
        key, sep, value = item.partition("=")
        key = "budget" if key == "method.budget" else key
        if not sep or key not in ("method", "model", "budget"):
            raise UnipeltError(f"unipelt-count: cannot read argument '{item}'; {USAGE}")
        args[key] = value
    return args


def format_table(counts: dict[str, Any], model: str) -> str:
    rows = [
        ("method", counts["method"]),
        ("model", model),
        ("added (paper accounting)", f"{counts['added']:,}"),
        ("reparam: prefix MLP, prompt encoder (training only)", f"{counts['reparam']:,}"),
        ("base weights trained", f"{counts['trained_base']:,}"),
        ("trainable (no task head)", f"{counts['trainable']:,}"),
        ("base model", f"{counts['base']:,}"),
        ("total", f"{counts['total']:,}"),
        ("percent of base", f"{counts['percent']:.4f}%"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_overrides(argv)
        method = args.get("method", "mam")
        model = args.get("model", "minilm")
        spec = load_method(method)  # a bad method fails fast, before any model lookup
        if "budget" in args:
            budget = args["budget"]
            spec = load_method({**spec.to_dict(), "budget": int(budget) if budget.isdigit() else budget})
        config = model_config(model)
        solution = solve(spec, config) if spec.budget is not None else None
        counts = count_parameters(config, solution.spec if solution else spec)
    except UnipeltError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(counts, model))
    if solution is not None:
        sizes = ", ".join(f"{k}={v}" for k, v in solution.sizes.items())
        print(f"budget {spec.budget} = {solution.budget:,} added parameters; solved sizes: {sizes}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
