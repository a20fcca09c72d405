"""The embedded PostgreSQL server, used when no database URL is configured.

It runs from the ``pgserver`` wheel's binaries with its files in the data
directory, so a laptop needs nothing installed. The same server is reused by
every forgeline process on that directory (``serve``, ``keys``, ``migrate``);
the last process to let go of it stops it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from forgeline.errors import ConfigurationError

DATABASE_NAME = "postgres"


def start_embedded_postgres(data_dir: Path) -> str:
    """Start (or join) the embedded server and return its libpq URL.

    Blocking: call it from a thread when an event loop is running.
    """
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset; harmless here.
        warnings.simplefilter("ignore")
        try:
            import pgserver
        except ImportError:
            raise ConfigurationError(
                "FORGELINE_DATABASE_URL: required here (this installation has no embedded "
                "PostgreSQL; install the pgserver package to have one)"
            ) from None

    pgdata = data_dir / "postgres"
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        server = pgserver.get_server(pgdata, cleanup_mode="stop")  # type: ignore[attr-defined]
    except PermissionError as exc:
        raise ConfigurationError(
            f"FORGELINE_DATA_DIR: cannot write the embedded database to {pgdata}: {exc}"
        ) from None
    except Exception as exc:  # pgserver raises bare exceptions with initdb/pg_ctl output
        log = pgdata / "log"
        raise ConfigurationError(
            f"the embedded PostgreSQL in {pgdata} failed to start ({exc}); see {log}"
        ) from None
    return server.get_uri(DATABASE_NAME)
