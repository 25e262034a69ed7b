"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}``.

vLLM's server answers its own errors in this shape; ours use it too, so a client sees
one error format whichever layer refused the request.
"""

from __future__ import annotations

import json
from http import HTTPStatus

from fastapi.responses import JSONResponse

_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
          404: "NotFoundError", 409: "ConflictError", 422: "UnprocessableEntityError"}


class APIError(Exception):
    """An error the HTTP layer answers as OpenAI-style JSON with ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def body(self) -> dict:
        kind = _TYPES.get(self.status, "InternalServerError" if self.status >= 500 else HTTPStatus(self.status).phrase)
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.status}}

    def encode(self) -> bytes:
        return json.dumps(self.body()).encode()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)
