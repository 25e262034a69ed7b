"""Typed results: one :class:`Rollout` per sample, gathered in a :class:`RolloutBatch`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, model_validator

from ead_server import protocol
from ead_server.schedule import ResolvedSchedule

from ._arrays import pad_ragged

if TYPE_CHECKING:
    from .tis import TISResult

__all__ = ["Rollout", "RolloutBatch"]


class Rollout(protocol.Rollout):
    """One sampled completion, as the server returns it.

    ``behavior_logprobs[j]`` is the log-probability of ``token_ids[j]`` under the
    distribution it was actually drawn from (temperature ``temperatures[j]``, after any
    top-p / top-k truncation); ``target_logprobs[j]`` (only when requested) is the same
    model's log-probability at temperature 1 without truncation (docs/design.md, "Target
    log-probs").
    ``prompt_index`` indexes the caller's prompt list, ``sample_index`` runs over ``n``.
    """

    # The fields are the server's (ead_server.protocol.Rollout, the wire contract).
    # Unknown fields are ignored so that a newer server can add fields without breaking
    # older clients; missing or mistyped ones fail loudly.
    model_config = ConfigDict(extra="ignore", frozen=True)

    def token_versions(self, default: int | None = None) -> list[int]:
        """The weight version that produced each token (``weight_versions`` spread out);
        ``default`` for every token when the server sent no spans."""
        if not self.weight_versions:
            if default is None:
                raise ValueError("this rollout carries no weight_versions; pass default=")
            return [default] * len(self.token_ids)
        out = [0] * len(self.token_ids)
        for span in self.weight_versions:
            out[span.start:span.end] = [span.version] * (span.end - span.start)
        return out

    def staleness(self, current_version: int) -> int:
        """How many versions behind ``current_version`` its oldest token is (docs/design.md,
        "Weight versions and spans": ``current - min(v)``); 0 for a rollout made entirely by
        the current weights."""
        if not self.weight_versions:
            raise ValueError("this rollout carries no weight_versions (a server older than the async-RL routes)")
        return current_version - min(span.version for span in self.weight_versions)

    @model_validator(mode="after")
    def _aligned(self) -> Rollout:
        n = len(self.token_ids)
        for name in ("behavior_logprobs", "temperatures", "target_logprobs", "entropies", "behavior_entropies"):
            values = getattr(self, name)
            if values is not None and len(values) != n:
                raise ValueError(f"{name} has {len(values)} entries for {n} tokens")
        return self


class RolloutBatch(BaseModel):
    """All rollouts of one ``rollouts()`` call, ordered by ``(prompt_index, sample_index)``.

    ``rollouts[i * n + s]`` is sample ``s`` of prompt ``i``. ``schedule`` is the schedule
    the server applied, every field resolved (``None`` for unscheduled sampling);
    ``weight_version`` is the version of the earliest token; when the weights changed
    during the call, each rollout's ``weight_versions`` spans say which tokens came from
    which version (``token_versions()``, ``staleness()``, ``fresh()``).

    The array helpers right-pad to the longest completion and return a boolean mask that
    is True on real tokens. Floating-point arrays are float64 (lossless from JSON), token
    ids int64.
    """

    model_config = ConfigDict(frozen=True)

    weight_version: int
    schedule: ResolvedSchedule | None
    num_prompts: int
    n: int
    rollouts: list[Rollout]

    def __len__(self) -> int:
        return len(self.rollouts)

    @property
    def texts(self) -> list[str]:
        return [r.text for r in self.rollouts]

    def by_prompt(self) -> list[list[Rollout]]:
        """The rollouts grouped per prompt: ``by_prompt()[i]`` holds prompt ``i``'s ``n`` samples."""
        return [self.rollouts[i * self.n : (i + 1) * self.n] for i in range(self.num_prompts)]

    def lengths(self) -> np.ndarray:
        """Number of generated tokens of each rollout, shape ``[R]``."""
        return np.array([len(r.token_ids) for r in self.rollouts], dtype=np.int64)

    def token_ids(self, pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Completion token ids ``[R, L]`` (int64) and the mask ``[R, L]``."""
        return pad_ragged([r.token_ids for r in self.rollouts], pad, np.int64)

    def prompt_token_ids(self, pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Prompt token ids ``[R, P]`` (int64, right-padded) and their mask."""
        return pad_ragged([r.prompt_token_ids for r in self.rollouts], pad, np.int64)

    def behavior_logprobs(self, pad: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """Behaviour log-probs ``[R, L]`` (float64) and the mask."""
        return pad_ragged([r.behavior_logprobs for r in self.rollouts], pad, np.float64)

    def temperatures(self, pad: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """Per-token sampling temperatures ``[R, L]`` (float64) and the mask."""
        return pad_ragged([r.temperatures for r in self.rollouts], pad, np.float64)

    def token_versions(self, pad: int = -1) -> tuple[np.ndarray, np.ndarray]:
        """The weight version of every token ``[R, L]`` (int64) and the mask."""
        rows = [r.token_versions(default=self.weight_version) for r in self.rollouts]
        return pad_ragged(rows, pad, np.int64)

    def staleness(self, current_version: int) -> np.ndarray:
        """Each rollout's staleness against ``current_version``, shape ``[R]`` (int64)."""
        return np.array([current_version - min(r.token_versions(default=self.weight_version))
                         if r.token_ids else current_version - self.weight_version for r in self.rollouts],
                        dtype=np.int64)

    def fresh(self, current_version: int, max_staleness: int) -> np.ndarray:
        """True for rollouts at most ``max_staleness`` versions old, shape ``[R]``: the mask
        to drop or down-weight the rest (AReaL's ``max_head_offpolicyness``, prime-rl's
        ``max_async_level``, TRL's async GRPO ``max_staleness``)."""
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        return self.staleness(current_version) <= max_staleness

    def target_logprobs(self, pad: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """Target (temperature-1) log-probs ``[R, L]`` (float64) and the mask.

        Raises ``ValueError`` unless the call asked for ``return_target_logprobs=True``.
        """
        rows = [r.target_logprobs for r in self.rollouts]
        if any(row is None for row in rows):
            raise ValueError("this batch has no target log-probs: call rollouts(..., return_target_logprobs=True)")
        return pad_ragged(rows, pad, np.float64)  # type: ignore[arg-type]

    @property
    def has_target_logprobs(self) -> bool:
        return bool(self.rollouts) and all(r.target_logprobs is not None for r in self.rollouts)

    def to_numpy(self, pad_token_id: int = 0, pad_value: float = 0.0) -> dict[str, np.ndarray]:
        """Every per-token field as a padded array, plus masks, lengths and indices.

        Keys: ``token_ids``, ``behavior_logprobs``, ``temperatures``, ``target_logprobs``
        (only when requested), ``mask`` and ``lengths`` (completions); ``prompt_token_ids``,
        ``prompt_mask``, ``prompt_lengths`` (prompts, right-padded); ``prompt_index`` and
        ``sample_index`` (``[R]``).
        """
        token_ids, mask = self.token_ids(pad_token_id)
        prompt_ids, prompt_mask = self.prompt_token_ids(pad_token_id)
        out: dict[str, np.ndarray] = {
            "token_ids": token_ids,
            "behavior_logprobs": self.behavior_logprobs(pad_value)[0],
            "temperatures": self.temperatures(pad_value)[0],
            "mask": mask,
            "lengths": self.lengths(),
            "prompt_token_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "prompt_lengths": prompt_mask.sum(axis=1).astype(np.int64),
            "prompt_index": np.array([r.prompt_index for r in self.rollouts], dtype=np.int64),
            "sample_index": np.array([r.sample_index for r in self.rollouts], dtype=np.int64),
        }
        if self.has_target_logprobs:
            out["target_logprobs"] = self.target_logprobs(pad_value)[0]
        return out

    def to_torch(
        self, device: Any = None, float_dtype: Any = None, pad_token_id: int = 0, pad_value: float = 0.0
    ) -> dict[str, Any]:
        """:meth:`to_numpy` as torch tensors (needs PyTorch; the rest of the client does not).

        Floating-point arrays become ``float_dtype`` (default ``torch.float32``, what
        trainers compute losses in); ids, lengths and indices ``torch.int64``; masks
        ``torch.bool``.
        """
        try:
            import torch
        except ImportError as exc:
            raise ImportError(
                "RolloutBatch.to_torch() needs PyTorch, which ead_client does not install; "
                "install torch, or use to_numpy()"
            ) from exc
        float_dtype = torch.float32 if float_dtype is None else float_dtype
        out: dict[str, Any] = {}
        for key, array in self.to_numpy(pad_token_id, pad_value).items():
            tensor = torch.from_numpy(array)
            if array.dtype.kind == "f":
                tensor = tensor.to(float_dtype)
            out[key] = tensor.to(device) if device is not None else tensor
        return out

    def tis(self, old_logprobs: Any = None, **kwargs: Any) -> TISResult:
        """Truncated importance weights for this batch, see :func:`ead_client.tis_weights`.

        ``old_logprobs`` are the trainer's ``log pi_old`` per token (ragged lists or a
        padded ``[R, L]`` array). Left out, the engine's own ``target_logprobs`` are used
        (docs/design.md, "Truncated importance sampling": when the trainer trusts the engine).
        """
        from .tis import tis_weights

        if old_logprobs is None:
            old_logprobs = [r.target_logprobs for r in self.rollouts]
            if any(row is None for row in old_logprobs):
                raise ValueError("no old_logprobs given and the batch has no target log-probs")
        if isinstance(old_logprobs, (list, tuple)):
            # Ragged against ragged: tis_weights checks every row's length.
            return tis_weights([r.behavior_logprobs for r in self.rollouts], old_logprobs, **kwargs)
        behavior, mask = self.behavior_logprobs()
        return tis_weights(behavior, old_logprobs, mask, **kwargs)
