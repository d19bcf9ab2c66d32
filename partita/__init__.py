__version__ = '0.1.0'

# Runtime entry points, loaded on first use so that `import partita` does not import torch or zmq.
_LAZY = {
    "deploy": "partita.runtime.coordinator",
    "connect": "partita.runtime.connect",
    "LocalCluster": "partita.runtime.local",
    "deploy_generator": "partita.runtime.generate",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'partita' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
