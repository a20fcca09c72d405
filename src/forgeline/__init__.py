"""forgeline: durable, streaming AI generation jobs, with the kit to run them in production."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("forgeline")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0"
