"""What the Compose stack asks of MinIO's client, against any S3-compatible server.

Used by the S3 stand-in image (s3.Containerfile) in place of ``mc``:

    s3-tool.py ready URL            exit 0 once the server lists its buckets
    s3-tool.py mb URL BUCKET        create BUCKET unless it exists (mc mb --ignore-existing)
    s3-tool.py cat URL BUCKET KEY   write an object to standard output

Credentials come from MINIO_ROOT_USER and MINIO_ROOT_PASSWORD, as for mc.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError


def client(url: str) -> Any:
    """An S3 client for the server at ``url``, path-style like forgeline's."""
    return boto3.client(
        "s3",
        endpoint_url=url,
        aws_access_key_id=os.environ["MINIO_ROOT_USER"],
        aws_secret_access_key=os.environ["MINIO_ROOT_PASSWORD"],
        region_name="us-east-1",
        config=Config(
            s3={"addressing_style": "path"},
            retries={"max_attempts": 1},
            connect_timeout=2,
            read_timeout=5,
        ),
    )


def main(argv: list[str]) -> int:
    command, url, *rest = argv
    s3 = client(url)
    try:
        if command == "ready":
            s3.list_buckets()
        elif command == "mb":
            (bucket,) = rest
            try:
                s3.create_bucket(Bucket=bucket)
                print(f"bucket {bucket} created")
            except ClientError as exc:
                if exc.response["Error"]["Code"] not in (
                    "BucketAlreadyOwnedByYou",
                    "BucketAlreadyExists",
                ):
                    raise
                print(f"bucket {bucket} exists")
        elif command == "cat":
            bucket, key = rest
            sys.stdout.buffer.write(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        else:
            print(f"unknown command {command}", file=sys.stderr)
            return 2
    except (BotoCoreError, ClientError) as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
