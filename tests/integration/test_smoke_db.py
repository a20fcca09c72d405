"""The test database fixtures give a migrated, isolated database."""

from forgeline.runtime import Runtime


async def test_runtime_starts_on_fresh_database(runtime: Runtime) -> None:
    """A fresh test database already has the schema: submitting a job works."""
    submission = await runtime.jobs.submit(owner=None, pipeline="echo", job_input={"text": "x"})
    assert submission.created
