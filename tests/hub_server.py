"""A local Hugging Face Hub for tests: the part of the Hub's HTTP protocol that huggingface_hub 2.4 and transformers
use to create model repos, commit files to them and download them, served by a stdlib `ThreadingHTTPServer`.

Storage is content-addressed (blobs keyed by their git blob sha1) and history is real: every commit gets a 40-hex
sha, moves its branch, and stays resolvable by sha, so `from_pretrained(repo, revision=<sha>)` loads an older push.
Branches, tags and pull-request refs (`refs/pr/N`) are refs like `main`. Every file is answered "regular" at
preupload, so uploads never use LFS or Xet.

    with HubServer(token="hf_test") as hub:   # HF_ENDPOINT=hub.url in the clients
        ...
        hub.files("user/repo")                 # {path: bytes} at main

Writes need an `Authorization` header (the given token, if any); tokens are never logged or stored. Only model
repos with a `namespace/name` id are served.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

_REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
_API = rf"^/api/models/{_REPO}"
ROUTES: list[tuple[str, re.Pattern, str]] = [
    ("POST", re.compile(r"^/api/repos/create$"), "create_repo"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
    ("POST", re.compile(rf"{_API}/preupload/(?P<rev>[^/]+)$"), "preupload"),
    ("POST", re.compile(rf"{_API}/commit/(?P<rev>[^/]+)$"), "commit"),
    ("POST", re.compile(rf"{_API}/branch/(?P<rev>[^/]+)$"), "create_branch"),
    ("POST", re.compile(rf"{_API}/tag/(?P<rev>[^/]+)$"), "create_tag"),
    ("POST", re.compile(rf"{_API}/discussions$"), "create_pull_request"),
    ("GET", re.compile(rf"{_API}/discussions/(?P<num>\d+)$"), "pull_request"),
    ("GET", re.compile(rf"{_API}(?:/revision/(?P<rev>[^/]+))?$"), "model_info"),
    ("GET", re.compile(rf"{_API}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?$"), "tree"),
    ("GET", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
    ("HEAD", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
]


class HubError(Exception):
    """An HTTP error answer, typed for huggingface_hub by the `X-Error-Code` header when `code` is set."""

    def __init__(self, status: int, message: str, code: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


@dataclass
class Commit:
    oid: str
    parent: str | None
    message: str
    tree: dict[str, str]  # path -> blob oid
    date: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    refs: dict[str, str] = field(default_factory=dict)  # "main", tags, "refs/pr/1" -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)
    pull_requests: list[dict[str, Any]] = field(default_factory=list)

    def resolve(self, revision: str) -> Commit:
        """The commit a branch, tag, PR ref or full commit sha names."""
        oid = self.refs.get(revision, revision)
        if oid not in self.commits:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return self.commits[oid]


def git_blob_oid(content: bytes) -> str:
    """The git blob sha1 of `content`: the Hub's oid (and ETag) of a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class HubServer:
    """A Hub on `127.0.0.1` (a free port by default), serving from a thread while started.

    Args:
        token: the only token accepted for writes and private reads; None accepts any `Authorization` header.
    """

    def __init__(self, token: str | None = None, port: int = 0) -> None:
        self._token = token
        self.blobs: dict[str, bytes] = {}
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, bool]] = []  # (method, path, had an Authorization header)
        self.lock = threading.RLock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
        self._httpd.hub = self  # type: ignore[attr-defined]
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    # -- inspection helpers for tests --------------------------------------------------------------------------

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Every file of `repo_id` at `revision`: `{path: content}`."""
        with self.lock:
            return {path: self.blobs[oid] for path, oid in self.repos[repo_id].resolve(revision).tree.items()}

    def history(self, repo_id: str, revision: str = "main") -> list[Commit]:
        """The commits reachable from `revision`, newest first."""
        with self.lock:
            repo = self.repos[repo_id]
            commits, commit = [], repo.resolve(revision)
            while True:
                commits.append(commit)
                if commit.parent is None:
                    return commits
                commit = repo.commits[commit.parent]

    # -- state changes (called with the lock held) -------------------------------------------------------------

    def authorized(self, header: str | None) -> bool:
        if not header or not header.startswith("Bearer "):
            return False
        return self._token is None or hmac.compare_digest(header[len("Bearer ") :], self._token)

    def add_commit(self, repo: Repo, ref: str, message: str, tree: dict[str, str]) -> Commit:
        parent = repo.refs.get(ref)
        seed = json.dumps([repo.repo_id, parent, message, sorted(tree.items()), time.time_ns(), len(repo.commits)])
        date = datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), parent, message, dict(tree), date)
        repo.commits[commit.oid] = commit
        repo.refs[ref] = commit.oid
        return commit

    def open_pull_request(self, repo: Repo, title: str, description: str) -> dict[str, Any]:
        num = len(repo.pull_requests) + 1
        repo.refs[f"refs/pr/{num}"] = repo.refs["main"]
        pull_request = {
            "num": num,
            "title": title,
            "description": description,
            "url": f"{self.url}/{repo.repo_id}/discussions/{num}",
        }
        repo.pull_requests.append(pull_request)
        return pull_request


class _Handler(BaseHTTPRequestHandler):
    server_version = "LocalHub/1.0"

    @property
    def hub(self) -> HubServer:
        return self.server.hub  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet (tests read `hub.requests`; headers, and so tokens, are never logged)."""

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self.query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(length) if length else b""
        has_auth = self.headers.get("Authorization") is not None
        self.hub.requests.append((method, url.path, has_auth))
        try:
            for route_method, pattern, name in ROUTES:
                match = pattern.match(url.path)
                if match and route_method == method:
                    params = {key: unquote(value) for key, value in match.groupdict().items() if value is not None}
                    if method == "POST" and not self.hub.authorized(self.headers.get("Authorization")):
                        raise HubError(401, "Invalid credentials in Authorization header")
                    with self.hub.lock:
                        getattr(self, f"_{name}")(**params)
                    return
            raise HubError(404, f"No route for {method} {url.path}")
        except HubError as error:
            self._send_json({"error": error.message, **error.extra}, error.status, error.code, error.message)
        except (KeyError, TypeError, ValueError) as error:  # a malformed request
            self._send_json({"error": f"Bad request: {error!r}"}, 400, message=f"Bad request: {error!r}")

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, payload: Any, status: int = 200, code: str | None = None, message: str | None = None) -> None:
        headers = {"X-Error-Code": code} if code else {}
        if message and status >= 400:
            headers["X-Error-Message"] = message
        self._send(status, json.dumps(payload).encode(), "application/json", headers)

    def _json(self) -> dict[str, Any]:
        try:
            return json.loads(self.body or b"{}")
        except json.JSONDecodeError as error:
            raise HubError(400, f"Request body is not JSON: {error}") from error

    def _repo(self, repo: str) -> Repo:
        found = self.hub.repos.get(repo)
        if found is None or (found.private and not self.hub.authorized(self.headers.get("Authorization"))):
            raise HubError(404, f"Repository not found: {repo}", "RepoNotFound")
        return found

    # -- repos and refs ----------------------------------------------------------------------------------------

    def _create_repo(self) -> None:
        payload = self._json()
        if payload.get("type", "model") != "model" or not payload.get("organization"):
            raise HubError(400, "This hub serves model repos named namespace/name only.")
        repo_id = f"{payload['organization']}/{payload['name']}"
        if repo_id in self.hub.repos:
            raise HubError(409, "You already created this model repo", url=f"{self.hub.url}/{repo_id}")
        repo = Repo(repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
        self.hub.add_commit(repo, "main", "initial commit", {})
        self.hub.repos[repo_id] = repo
        self._send_json({"url": f"{self.hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _create_branch(self, repo: str, rev: str) -> None:
        found = self._repo(repo)
        if rev in found.refs:
            raise HubError(409, f"Reference {rev} already exists")
        found.refs[rev] = found.resolve(self._json().get("startingPoint") or "main").oid
        self._send_json({})

    def _create_tag(self, repo: str, rev: str) -> None:
        found, tag = self._repo(repo), self._json().get("tag", "")
        if not tag or tag in found.refs:
            raise HubError(409, f"Tag {tag!r} is empty or already exists")
        found.refs[tag] = found.resolve(rev).oid
        self._send_json({})

    def _create_pull_request(self, repo: str) -> None:
        payload = self._json()
        if not payload.get("pullRequest"):
            raise HubError(400, "This hub opens pull requests only, not discussions.")
        self._send_json(self.hub.open_pull_request(self._repo(repo), payload["title"], payload.get("description", "")))

    def _pull_request(self, repo: str, num: str) -> None:
        found = self._repo(repo)
        if not 1 <= int(num) <= len(found.pull_requests):
            raise HubError(404, f"Discussion {num} not found")
        pull_request = found.pull_requests[int(num) - 1]
        self._send_json(
            {
                **pull_request,
                "status": "draft",
                "isPullRequest": True,
                "createdAt": found.commits[found.refs["main"]].date,
                "repo": {"name": repo, "type": "model"},
                "events": [],
                "changes": {"base": "refs/heads/main"},
                "filesWithConflicts": [],
            }
        )

    # -- uploads -----------------------------------------------------------------------------------------------

    def _validate_yaml(self) -> None:
        content = self._json().get("content", "")
        match = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, re.DOTALL)
        try:
            metadata = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as error:
            self._send_json({"errors": [{"message": f"Invalid YAML: {error}"}], "warnings": []}, 400)
            return
        warnings = [] if metadata else [{"message": "Empty or missing yaml metadata in repo card"}]
        self._send_json({"errors": [], "warnings": warnings})

    def _preupload(self, repo: str, rev: str) -> None:
        tree = self._repo(repo).resolve(rev).tree
        files = [
            {"path": item["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": tree.get(item["path"])}
            for item in self._json().get("files", [])
        ]
        self._send_json({"files": files})

    def _commit(self, repo: str, rev: str) -> None:
        found = self._repo(repo)
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "A commit starts with a header line")
        header = lines[0]["value"]
        pull_request = None
        if self.query.get("create_pr") == "1":
            pull_request = self.hub.open_pull_request(found, header["summary"], header.get("description", ""))
            rev = f"refs/pr/{pull_request['num']}"
        base = found.resolve(rev)
        if header.get("parentCommit") and header["parentCommit"] != base.oid:
            raise HubError(412, f"parentCommit {header['parentCommit']} is not the head of {rev}")
        if rev not in found.refs:
            raise HubError(400, f"Commits go to a branch or PR ref, not to the commit {rev}")
        tree = dict(base.tree)
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            if key == "file" and value.get("encoding") == "base64":
                content = base64.b64decode(value["content"])
                oid = git_blob_oid(content)
                self.hub.blobs.setdefault(oid, content)
                tree[value["path"]] = oid
            elif key == "deletedFile":
                if tree.pop(value["path"], None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                tree = {path: oid for path, oid in tree.items() if not path.startswith(prefix)}
            else:
                raise HubError(400, f"Unsupported commit operation {key!r} (this hub takes regular files only)")
        commit = self.hub.add_commit(found, rev, header["summary"], tree)
        answer = {"success": True, "commitOid": commit.oid, "commitUrl": f"{self.hub.url}/{repo}/commit/{commit.oid}"}
        if pull_request is not None:
            answer["pullRequestUrl"] = pull_request["url"]
        self._send_json(answer)

    # -- downloads ---------------------------------------------------------------------------------------------

    def _model_info(self, repo: str, rev: str = "main") -> None:
        found = self._repo(repo)
        commit = found.resolve(rev)
        siblings = [{"rfilename": path} for path in sorted(commit.tree)]
        self._send_json(
            {
                "id": repo,
                "modelId": repo,
                "author": repo.split("/")[0],
                "sha": commit.oid,
                "lastModified": commit.date,
                "private": found.private,
                "disabled": False,
                "gated": False,
                "tags": [],
                "siblings": siblings,
            }
        )

    def _tree(self, repo: str, rev: str, path: str = "") -> None:
        commit = self._repo(repo).resolve(rev)
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""
        recursive = self.query.get("recursive", "false").lower() == "true"
        entries: dict[str, dict[str, Any]] = {}
        for file_path, oid in sorted(commit.tree.items()):
            if not file_path.startswith(prefix):
                continue
            rest = file_path[len(prefix) :].split("/")
            for depth in range(1, len(rest)):  # the folders on the way
                folder = prefix + "/".join(rest[:depth])
                if recursive or depth == 1:
                    entries.setdefault(folder, {"type": "directory", "path": folder, "oid": git_blob_oid(b"")})
            if recursive or len(rest) == 1:
                entries[file_path] = {"type": "file", "path": file_path, "size": len(self.hub.blobs[oid]), "oid": oid}
        if prefix and not entries:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        self._send_json(list(entries.values()))

    def _resolve(self, repo: str, rev: str, path: str) -> None:
        commit = self._repo(repo).resolve(rev)
        oid = commit.tree.get(path)
        if oid is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{oid}"'}
        self._send(HTTPStatus.OK, self.hub.blobs[oid], "application/octet-stream", headers)


__all__ = ["Commit", "HubServer", "Repo", "git_blob_oid"]
