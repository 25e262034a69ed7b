"""The client's errors, grouped so a caller can catch them by meaning.

::

    EADError                      every error this package raises on purpose
    ├── APIError                  the server answered with an error (status, message, param, code)
    │   ├── BadRequestError       4xx other than 401: the request is wrong (403: not allowed, e.g. a path outside --weights-root), retrying cannot help
    │   └── AuthenticationError   401: missing or wrong api_key / admin_key
    ├── ServerUnavailableError    no answer: connection refused, timeout, 5xx, after every retry
    ├── RolloutError              some prompts of a rollouts() call could not be generated
    ├── WeightVersionMismatch     servers (or one call's responses) disagree on the weight version
    └── ProtocolError             the server answered 2xx with a body this client cannot read

Schedule problems found before anything is sent raise ``ead_server.schedule.ScheduleError``
(a ``ValueError`` naming the field), the same class the server uses for its 400s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = [
    "APIError",
    "AuthenticationError",
    "BadRequestError",
    "EADError",
    "ProtocolError",
    "RolloutError",
    "ServerUnavailableError",
    "WeightVersionMismatch",
]


class EADError(Exception):
    """Base class of every error raised by ``ead_client``."""


class APIError(EADError):
    """The server answered with an OpenAI-style error body ``{"error": {...}}``.

    ``url`` is the server that answered; ``prompt_indices`` (rollouts only) are the
    caller's prompt indices of the request that failed, so a bad prompt can be found.
    """

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        *,
        type: str | None = None,
        url: str | None = None,
        prompt_indices: Sequence[int] | None = None,
    ) -> None:
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type
        self.url = url
        self.prompt_indices = list(prompt_indices) if prompt_indices is not None else None
        super().__init__(self._describe())

    def _describe(self) -> str:
        text = f"{self.status}: {self.message}"
        if self.param:
            text += f" (param: {self.param})"
        if self.url:
            text += f" [{self.url}]"
        if self.prompt_indices is not None:
            text += f" (prompts {_short_list(self.prompt_indices)})"
        return text

    def __str__(self) -> str:
        # Recomputed so that prompt_indices filled in after construction show up.
        return self._describe()


class BadRequestError(APIError):
    """A 4xx answer other than 401 (403: not allowed, e.g. a reload path outside the weights root); never retried."""


class AuthenticationError(APIError):
    """A 401 answer: give the right ``api_key`` (or ``admin_key`` for reloads)."""


class ServerUnavailableError(EADError):
    """No usable answer from a server after every retry.

    ``url`` is the last server tried, ``attempts`` how many requests were made in all.
    The underlying transport error or 5xx :class:`APIError` is ``__cause__``.
    """

    def __init__(self, message: str, *, url: str | None = None, attempts: int = 0) -> None:
        super().__init__(message)
        self.url = url
        self.attempts = attempts


class RolloutError(EADError):
    """Some prompts of one ``rollouts()`` call failed; nothing is returned for any prompt.

    ``failed_prompt_indices`` lists the caller's indices of every prompt without rollouts;
    ``errors`` pairs each failed request's prompt indices with its exception.
    """

    def __init__(self, failed_prompt_indices: Sequence[int], errors: Sequence[tuple[list[int], BaseException]]) -> None:
        self.failed_prompt_indices = sorted(failed_prompt_indices)
        self.errors = list(errors)
        first = self.errors[0][1] if self.errors else None
        super().__init__(
            f"{len(self.failed_prompt_indices)} prompt(s) failed: {_short_list(self.failed_prompt_indices)}"
            + (f"; first error: {first}" if first is not None else "")
        )


class WeightVersionMismatch(EADError):
    """Servers report different weight versions.

    Raised by ``reload_weights()`` when the servers disagree after a reload, and by
    ``rollouts()`` when one call's responses come from different weight versions
    (mixing them would silently train on samples from two policies). ``versions`` maps
    each server URL to the version it reported.
    """

    def __init__(self, versions: Mapping[str, int], message: str | None = None) -> None:
        self.versions = dict(versions)
        super().__init__(message or f"servers disagree on the weight version: {self.versions}")


class ProtocolError(EADError):
    """A 2xx answer whose body does not follow the rollout protocol (a server bug or
    a client/server version skew). Not retried: the same server would answer the same."""

    def __init__(self, message: str, *, url: str | None = None) -> None:
        super().__init__(f"{message} [{url}]" if url else message)
        self.url = url


def _short_list(items: Sequence[int], limit: int = 20) -> str:
    if len(items) <= limit:
        return str(list(items))
    return f"[{', '.join(map(str, items[:limit]))}, ... ({len(items)} in all)]"
