"""nanoseek: DeepSeek-V3 / R1 in one readable package: train, reason with GRPO, distill, evaluate, self-host.

The names below load on first use (PEP 562), so `nanoseek` on the command line starts without importing torch: a
Ctrl-C in its first second is then the CLI's one-line "interrupted", not a traceback from inside an import."""

import importlib

_WHERE = {"load_model": "checkpoint", "save_model": "checkpoint", "CheckpointError": "checkpoint",  # a bad model dir
          "ModelConfig": "config", "PRESETS": "config",
          "get_preset": "config", "Engine": "engine.engine", "SamplingParams": "engine.engine",
          "Transformer": "model", "build_model": "model"}
__all__ = list(_WHERE)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    try:  # a submodule, as `import nanoseek; nanoseek.config` found it when this file imported them all
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":  # the submodule exists, and a module it imports does not
            raise
        raise AttributeError(f"module 'nanoseek' has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
