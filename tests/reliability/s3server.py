"""A local S3 for tests: moto's S3 in a thread on 127.0.0.1, with a request log and injectable faults.

`S3Server.env` is what a process needs to talk to it (s3fs/botocore honour AWS_ENDPOINT_URL).
`requests` records (method, path) of every request, so a test can assert that readers never PUT,
POST or DELETE; `fail` (a function of method and path) makes matching requests answer an error,
which s3fs raises as an OSError, as it would for a refused or failed upload.
"""

from __future__ import annotations

import threading

WRITE_METHODS = {"PUT", "POST", "DELETE"}

FAULT_BODY = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
              b"<Message>injected fault: the store refused this write</Message></Error>")


class S3Server:
    def __init__(self):
        from moto.server import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import WSGIRequestHandler, make_server

        class Quiet(WSGIRequestHandler):
            def log(self, *args, **kwargs):
                pass

        self.requests: list[tuple[str, str]] = []
        self.fail = None
        self._lock = threading.Lock()
        self._app = DomainDispatcherApplication(create_backend_app)
        self._server = make_server("127.0.0.1", 0, self._wsgi, threaded=True, request_handler=Quiet)
        self.endpoint = f"http://127.0.0.1:{self._server.server_port}"
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _wsgi(self, environ, start_response):
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        with self._lock:
            self.requests.append((method, path))
        if self.fail is not None and self.fail(method, path):
            start_response("403 Forbidden", [("Content-Type", "application/xml")])
            return [FAULT_BODY]
        return self._app(environ, start_response)

    def writes_since(self, position: int) -> list[tuple[str, str]]:
        with self._lock:
            return [r for r in self.requests[position:] if r[0] in WRITE_METHODS]

    def make_bucket(self, name: str) -> str:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                     region_name="us-east-1").create_bucket(Bucket=name)
        return f"s3://{name}"

    def close(self):
        self._server.shutdown()
        self._thread.join(timeout=5)
