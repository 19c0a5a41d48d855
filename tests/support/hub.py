"""A fake Hugging Face Hub on 127.0.0.1 for the tests of `hf://` sources: real HTTP, no mocks.

`FakeHub` is two real `ModelServer`s (tests/support/http.py): the Hub itself, found by
`HF_ENDPOINT` (`hub.endpoint`), and the CDN its LFS files are redirected to, on another
port and under another host name (`localhost`, where the Hub is `127.0.0.1`), so that
host and port both differ, as huggingface.co and its CDN do.

The Hub answers `[/datasets|/spaces]/{owner}/{repo}/resolve/{revision}/{path}` (the
revision percent-encoded, `refs%2Fpr%2F1`) for a branch, a tag or a full commit hash,
with the headers the real Hub sends (huggingface_hub's `constants.HUGGINGFACE_HEADER_*`):

- a file stored with LFS: `302 Found` to a signed-looking URL on the CDN, with
  `X-Repo-Commit` (40 hex), `X-Linked-Etag` and `ETag` (`"<sha256>"`) and
  `X-Linked-Size`; the CDN serves the bytes (200, or 206 for a `Range`);
- a file stored in git itself: `200` with the body, `ETag` `"<git blob sha1>"`,
  `X-Repo-Commit` (and `Range` as any ModelServer resource);
- errors as JSON bodies with `X-Error-Code` / `X-Error-Message`: 404 `RepoNotFound`,
  `RevisionNotFound`, `EntryNotFound`; a gated repo 401 `GatedRepo` without a token and
  403 `GatedRepo` with a token that was not granted; a private repo 401 `RepoNotFound`
  without a granted token; a token the Hub does not know, 401 (as huggingface.co does).
- a renamed repo: `307` with a relative `Location` to its new name, on the same host.

    with FakeHub() as hub:
        repo = hub.repo("acme/ocr-models")
        commit = repo.commit({"en/en.gguf": data})          # .gguf: stored with LFS
        env = hub_env(base_env, hf_home=tmp_path / "hf", endpoint=hub.endpoint)
        ... ocrd("--config", policy, "apply", env=env) ...
        assert hub.resolves("acme/ocr-models", "en/en.gguf")[-1].path  # what was asked
        assert not hub.cdn.seen[-1].headers.get("authorization")

Everything ModelServer can do still works on both servers: `hub.server.fail(path, 503)`
comes before the Hub's own answer for that path, `hub.cdn.drop_after(hub.lfs_path(sha),
n)` cuts a CDN body, `hub.cdn.serve(hub.lfs_path(sha), other)` serves wrong bytes.

`on_resolve`, if set, is called in the server thread with each resolve request the Hub
is about to answer (after it resolved the revision, before the client has the answer):
a test can move a branch exactly between ocrd's HEAD and its GET.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socketserver
import threading
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Final

from tests.support import http as _http
from tests.support.http import ModelServer, Seen

if TYPE_CHECKING:
    import trustme

# Suffixes the Hub's default .gitattributes stores with LFS (a subset that matters here).
LFS_SUFFIXES: Final = frozenset(
    {
        ".bin",
        ".ckpt",
        ".gguf",
        ".gz",
        ".h5",
        ".model",
        ".msgpack",
        ".npz",
        ".onnx",
        ".ot",
        ".parquet",
        ".pkl",
        ".pt",
        ".pth",
        ".safetensors",
        ".tar",
        ".tflite",
        ".zip",
    }
)
URL_PREFIXES: Final = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_TYPES_BY_PREFIX: Final = {"datasets": "dataset", "spaces": "space"}
INVALID_TOKEN: Final = "Invalid credentials in Authorization header"  # noqa: S105
# Environment variables of huggingface_hub that would change what a run does.
HF_VARIABLES: Final = (
    "HF_ENDPOINT",
    "HF_HOME",
    "HF_TOKEN",
    "HF_TOKEN_PATH",
    "HF_HUB_OFFLINE",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HUGGINGFACE_HUB_CACHE",
    "HF_HUB_CACHE",
    "HF_HUB_ETAG_TIMEOUT",
    "HF_HUB_USER_AGENT_ORIGIN",
)
PROXY_VARIABLES: Final = (
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
)


def sha256_of(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def git_blob_sha1(body: bytes) -> str:
    """The git object id of *body* as a blob: what the Hub's ETag is for a git file."""
    return hashlib.sha1(b"blob %d\x00" % len(body) + body, usedforsecurity=False).hexdigest()


def hub_env(
    base: Mapping[str, str],
    *,
    hf_home: Path,
    endpoint: str,
    token: str | None = None,
) -> dict[str, str]:
    """*base* for an ocrd that talks to the fake Hub at *endpoint*: HF_HOME at *hf_home*
    (created; no token file unless a test writes one), telemetry off, HF_TOKEN only if
    *token* is given, no huggingface_hub setting and no proxy from outside the test."""
    env = {k: v for k, v in base.items() if k not in HF_VARIABLES and k not in PROXY_VARIABLES}
    hf_home.mkdir(parents=True, exist_ok=True)
    env["HF_HOME"] = str(hf_home)
    env["HF_ENDPOINT"] = endpoint
    env["HF_HUB_DISABLE_TELEMETRY"] = "1"
    if token is not None:
        env["HF_TOKEN"] = token
    return env


@dataclass(frozen=True)
class Blob:
    """One file in a commit."""

    body: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return sha256_of(self.body)

    @property
    def pointer(self) -> bytes:
        """The git-lfs pointer file git holds for an LFS file."""
        return b"version https://git-lfs.github.com/spec/v1\noid sha256:%s\nsize %d\n" % (
            self.sha256.encode(),
            len(self.body),
        )

    @property
    def git_sha1(self) -> str:
        """The blob id git has for this file (of the pointer, for an LFS file)."""
        return git_blob_sha1(self.pointer if self.lfs else self.body)


@dataclass(frozen=True)
class Resolved:
    """A resolve request the Hub is about to answer (for `FakeHub.on_resolve`)."""

    method: str
    repo_type: str
    repo_id: str
    revision: str  # as asked (unquoted)
    commit: str  # what it resolved to
    file: str


@dataclass(frozen=True)
class _Reply:
    status: int
    headers: dict[str, str]
    body: bytes = b""
    resource: _http._Resource | None = None  # a git file: served with Range and the rest


class Repo:
    """One repository on the fake Hub: commits, refs (branches, tags) and who may read it."""

    def __init__(
        self, hub: FakeHub, repo_id: str, repo_type: str, *, gated: bool, private: bool
    ) -> None:
        self.hub, self.repo_id, self.repo_type = hub, repo_id, repo_type
        self.gated, self.private = gated, private
        self.refs: dict[str, str] = {}
        self.commits: dict[str, dict[str, Blob]] = {}
        self.tokens: set[str] = set()  # tokens granted access (gated or private)
        self._count = 0

    @property
    def url_id(self) -> str:
        """The repo as in its URLs: `datasets/acme/corpus` for a dataset."""
        return URL_PREFIXES[self.repo_type] + self.repo_id

    def commit(
        self,
        files: Mapping[str, bytes],
        *,
        branch: str | None = "main",
        lfs: Iterable[str] | None = None,
        replace: bool = False,
    ) -> str:
        """Commit *files* on top of *branch*'s tree (or alone, *replace*), move the branch
        there, return the 40-hex commit id. *branch* None: a detached commit of *files*
        alone (point a ref at it later with `branch` or `tag`).
        *lfs*: the paths stored with LFS; by default those with a suffix in LFS_SUFFIXES."""
        chosen = set(lfs) if lfs is not None else None
        with self.hub._lock:
            parent = self.refs.get(branch) if branch is not None else None
            tree = {} if replace or parent is None else dict(self.commits[parent])
            for path, body in files.items():
                is_lfs = path in chosen if chosen is not None else Path(path).suffix in LFS_SUFFIXES
                tree[path] = Blob(bytes(body), is_lfs)
                if is_lfs:
                    self.hub._upload(tree[path])
            self._count += 1
            seed = json.dumps(
                [self.url_id, self._count, parent, sorted((p, b.git_sha1) for p, b in tree.items())]
            )
            commit = hashlib.sha1(seed.encode(), usedforsecurity=False).hexdigest()
            self.commits[commit] = tree
            if branch is not None:
                self.refs[branch] = commit
            return commit

    def branch(self, name: str, commit: str) -> None:
        """Point the branch (or `refs/pr/N`) *name* at *commit*."""
        with self.hub._lock:
            if commit not in self.commits:
                raise KeyError(f"{self.url_id} has no commit {commit}")
            self.refs[name] = commit

    tag = branch  # the Hub resolves a tag exactly as a branch

    def grant(self, token: str) -> None:
        """*token* may read this repo (and is a token the Hub knows)."""
        with self.hub._lock:
            self.tokens.add(token)
            self.hub.tokens.add(token)

    def blob(self, file: str, revision: str = "main") -> Blob:
        with self.hub._lock:
            commit = self.refs.get(revision, revision)
            return self.commits[commit][file]

    def resolve_path(self, revision: str, file: str) -> str:
        """The path of `/resolve/` for *file* at *revision*, as huggingface_hub writes it."""
        rev = urllib.parse.quote(revision, safe="")
        return f"{self.hub.prefix}/{self.url_id}/resolve/{rev}/{urllib.parse.quote(file)}"


class _HubHandler(_http._Handler):
    """ModelServer's handler, answering the Hub's `/resolve/` paths from the FakeHub."""

    def _respond(self, *, head: bool) -> None:
        owner = self.server.owner
        assert isinstance(owner, HubServer)
        if owner.failing(self.path):  # a fail() set by the test comes first
            super()._respond(head=head)
            return
        reply = owner.hub._answer(self.command, self.path, self.headers.get("Authorization"))
        if reply is None:  # not a resolve path: ModelServer's own resources, or 404
            super()._respond(head=head)
        elif reply.resource is not None:
            self._resource(reply.resource, head)
        else:
            self._simple(reply.status, reply.body, reply.headers, head)


class HubServer(ModelServer):
    """A ModelServer whose resolve paths are answered by *hub* (the Hub's own host)."""

    def __init__(self, hub: FakeHub, *, tls: trustme.CA | None = None) -> None:
        super().__init__(tls=tls)
        self.hub = hub
        # Nobody knows the port yet, so no request has come in with the plain handler.
        self._server.RequestHandlerClass = _HubHandler

    def failing(self, path: str) -> bool:
        """Whether a `fail()` answers the next request for *path*."""
        with self._lock:
            return _http._match(path, self._failures) is not None


class FakeHub:
    """The Hub (`server`, at `endpoint`) and its CDN (`cdn`), with the repos on them.

    *prefix*: a path the endpoint has (a company mirror's `https://host/api/hf`).
    """

    def __init__(self, *, prefix: str = "", tls: trustme.CA | None = None) -> None:
        self.prefix = prefix.rstrip("/")
        self._lock = threading.RLock()
        self._repos: dict[str, Repo] = {}  # by url_id
        self._renamed: dict[str, str] = {}  # old url_id -> new url_id
        self.tokens: set[str] = set()  # every token the Hub knows
        self.on_resolve: Callable[[Resolved], None] | None = None
        self.cdn = ModelServer(tls=tls)
        self.server = HubServer(self, tls=tls)
        # The CDN under another host name too: a client that compares only ports (or only
        # host names) to decide what is "another host" is caught either way.
        self.cdn_base = self.cdn.base.replace(f"//{_http.HOST}:", "//localhost:")
        self.endpoint = self.server.base + self.prefix

    def __repr__(self) -> str:
        return f"FakeHub({self.endpoint}, cdn={self.cdn_base})"

    # -- what is on the Hub -----------------------------------------------------------------

    def repo(
        self,
        repo_id: str,
        *,
        repo_type: str = "model",
        gated: bool = False,
        private: bool = False,
    ) -> Repo:
        """Create the repo *repo_id* (OWNER/NAME) of *repo_type* (model, dataset, space)."""
        if repo_type not in URL_PREFIXES:
            raise ValueError(f"repo_type must be one of {sorted(URL_PREFIXES)}")
        made = Repo(self, repo_id, repo_type, gated=gated, private=private)
        with self._lock:
            self._repos[made.url_id] = made
        return made

    def rename(self, repo: Repo, new_id: str) -> None:
        """Rename *repo* to *new_id*: the old name redirects (307) to the new one."""
        with self._lock:
            old = repo.url_id
            del self._repos[old]
            repo.repo_id = new_id
            self._repos[repo.url_id] = repo
            self._renamed[old] = repo.url_id

    @staticmethod
    def lfs_path(sha256: str) -> str:
        """Where the CDN serves the LFS object *sha256* (content-addressed, as the Hub's)."""
        return f"/repos/{sha256[:2]}/{sha256[2:4]}/{sha256}"

    def _upload(self, blob: Blob) -> None:
        self.cdn.serve(self.lfs_path(blob.sha256), blob.body, etag=f'"{blob.sha256}"')

    # -- what was asked -------------------------------------------------------------------

    def resolves(self, repo_id: str, file: str, *, repo_type: str = "model") -> list[Seen]:
        """The requests the Hub received for *file* of *repo_id*, at any revision."""
        start = f"{self.prefix}/{URL_PREFIXES[repo_type]}{repo_id}/resolve/"
        end = "/" + urllib.parse.quote(file)
        return [
            s
            for s in self.server.seen
            if s.path.split("?", 1)[0].startswith(start) and s.path.split("?", 1)[0].endswith(end)
        ]

    # -- the answers ----------------------------------------------------------------------

    def _parse(self, path: str) -> tuple[str, str, str] | None:
        """(url_id, revision, file) of a resolve path, None for any other path."""
        bare = path.split("?", 1)[0]
        if self.prefix:
            if not bare.startswith(self.prefix + "/"):
                return None
            bare = bare[len(self.prefix) :]
        parts = bare.split("/")[1:]
        kind = ""
        if parts and parts[0] in _TYPES_BY_PREFIX:
            kind, parts = parts[0] + "/", parts[1:]
        if len(parts) < 5 or parts[2] != "resolve" or not parts[0] or not parts[1]:
            return None
        owner, name, _, revision, *rest = parts
        file = urllib.parse.unquote("/".join(rest))
        return f"{kind}{owner}/{name}", urllib.parse.unquote(revision), file

    def _answer(self, method: str, path: str, authorization: str | None) -> _Reply | None:
        parsed = self._parse(path)
        if parsed is None:
            return None
        url_id, revision, file = parsed
        with self._lock:
            renamed = self._renamed.get(url_id)
            if renamed is not None:
                query = path.split("?", 1)[1] if "?" in path else ""
                rev = urllib.parse.quote(revision, safe="")
                to = f"{self.prefix}/{renamed}/resolve/{rev}/{urllib.parse.quote(file)}"
                return _Reply(307, {"Location": to + (f"?{query}" if query else "")})
            token = self._token(authorization)
            if token is False:
                return _error(401, None, INVALID_TOKEN)
            repo = self._repos.get(url_id)
            if repo is None:
                return _error(404, "RepoNotFound", "Repository not found")
            allowed = token is not None and token in repo.tokens
            what = repo.repo_type
            if repo.private and not allowed:
                return _error(401 if token is None else 404, "RepoNotFound", "Repository not found")
            if repo.gated and not allowed:
                if token is None:
                    return _error(
                        401,
                        "GatedRepo",
                        f"Access to {what} {repo.repo_id} is restricted. You must have access "
                        "to it and be authenticated to access it. Please log in.",
                    )
                return _error(
                    403,
                    "GatedRepo",
                    f"Access to {what} {repo.repo_id} is restricted and you are not in the "
                    "authorized list.",
                )
            commit = repo.refs.get(revision)
            if commit is None and revision in repo.commits:
                commit = revision
            if commit is None:
                return _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            blob = repo.commits[commit].get(file)
            if blob is None:
                return _error(404, "EntryNotFound", "Entry not found")
            hook = self.on_resolve
        if hook is not None:
            hook(Resolved(method, repo.repo_type, repo.repo_id, revision, commit, file))
        common = {"X-Repo-Commit": commit, "Vary": "Origin, Accept"}
        if blob.lfs:
            location = f"{self.cdn_base}{self.lfs_path(blob.sha256)}?" + urllib.parse.urlencode(
                {
                    "response-content-disposition": f'inline; filename="{Path(file).name}"',
                    "Expires": "4102444800",
                    "Signature": hashlib.sha256(f"{commit}/{file}".encode()).hexdigest()[:40],
                    "Key-Pair-Id": "K-FAKE-HUB",
                }
            )
            return _Reply(
                302,
                {
                    **common,
                    "Location": location,
                    "ETag": f'"{blob.sha256}"',
                    "X-Linked-Etag": f'"{blob.sha256}"',
                    "X-Linked-Size": str(len(blob.body)),
                    "Content-Type": "text/plain; charset=utf-8",
                },
                f"Found. Redirecting to {location}".encode(),
            )
        resource = _http._Resource(
            body=blob.body,
            etag=f'"{blob.git_sha1}"',
            last_modified=None,
            content_type="text/plain; charset=utf-8",
            headers=common,
            send_length=True,
        )
        return _Reply(200, {}, resource=resource)

    def _token(self, value: str | None) -> str | bool | None:
        """The token of an Authorization header; None without one; False for one the Hub
        does not know."""
        if value is None:
            return None
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or token.strip() not in self.tokens:
            return False
        return token.strip()

    # -- the end --------------------------------------------------------------------------

    def close(self) -> None:
        self.server.close()
        self.cdn.close()

    def __enter__(self) -> FakeHub:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _error(status: int, code: str | None, message: str) -> _Reply:
    headers = {"Content-Type": "application/json; charset=utf-8", "X-Error-Message": message}
    if code is not None:
        headers["X-Error-Code"] = code
    return _Reply(status, headers, json.dumps({"error": message}).encode())


def token_file(hf_home: Path, token: str) -> Path:
    """Write *token* where `hf auth login` keeps it under *hf_home* (mode 600)."""
    path = hf_home / "token"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(token, encoding="utf-8")
    os.chmod(path, 0o600)
    return path


class ProxyTrap:
    """A proxy on 127.0.0.1 that forwards nothing: it records the request line of every
    connection (`CONNECT huggingface.co:443 HTTP/1.1`, `GET http://… HTTP/1.1`) and
    answers 403. Point `https_proxy`/`http_proxy` at `url` (with `no_proxy` for the fake
    Hub's hosts) and whatever a run sends anywhere else shows up in `asked`."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self._lock = threading.Lock()
        trap = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                line = self.rfile.readline(65536).decode("latin-1").rstrip("\r\n")
                with trap._lock:
                    trap.asked.append(line)
                with contextlib.suppress(OSError):
                    self.wfile.write(
                        b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    )

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server((_http.HOST, 0), Handler)
        self.url = f"http://{_http.HOST}:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> ProxyTrap:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def env(self, no_proxy: str = "127.0.0.1,localhost") -> dict[str, str]:
        """The proxy variables that send everything but *no_proxy* to this trap."""
        names = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY")
        return {**dict.fromkeys(names, self.url), "no_proxy": no_proxy, "NO_PROXY": no_proxy}
