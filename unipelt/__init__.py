"""unipelt: parameter-efficient fine-tuning as points in He et al.'s four-axis design space.

Layers, low to high (tests/test_architecture.py holds them for every import, annotation-only ones included):
errors, compat, full_tensor, package_files, model_snapshot → spec_values, sites (site vocabulary, family table,
identity), quantize → module_spec (the contract's data types: a module spec, a placement) → compose, weight_fold,
slot, forms (the composition axis, the slot and Δh bases, the form registry and every form) → spec (method specs,
validated against what forms declare) → placement (a spec resolved on a model) → attach → merge / io / accounting /
optim / peft (operations on an attached model, the contract with a training loop) → budget → api (attach and
count with a budget solved) → tasks → train → integrations → app, cli → hydra_plugins (docs/forms.md).
"""

from .adapter_combine import merge_adapters, to_lora
from .adapter_folders import load_adapters, save_adapters
from .adapters import active_adapters, delete_adapter, list_adapters, mixed_batch, rename_adapter, set_active
from .api import attach, count_parameters
from .composition import Average, BatchSplit, Parallel, Stack
from .attach import detach, disabled, fold_prefixes, is_attached
from .budget import solve_budget
from .errors import AdapterFileError, AttachError, DataError, MethodConfigError, UnipeltError
from .io import load_adapter, save_adapter
from .merge import merge, unmerge
from .peft_interop import export_peft, import_peft
from .optim import on_optimizer_step, param_groups, regularization_loss, training_metrics
from .spec import MethodSpec, ModuleSpec, list_presets, load_method

__version__ = "0.1.0"

__all__ = [
    "AdapterFileError",
    "Average",
    "BatchSplit",
    "Parallel",
    "Stack",
    "active_adapters",
    "delete_adapter",
    "list_adapters",
    "load_adapters",
    "merge_adapters",
    "to_lora",
    "save_adapters",
    "mixed_batch",
    "rename_adapter",
    "set_active",
    "AttachError",
    "DataError",
    "MethodConfigError",
    "MethodSpec",
    "ModuleSpec",
    "UnipeltError",
    "attach",
    "count_parameters",
    "detach",
    "export_peft",
    "import_peft",
    "disabled",
    "fold_prefixes",
    "is_attached",
    "list_presets",
    "load_adapter",
    "load_method",
    "merge",
    "on_optimizer_step",
    "param_groups",
    "regularization_loss",
    "training_metrics",
    "save_adapter",
    "solve_budget",
    "unmerge",
]
