"""Request and response models of ead-server's own routes: the contract clients rely on.

They generate the OpenAPI document (``/openapi.json``) beside vLLM's routes. The
``temperature_schedule`` object is :class:`ead_server.schedule.TemperatureSchedule`.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, SkipValidation, model_validator

from ead_server.schedule import ResolvedSchedule, TemperatureSchedule


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RolloutRequest(_Request):
    """Token-level rollouts for an RL trainer: give ``prompts`` or ``messages``."""

    model: str | None = Field(None, description="served model name (optional; there is one model)")
    prompts: list[str | list[int]] | None = Field(
        None, description="prompts used as-is: strings (tokenized with the model's tokenizer) or token-id lists")
    messages: list[list[dict[str, Any]]] | None = Field(
        None, description="chat conversations; the model's chat template is applied with a generation prompt")
    # Values are checked where /v1/completions checks them (vLLM's SamplingParams and the
    # request policy), so both routes refuse the same request with the same `param`.
    n: int = Field(1, description="samples per prompt")
    max_tokens: int = Field(256, description="tokens per sample; prompt + max_tokens must fit the context")
    stop: str | list[str] | None = None
    seed: int | list[int] | None = Field(
        None, description="one seed for the call (prompt i is seeded seed + i, like a one-prompt request seeded seed + i), or one seed per "
                          "prompt; sample j of a prompt gets an independent stream derived from (seed, j)")
    temperature: float | None = Field(
        None, description="a fixed temperature for requests without a schedule (default 1.0); with a "
                          "temperature_schedule it must be unset or 1.0")
    top_p: float | None = None
    top_k: int | None = None
    # Parsed by the request policy, as on /v1/completions (the schema still shows the object).
    temperature_schedule: Annotated[TemperatureSchedule | None, SkipValidation] = None
    return_target_logprobs: bool = Field(
        False, description="also return log-probs of the generated tokens at temperature 1, no truncation")

    @model_validator(mode="after")
    def _one_source(self) -> RolloutRequest:
        if (self.prompts is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompts' and 'messages'")
        count = len(self.prompts if self.prompts is not None else self.messages or [])
        if count == 0:
            raise ValueError("no prompts given")
        if isinstance(self.seed, list) and len(self.seed) != count:
            raise ValueError(f"seed has {len(self.seed)} entries for {count} prompts")
        return self


class Rollout(BaseModel):
    prompt_index: int
    sample_index: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    behavior_logprobs: list[float] = Field(description="log-probs under the distribution each token was sampled from")
    temperatures: list[float] = Field(description="temperature each token was sampled at")
    target_logprobs: list[float] | None = Field(None, description="log-probs at temperature 1, no truncation")


class RolloutResponse(BaseModel):
    weight_version: int
    temperature_schedule: ResolvedSchedule | None
    rollouts: list[Rollout]


class ReloadRequest(_Request):
    path: str = Field(description="a Hugging Face safetensors checkpoint folder under --weights-root")


class WeightsInfo(BaseModel):
    weight_version: int
    path: str | None
