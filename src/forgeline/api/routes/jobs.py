"""``/api/v1/jobs``: submit, list, read, cancel, download artifacts."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Response, status
from fastapi.responses import StreamingResponse

from forgeline import metrics
from forgeline.api.deps import JobsDep, OwnerDep, RuntimeDep, SettingsDep
from forgeline.api.schemas import ErrorEnvelope, JobCreate, JobOut, JobPage
from forgeline.jobs.models import JobStatus
from forgeline.jobs.service import CURSOR_PATTERN, MAX_PAGE_SIZE, Quota

router = APIRouter(prefix="/api/v1/jobs", tags=["jobs"])

ERRORS: dict[int | str, dict[str, object]] = {
    401: {"model": ErrorEnvelope, "description": "Missing or invalid API key."},
    404: {"model": ErrorEnvelope, "description": "No such job (or not yours)."},
    422: {"model": ErrorEnvelope, "description": "Invalid request."},
}


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=JobOut,
    responses={
        200: {"model": JobOut, "description": "Same Idempotency-Key and body: the first job."},
        400: {"model": ErrorEnvelope, "description": "Malformed JSON."},
        409: {"model": ErrorEnvelope, "description": "Idempotency-Key reused with another body."},
        429: {"model": ErrorEnvelope, "description": "Over a rate limit, job cap or quota."},
        **ERRORS,
    },
)
async def create_job(
    body: JobCreate,
    jobs: JobsDep,
    owner: OwnerDep,
    settings: SettingsDep,
    response: Response,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JobOut:
    """Submit a job. It is stored and queued atomically before this returns."""
    submission = await jobs.submit(
        owner=owner,
        pipeline=body.pipeline,
        job_input=body.input,
        idempotency_key=idempotency_key,
        cancel_on_disconnect=body.cancel_on_disconnect,
        quota=Quota(
            max_active_jobs=settings.max_active_jobs_per_key,
            max_tokens_per_job=settings.max_tokens_per_job,
            daily_tokens=settings.daily_token_quota,
        ),
    )
    if submission.created:
        metrics.JOBS_SUBMITTED.labels(body.pipeline).inc()
    else:
        response.status_code = status.HTTP_200_OK
    response.headers["Location"] = f"/api/v1/jobs/{submission.job.id}"
    return JobOut.from_job(submission.job)


@router.get("", response_model=JobPage, responses=ERRORS)
async def list_jobs(
    jobs: JobsDep,
    owner: OwnerDep,
    status_filter: Annotated[JobStatus | None, Query(alias="status")] = None,
    pipeline: Annotated[str | None, Query(max_length=100)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = 20,
    cursor: Annotated[str | None, Query(pattern=CURSOR_PATTERN)] = None,
) -> JobPage:
    """Your jobs, newest first."""
    page = await jobs.list_jobs(
        owner=owner, status=status_filter, pipeline=pipeline, limit=limit, cursor=cursor
    )
    return JobPage(items=[JobOut.from_job(job) for job in page.items], next_cursor=page.next_cursor)


@router.get("/{job_id}", response_model=JobOut, responses=ERRORS)
async def get_job(job_id: str, jobs: JobsDep, owner: OwnerDep) -> JobOut:
    """One job, with its result and artifacts once it has them."""
    return JobOut.from_job(await jobs.get(job_id, owner=owner))


@router.post(
    "/{job_id}/cancel",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobOut,
    responses={409: {"model": ErrorEnvelope, "description": "Already finished."}, **ERRORS},
)
async def cancel_job(job_id: str, jobs: JobsDep, owner: OwnerDep) -> JobOut:
    """Cancel a job: at once if queued, within about a second if running."""
    return JobOut.from_job(await jobs.cancel(job_id, owner=owner))


@router.get(
    "/{job_id}/artifacts/{name}",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}, **ERRORS},
)
async def download_artifact(
    job_id: str, name: str, jobs: JobsDep, owner: OwnerDep, runtime: RuntimeDep
) -> StreamingResponse:
    """Download a file the job produced, streamed from object storage."""
    artifact = await jobs.artifact(job_id, name, owner=owner)
    chunks = runtime.storage.open(artifact.storage_key)
    # Read the first chunk now, so a missing object is a 404, not a broken stream.
    first = await anext(chunks, b"")

    async def body() -> AsyncIterator[bytes]:
        yield first
        async for chunk in chunks:
            yield chunk

    return StreamingResponse(
        body(),
        media_type=artifact.content_type,
        headers={
            "Content-Length": str(artifact.size),
            "Content-Disposition": f'attachment; filename="{artifact.name}"',
        },
    )
