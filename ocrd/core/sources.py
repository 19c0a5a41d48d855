"""Where a required model can be fetched from: the three forms of `source:` (pure).

    /srv/model-mirror/en_ocr_v1.bin                  a local file (relative: to the policy)
    https://models.example.com/ocr/en_ocr_v1.bin      an HTTP(S) URL
    hf://aspose/ocr-models@v2.1/en/en_ocr_v1.gguf     a file in a Hugging Face Hub repo

`hf://` follows the Hub's file-system convention: `hf://[datasets/|spaces/]OWNER/REPO
[@REVISION]/PATH/IN/REPO`; a revision with a `/` in it (`refs/pr/1`) is written with
`%2F`. Credentials are never part of a source: a URL with `user:password@` is refused
(they come from the environment or the netrc file named in `download.netrc`).
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass
from enum import Enum
from pathlib import Path


class SourceKind(str, Enum):
    LOCAL = "local"
    HTTP = "http"
    HUB = "hf"


@dataclass(frozen=True)
class Source:
    """One parsed source. `text` is what the policy says (logged as it is: no secrets)."""

    kind: SourceKind
    text: str
    path: Path | None = None  # LOCAL
    url: str | None = None  # HTTP
    repo_type: str = "model"  # HUB: model | dataset | space
    repo_id: str = ""  # HUB: OWNER/REPO
    revision: str | None = None  # HUB: None is the repo's default branch
    file: str = ""  # HUB: the path in the repo

    @property
    def remote(self) -> bool:
        return self.kind is not SourceKind.LOCAL

    def __str__(self) -> str:
        return self.text


def redact(url: str) -> str:
    """*url* as it may be logged: no query string (a signed URL carries its key there)
    and never credentials."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    query = "?…" if parts.query else ""
    return f"{parts.scheme}://{host}{parts.path}{query}"


def shown(text: str) -> str:
    """A source as logs, reasons and status show it: an URL's query string left out."""
    if _SCHEME.match(text) and text.split(":", 1)[0].lower() in ("http", "https"):
        return redact(text)
    return text


FORMS = (
    "a file path, an http(s):// URL, or hf://OWNER/REPO[@REVISION]/PATH "
    "(e.g. hf://aspose/ocr-models/en_ocr_v1.gguf)"
)
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_REPO_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_HUB_TYPES = {"datasets": "dataset", "spaces": "space"}


def parse_source(text: str) -> Source:
    """Parse one `source:` value; ValueError says what is wrong and which forms exist."""
    if not text.strip():
        raise ValueError(f"an empty source; expected {FORMS}")
    if "\x00" in text:
        raise ValueError("a source cannot contain a NUL byte")
    match = _SCHEME.match(text)
    if match is None:
        return Source(SourceKind.LOCAL, text, path=Path(text))
    scheme = match.group(1).lower()
    if scheme in ("http", "https"):
        return _http(text)
    if scheme == "hf":
        return _hub(text)
    if scheme == "file":
        parts = urllib.parse.urlsplit(text)
        if parts.netloc not in ("", "localhost"):
            raise ValueError(
                f"{text!r}: a file:// URL needs an absolute path (file:///srv/m.bin); "
                f"{parts.netloc!r} would be read as a host name. For a relative path write "
                "the path itself (relative to the policy file)"
            )
        path = urllib.parse.unquote(parts.path)
        if not path.startswith("/"):
            raise ValueError(f"{text!r}: a file:// URL needs an absolute path (file:///srv/m.bin)")
        return Source(SourceKind.LOCAL, text, path=Path(path))
    raise ValueError(f"{text!r}: ocrd cannot fetch {scheme}:// sources; expected {FORMS}")


def _http(text: str) -> Source:
    parts = urllib.parse.urlsplit(text)
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            f"{parts.scheme}://…@{parts.hostname}: credentials do not belong in the policy "
            "(it is logged and often world-readable); put them in a netrc file named by "
            "download.netrc, and write the URL without them"
        )
    if not parts.hostname:
        raise ValueError(f"{text!r}: the URL has no host")
    try:
        parts.port  # noqa: B018 - raises for a port that is not a number
    except ValueError:
        raise ValueError(f"{text!r}: the URL's port is not a number") from None
    if not parts.path or parts.path.endswith("/"):
        raise ValueError(f"{text!r}: the URL must name the model file, not a directory")
    if parts.fragment:
        raise ValueError(f"{text!r}: a URL fragment (#…) is never sent to the server; drop it")
    return Source(SourceKind.HTTP, text, url=text)


def _hub(text: str) -> Source:
    rest = text[len("hf://") :]
    repo_type = "model"
    first, _, after = rest.partition("/")
    if first in _HUB_TYPES:
        repo_type, rest = _HUB_TYPES[first], after
    owner, _, rest = rest.partition("/")
    repo, sep, file = rest.partition("/")
    revision = None
    if "@" in repo:
        repo, _, revision = repo.partition("@")
        revision = urllib.parse.unquote(revision)
        if not revision:
            raise ValueError(f"{text!r}: '@' must be followed by a branch, tag or commit")
    if not (owner and repo and sep and file):
        raise ValueError(
            f"{text!r}: expected hf://OWNER/REPO[@REVISION]/PATH/IN/REPO "
            "(e.g. hf://aspose/ocr-models@main/en_ocr_v1.gguf)"
        )
    for part in (owner, repo):
        if not _REPO_PART.match(part) or part in (".", ".."):
            raise ValueError(f"{text!r}: {part!r} is not a Hub owner or repository name")
    if file.endswith("/") or any(p in ("", ".", "..") for p in file.split("/")):
        raise ValueError(f"{text!r}: {file!r} is not a file path in the repository")
    return Source(
        SourceKind.HUB,
        text,
        repo_type=repo_type,
        repo_id=f"{owner}/{repo}",
        revision=revision,
        file=file,
    )
