"""`hf://` sources: the Hugging Face Hub's URL, headers and metadata for one file.

huggingface_hub builds the URL (`HF_ENDPOINT` honoured, so a company mirror of
the Hub works), the headers (its user agent; the token from `HF_TOKEN` or the
token file of `hf auth login`, never from the policy) and names the Hub's
metadata headers. The request itself goes through ocrd's own transport, like
every download, so `download.ca_bundle`, the timeouts, retries, proxies and
the network-sandbox diagnosis hold for the Hub too.

A HEAD of `/{repo}/resolve/{revision}/{path}` answers (without following the
Hub's redirect to its CDN) with the commit the revision points at
(`X-Repo-Commit`), and for a file stored with LFS its sha256 (`X-Linked-Etag`)
and size (`X-Linked-Size`). The body is then fetched from that commit, so a
branch moving during a long download cannot splice two versions.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass

from ocrd import __version__
from ocrd.core.sources import Source, redact
from ocrd.fetch.transport import REDIRECTS, Answer, FetchError, Transport, length

_SHA256 = re.compile(r"[0-9a-f]{64}")
_COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class HubFile:
    """Where to fetch one Hub file from, and what the Hub says it is."""

    url: str  # /resolve/ at the commit (or the revision, if the Hub named no commit)
    headers: dict[str, str]  # the Hub's: user agent, and the token for the Hub's host only
    commit: str | None
    sha256: str | None  # the LFS object's sha256: None for a file stored in git itself
    size: int | None
    endpoint: str


def endpoint() -> str:
    """The Hub ocrd talks to: `HF_ENDPOINT`, else huggingface.co."""
    from huggingface_hub import constants

    return constants.ENDPOINT


def _url(source: Source, revision: str | None) -> str:
    from huggingface_hub import hf_hub_url

    return hf_hub_url(
        source.repo_id,
        source.file,
        repo_type=None if source.repo_type == "model" else source.repo_type,
        revision=revision,
    )


def _headers() -> dict[str, str]:
    """The Hub's user agent and token. Built here, not with build_hf_headers, which may
    ask the Hub things of its own (over its own HTTP client, past ocrd's settings) and
    write files under HF_HOME."""
    import huggingface_hub
    from huggingface_hub import constants, get_token

    headers = {"User-Agent": f"ocrd/{__version__}; hf_hub/{huggingface_hub.__version__}"}
    token = None if constants.HF_HUB_DISABLE_IMPLICIT_TOKEN else get_token()
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def _strip(etag: str | None) -> str | None:
    if etag is None:
        return None
    return etag.strip().removeprefix("W/").strip('"').lower()


def _error(source: Source, status: int, code: str, message: str, *, token: bool) -> FetchError:
    where = f"{source.repo_id}@{source.revision or 'main'}/{source.file}"
    if token and (status == 401 or status == 403):
        return FetchError(
            f"the Hub refused {where} with the token ocrd sent (HTTP {status}"
            f"{', ' + code if code else ''}{': ' + message if message else ''}): the token "
            "is invalid, expired, or has no access to this repo (a gated repo must be "
            "accepted on its page first); check HF_TOKEN or the token file",
            status=status,
        )
    if status == 401 or code == "GatedRepo" or status == 403:
        return FetchError(
            f"the Hub refused {where} (HTTP {status}{', ' + code if code else ''}): a private "
            "or gated repo needs a token with access; set HF_TOKEN for the service or run "
            "`hf auth login` as its user",
            status=status,
        )
    if code == "RepoNotFound":
        return FetchError(f"no repository {source.repo_id} on the Hub ({message})", status=status)
    if code == "RevisionNotFound":
        return FetchError(
            f"{source.repo_id} has no revision {source.revision!r} ({message})", status=status
        )
    if code == "EntryNotFound" or status == 404:
        return FetchError(f"{where} is not on the Hub (HTTP {status})", status=status)
    return FetchError(
        f"the Hub answered HTTP {status} for {where}",
        status=status,
        retry=status >= 500 or status == 429,
    )


def resolve(source: Source, transport: Transport) -> HubFile:
    """Ask the Hub what *source* is; FetchError (with a fix) if it cannot be fetched."""
    from huggingface_hub import constants

    url = _url(source, source.revision)
    headers = _headers()
    host = urllib.parse.urlsplit(url).netloc
    answer = None
    failures = 0
    while True:
        try:
            answer = _head(transport, url, headers, host)
        except FetchError as exc:
            failures += 1
            if not exc.retry or failures > transport.settings.retries:
                raise
            transport.backoff(failures, exc.wait)
            continue
        status = answer.status
        if status >= 400:
            code = answer.headers.get("X-Error-Code", "")
            error = _error(
                source,
                status,
                code,
                answer.headers.get("X-Error-Message", ""),
                token=any(k.lower() == "authorization" for k in headers),
            )
            failures += 1
            if not error.retry or failures > transport.settings.retries:
                raise error
            transport.backoff(failures, error.wait)
            continue
        break
    found = answer.headers
    commit = found.get(constants.HUGGINGFACE_HEADER_X_REPO_COMMIT)
    commit = commit if commit is not None and _COMMIT.fullmatch(commit) else None
    linked = _strip(found.get(constants.HUGGINGFACE_HEADER_X_LINKED_ETAG))
    sha256 = linked if linked is not None and _SHA256.fullmatch(linked) else None
    size_text = found.get(constants.HUGGINGFACE_HEADER_X_LINKED_SIZE)
    if size_text is None and answer.status not in REDIRECTS:
        size_text = found.get("Content-Length")
    size = length(size_text)
    return HubFile(
        url=_url(source, commit) if commit is not None else url,
        headers=headers,
        commit=commit,
        sha256=sha256,
        size=size,
        endpoint=endpoint(),
    )


def _head(transport: Transport, url: str, headers: dict[str, str], host: str) -> Answer:
    """HEAD *url*, following only the Hub's own redirects (a renamed repo), not the
    one to its CDN: the metadata headers are on that redirect."""
    for _ in range(transport.settings.max_redirects + 1):
        answer = transport.open("HEAD", url, headers, follow=False)
        answer.close()
        location = answer.headers.get("Location")
        if answer.status not in REDIRECTS or not location:
            return answer
        target = urllib.parse.urljoin(url, location)
        if urllib.parse.urlsplit(target).netloc != host:
            return answer  # to the CDN: what the Hub says is on this answer
        url = target
    raise FetchError(
        f"more than {transport.settings.max_redirects} redirects on the Hub from {redact(url)}"
    )
