"""The story pipeline: a short story from a prompt, streamed from the model."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from forgeline.backends.base import GenerationRequest
from forgeline.pipelines.base import Pipeline, PipelineContext

SYSTEM_PROMPT = (
    "You are a storyteller. Write an original short story for the reader's idea. "
    "Use vivid, concrete details and end the story properly."
)
#: Progress is stored at most this often, in generated characters.
PROGRESS_EVERY_CHARS = 400


class StoryInput(BaseModel):
    """What a story job needs."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=4000, description="The idea for the story.")
    genre: str | None = Field(default=None, max_length=50, description="e.g. fantasy, mystery.")
    max_tokens: int = Field(default=512, ge=1, le=4096)
    temperature: float = Field(default=0.8, ge=0.0, le=2.0)
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)


def build_prompt(story: StoryInput) -> str:
    """The user message sent to the model."""
    genre = f" Genre: {story.genre}." if story.genre else ""
    return f"Write a short story about: {story.prompt.strip()}.{genre}"


def to_markdown(story: StoryInput, text: str) -> str:
    """The story as the Markdown document stored as an artifact."""
    title = story.prompt.strip().rstrip(".")
    return f"# {title}\n\n{text.strip()}\n"


class StoryPipeline(Pipeline):
    """Generates a short story and stores it as ``story.md``."""

    name = "story"
    description = "A short story from a prompt, with optional genre."
    input_model = StoryInput

    async def run(self, ctx: PipelineContext) -> dict[str, Any]:
        story = StoryInput.model_validate(ctx.input)
        request = GenerationRequest(
            prompt=build_prompt(story),
            system=SYSTEM_PROMPT,
            max_tokens=story.max_tokens,
            temperature=story.temperature,
            seed=story.seed,
        )
        parts: list[str] = []
        produced = reported = 0
        async for delta in ctx.backend.stream(request):
            if delta.usage is not None:
                ctx.add_usage(delta.usage)
            if delta.text:
                await ctx.token(delta.text)
                parts.append(delta.text)
                produced += len(delta.text)
                if produced - reported >= PROGRESS_EVERY_CHARS:
                    reported = produced
                    # Length is the only honest measure mid-stream.
                    await ctx.progress(min(0.95, len(parts) / story.max_tokens))
        text = "".join(parts)
        await ctx.put_artifact("story.md", to_markdown(story, text).encode(), "text/markdown")
        return {"text": text, "characters": len(text)}
