"""The echo pipeline: returns its input without calling a model.

Smoke tests after a deploy and queue benchmarks use it: it exercises the whole
job path (API, queue, worker, database) and nothing else.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from forgeline.pipelines.base import Pipeline, PipelineContext


class EchoInput(BaseModel):
    """The text to give back."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field(default="", max_length=10_000)


class EchoPipeline(Pipeline):
    """Succeeds at once with ``{"text": input.text}``."""

    name = "echo"
    description = "Returns its input; for smoke tests and benchmarks of the job path."
    input_model = EchoInput

    async def run(self, ctx: PipelineContext) -> dict[str, Any]:
        return {"text": EchoInput.model_validate(ctx.input).text}
