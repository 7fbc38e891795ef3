"""The one error type of the latent wire format, carrying the gRPC status a server should answer with."""

from __future__ import annotations

import grpc


class WireError(Exception):
    """A latent stream that cannot be accepted.

    `code` is the gRPC status to abort the call with, `details` says what was wrong and what to do:

        except WireError as err:
            await context.abort(err.code, err.details)

    Codes used: FAILED_PRECONDITION (unknown format version, messages in the wrong order),
    DATA_LOSS (corrupted, missing, duplicated or truncated data), INVALID_ARGUMENT (a header,
    size or safetensors blob that breaks the format's rules or limits).
    """

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


def data_loss(details: str) -> WireError:
    return WireError(grpc.StatusCode.DATA_LOSS, details)


def invalid(details: str) -> WireError:
    return WireError(grpc.StatusCode.INVALID_ARGUMENT, details)


def precondition(details: str) -> WireError:
    return WireError(grpc.StatusCode.FAILED_PRECONDITION, details)
