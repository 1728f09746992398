"""soralib: SoRA (Sparse Low-rank Adaptation) as a PEFT method.

    import soralib, peft
    model = peft.get_peft_model(model, soralib.SoraConfig(r=8, target_modules=["query", "value"]))
    optimizer = soralib.create_sora_optimizer(model, lr=8e-4, threshold=3e-4)
    ...train...
    soralib.export_lora(model, "adapter/")   # a plain PEFT LoRA, smaller rank per module
    lora = soralib.lora_config_from(model)   # or: retrain a plain LoRA from scratch with the ranks SoRA found

The names below are loaded on first use (PEP 562), so that `sora --help` does not wait seconds for torch,
transformers and peft; so are the submodules (`soralib.errors.InputError`). "SORA" is registered with PEFT by
importing soralib.config or soralib.model, which every soralib module that hands SoRA to PEFT does (verify,
adapter_dir): a submodule imported directly works as the top-level names do. `import soralib` alone registers
it at once when peft is already imported, else as soon as peft has been imported (a one-shot import hook), or
at the first use of any soralib name (or `soralib.register()`).

One name is both a function and a submodule: `soralib.prune` is the function, and so is `import soralib.prune as
sp` (Python resolves it as the attribute). The module's names: `from soralib.prune import sparsity_report`.
"""

import importlib
import importlib.machinery
import importlib.util
import sys
import types

__version__ = "0.1.0"
_EXPORTS = {
    "SoraConfig": "config", "SoraPeftType": "config", "export_lora": "export", "SoraLayer": "layer",
    "SoraLinear": "layer", "SoraModel": "model", "register": "model",
    "add_prox_step": "prox", "create_sora_optimizer": "optim", "gate_l1": "optim", "gate_parameters": "optim",
    "get_threshold": "optim", "set_threshold": "optim", "soft_threshold": "prox",
    "trainer_optimizer_cls_and_kwargs": "optim", "prune": "prune", "sparsity_report": "prune",
    "load_adapter_safely": "verify", "verify_adapter": "verify", "rank_pattern": "ranks", "lora_config_from": "ranks",
    "SoraCallback": "callbacks", "SoraBudgetCallback": "callbacks", "BudgetSchedule": "budget",
    "stage_thresholds": "schedule",
}
__all__ = list(_EXPORTS)


def _load() -> None:
    """Import the public names into the package namespace and register SORA with PEFT (idempotent)."""
    for name, module in _EXPORTS.items():
        globals()[name] = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()["register"]()


def __getattr__(name: str):
    if name in _EXPORTS:
        _load()
        return globals()[name]
    if name.isidentifier() and not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}"):
        # a submodule not imported yet, e.g. soralib.errors (the docs name its exceptions so)
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        # Importing the submodule soralib.prune binds it as `soralib.prune` and would hide the function
        # `prune` until the names load; left unbound, the name loads the function on first use.
        if not (name in _EXPORTS and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


class _RegisterWhenPeftLoads:
    """A meta-path finder that registers "SORA" once `peft` has finished importing, then removes itself.

    `import soralib` must not import peft (`sora --help` would wait seconds for torch), yet `import soralib, peft`
    then `PeftModel.from_pretrained(base, "sora_dir")` must know "SORA". So this finder lets the other finders
    find peft and wraps its loader: after peft's own code has run, soralib.model is imported (it registers)."""

    def __init__(self) -> None:
        self.searching = False

    def find_spec(self, name, path=None, target=None):
        if name != "peft" or self.searching:
            return None
        self.searching = True  # so that the search below skips this finder
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self.searching = False
        # These loaders are made for one file (peft/__init__.py): wrapping its exec_module changes no other import
        machinery = importlib.machinery
        if spec is not None and isinstance(spec.loader, (machinery.SourceFileLoader, machinery.SourcelessFileLoader)):
            exec_peft = spec.loader.exec_module

            def exec_then_register(module) -> None:
                exec_peft(module)
                if self in sys.meta_path:
                    sys.meta_path.remove(self)
                # soralib.model needs soralib.config and .layer. When one of the three is what imports peft, it is
                # half-imported now and importing soralib.model would fail: config and model register "SORA" at
                # their end, and soralib.layer (or optim) imported alone hands nothing to PEFT.
                if {f"{__name__}.config", f"{__name__}.layer", f"{__name__}.model"}.isdisjoint(sys.modules):
                    importlib.import_module(".model", __name__)

            spec.loader.exec_module = exec_then_register
        return spec


if "peft" in sys.modules:  # cheap now: peft, torch and transformers are loaded already
    _load()
else:
    sys.meta_path.insert(0, _RegisterWhenPeftLoads())
