"""One table from domain errors to public statuses (gRPC code, HTTP status, OpenAI error type), and
Triton's streamed errors back to domain errors."""

from __future__ import annotations

import logging
from typing import NamedTuple

import grpc

from service.errors import (
    Cancelled,
    CheckpointError,
    DeadlineExceeded,
    DGemmaError,
    InvalidArgument,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    Unauthenticated,
    Unavailable,
    UnknownModel,
    WIRE_CODES,
)

log = logging.getLogger(__name__)


class Status(NamedTuple):
    grpc: grpc.StatusCode
    http: int
    type: str  # OpenAI's error body `type`


INTERNAL = Status(grpc.StatusCode.INTERNAL, 500, "internal_error")

# The one table: domain error -> public status. Anything else is INTERNAL with a generic message.
STATUS: dict[type[DGemmaError], Status] = {
    InvalidArgument: Status(grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error"),
    UnknownModel: Status(grpc.StatusCode.INVALID_ARGUMENT, 404, "invalid_request_error"),
    PayloadTooLarge: Status(grpc.StatusCode.INVALID_ARGUMENT, 413, "invalid_request_error"),
    Overloaded: Status(grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error"),
    DeadlineExceeded: Status(grpc.StatusCode.DEADLINE_EXCEEDED, 504, "timeout_error"),
    # HTTP only: the body did not arrive within NIM_HTTP_BODY_TIMEOUT (the client's fault, not the model's)
    RequestTimeout: Status(grpc.StatusCode.DEADLINE_EXCEEDED, 408, "timeout_error"),
    # 499: nginx's "client closed request"; the client is gone and never reads it
    Cancelled: Status(grpc.StatusCode.CANCELLED, 499, "cancelled"),
    Unauthenticated: Status(grpc.StatusCode.UNAUTHENTICATED, 401, "authentication_error"),
    Unavailable: Status(grpc.StatusCode.UNAVAILABLE, 503, "service_unavailable"),
    CheckpointError: INTERNAL,
}
GRPC_STATUS: dict[type[DGemmaError], grpc.StatusCode] = {cls: s.grpc for cls, s in STATUS.items()}


def public_status(err: BaseException) -> Status:
    for cls in type(err).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return INTERNAL


def status_for(err: BaseException) -> grpc.StatusCode:
    return public_status(err).grpc


# A message echoes client values (a model name, a role): past this it is cut, so that it fits in gRPC's
# trailers (grpc-message; 16 KiB of metadata by default) and in log lines.
MAX_MESSAGE_CHARS = 1024


def public_message(err: BaseException, request_id: str) -> str:
    """What the client reads: the domain message, or a generic one (never internals) for the rest."""
    if isinstance(err, DGemmaError) and public_status(err) != INTERNAL:
        m = err.message
        return m if len(m) <= MAX_MESSAGE_CHARS else m[:MAX_MESSAGE_CHARS - 1] + "…"
    return f"internal error (request_id={request_id})"


# Triton's own errors (no code of ours) whose meaning is not "the model cannot serve now": its exact texts
# (Triton core: the scheduler's queue policy rejects with this one).
TRITON_OWN_ERRORS: dict[str, type[DGemmaError]] = {"Exceeds maximum queue size": Overloaded}


def error_from_triton(text: str, field_names: dict[str, str] | None = None) -> DGemmaError:
    """A Triton streamed error as a domain error, by its leading code ("OVERLOADED: …", service.errors.WIRE_CODES;
    docs/api.md). A message without one is Triton's own (a dead backend stub, a full queue, a model being
    reloaded): the model cannot serve now, Unavailable (the text stays in the front's log), except Triton's own
    full-queue refusal (TRITON_OWN_ERRORS), which is Overloaded.

    `field_names` renames the backend's input names to the public request's field paths.
    """
    code, sep, message = text.partition(": ")
    cls = WIRE_CODES.get(code) if sep else None
    if cls is None:
        own = TRITON_OWN_ERRORS.get(text.strip().rstrip("."))
        if own is Overloaded:
            return Overloaded("the model is overloaded; retry later")
        log.warning("backend error without a code: %s", text)
        return Unavailable("the model is unavailable; retry later")
    if cls is InvalidArgument:
        field, sep, detail = message.partition(": ")
        if sep:
            return InvalidArgument((field_names or {}).get(field, field), detail)
        return InvalidArgument("request", message)
    if cls is Overloaded:
        return Overloaded("the model is overloaded; retry later")
    if cls is DGemmaError:
        return DGemmaError(text)  # INTERNAL: the text stays in the front's log, never reaches the client
    return cls(message or code.lower().replace("_", " "))
