"""A loopback fake of the Hugging Face Hub for tests.

`FakeHubServer` answers, on 127.0.0.1 and from memory, the HTTP routes that `huggingface_hub` uses for
`create_repo`, `upload_folder` / `upload_file` (README validation, preupload, NDJSON commit),
`repo_info` / `model_info`, `list_repo_files` / `list_repo_tree`, `hf_hub_download` and
`snapshot_download`. Every file is committed inline ("regular" upload mode), so neither LFS nor Xet is
involved. `point_huggingface_hub_at` redirects an already-imported `huggingface_hub` to such a server.
"""

import base64
import hashlib
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import yaml


REPO_TYPE_URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_REPO_TYPE_FROM_PLURAL = {"models": "model", "datasets": "dataset", "spaces": "space"}
_REPO_ID = r"(?P<repo_id>[^/]+(?:/[^/]+)?)"
_API_ROUTE = re.compile(
    rf"^/api/(?P<plural>models|datasets|spaces)/{_REPO_ID}"
    r"(?:/(?P<action>preupload|commit|revision|tree)/(?P<revision>[^/]+)(?:/(?P<rest>.*))?)?$"
)
_RESOLVE_ROUTE = re.compile(
    rf"^/(?:(?P<prefix>datasets|spaces)/)?{_REPO_ID}/resolve/(?P<revision>[^/]+)/(?P<path>.+)$"
)
_FRONT_MATTER = re.compile(r"\A---\s*\n(.*?)\n---\s*(?:\n|\Z)", re.DOTALL)
DEFAULT_BRANCH = "main"


def git_blob_sha1(content: bytes) -> str:
    """The git object id of a blob holding `content` (what the Hub reports as a regular file's oid/ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _card_metadata(readme: bytes) -> dict | None:
    """The YAML front matter of a README as a dict; None without front matter; ValueError if it does not parse."""
    match = _FRONT_MATTER.match(readme.decode("utf-8"))
    if match is None:
        return None
    metadata = yaml.safe_load(match.group(1))
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise ValueError(f"README.md front matter must be a YAML mapping, got {type(metadata).__name__}.")
    return metadata


@dataclass(frozen=True)
class RecordedRequest:
    """One request the server received. `path` excludes the query string; header names are lower-case."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]


@dataclass(frozen=True)
class CreatedRepo:
    """One successful `create_repo` call (calls for existing repos are not recorded)."""

    repo_id: str
    repo_type: str
    private: bool


@dataclass(frozen=True)
class FakeCommit:
    """A commit: its id, message and the complete file tree after it."""

    oid: str
    summary: str
    description: str
    files: dict[str, bytes]


@dataclass
class FakeRepo:
    repo_id: str
    repo_type: str
    private: bool
    created_at: str
    commits: list[FakeCommit] = field(default_factory=list)

    @property
    def head(self) -> FakeCommit:
        return self.commits[-1]

    def commit(self, revision: str) -> FakeCommit | None:
        """The commit named by a branch ("main") or a full commit id; None if unknown."""
        if revision == DEFAULT_BRANCH:
            return self.head
        return next((commit for commit in self.commits if commit.oid == revision), None)

    def add_commit(self, files: dict[str, bytes], summary: str, description: str = "") -> FakeCommit:
        parent = self.commits[-1].oid if self.commits else ""
        digest = hashlib.sha1(f"{self.repo_type}/{self.repo_id}\n{parent}\n{summary}\n{len(self.commits)}".encode())
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + git_blob_sha1(files[path]).encode())
        commit = FakeCommit(oid=digest.hexdigest(), summary=summary, description=description, files=dict(files))
        self.commits.append(commit)
        return commit


class _HubError(Exception):
    """An HTTP error answer, with the `X-Error-Code` that `huggingface_hub` maps to its exception classes."""

    def __init__(self, status: int, message: str, error_code: str | None = None, repo_commit: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.repo_commit = repo_commit


class FakeHubServer:
    """An in-memory Hub on 127.0.0.1 at a random port.

    Attributes:
        url: base URL, e.g. `http://127.0.0.1:41234` (use it as `HF_ENDPOINT`).
        user: the account `whoami` reports for any token.
        fail_with: when set to an HTTP status (e.g. 500), every request is answered with that status (settable).
        requests: every request received, in order (`RecordedRequest`).
        created_repos: every repo created through the API, in order (`CreatedRepo`).
    """

    def __init__(self, fail_with: int | None = None, user: str = "tester"):
        self.fail_with = fail_with
        self.user = user
        self.requests: list[RecordedRequest] = []
        self.created_repos: list[CreatedRepo] = []
        self._repos: dict[tuple[str, str], FakeRepo] = {}
        self._lock = threading.RLock()
        self._serving = threading.Event()
        self._serving.set()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread: threading.Thread | None = None

    def start(self) -> "FakeHubServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._serving.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> "FakeHubServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Hold every request (after recording it) until the block exits, like a Hub that stopped answering."""
        self._serving.clear()
        try:
            yield
        finally:
            self._serving.set()

    def wait_for_request(self, method: str, path: str, timeout: float = 10.0) -> None:
        """Block until a `method` request for `path` has been received (TimeoutError after `timeout` seconds)."""
        deadline = time.monotonic() + timeout
        while (method, path) not in {(request.method, request.path) for request in list(self.requests)}:
            if time.monotonic() > deadline:
                raise TimeoutError(f"The fake Hub received no {method} {path} within {timeout} s.")
            time.sleep(0.01)

    @staticmethod
    def refused_url() -> str:
        """A loopback URL on a port nothing listens on, so connecting to it is refused."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        return f"http://127.0.0.1:{port}"

    # ----------------------------------------------------------------- state helpers for tests

    def has_repo(self, repo_id: str, repo_type: str = "model") -> bool:
        with self._lock:
            return (repo_type, repo_id) in self._repos

    def files(self, repo_id: str, repo_type: str = "model", revision: str = DEFAULT_BRANCH) -> dict[str, bytes]:
        """Path -> content of every file of `repo_id` at `revision`. KeyError if the repo or revision is unknown."""
        with self._lock:
            repo = self._repos[(repo_type, repo_id)]
            commit = repo.commit(revision)
            if commit is None:
                raise KeyError(f"{repo_type} repo {repo_id!r} has no revision {revision!r}")
            return dict(commit.files)

    def commits(self, repo_id: str, repo_type: str = "model") -> list[FakeCommit]:
        """Every commit of `repo_id`, oldest first (the first one is the empty commit made at creation)."""
        with self._lock:
            return list(self._repos[(repo_type, repo_id)].commits)

    def is_private(self, repo_id: str, repo_type: str = "model") -> bool:
        with self._lock:
            return self._repos[(repo_type, repo_id)].private

    def seed_repo(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        repo_type: str = "model",
        private: bool = False,
        commit_message: str = "Seed repository",
    ) -> str:
        """Create (or extend) a repo with `files` directly, without going through the API; returns the commit id."""
        with self._lock:
            repo = self._get_or_create_repo(repo_id, repo_type, private)
            return repo.add_commit({**repo.head.files, **files}, commit_message).oid

    def request_paths(self, method: str | None = None) -> list[str]:
        """Paths of the recorded requests, optionally only those made with `method`."""
        with self._lock:
            return [request.path for request in self.requests if method is None or request.method == method]

    # ----------------------------------------------------------------- request handling

    def _get_or_create_repo(self, repo_id: str, repo_type: str, private: bool) -> FakeRepo:
        key = (repo_type, repo_id)
        if key not in self._repos:
            created_at = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")
            repo = FakeRepo(repo_id=repo_id, repo_type=repo_type, private=private, created_at=created_at)
            repo.add_commit({}, "initial commit")
            self._repos[key] = repo
        return self._repos[key]

    def _repo(self, repo_type: str, repo_id: str) -> FakeRepo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise _HubError(HTTPStatus.NOT_FOUND, f"Repository {repo_id!r} not found", error_code="RepoNotFound")
        return repo

    def _revision(self, repo: FakeRepo, revision: str) -> FakeCommit:
        commit = repo.commit(revision)
        if commit is None:
            raise _HubError(HTTPStatus.NOT_FOUND, f"Invalid rev id: {revision}", error_code="RevisionNotFound")
        return commit

    def _repo_url(self, repo: FakeRepo) -> str:
        return f"{self.url}/{REPO_TYPE_URL_PREFIXES[repo.repo_type]}{repo.repo_id}"

    def handle(self, method: str, target: str, headers: dict[str, str], body: bytes) -> tuple[int, dict, bytes]:
        """Record and answer one request: (status, headers, body). `headers` has lower-case names."""
        url = urlsplit(target)
        query = parse_qs(url.query)
        with self._lock:
            self.requests.append(RecordedRequest(method=method, path=url.path, query=query, headers=headers))
        self._serving.wait()
        with self._lock:
            if self.fail_with is not None:
                message = json.dumps({"error": f"The fake Hub is failing with {self.fail_with}"}).encode()
                return self.fail_with, {"Content-Type": "application/json"}, message
            try:
                return self._route(method, url.path, query, headers, body)
            except (ValueError, KeyError) as error:
                message = json.dumps({"error": f"Malformed request: {type(error).__name__}: {error}"}).encode()
                return HTTPStatus.BAD_REQUEST, {"Content-Type": "application/json"}, message
            except _HubError as error:
                error_headers = {"Content-Type": "application/json", "X-Error-Message": error.message}
                if error.error_code is not None:
                    error_headers["X-Error-Code"] = error.error_code
                if error.repo_commit is not None:
                    error_headers["X-Repo-Commit"] = error.repo_commit
                return error.status, error_headers, json.dumps({"error": error.message}).encode()

    def _route(
        self, method: str, path: str, query: dict[str, list[str]], headers: dict[str, str], body: bytes
    ) -> tuple[int, dict, bytes]:
        if method == "POST" and path == "/api/repos/create":
            return self._create_repo(json.loads(body))
        if method == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(body))
        if method == "GET" and path == "/api/whoami-v2":
            if not headers.get("authorization"):
                raise _HubError(HTTPStatus.UNAUTHORIZED, "Invalid credentials in Authorization header")
            return self._json({"type": "user", "name": self.user, "orgs": []})
        if match := _API_ROUTE.match(path):
            repo_type = _REPO_TYPE_FROM_PLURAL[match["plural"]]
            repo = self._repo(repo_type, match["repo_id"])
            action, revision = match["action"], unquote(match["revision"] or DEFAULT_BRANCH)
            if method == "GET" and action in (None, "revision"):
                return self._json(self._repo_info(repo, self._revision(repo, revision)))
            if method == "GET" and action == "tree":
                recursive = query.get("recursive", ["false"])[0].lower() == "true"
                return self._json(self._tree(self._revision(repo, revision), unquote(match["rest"] or ""), recursive))
            if method == "POST" and action in ("preupload", "commit"):
                if "create_pr" in query:
                    raise _HubError(HTTPStatus.BAD_REQUEST, "The fake Hub does not support pull requests")
                if revision != DEFAULT_BRANCH:
                    raise _HubError(HTTPStatus.NOT_FOUND, f"Invalid rev id: {revision}", error_code="RevisionNotFound")
                if action == "preupload":
                    return self._json(self._preupload(repo, json.loads(body)))
                return self._json(self._commit(repo, body))
        if method in ("GET", "HEAD") and (match := _RESOLVE_ROUTE.match(path)):
            repo_type = {"datasets": "dataset", "spaces": "space", None: "model"}[match["prefix"]]
            repo = self._repo(repo_type, match["repo_id"])
            return self._resolve(repo, unquote(match["revision"]), unquote(match["path"]), headers.get("range"))
        raise _HubError(HTTPStatus.NOT_FOUND, f"The fake Hub has no route for {method} {path}")

    @staticmethod
    def _json(payload) -> tuple[int, dict, bytes]:
        return HTTPStatus.OK, {"Content-Type": "application/json"}, json.dumps(payload).encode()

    def _create_repo(self, payload: dict) -> tuple[int, dict, bytes]:
        repo_type = payload.get("type") or "model"
        if repo_type not in REPO_TYPE_URL_PREFIXES:
            raise _HubError(HTTPStatus.BAD_REQUEST, f"Unsupported repo type {repo_type!r}")
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        if (repo_type, repo_id) in self._repos:
            url = self._repo_url(self._repos[(repo_type, repo_id)])
            return HTTPStatus.CONFLICT, {}, json.dumps({"error": "You already created this repo", "url": url}).encode()
        private = payload.get("visibility", "public") == "private" or bool(payload.get("private", False))
        repo = self._get_or_create_repo(repo_id, repo_type, private)
        self.created_repos.append(CreatedRepo(repo_id=repo_id, repo_type=repo_type, private=private))
        return self._json({"url": self._repo_url(repo), "name": repo_id, "id": repo_id})

    @staticmethod
    def _validate_yaml(payload: dict) -> tuple[int, dict, bytes]:
        try:
            _card_metadata(payload["content"].encode("utf-8"))
        except (yaml.YAMLError, ValueError) as error:
            body = json.dumps({"errors": [{"message": str(error)}], "warnings": []}).encode()
            return HTTPStatus.BAD_REQUEST, {"Content-Type": "application/json"}, body
        return FakeHubServer._json({"errors": [], "warnings": []})

    def _repo_info(self, repo: FakeRepo, commit: FakeCommit) -> dict:
        info = {
            "_id": hashlib.sha1(f"{repo.repo_type}/{repo.repo_id}".encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0] if "/" in repo.repo_id else None,
            "sha": commit.oid,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "createdAt": repo.created_at,
            "lastModified": repo.created_at,
            "tags": [],
            "siblings": [{"rfilename": path} for path in sorted(commit.files)],
        }
        if "README.md" in commit.files:
            try:
                metadata = _card_metadata(commit.files["README.md"])
            except (yaml.YAMLError, ValueError, UnicodeDecodeError):
                metadata = None
            if metadata:
                info["cardData"] = metadata
                info["tags"] = list(metadata.get("tags") or [])
                for key in ("library_name", "pipeline_tag"):
                    if key in metadata:
                        info[key] = metadata[key]
        return info

    @staticmethod
    def _tree(commit: FakeCommit, folder: str, recursive: bool) -> list[dict]:
        folder = folder.strip("/")
        prefix = f"{folder}/" if folder else ""
        if folder and not any(path.startswith(prefix) for path in commit.files):
            raise _HubError(HTTPStatus.NOT_FOUND, f"Folder {folder!r} not found", error_code="EntryNotFound")
        entries: dict[str, dict] = {}
        for path in sorted(commit.files):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            for depth in range(1, len(parts)):
                directory = prefix + "/".join(parts[:depth])
                if depth == 1 or recursive:
                    entries.setdefault(
                        directory,
                        {"type": "directory", "path": directory, "oid": hashlib.sha1(directory.encode()).hexdigest()},
                    )
            if len(parts) == 1 or recursive:
                content = commit.files[path]
                entries[path] = {"type": "file", "path": path, "size": len(content), "oid": git_blob_sha1(content)}
        return list(entries.values())

    @staticmethod
    def _preupload(repo: FakeRepo, payload: dict) -> dict:
        files = repo.head.files
        return {
            "commitOid": repo.head.oid,
            "files": [
                {
                    "path": item["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": git_blob_sha1(files[item["path"]]) if item["path"] in files else None,
                }
                for item in payload["files"]
            ],
        }

    def _commit(self, repo: FakeRepo, body: bytes) -> dict:
        files = dict(repo.head.files)
        summary, description = "", ""
        for line in body.splitlines():
            if not line.strip():
                continue
            operation = json.loads(line)
            key, value = operation["key"], operation["value"]
            if key == "header":
                summary, description = value.get("summary", ""), value.get("description", "")
                parent = value.get("parentCommit")
                if parent is not None and parent != repo.head.oid:
                    raise _HubError(HTTPStatus.PRECONDITION_FAILED, f"Parent commit {parent} is not the head")
            elif key == "file":
                path = value["path"]
                if path.startswith("/") or ".." in path.split("/"):
                    raise _HubError(HTTPStatus.BAD_REQUEST, f"Invalid path in repo: {path!r}")
                if value.get("encoding", "base64") != "base64":
                    raise _HubError(HTTPStatus.BAD_REQUEST, f"Unsupported encoding {value.get('encoding')!r}")
                files[path] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if value["path"] not in files:
                    raise _HubError(
                        HTTPStatus.NOT_FOUND, "A file with this name doesn't exist", error_code="EntryNotFound"
                    )
                del files[value["path"]]
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                files = {path: content for path, content in files.items() if not path.startswith(folder)}
            else:
                raise _HubError(HTTPStatus.BAD_REQUEST, f"The fake Hub only accepts inline files, got {key!r}")
        commit = repo.add_commit(files, summary, description)
        return {"commitUrl": f"{self._repo_url(repo)}/commit/{commit.oid}", "commitOid": commit.oid, "success": True}

    def _resolve(self, repo: FakeRepo, revision: str, path: str, range_header: str | None) -> tuple[int, dict, bytes]:
        commit = self._revision(repo, revision)
        if path not in commit.files:
            raise _HubError(
                HTTPStatus.NOT_FOUND, f"Entry {path!r} not found", error_code="EntryNotFound", repo_commit=commit.oid
            )
        content = commit.files[path]
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{git_blob_sha1(content)}"',
            "X-Repo-Commit": commit.oid,
            "Accept-Ranges": "bytes",
        }
        status, content = _apply_range(range_header, headers, content)
        return status, headers, content


def _read_body(handler: BaseHTTPRequestHandler) -> bytes:
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int(handler.rfile.readline().split(b";")[0].strip(), 16)
            chunk = handler.rfile.read(size)
            handler.rfile.readline()
            if size == 0:
                return b"".join(chunks)
            chunks.append(chunk)
    length = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(length) if length else b""


def _apply_range(range_header: str | None, headers: dict, content: bytes) -> tuple[int, bytes]:
    """Serve `Range: bytes=start-[end]` like the Hub's CDN (206 + Content-Range); anything else gets the full body."""
    match = re.fullmatch(r"bytes=(\d+)-(\d*)", range_header or "")
    if match is None:
        return HTTPStatus.OK, content
    start = int(match[1])
    end = min(int(match[2]) if match[2] else len(content) - 1, len(content) - 1)
    if start > end:
        headers["Content-Range"] = f"bytes */{len(content)}"
        return HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, b""
    headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
    return HTTPStatus.PARTIAL_CONTENT, content[start : end + 1]


def _make_handler(server: FakeHubServer) -> type[BaseHTTPRequestHandler]:
    class FakeHubRequestHandler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            body = _read_body(self)
            headers = {name.lower(): value for name, value in self.headers.items()}
            status, answer_headers, content = server.handle(self.command, self.path, headers, body)
            self.send_response(status)
            for name, value in answer_headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(content)

        do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _serve

        def log_message(self, format: str, *args) -> None:
            """Requests are kept in `server.requests` instead of being printed."""

    return FakeHubRequestHandler


@contextmanager
def point_huggingface_hub_at(endpoint: str, cache_dir: str | Path) -> Iterator[None]:
    """Send every `huggingface_hub` call (module functions, new `HfApi`s, downloads) to `endpoint`, online,
    caching downloads under `cache_dir`; everything is restored on exit.

    `huggingface_hub` reads `HF_ENDPOINT`, `HF_HUB_OFFLINE` and `HF_HUB_CACHE` once at import, and its
    module-level `HfApi` (behind `create_repo`, `model_info`, ... and diffusers' downloads) keeps the endpoint
    it was built with, so the environment, the constants and that instance are all patched. The shared HTTP
    client is closed on exit so that no keep-alive connection to `endpoint` outlives it.
    """
    from huggingface_hub import close_session, constants, hf_api

    endpoint = endpoint.rstrip("/")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_ENDPOINT", endpoint)
        patch.setenv("HF_HUB_CACHE", str(cache_dir))
        patch.delenv("HF_HUB_OFFLINE", raising=False)
        patch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        patch.setattr(constants, "ENDPOINT", endpoint)
        patch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        patch.setattr(constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {urlsplit(endpoint).hostname})
        patch.setattr(constants, "HF_HUB_OFFLINE", False)
        patch.setattr(constants, "HF_HUB_CACHE", str(cache_dir))
        patch.setattr(hf_api.api, "endpoint", endpoint)
        try:
            yield
        finally:
            close_session()
