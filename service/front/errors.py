"""One table from domain errors to gRPC status codes, and Triton's streamed errors back to domain errors."""

from __future__ import annotations

import grpc

from service.errors import (
    Cancelled,
    CheckpointError,
    DeadlineExceeded,
    DGemmaError,
    InvalidArgument,
    Overloaded,
    Unauthenticated,
    Unavailable,
)

# The one table: domain error -> public status code. Anything else is INTERNAL with a generic message.
GRPC_STATUS: dict[type[DGemmaError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Cancelled: grpc.StatusCode.CANCELLED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    CheckpointError: grpc.StatusCode.INTERNAL,
}


def status_for(err: BaseException) -> grpc.StatusCode:
    for cls in type(err).__mro__:
        if cls in GRPC_STATUS:
            return GRPC_STATUS[cls]
    return grpc.StatusCode.INTERNAL


def public_message(err: BaseException, request_id: str) -> str:
    """What the client reads: the domain message, or a generic one (never internals) for the rest."""
    if isinstance(err, DGemmaError) and status_for(err) != grpc.StatusCode.INTERNAL:
        return err.message
    return f"internal error (request_id={request_id})"


def error_from_triton(text: str, field_names: dict[str, str] | None = None) -> DGemmaError:
    """A Triton streamed error ("INVALID_ARG: input_ids: …", see docs/api.md) as a domain error.

    `field_names` renames the backend's input names to the public request's field paths.
    """
    code, _, message = text.partition(": ")
    if code == "INVALID_ARG":
        field, sep, detail = message.partition(": ")
        if sep:
            return InvalidArgument((field_names or {}).get(field, field), detail)
        return InvalidArgument("request", message)
    if code == "CANCELLED":
        return Cancelled(message or "request cancelled")
    if "overloaded" in message or "Exceeds maximum queue size" in text:
        return Overloaded("the model is overloaded; retry later")
    if message.startswith("deadline exceeded"):
        return DeadlineExceeded("deadline exceeded")
    if code == "UNAVAILABLE":
        return Unavailable(message or "the model is unavailable")
    return DGemmaError(text)  # INTERNAL: the text stays in the front's log, never reaches the client
