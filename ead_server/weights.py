"""The weight routes: which weights serve, and in-place reloads between training steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends

from ead_server.app_state import AppState, get_state, require_admin
from ead_server.checkpoints import check_compatible, resolve_under, stage_tied_head
from ead_server.errors import APIError
from ead_server.protocol import ReloadRequest, WeightsInfo
from ead_server.vllm_adapter import engine as vllm_engine

router = APIRouter()


@router.get("/v1/weights", response_model=WeightsInfo)
async def weights(state: AppState = Depends(get_state)) -> WeightsInfo:
    return WeightsInfo(weight_version=state.gate.version, path=state.gate.path)


@router.post("/v1/weights/reload", response_model=WeightsInfo, dependencies=[Depends(require_admin)])
async def reload(body: ReloadRequest, state: AppState = Depends(get_state)) -> WeightsInfo:
    """Load a same-architecture safetensors checkpoint under ``--weights-root``.

    Requests in flight finish on the old weights; new ones wait and then run on the new
    ones. A checkpoint that fails the checks is refused before the engine sees it; one
    that fails inside the engine is answered 500 after the previous weights are loaded
    back.
    """
    root = state.config.weights_root
    if root is None:
        raise APIError(403, "weight reload is disabled: start the server with --weights-root DIR", "path")
    folder = resolve_under(root, body.path)
    table = check_compatible(folder, Path(state.config.model_path))
    async with state.gate.writing():  # one reload at a time, alone with the engine
        try:
            await _load(state.engine, folder, table)
        except Exception as exc:  # noqa: BLE001 - any engine failure: restore, then report
            previous = Path(state.gate.path or state.config.model_path)
            await _load(state.engine, previous, check_compatible(previous, Path(state.config.model_path)))
            raise APIError(500, f"reload failed inside the engine ({exc}); the previous weights "
                                f"(version {state.gate.version}) are serving again") from None
        state.gate.commit(str(folder))
    return WeightsInfo(weight_version=state.gate.version, path=state.gate.path)


async def _load(engine: Any, folder: Path, table: dict) -> None:
    staging = stage_tied_head(folder, table)
    try:
        await vllm_engine.reload_weights(engine, staging.name if staging else str(folder))
    finally:
        if staging:
            staging.cleanup()
