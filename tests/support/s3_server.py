"""The suite's S3-compatible server: moto's, on 127.0.0.1, in a process of its own.

The server runs in its own process: moto serves with Flask, and a Flask imported into the test
process leaves a ``current_app`` proxy in ``sys.modules`` that raises when vLLM's CPU platform
scans every module's globals (as it does on starting an engine), so a later test's vLLM engine
would fail for a reason no user meets. ``conftest.py`` starts one per session (fixture
``s3_endpoint``) and gives each test module the environment that reaches it (fixture ``s3``)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

from ports import free_port

BUCKET = "palign-test"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}


def start() -> tuple[subprocess.Popen, str]:
    """Start a moto S3 server on a free port; the process and its URL."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                               "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, f"http://127.0.0.1:{port}"
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError("the moto S3 server did not start") from None
            time.sleep(0.2)


def make_bucket(endpoint: str, bucket: str = BUCKET) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, **{
        "aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "region_name": CREDENTIALS["AWS_DEFAULT_REGION"]})
    try:
        client.create_bucket(Bucket=bucket)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
