"""Finding pipelines: the ``forgeline.pipelines`` entry-point group, plus import paths.

Built-in pipelines register through the same entry-point group as a user's
package would, so nothing about them is special. ``FORGELINE_PIPELINES`` adds
pipelines by ``module:Class`` path, for code that is not packaged.
"""

from __future__ import annotations

import importlib
import inspect
import json
from collections.abc import Iterable, Mapping
from importlib.metadata import entry_points
from typing import Any

from pydantic import ValidationError

from forgeline.errors import ConfigurationError, InvalidInputError, NotFoundError
from forgeline.pipelines.base import Pipeline

ENTRY_POINT_GROUP = "forgeline.pipelines"


class PipelineRegistry:
    """The pipelines this process can run, by name."""

    def __init__(self, pipelines: Iterable[Pipeline]) -> None:
        self._pipelines: dict[str, Pipeline] = {}
        for pipeline in pipelines:
            if pipeline.name in self._pipelines:
                raise ConfigurationError(f"two pipelines are named {pipeline.name!r}")
            self._pipelines[pipeline.name] = pipeline

    @property
    def names(self) -> list[str]:
        """Known pipeline names, sorted."""
        return sorted(self._pipelines)

    def all(self) -> Mapping[str, Pipeline]:
        """Every pipeline by name."""
        return dict(self._pipelines)

    def get(self, name: str) -> Pipeline:
        """The pipeline called ``name``; ``NotFoundError`` listing the known ones."""
        try:
            return self._pipelines[name]
        except KeyError:
            raise NotFoundError(
                f"unknown pipeline {name!r}; known pipelines: {', '.join(self.names)}",
                details={"known": self.names},
            ) from None

    def validate_input(self, name: str, data: Any) -> dict[str, Any]:
        """Validate ``data`` against the pipeline's input model; return it normalised."""
        pipeline = self.get(name)
        try:
            # Strict, with JSON's meaning of values, as the document says: 1 is
            # not true and "5" is not 5, but 5.0 is 5.
            encoded = json.dumps(_integral_floats_as_ints(data))
            model = pipeline.input_model.model_validate_json(encoded, strict=True)
        except ValidationError as exc:
            raise InvalidInputError(
                f"invalid input for pipeline {name!r}",
                details=[
                    {"loc": ["input", *error["loc"]], "msg": error["msg"], "type": error["type"]}
                    for error in exc.errors(include_url=False, include_context=False)
                ],
            ) from None
        return model.model_dump(mode="json")


def _integral_floats_as_ints(value: Any) -> Any:
    """``value`` with every whole float (5.0) made an int: JSON does not tell them apart."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _integral_floats_as_ints(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_integral_floats_as_ints(item) for item in value]
    return value


def load_pipelines(extra_paths: Iterable[str] = ()) -> PipelineRegistry:
    """Instantiate every registered pipeline, then those named by import path."""
    classes: list[Any] = []
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            classes.append(entry_point.load())
        except Exception as exc:  # a broken plug-in must name itself
            raise ConfigurationError(
                f"pipeline entry point {entry_point.name!r} ({entry_point.value}) "
                f"failed to load: {exc}"
            ) from None
    for path in extra_paths:
        module_name, _, attribute = path.partition(":")
        try:
            classes.append(getattr(importlib.import_module(module_name), attribute))
        except Exception as exc:  # anything a broken module raises must name the path
            raise ConfigurationError(
                f"FORGELINE_PIPELINES: cannot import {path!r}: {exc}"
            ) from None
    pipelines: list[Pipeline] = []
    for cls in classes:
        if not (isinstance(cls, type) and issubclass(cls, Pipeline)) or inspect.isabstract(cls):
            raise ConfigurationError(
                f"FORGELINE_PIPELINES / {ENTRY_POINT_GROUP}: {cls!r} is not a concrete "
                "forgeline Pipeline subclass"
            )
        pipelines.append(cls())
    return PipelineRegistry(pipelines)
