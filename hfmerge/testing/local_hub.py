"""A local, in-memory server that speaks the part of the Hub HTTP API huggingface_hub uses.

Pointing ``HF_ENDPOINT`` at it lets tests and the offline demo run the real
huggingface_hub client path — ``create_repo``, ``upload_folder``,
``snapshot_download``, ``hf_hub_download``, ``from_pretrained`` — with no
network. Every commit keeps a full snapshot, so branches, tags and commit shas
resolve as on the Hub. Uploads are answered with ``uploadMode: regular``, which
keeps file content inline in the commit (no LFS or Xet).

Access control is minimal but real: one user whose token may write to its own
namespace and the organisations it is given, and a read-only token of the same
user; private repos are invisible without a token. ``whoami-v2`` answers as
the Hub does (401 for an unknown token). File downloads honour
``Range: bytes=a-b`` (206 with ``Content-Range``), as ``get_safetensors_metadata``
needs; ``requests`` logs every request as (verb, path, Range header or None), ``responses``
every answer as (status, verb, path).

Dataset repos answer what ``datasets.load_dataset("org/ds", revision=..., split=...)``
asks, streaming or not: the dataset's info on a revision (``expand`` is accepted;
every field is sent), ``tree`` listings (``recursive``, ``expand`` with each
entry's last commit), ``paths-info``, and ``resolve`` with ``HEAD`` and ranges.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import yaml

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}


def _git_blob_sha(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    sdk: str | None = None
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    history: list[str] = field(default_factory=list)
    parents: dict[str, str | None] = field(default_factory=dict)
    summaries: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> str | None:
        if revision in self.branches:
            return self.branches[revision]
        if revision in self.tags:
            return self.tags[revision]
        if revision in self.commits:
            return revision
        return None

    def commit(self, parent: str | None, files: dict[str, bytes | None], summary: str) -> str:
        """Record a commit on top of ``parent`` and return its sha; no branch moves here.

        The sha depends only on the parent, the message and the files (as a git
        commit's would, less author and time), so a test that pushes the same
        content gets the same sha on every run.
        """
        snapshot = dict(self.commits[parent]) if parent else {}
        for path, content in files.items():
            if content is None:
                for existing in [p for p in snapshot if p == path or p.startswith(path.rstrip("/") + "/")]:
                    del snapshot[existing]
            else:
                snapshot[path] = content
        digest = hashlib.sha1()
        digest.update((parent or "").encode())
        digest.update(b"\0" + summary.encode() + b"\0")
        for path in sorted(snapshot):
            digest.update(path.encode() + b"\0" + _git_blob_sha(snapshot[path]).encode())
        sha = digest.hexdigest()
        if sha not in self.commits:
            self.commits[sha] = snapshot
            self.history.append(sha)
            self.parents[sha] = parent
            self.summaries[sha] = summary
        return sha

    def last_commit(self, sha: str, path: str) -> str:
        """The newest commit, from ``sha`` back along its parents, that changed ``path`` (a file or a folder)."""
        def content(commit: str) -> dict[str, bytes]:
            return {p: c for p, c in self.commits[commit].items() if p == path or p.startswith(path + "/")}

        current = content(sha)
        while (parent := self.parents.get(sha)) is not None and content(parent) == current:
            sha = parent
        return sha


class LocalHub:
    """The server. Use as a context manager; ``endpoint`` is the URL for ``HF_ENDPOINT``."""

    def __init__(self, *, token: str = "hf_local_test_token", user: str = "tester",
                 orgs: tuple[str, ...] = ("demo", "org"), host: str = "127.0.0.1", port: int = 0,
                 read_token: str = "hf_local_read_token") -> None:
        self.token = token
        self.read_token = read_token
        self.user = user
        self.namespaces = {user, *orgs}
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str, str | None]] = []
        self.responses: list[tuple[int, str, str]] = []
        handler = type("Handler", (_Handler,), {"hub": self})
        self.server = ThreadingHTTPServer((host, port), handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://{host}:{self.server.server_address[1]}"
        self._thread: threading.Thread | None = None

    def start(self) -> LocalHub:
        self._thread = threading.Thread(target=self.server.serve_forever, name="local-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo | None:
        return self.repos.get((repo_type, repo_id))


class _Handler(BaseHTTPRequestHandler):
    hub: LocalHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - BaseHTTPRequestHandler's name
        return

    # -- helpers -------------------------------------------------------------------
    def _token(self) -> str:
        return self.headers.get("Authorization", "").removeprefix("Bearer ")

    def _authorized(self) -> bool:
        return self._token() in (self.hub.token, self.hub.read_token)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, payload: Any = None, *, headers: dict[str, str] | None = None,
              raw: bytes | None = None, head: bool = False) -> None:
        body = raw if raw is not None else (b"" if payload is None else json.dumps(payload).encode())
        self.hub.responses.append((status, self.command, urlsplit(self.path).path))
        self.send_response(status)
        if raw is None:
            self.send_header("Content-Type", "application/json")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _error(self, status: int, message: str, code: str | None = None, head: bool = False,
               headers_extra: dict[str, str] | None = None, **extra: Any) -> None:
        headers = {"X-Error-Message": message, **(headers_extra or {})}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, {"error": message, **extra}, headers=headers, head=head)

    def _repo_for_read(self, repo_type: str, repo_id: str, head: bool = False) -> Repo | None:
        repo = self.hub.repo(repo_id, repo_type)
        if repo is None or (repo.private and not self._authorized()):
            status = 401 if not self._authorized() else 404
            self._error(status, f"Repository Not Found for url: {self.path}.", "RepoNotFound", head=head)
            return None
        return repo

    def _commit_for_read(self, repo_type: str, repo_id: str, revision: str,
                         head: bool = False) -> tuple[Repo, str] | None:
        """The readable repo and the commit ``revision`` names, or ``None`` after answering the 404."""
        repo = self._repo_for_read(repo_type, repo_id, head=head)
        if repo is None:
            return None
        sha = repo.resolve(revision)
        if sha is None:
            self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound", head=head)
            return None
        return repo, sha

    def _can_write(self, repo_id: str) -> bool:
        return self._token() == self.hub.token and repo_id.split("/")[0] in self.hub.namespaces

    @staticmethod
    def _split(path: str) -> list[str]:
        return [unquote(p) for p in path.split("/") if p]

    # -- dispatch ------------------------------------------------------------------
    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self._dispatch("HEAD")

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def _dispatch(self, verb: str) -> None:
        url = urlsplit(self.path)
        parts = self._split(url.path)
        query = parse_qs(url.query)
        self.hub.requests.append((verb, url.path, self.headers.get("Range")))
        try:
            if parts[:1] == ["api"]:
                self._api(verb, parts[1:], query)
            else:
                self._resolve(verb, parts)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _api(self, verb: str, parts: list[str], query: dict[str, list[str]]) -> None:
        if verb == "POST" and parts == ["repos", "create"]:
            return self._create(json.loads(self._body() or b"{}"))
        if verb == "POST" and parts == ["validate-yaml"]:
            self._body()
            return self._send(200, {"errors": [], "warnings": []})
        if verb == "GET" and parts == ["whoami-v2"]:
            if not self._authorized():
                return self._error(401, "Invalid credentials in Authorization header")
            role = "write" if self._token() == self.hub.token else "read"
            return self._send(200, {"name": self.hub.user, "type": "user",
                                    "orgs": [{"name": o, "roleInOrg": "write"}
                                             for o in sorted(self.hub.namespaces - {self.hub.user})],
                                    "auth": {"type": "access_token", "accessToken": {"role": role}}})
        if len(parts) >= 3 and parts[0] in REPO_TYPES:
            repo_type = REPO_TYPES[parts[0]]
            repo_id = "/".join(parts[1:3])
            rest = parts[3:]
            if verb == "GET" and not rest:
                return self._info(repo_type, repo_id, "main")
            if verb == "GET" and rest[0] == "revision" and len(rest) >= 2:
                return self._info(repo_type, repo_id, "/".join(rest[1:]))
            if verb == "GET" and rest[0] == "tree" and len(rest) >= 2:
                return self._tree(repo_type, repo_id, rest[1], "/".join(rest[2:]), query)
            if verb == "POST" and rest[0] == "paths-info" and len(rest) >= 2:
                return self._paths_info(repo_type, repo_id, "/".join(rest[1:]))
            if verb == "GET" and rest[0] == "refs":
                return self._refs(repo_type, repo_id)
            if verb == "POST" and rest[0] == "preupload":
                return self._preupload(repo_type, repo_id)
            if verb == "POST" and rest[0] == "commit" and len(rest) >= 2:
                return self._commit(repo_type, repo_id, "/".join(rest[1:]))
            if verb == "POST" and rest[0] in ("tag", "branch") and len(rest) >= 2:
                return self._ref_create(repo_type, repo_id, rest[0], "/".join(rest[1:]))
        self._error(404, f"no route for {verb} /api/{'/'.join(parts)}")

    # -- routes --------------------------------------------------------------------
    def _create(self, payload: dict[str, Any]) -> None:
        repo_type = payload.get("type") or "model"
        name = payload.get("name", "")
        org = payload.get("organization")
        repo_id = f"{org}/{name}" if org else name
        if "/" not in repo_id:
            repo_id = f"{self.hub.user}/{repo_id}"
        url = f"{self.hub.endpoint}/{URL_PREFIX[repo_type]}{repo_id}"
        if not self._can_write(repo_id):
            return self._error(403 if self._authorized() else 401,
                               f"You don't have the rights to create a {repo_type} under the namespace "
                               f"\"{repo_id.split('/')[0]}\".")
        private = bool(payload.get("private")) or payload.get("visibility") == "private"
        with self.hub.lock:
            if (repo_type, repo_id) in self.hub.repos:
                return self._error(409, f"You already created this {repo_type} repo", url=url)
            repo = Repo(repo_id, repo_type, private, payload.get("sdk"))
            sha = repo.commit(None, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
                              "initial commit")
            repo.branches["main"] = sha
            self.hub.repos[(repo_type, repo_id)] = repo
        self._send(200, {"url": url, "name": repo_id})

    def _info(self, repo_type: str, repo_id: str, revision: str) -> None:
        found = self._commit_for_read(repo_type, repo_id, revision)
        if found is None:
            return
        repo, sha = found
        files = repo.commits[sha]
        card_data = None
        if "README.md" in files:
            text = files["README.md"].decode("utf-8", "replace")
            if text.startswith("---"):
                try:
                    card_data = yaml.safe_load(text.split("---", 2)[1]) or None
                except yaml.YAMLError:
                    card_data = None
        info: dict[str, Any] = {
            "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24], "id": repo_id, "modelId": repo_id,
            "author": repo_id.split("/")[0], "sha": sha, "private": repo.private, "disabled": False,
            "gated": False, "downloads": 0, "likes": 0, "tags": [], "lastModified": "2026-01-01T00:00:00.000Z",
            "createdAt": "2026-01-01T00:00:00.000Z",
            "siblings": [{"rfilename": p, "size": len(c)} for p, c in sorted(files.items())],
        }
        if card_data is not None:
            info["cardData"] = card_data
        if repo_type == "space":
            info["sdk"] = repo.sdk
            info["runtime"] = {"stage": "RUNNING"}
        self._send(200, info)

    def _tree(self, repo_type: str, repo_id: str, revision: str, prefix: str, query: dict[str, list[str]]) -> None:
        found = self._commit_for_read(repo_type, repo_id, revision)
        if found is None:
            return
        repo, sha = found
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        expand = query.get("expand", ["false"])[0].lower() == "true"
        prefix = prefix.strip("/")
        files = repo.commits[sha]
        if prefix and prefix not in _folders(files):
            return self._error(404, f"Entry not found: {prefix}", "EntryNotFound")
        entries: dict[str, dict[str, Any]] = {}
        for path in sorted(files):
            if prefix and not path.startswith(prefix + "/"):
                continue
            rel = path[len(prefix) + 1:] if prefix else path
            parts = rel.split("/")
            if len(parts) > 1:
                for depth in range(1, len(parts) if recursive else 2):
                    directory = "/".join(([prefix] if prefix else []) + parts[:depth])
                    entries.setdefault(directory, self._entry(repo, sha, directory, expand))
                if not recursive:
                    continue
            entries[path] = self._entry(repo, sha, path, expand)
        self._send(200, list(entries.values()))

    def _entry(self, repo: Repo, sha: str, path: str, expand: bool) -> dict[str, Any]:
        """One tree or paths-info entry, as the Hub writes it; ``expand`` adds the path's last commit."""
        files = repo.commits[sha]
        if path in files:
            entry: dict[str, Any] = {"type": "file", "path": path, "size": len(files[path]),
                                     "oid": _git_blob_sha(files[path])}
        else:
            inside = sorted((p, _git_blob_sha(c)) for p, c in files.items() if p.startswith(path + "/"))
            entry = {"type": "directory", "path": path, "size": 0,
                     "oid": hashlib.sha1(json.dumps(inside).encode()).hexdigest()}
        if expand:
            last = repo.last_commit(sha, path)
            entry["lastCommit"] = {"id": last, "title": repo.summaries.get(last, ""),
                                   "date": "2026-01-01T00:00:00.000Z"}
        return entry

    def _paths_info(self, repo_type: str, repo_id: str, revision: str) -> None:
        """``POST paths-info``: the entries of the paths asked (form fields ``paths``, ``expand``) that exist."""
        body = self._body()
        if "json" in self.headers.get("Content-Type", ""):
            form = {k: v if isinstance(v, list) else [str(v)] for k, v in json.loads(body or b"{}").items()}
        else:
            form = parse_qs(body.decode())
        found = self._commit_for_read(repo_type, repo_id, revision)
        if found is None:
            return
        repo, sha = found
        expand = str(form.get("expand", ["false"])[0]).lower() == "true"
        files = repo.commits[sha]
        folders = _folders(files)
        found = [path.strip("/") for path in form.get("paths", [])]
        self._send(200, [self._entry(repo, sha, path, expand) for path in found if path in files or path in folders])

    def _refs(self, repo_type: str, repo_id: str) -> None:
        repo = self._repo_for_read(repo_type, repo_id)
        if repo is None:
            return
        ref = lambda kind, name, sha: {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": sha}  # noqa: E731
        self._send(200, {"branches": [ref("heads", n, s) for n, s in repo.branches.items()],
                         "tags": [ref("tags", n, s) for n, s in repo.tags.items()], "converts": []})

    def _preupload(self, repo_type: str, repo_id: str) -> None:
        payload = json.loads(self._body() or b"{}")
        if self._repo_for_read(repo_type, repo_id) is None:
            return
        files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                 for f in payload.get("files", [])]
        self._send(200, {"files": files, "commitOid": None})

    def _commit(self, repo_type: str, repo_id: str, revision: str) -> None:
        body = self._body()
        repo = self._repo_for_read(repo_type, repo_id)
        if repo is None:
            return
        if not self._can_write(repo_id):
            return self._error(403, f"You don't have the rights to write to {repo_id}")
        summary = "commit"
        files: dict[str, bytes | None] = {}
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            value = item.get("value", {})
            if item["key"] == "header":
                summary = value.get("summary") or summary
            elif item["key"] == "file":
                content = value.get("content", "")
                files[value["path"]] = (base64.b64decode(content) if value.get("encoding") == "base64"
                                        else content.encode())
            elif item["key"] in ("deletedFile", "deletedFolder"):
                files[value["path"]] = None
            elif item["key"] == "lfsFile":
                return self._error(400, "this local Hub only takes regular uploads")
        with self.hub.lock:
            if revision not in repo.branches:  # as on the Hub: a commit goes onto a branch, never a tag or a sha
                if repo.resolve(revision) is None:
                    return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
                return self._error(400, f"Invalid rev id: {revision} is not a branch; commit to a branch "
                                        "(create one from it with create_branch)")
            sha = repo.commit(repo.branches[revision], files, summary)
            repo.branches[revision] = sha
        url = f"{self.hub.endpoint}/{URL_PREFIX[repo_type]}{repo_id}/commit/{sha}"
        self._send(200, {"commitOid": sha, "commitUrl": url, "success": True})

    def _ref_create(self, repo_type: str, repo_id: str, kind: str, revision: str) -> None:
        payload = json.loads(self._body() or b"{}")
        repo = self._repo_for_read(repo_type, repo_id)
        if repo is None:
            return
        if not self._can_write(repo_id):
            return self._error(403, f"You don't have the rights to write to {repo_id}")
        with self.hub.lock:
            if kind == "tag":
                sha = repo.resolve(revision)
                if sha is None:
                    return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
                repo.tags[payload["tag"]] = sha
            else:
                start = repo.resolve(payload.get("startingPoint") or "main")
                if start is None:
                    return self._error(404, "Invalid starting point", "RevisionNotFound")
                repo.branches[revision] = start
        self._send(200, {})

    def _resolve(self, verb: str, parts: list[str]) -> None:
        head = verb == "HEAD"
        repo_type = "model"
        if parts[:1] in (["datasets"], ["spaces"]):
            repo_type = REPO_TYPES[parts[0]]
            parts = parts[1:]
        if len(parts) < 5 or parts[2] != "resolve":
            return self._error(404, "Not found", head=head)
        repo_id = "/".join(parts[:2])
        revision = parts[3]
        path = "/".join(parts[4:])
        found = self._commit_for_read(repo_type, repo_id, revision, head=head)
        if found is None:
            return
        repo, sha = found
        content = repo.commits[sha].get(path)
        if content is None:
            return self._error(404, f"Entry not found: {path}", "EntryNotFound", head=head)
        headers = {
            "X-Repo-Commit": sha,
            "ETag": f'"{_git_blob_sha(content)}"',
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(path.split('/')[-1])}",
            "Accept-Ranges": "bytes",
        }
        requested = self.headers.get("Range")
        if requested is None or head:
            return self._send(200, raw=content, headers=headers, head=head)
        span = _byte_range(requested, len(content))
        if span is None:
            return self._error(416, f"Range Not Satisfiable: {requested}", headers_extra={
                "Content-Range": f"bytes */{len(content)}"})
        start, end = span
        headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
        self._send(206, raw=content[start:end + 1], headers=headers)


def _folders(files: dict[str, bytes]) -> set[str]:
    """Every folder that holds a file of ``files``."""
    return {"/".join(path.split("/")[:depth]) for path in files for depth in range(1, path.count("/") + 1)}


def _byte_range(header: str, size: int) -> tuple[int, int] | None:
    """The inclusive span asked by ``Range: bytes=a-b`` (or ``a-``, ``-n``), clipped to ``size``.

    One range only, as huggingface_hub asks; ``None`` when it cannot be satisfied.
    """
    unit, _, spec = header.partition("=")
    first, dash, last = spec.strip().partition("-")
    if unit.strip() != "bytes" or not dash or "," in spec:
        return None
    try:
        if not first:
            start, end = max(size - int(last), 0), size - 1
        else:
            start, end = int(first), min(int(last), size - 1) if last else size - 1
    except ValueError:
        return None
    return (start, end) if 0 <= start <= end else None
