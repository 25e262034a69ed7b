"""Request and response models of ead-server's own routes: the contract clients rely on.

They generate the OpenAPI document (``/openapi.json``) beside vLLM's routes. The
``temperature_schedule`` object is :class:`ead_server.schedule.TemperatureSchedule`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SkipValidation, model_validator

from ead_server.request_contract import DEFAULT_MAX_TOKENS, DEFAULT_TEMPERATURE
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
    # request contract), so both routes refuse the same request with the same `param`.
    n: int = Field(1, description="samples per prompt")
    max_tokens: int = Field(DEFAULT_MAX_TOKENS, description="tokens per sample; prompt + max_tokens must fit the context")
    stop: str | list[str] | None = None
    ignore_eos: bool = Field(False, description="keep sampling after the end-of-sequence token, up to max_tokens")
    seed: int | list[int] | None = Field(
        None, description="one seed for the call (prompt i is seeded seed + i, like a one-prompt request seeded seed + i), or one seed per "
                          "prompt; sample j of a prompt gets an independent stream derived from (seed, j)")
    temperature: float | None = Field(
        None, description=f"a fixed temperature for requests without a schedule (default {DEFAULT_TEMPERATURE}); "
                          "with a temperature_schedule it must be unset or 1.0")
    top_p: float | None = None
    top_k: int | None = None
    # Read by the request contract, as on /v1/completions (the schema still shows the object).
    temperature_schedule: Annotated[TemperatureSchedule | None, SkipValidation] = None
    return_target_logprobs: bool = Field(
        False, description="also return log-probs of the generated tokens at temperature 1, no truncation")
    return_entropy: bool = Field(
        False, description="also return each token's entropy at temperature 1 and at its sampling temperature, from "
                           "the sampling pass (needs a temperature_schedule, and no top_p or top_k)")

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


class VersionSpan(BaseModel):
    """Tokens ``start`` to ``end`` (exclusive) of a completion came from weight ``version``."""

    version: int
    start: int
    end: int
    label: str | None = None


class Rollout(BaseModel):
    prompt_index: int
    sample_index: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    behavior_logprobs: list[float] = Field(description="log-probs under the distribution each token was sampled from")
    temperatures: list[float] = Field(description="temperature each token was sampled at")
    target_logprobs: list[float | None] | None = Field(
        None, description="log-probs at temperature 1, no truncation; null for a token whose weights were replaced "
                          "before it could be scored")
    target_logprobs_source: Literal["sampling", "scoring"] | None = Field(
        None, description="'sampling': computed in the sampling pass itself (no extra cost, exact across weight "
                          "changes); 'scoring': a second pass, used when top-k, top-p, min-p, penalties or other "
                          "logit changes make the in-pass formula inexact")
    entropies: list[float | None] | None = Field(
        None, description="with return_entropy: the entropy (nats) of each token's distribution at temperature 1, "
                          "softmax(h); null for a row of NaN logits")
    behavior_entropies: list[float | None] | None = Field(
        None, description="with return_entropy: the entropy (nats) of the distribution each token was sampled from, "
                          "softmax(h / tau)")
    weight_versions: list[VersionSpan] | None = Field(
        None, description="which weights produced which tokens, first token first (one span unless the weights "
                          "changed during the rollout)")


class RolloutResponse(BaseModel):
    weight_version: int = Field(description="the version of the earliest first token among the rollouts")
    temperature_schedule: ResolvedSchedule | None
    rollouts: list[Rollout]


class ReloadRequest(_Request):
    path: str = Field(description="a Hugging Face safetensors checkpoint folder under --weights-root")
    mode: Literal["wait", "keep", "abort"] = Field(
        "wait", description="requests in flight: 'wait' finish on the old weights first; 'keep' are frozen and go on "
                            "under the new weights (prefilled again); 'abort' end now with finish_reason 'abort'")
    label: str | None = Field(None, max_length=200, description="a name for the new version, e.g. 'step-100'")


class WeightsInfo(BaseModel):
    weight_version: int = Field(description="goes up by one with every change of weights, whatever the route")
    label: str | None = Field(None, description="the name a trainer gave this version, if any")
    path: str | None = Field(description="the checkpoint folder, or null for weights sent over vLLM's transfer")
