"""The errors of the HTTP face and the one JSON shape every error response takes."""

from __future__ import annotations

import re
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from podfsm.core.errors import (
    ContainerNotFound,
    ContainerPrecondition,
    ExecTimeout,
    IdRangeUnavailable,
    ImageInUse,
    ImageNotFound,
    ImageNotInRegistry,
    ImagePullError,
    InvalidPodConfig,
    InvalidPullRequest,
    NameReserved,
    NodeFull,
    PodfsmError,
    SandboxNotFound,
    SandboxRunError,
    UnpackError,
)
from podfsm.core.spec import describe_validation_error
from podfsm.faces.wire import ErrorBody

Q = TypeVar("Q", bound=BaseModel)


class ServiceUnavailable(PodfsmError):
    """The controller is not serving yet: it is starting or recovering persisted sandboxes."""


class BadRequest(PodfsmError):
    """A request parameter other than the pod config is malformed."""


class PayloadTooLarge(PodfsmError):
    """The request body is larger than MAX_BODY."""


class Unauthorized(PodfsmError):
    """TCP: the request carries no valid token."""


class Forbidden(PodfsmError):
    """TCP: a Host that is not one of the listening names, or a foreign Origin."""


class UnsupportedMediaType(PodfsmError):
    """A request body that is not application/json."""


class DaemonError(PodfsmError):
    """`serve` cannot listen where it was asked to."""


_STATUSES: tuple[tuple[type[Exception], int], ...] = (
    (SandboxNotFound, 404),
    (ContainerNotFound, 404),
    (ContainerPrecondition, 409),  # the CRI's FAILED_PRECONDITION: wrong state, pod not Ready
    (ExecTimeout, 504),
    (ImageNotFound, 404),
    (ImageInUse, 409),
    (ImageNotInRegistry, 404),
    (InvalidPullRequest, 422),
    (ImagePullError, 502),  # the registry or what it served: refused, missing, not matching
    (UnpackError, 502),
    (NameReserved, 409),
    (IdRangeUnavailable, 409),  # before InvalidPodConfig, which it is too
    (NodeFull, 409),  # likewise
    (InvalidPodConfig, 422),
    (ValidationError, 422),
    (BadRequest, 400),
    (PayloadTooLarge, 413),
    (UnsupportedMediaType, 415),
    (Unauthorized, 401),
    (Forbidden, 403),
    (ServiceUnavailable, 503),
    (PodfsmError, 500),  # SandboxRunError and every other real failure of the system
)


def error_response(exc: Exception) -> Response:
    """The JSON error response for `exc` (an error of podfsm's or pydantic's)."""
    status = next((code for kind, code in _STATUSES if isinstance(exc, kind)), 500)
    if isinstance(exc, ValidationError):
        body = ErrorBody(error=describe_validation_error(exc), kind="InvalidPodConfig")
    elif isinstance(exc, SandboxRunError):
        body = ErrorBody(error=str(exc), kind=type(exc).__name__, step=exc.step,
                         leftovers=list(exc.leftovers))
    else:
        body = ErrorBody(error=str(exc), kind=type(exc).__name__)
    headers = ({"retry-after": "1"} if status == 503 else
               {"www-authenticate": 'Bearer realm="podfsm"'} if status == 401 else None)
    return json_response(body, status, headers)


def json_response(model: BaseModel, status: int = 200,
                  headers: dict[str, str] | None = None) -> Response:
    """`model` as a JSON response (an ErrorBody without its empty fields)."""
    return Response(model.model_dump_json(exclude_defaults=isinstance(model, ErrorBody)),
                    status_code=status, headers=headers, media_type="application/json")



def number(text: str | None) -> int | None:
    """`text` as a non-negative integer in ASCII digits, else None."""
    return int(text) if text is not None and re.fullmatch(r"[0-9]{1,18}", text) else None


def parse_query(model: type[Q], request: Request) -> Q:
    """The request's query string as `model` (the operation's query model in wire.py)."""
    try:
        return model.model_validate(dict(request.query_params))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'query'}: {e['msg']}"
                             for e in exc.errors())
        raise BadRequest(f"bad query parameter: {problems}") from None
