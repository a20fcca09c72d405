"""A per-job event counter, so appending events takes one row lock, not a scan.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("event_seq", sa.BigInteger, nullable=False, server_default="0"))
    op.execute(
        "UPDATE jobs SET event_seq = e.last"
        " FROM (SELECT job_id, max(seq) AS last FROM job_events GROUP BY job_id) AS e"
        " WHERE jobs.id = e.job_id"
    )


def downgrade() -> None:
    op.drop_column("jobs", "event_seq")
