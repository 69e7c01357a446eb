"""Domain errors. Every layer raises these; the edges (CLI, Triton, gRPC) map them to codes."""

from __future__ import annotations


class DGemmaError(Exception):
    """Base of every error the service raises on purpose. `message` is safe to show a client."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(DGemmaError):
    """A request field is invalid. `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.detail = message

    def renamed(self, field: str) -> "InvalidArgument":
        """The same error under the name the caller's interface uses for the field."""
        return InvalidArgument(field, self.detail)


class UnknownModel(InvalidArgument):
    """A request names a model this server does not serve."""


class PayloadTooLarge(InvalidArgument):
    """A request body is larger than the server accepts."""


class CheckpointError(DGemmaError):
    """A checkpoint directory is missing, malformed or of another architecture."""


class Overloaded(DGemmaError):
    """The engine's admission budget and queue are full."""


class Cancelled(DGemmaError):
    """The request was cancelled by its client."""


class DeadlineExceeded(DGemmaError):
    """The request's deadline passed before it finished."""


class RequestTimeout(DGemmaError):
    """The client did not send its whole request (an HTTP body) in time."""


class Unavailable(DGemmaError):
    """The engine is not ready or is shutting down."""


class Unauthenticated(DGemmaError):
    """The call carries no valid credentials."""


# The one table of the codes that lead the engine's streamed error messages ("OVERLOADED: ..."), from the
# Triton backend to the front (docs/api.md, "Errors"). The front maps the code back by this table alone.
WIRE_CODES: dict[str, type[DGemmaError]] = {
    "INVALID_ARG": InvalidArgument,
    "OVERLOADED": Overloaded,
    "DEADLINE_EXCEEDED": DeadlineExceeded,
    "CANCELLED": Cancelled,
    "UNAVAILABLE": Unavailable,
    "INTERNAL": DGemmaError,
}


def wire_code(err: BaseException) -> str:
    """The code of `err` in WIRE_CODES (its nearest class there); INTERNAL for anything else."""
    by_class = {cls: code for code, cls in WIRE_CODES.items()}
    for cls in type(err).__mro__:
        if cls in by_class:
            return by_class[cls]
    return "INTERNAL"
