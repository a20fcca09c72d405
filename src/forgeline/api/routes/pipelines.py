"""``/api/v1/pipelines``: what can be run, with input schemas."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from forgeline.api.deps import RuntimeDep, authenticate
from forgeline.api.schemas import PipelineList, PipelineOut

router = APIRouter(prefix="/api/v1/pipelines", tags=["pipelines"])


@router.get("", response_model=PipelineList, dependencies=[Depends(authenticate)])
async def list_pipelines(runtime: RuntimeDep) -> PipelineList:
    """Every pipeline, with the JSON schema its ``input`` must match."""
    return PipelineList(
        items=[
            PipelineOut(
                name=name,
                description=pipeline.description,
                input_schema=pipeline.input_model.model_json_schema(),
            )
            for name, pipeline in sorted(runtime.pipelines.all().items())
        ]
    )
