"""Pipelines on in-memory fakes: story, echo, and the registry that finds them."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict

from forgeline.backends.base import Usage
from forgeline.errors import ConfigurationError, InvalidInputError, NotFoundError
from forgeline.events.models import EventType
from forgeline.pipelines.base import Pipeline, PipelineContext
from forgeline.pipelines.echo import EchoInput, EchoPipeline
from forgeline.pipelines.registry import PipelineRegistry, load_pipelines
from forgeline.pipelines.story import (
    PROGRESS_EVERY_CHARS,
    SYSTEM_PROMPT,
    StoryInput,
    StoryPipeline,
)
from forgeline.testing import FakeBackend, MemoryRecorder, MemoryStorage

THIS_MODULE = __name__


class ShoutInput(BaseModel):
    """Input of the test-only pipeline."""

    model_config = ConfigDict(extra="forbid")

    text: str


class ShoutPipeline(Pipeline):
    """A test-only pipeline loaded through FORGELINE_PIPELINES."""

    name = "shout"
    description = "Upper-cases its input."
    input_model = ShoutInput

    async def run(self, ctx: PipelineContext) -> dict[str, Any]:
        return {"text": ShoutInput.model_validate(ctx.input).text.upper()}


class NotAPipeline:
    """A class that is not a Pipeline subclass."""


@dataclass
class RecordingSink:
    """An ``EventSink`` that keeps streamed text and events in arrival order."""

    received: list[tuple[str, Any]] = field(default_factory=list)

    async def token(self, text: str) -> None:
        self.received.append(("token", text))

    async def progress(self, fraction: float) -> None:
        self.received.append(("progress", fraction))

    async def emit(self, kind: EventType, data: dict[str, Any]) -> None:
        self.received.append((kind.value, data))


@pytest.fixture
def make_context() -> Callable[..., PipelineContext]:
    """Builds a pipeline context on a fake backend, memory storage and memory recorder."""

    def make(job_input: BaseModel, *, backend: FakeBackend | None = None) -> PipelineContext:
        return PipelineContext(
            job_id=uuid.uuid4(),
            attempt=1,
            input=job_input,
            backend=backend or FakeBackend(),
            storage=MemoryStorage(),
            recorder=MemoryRecorder(),
        )

    return make


def storage_of(ctx: PipelineContext) -> MemoryStorage:
    """The context's storage, typed as the fake it is."""
    storage = ctx.storage
    assert isinstance(storage, MemoryStorage)
    return storage


def recorder_of(ctx: PipelineContext) -> MemoryRecorder:
    """The context's recorder, typed as the fake it is."""
    recorder = ctx.recorder
    assert isinstance(recorder, MemoryRecorder)
    return recorder


# -- story ------------------------------------------------------------------


async def test_story_prompt_carries_the_idea_and_genre(
    make_context: Callable[..., PipelineContext],
) -> None:
    """The model is asked for a story about the prompt, in the genre, with the system prompt."""
    backend = FakeBackend()
    ctx = make_context(
        StoryInput(prompt="  a lighthouse keeper  ", genre="mystery", temperature=0.3, seed=7),
        backend=backend,
    )

    await StoryPipeline().run(ctx)

    (request,) = backend.requests
    assert request.prompt == "Write a short story about: a lighthouse keeper. Genre: mystery."
    assert request.system == SYSTEM_PROMPT
    assert request.temperature == 0.3
    assert request.seed == 7


async def test_story_prompt_without_genre_mentions_none(
    make_context: Callable[..., PipelineContext],
) -> None:
    """Without a genre the prompt says nothing about one."""
    backend = FakeBackend()

    await StoryPipeline().run(make_context(StoryInput(prompt="a door"), backend=backend))

    assert "Genre" not in backend.requests[0].prompt


async def test_story_streams_each_piece_then_announces_the_artifact(
    make_context: Callable[..., PipelineContext],
) -> None:
    """Every piece reaches the job's stream as it arrives, in order, before the artifact event."""
    pieces = ["The ", "sea ", "opened", "."]
    ctx = make_context(StoryInput(prompt="a door"), backend=FakeBackend(pieces))
    sink = RecordingSink()
    ctx.events = sink

    await StoryPipeline().run(ctx)

    tokens = [data for kind, data in sink.received if kind == "token"]
    assert tokens == pieces
    assert sink.received[: len(pieces)] == [("token", piece) for piece in pieces]
    kind, artifact = sink.received[-1]
    assert kind == "artifact"
    assert artifact["name"] == "story.md"
    assert artifact["url"] == f"/api/v1/jobs/{ctx.job_id}/artifacts/story.md"


async def test_story_result_is_the_streamed_pieces_joined(
    make_context: Callable[..., PipelineContext],
) -> None:
    """The result text is every streamed piece, concatenated in order, with its length."""
    pieces = ["The ", "sea ", "opened", "."]
    ctx = make_context(StoryInput(prompt="a door"), backend=FakeBackend(pieces))

    result = await StoryPipeline().run(ctx)

    assert result == {"text": "The sea opened.", "characters": len("The sea opened.")}


async def test_story_stores_markdown_at_the_deterministic_key(
    make_context: Callable[..., PipelineContext],
) -> None:
    """``story.md`` lands at ``jobs/<id>/story.md`` as Markdown, and its metadata is recorded."""
    ctx = make_context(StoryInput(prompt="A door in the sea."), backend=FakeBackend(["Once."]))

    await StoryPipeline().run(ctx)

    key = f"jobs/{ctx.job_id}/story.md"
    content = storage_of(ctx).objects[key]
    assert content.decode() == "# A door in the sea\n\nOnce.\n"
    assert recorder_of(ctx).artifacts == {"story.md": (key, len(content), "text/markdown")}


async def test_story_rerun_overwrites_the_same_artifact(
    make_context: Callable[..., PipelineContext],
) -> None:
    """A second delivery writes the same key again: one object, not two."""
    ctx = make_context(StoryInput(prompt="a door"))
    pipeline = StoryPipeline()

    await pipeline.run(ctx)
    await pipeline.run(ctx)

    storage = storage_of(ctx)
    assert list(storage.objects) == [f"jobs/{ctx.job_id}/story.md"]
    assert storage.writes == 2


async def test_story_counts_usage(make_context: Callable[..., PipelineContext]) -> None:
    """The usage the backend reports is added to the context."""
    backend = FakeBackend(["a", "b", "c"])
    ctx = make_context(StoryInput(prompt="a door"), backend=backend)

    await StoryPipeline().run(ctx)

    # The fake reports one prompt token per word of the prompt it was sent.
    prompt_words = len(backend.requests[0].prompt.split())
    assert ctx.usage == Usage(prompt_tokens=prompt_words, completion_tokens=3)


async def test_story_passes_max_tokens_to_the_backend(
    make_context: Callable[..., PipelineContext],
) -> None:
    """``max_tokens`` reaches the backend, which stops there."""
    backend = FakeBackend(["one ", "two ", "three ", "four"])
    ctx = make_context(StoryInput(prompt="a door", max_tokens=2), backend=backend)

    result = await StoryPipeline().run(ctx)

    assert backend.requests[0].max_tokens == 2
    assert result["text"] == "one two "
    assert ctx.usage.completion_tokens == 2


async def test_story_reports_progress_while_streaming(
    make_context: Callable[..., PipelineContext],
) -> None:
    """Long output reports progress, rising and below completion, every few hundred chars."""
    pieces = ["x" * 100] * 20
    ctx = make_context(StoryInput(prompt="a door", max_tokens=40), backend=FakeBackend(pieces))

    await StoryPipeline().run(ctx)

    progress = recorder_of(ctx).progress
    assert len(progress) == sum(len(p) for p in pieces) // PROGRESS_EVERY_CHARS
    assert progress == sorted(progress)
    assert all(0.0 < fraction <= 0.95 for fraction in progress)


async def test_short_story_reports_no_intermediate_progress(
    make_context: Callable[..., PipelineContext],
) -> None:
    """Output shorter than the progress step stores no progress (the runner sets 1 at the end)."""
    ctx = make_context(StoryInput(prompt="a door"))

    await StoryPipeline().run(ctx)

    assert recorder_of(ctx).progress == []


@pytest.mark.parametrize(
    ("job_input", "field"),
    [
        ({}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "temperature": 2.5}, "temperature"),
        ({"prompt": "x", "seed": -1}, "seed"),
        ({"prompt": "x", "style": "noir"}, "style"),
    ],
)
def test_story_input_refuses_bad_fields(job_input: dict[str, Any], field: str) -> None:
    """Missing, out-of-range and unknown story fields are refused with their location."""
    registry = load_pipelines()

    with pytest.raises(InvalidInputError) as caught:
        registry.validate_input("story", job_input)

    assert [detail["loc"] for detail in caught.value.details] == [["input", field]]


# -- echo -------------------------------------------------------------------


async def test_echo_returns_its_text_without_touching_backend_or_storage(
    make_context: Callable[..., PipelineContext],
) -> None:
    """Echo succeeds with its input text, calling no model and storing nothing."""
    backend = FakeBackend()
    ctx = make_context(EchoInput(text="ping"), backend=backend)

    result = await EchoPipeline().run(ctx)

    assert result == {"text": "ping"}
    assert backend.requests == []
    assert storage_of(ctx).objects == {}


# -- registry ---------------------------------------------------------------


def test_builtin_pipelines_are_found_through_entry_points() -> None:
    """The installed package registers story and echo."""
    registry = load_pipelines()

    assert {"echo", "story"} <= set(registry.names)
    assert isinstance(registry.get("story"), StoryPipeline)
    assert isinstance(registry.get("echo"), EchoPipeline)


def test_unknown_pipeline_lists_the_known_ones() -> None:
    """Asking for a pipeline that does not exist names every one that does."""
    registry = PipelineRegistry([EchoPipeline(), StoryPipeline()])

    with pytest.raises(NotFoundError) as caught:
        registry.get("poem")

    assert "'poem'" in caught.value.message
    assert "echo, story" in caught.value.message
    assert caught.value.details == {"known": ["echo", "story"]}


def test_validate_input_of_unknown_pipeline_is_not_found() -> None:
    """Validation first finds the pipeline, so an unknown name is NotFoundError."""
    with pytest.raises(NotFoundError):
        PipelineRegistry([EchoPipeline()]).validate_input("poem", {})


def test_invalid_input_has_field_level_details() -> None:
    """Each invalid field is one detail with loc under ``input``, msg and type."""
    registry = PipelineRegistry([StoryPipeline()])

    with pytest.raises(InvalidInputError) as caught:
        registry.validate_input("story", {"max_tokens": "many", "extra": 1})

    details = {tuple(d["loc"]): d for d in caught.value.details}
    assert set(details) == {("input", "prompt"), ("input", "max_tokens"), ("input", "extra")}
    assert details[("input", "prompt")]["type"] == "missing"
    assert details[("input", "extra")]["type"] == "extra_forbidden"
    assert all(d["msg"] for d in details.values())
    assert "story" in caught.value.message


def test_validate_input_returns_normalised_json() -> None:
    """Valid input comes back with defaults filled in, as plain JSON values."""
    normalised = PipelineRegistry([StoryPipeline()]).validate_input("story", {"prompt": "x"})

    assert normalised == {
        "prompt": "x",
        "genre": None,
        "max_tokens": 512,
        "temperature": 0.8,
        "seed": None,
    }


def test_extra_pipeline_is_loaded_by_import_path() -> None:
    """A ``module:Class`` path adds a pipeline beside the built-in ones."""
    registry = load_pipelines([f"{THIS_MODULE}:ShoutPipeline"])

    assert isinstance(registry.get("shout"), ShoutPipeline)
    assert {"echo", "story", "shout"} <= set(registry.names)


@pytest.mark.parametrize(
    "path",
    [
        "forgeline_no_such_module:Thing",
        "forgeline.pipelines.echo:NoSuchClass",
        "forgeline.pipelines.echo",
    ],
)
def test_unimportable_path_names_the_variable_and_the_path(path: str) -> None:
    """A FORGELINE_PIPELINES entry that cannot be imported is a ConfigurationError naming it."""
    with pytest.raises(ConfigurationError) as caught:
        load_pipelines([path])

    assert caught.value.message.startswith("FORGELINE_PIPELINES:")
    assert repr(path) in caught.value.message


def test_module_that_fails_to_import_names_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A module raising on import (here a syntax error) is a ConfigurationError naming the path."""
    (tmp_path / "forgeline_broken_plugin.py").write_text("def (\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "forgeline_broken_plugin", raising=False)

    with pytest.raises(ConfigurationError, match="forgeline_broken_plugin"):
        load_pipelines(["forgeline_broken_plugin:Plugin"])


def test_duplicate_pipeline_names_are_refused() -> None:
    """Two pipelines with one name cannot both be installed."""
    with pytest.raises(ConfigurationError, match="'echo'"):
        PipelineRegistry([EchoPipeline(), EchoPipeline()])


def test_extra_path_clashing_with_a_builtin_is_refused() -> None:
    """Adding a built-in again through FORGELINE_PIPELINES is a duplicate."""
    with pytest.raises(ConfigurationError, match="two pipelines are named 'echo'"):
        load_pipelines(["forgeline.pipelines.echo:EchoPipeline"])


def test_non_pipeline_class_is_refused() -> None:
    """A path to something that is not a Pipeline subclass is refused by name."""
    with pytest.raises(
        ConfigurationError, match=r"NotAPipeline.*not a concrete forgeline Pipeline"
    ):
        load_pipelines([f"{THIS_MODULE}:NotAPipeline"])


def test_non_class_object_is_refused() -> None:
    """A path to a function or value is refused the same way."""
    with pytest.raises(ConfigurationError, match="not a concrete forgeline Pipeline"):
        load_pipelines(["forgeline.pipelines.story:build_prompt"])


def test_abstract_pipeline_class_is_refused() -> None:
    """The abstract base itself is refused as configuration, not crashing with TypeError."""
    with pytest.raises(ConfigurationError, match="FORGELINE_PIPELINES"):
        load_pipelines(["forgeline.pipelines.base:Pipeline"])


def test_registry_all_is_a_copy() -> None:
    """Changing the mapping ``all()`` returns does not change the registry."""
    registry = PipelineRegistry([EchoPipeline()])

    pipelines = dict(registry.all())
    pipelines.clear()

    assert registry.names == ["echo"]
