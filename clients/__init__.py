"""ead_client: the RL client of the EAD server (no vLLM, no torch needed).

::

    from ead_client import EADClient, tis_weights

    with EADClient(["http://gpu0:8000", "http://gpu1:8000"]) as client:
        batch = client.rollouts(prompts, n=8, max_tokens=1024, step=global_step, seed=1234,
                                return_target_logprobs=True)
    arrays = batch.to_numpy()            # padded [R, L] arrays + mask + lengths
    behavior, mask = batch.behavior_logprobs()
    result = tis_weights(behavior, old_logprobs, mask, level="token", mode="truncate", cap=2.0)
    # or batch.tis(): old = the engine's own target log-probs

The schedule types come from ``ead_server.schedule`` (the single source of truth) and
are re-exported here for convenience.
"""

from ead_server.schedule import DecaySchedule, ResolvedSchedule, ScheduleError, TemperatureSchedule

from ._base import __version__
from ._client import AsyncEADClient, EADClient
from ._models import Rollout, RolloutBatch
from .errors import (
    APIError,
    AuthenticationError,
    BadRequestError,
    EADError,
    ProtocolError,
    RolloutError,
    ServerUnavailableError,
    WeightVersionMismatch,
)
from .tis import TISResult, tis_weights

__all__ = [
    "APIError",
    "AsyncEADClient",
    "AuthenticationError",
    "BadRequestError",
    "DecaySchedule",
    "EADClient",
    "EADError",
    "ProtocolError",
    "ResolvedSchedule",
    "Rollout",
    "RolloutBatch",
    "RolloutError",
    "ScheduleError",
    "ServerUnavailableError",
    "TISResult",
    "TemperatureSchedule",
    "WeightVersionMismatch",
    "__version__",
    "tis_weights",
]
