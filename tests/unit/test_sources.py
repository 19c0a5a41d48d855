"""ocrd.core.sources.parse_source: the three forms of `source:` and what is refused, and
`source`/`sources` of a required model as the policy validates them (pure, no I/O)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from ocrd.core.policy import Policy
from ocrd.core.sources import FORMS, Source, SourceKind, parse_source

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def make(**required: Any) -> Policy:
    """A policy whose one required model `en.gguf` has *required* keys too."""
    return Policy.model_validate(
        {"model_dir": "/srv/models", "required": [{"name": "en.gguf", **required}]}
    )


def errors_of(**required: Any) -> list[tuple[tuple[str | int, ...], str]]:
    """(loc, msg) of each error validating `make(**required)` raises (fails if it validates)."""
    with pytest.raises(ValidationError) as exc:
        make(**required)
    return [(tuple(e["loc"]), e["msg"]) for e in exc.value.errors(include_url=False)]


def refused(text: str) -> str:
    """The message parse_source(text) refuses *text* with (fails if it parses)."""
    with pytest.raises(ValueError) as exc:
        parse_source(text)
    return str(exc.value)


# --- local files -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("/srv/model-mirror/en_ocr_v1.bin", Path("/srv/model-mirror/en_ocr_v1.bin")),
        ("mirror/en.bin", Path("mirror/en.bin")),  # relative: config.load makes it absolute
        ("./en.bin", Path("en.bin")),
        ("file:///srv/m.bin", Path("/srv/m.bin")),
        ("file:///srv/a%20b.bin", Path("/srv/a b.bin")),  # a file URL is percent-decoded
        ("FILE:///srv/m.bin", Path("/srv/m.bin")),  # schemes are case-insensitive
        ("file://localhost/srv/m.bin", Path("/srv/m.bin")),  # RFC 8089: this host
    ],
)
def test_local_sources(text: str, path: Path) -> None:
    source = parse_source(text)
    assert source.kind is SourceKind.LOCAL
    assert source.path == path
    assert source.url is None
    assert not source.remote
    assert str(source) == source.text == text


@pytest.mark.parametrize("text", ["file://en.bin", "file://", "file://?x=/srv/en.bin"])
def test_a_relative_file_url_is_refused(text: str) -> None:
    message = refused(text)
    assert "absolute path" in message
    assert "file:///" in message  # the fix, shown


@pytest.mark.parametrize(
    ("text", "taken_as"),
    [
        ("file://./en.bin", "/en.bin"),
        ("file://models/en.bin", "/en.bin"),
        ("file://../mirror/en.bin", "/mirror/en.bin"),
    ],
)
def test_a_relative_file_url_with_a_slash_is_refused_too(text: str, taken_as: str) -> None:
    # RFC 8089: file://HOST/PATH names PATH on HOST; ocrd cannot read another host's files,
    # so "models" here is either a mistaken relative path or a remote host: refused either
    # way, as file://en.bin is already.
    try:
        found = parse_source(text)
    except ValueError as exc:
        assert text in str(exc)
    else:
        assert found.path != Path(taken_as), f"{text!r} was taken as the local file {found.path}"
        pytest.fail(f"{text!r} parsed as {found}")


# --- http(s) ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "https://models.example.com/ocr/en_ocr_v1.bin",
        "http://10.0.0.5/en.bin",
        "https://models.example.com:8443/ocr/en.bin",
        "https://cdn.example.com/en.bin?X-Amz-Signature=abc&Expires=1",  # a signed URL
        "HTTPS://models.example.com/en.bin",
        "http://[::1]:8080/en.bin",
    ],
)
def test_http_sources(text: str) -> None:
    source = parse_source(text)
    assert source.kind is SourceKind.HTTP
    assert source.url == text
    assert source.path is None
    assert source.remote
    assert str(source) == text


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("https://alice:s3cret-pw@models.example.com/en.bin", "s3cret-pw"),
        ("https://alice@models.example.com/en.bin", "alice"),
        ("http://:s3cret-pw@models.example.com/en.bin", "s3cret-pw"),
        ("https://tok3n-xyz:x-oauth-basic@models.example.com/en.bin", "tok3n-xyz"),
    ],
)
def test_credentials_in_a_url_are_refused_without_repeating_them(text: str, secret: str) -> None:
    message = refused(text)
    assert "credentials" in message
    assert "netrc" in message  # where they go instead
    assert "models.example.com" in message  # which URL it is
    assert secret not in message  # the error is logged: it must not carry the secret


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("https://models.example.com/ocr/", "must name the model file, not a directory"),
        ("https://models.example.com/", "must name the model file"),
        ("https://models.example.com", "must name the model file"),
        ("https:///en.bin", "has no host"),
        ("https://models.example.com:http/en.bin", "port is not a number"),
        ("https://models.example.com/en.bin#part2", "fragment"),
    ],
)
def test_bad_urls_say_what_is_wrong(text: str, pattern: str) -> None:
    message = refused(text)
    assert re.search(pattern, message), message
    assert text in message  # which source it is


@pytest.mark.parametrize("scheme", ["ftp", "s3", "sftp", "gs", "ssh"])
def test_other_schemes_are_refused_with_the_forms_there_are(scheme: str) -> None:
    message = refused(f"{scheme}://models.example.com/en.bin")
    assert f"cannot fetch {scheme}://" in message
    assert FORMS in message
    assert "hf://OWNER/REPO" in message


@pytest.mark.parametrize("text", ["", "   ", "\t\n"])
def test_an_empty_source_is_refused(text: str) -> None:
    message = refused(text)
    assert "empty source" in message
    assert FORMS in message


@pytest.mark.parametrize("text", ["/srv/m\x00.bin", "https://h/m\x00.bin", "hf://a/b/m\x00"])
def test_a_nul_byte_is_refused(text: str) -> None:
    assert "NUL" in refused(text)


# --- hf:// -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "repo_type", "repo_id", "revision", "file"),
    [
        (
            "hf://aspose/ocr-models/en_ocr_v1.gguf",
            "model",
            "aspose/ocr-models",
            None,
            "en_ocr_v1.gguf",
        ),
        (
            "hf://aspose/ocr-models@v2.1/en/en_ocr_v1.gguf",
            "model",
            "aspose/ocr-models",
            "v2.1",
            "en/en_ocr_v1.gguf",
        ),
        ("hf://acme/ocr-models@main/a/b/c.bin", "model", "acme/ocr-models", "main", "a/b/c.bin"),
        (f"hf://acme/ocr-models@{COMMIT}/en.gguf", "model", "acme/ocr-models", COMMIT, "en.gguf"),
        (
            "hf://acme/ocr-models@refs%2Fpr%2F1/en.gguf",
            "model",
            "acme/ocr-models",
            "refs/pr/1",
            "en.gguf",
        ),
        (
            "hf://acme/ocr-models@refs%2fconvert%2fparquet/x.bin",
            "model",
            "acme/ocr-models",
            "refs/convert/parquet",
            "x.bin",
        ),
        (
            "hf://acme/ocr-models@feature%2Fnew-ocr/en.gguf",
            "model",
            "acme/ocr-models",
            "feature/new-ocr",
            "en.gguf",
        ),
        (
            "hf://datasets/acme/corpus/data/train.parquet",
            "dataset",
            "acme/corpus",
            None,
            "data/train.parquet",
        ),
        ("hf://datasets/acme/corpus@v1/x.bin", "dataset", "acme/corpus", "v1", "x.bin"),
        ("hf://spaces/acme/demo@main/weights/m.bin", "space", "acme/demo", "main", "weights/m.bin"),
        (
            "hf://Acme-Labs/OCR_models.v2/en.gguf",
            "model",
            "Acme-Labs/OCR_models.v2",
            None,
            "en.gguf",
        ),
        ("hf://acme/ocr-models/names/a@b.bin", "model", "acme/ocr-models", None, "names/a@b.bin"),
        ("HF://acme/ocr-models/en.gguf", "model", "acme/ocr-models", None, "en.gguf"),
    ],
)
def test_hub_sources(
    text: str, repo_type: str, repo_id: str, revision: str | None, file: str
) -> None:
    source = parse_source(text)
    assert source.kind is SourceKind.HUB
    assert (source.repo_type, source.repo_id, source.revision, source.file) == (
        repo_type,
        repo_id,
        revision,
        file,
    )
    assert source.remote
    assert source.path is None and source.url is None
    assert str(source) == text


def test_a_source_is_a_frozen_value() -> None:
    one = parse_source("hf://acme/ocr-models@main/en.gguf")
    assert one == parse_source("hf://acme/ocr-models@main/en.gguf")
    assert one != parse_source("hf://acme/ocr-models@v1/en.gguf")
    with pytest.raises(AttributeError):
        one.revision = "v1"  # type: ignore[misc]
    assert isinstance(one, Source)


@pytest.mark.parametrize(
    "text",
    [
        "hf://acme",  # owner only
        "hf://acme/",
        "hf://acme/ocr-models",  # no path in the repo
        "hf://acme/ocr-models/",
        "hf://acme/ocr-models@main",
        "hf://acme/ocr-models@main/",
        "hf://datasets/acme",
        "hf://datasets/acme/corpus",
        "hf://",
        "hf:///acme/ocr-models/en.gguf",  # empty owner
    ],
)
def test_an_incomplete_hub_source_shows_the_form(text: str) -> None:
    message = refused(text)
    assert "hf://OWNER/REPO[@REVISION]/PATH" in message
    assert repr(text) in message


@pytest.mark.parametrize(
    "text", ["hf://acme/ocr-models@/en.gguf", "hf://datasets/acme/corpus@/x.bin"]
)
def test_an_empty_revision_is_refused(text: str) -> None:
    message = refused(text)
    assert "'@' must be followed by a branch, tag or commit" in message


@pytest.mark.parametrize(
    ("text", "part"),
    [
        ("hf://acme/ocr-models/en/../secret.bin", "en/../secret.bin"),
        ("hf://acme/ocr-models/../en.gguf", "../en.gguf"),
        ("hf://acme/ocr-models/en/..", "en/.."),
        ("hf://acme/ocr-models/./en.gguf", "./en.gguf"),
        ("hf://acme/ocr-models/en//en.gguf", "en//en.gguf"),
        ("hf://acme/ocr-models@main/en/", "en/"),
        ("hf://acme/ocr-models@main/en/../../x.bin", "en/../../x.bin"),
    ],
)
def test_a_path_in_the_repo_with_dot_dot_or_empty_parts_is_refused(text: str, part: str) -> None:
    message = refused(text)
    assert f"{part!r} is not a file path in the repository" in message


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("hf://../ocr-models/en.gguf", ".."),
        ("hf://acme/../en.gguf", ".."),
        ("hf://acme/ocr models/en.gguf", "ocr models"),
        ("hf://-acme/ocr-models/en.gguf", "-acme"),
        ("hf://acme/ocr-models%2Fx/en.gguf", "ocr-models%2Fx"),
        ("hf://acme/.hidden/en.gguf", ".hidden"),
    ],
)
def test_a_bad_owner_or_repo_name_is_refused(text: str, name: str) -> None:
    message = refused(text)
    assert f"{name!r} is not a Hub owner or repository name" in message


# --- source / sources in the policy ----------------------------------------------------


def test_one_source_or_a_list_of_mirrors() -> None:
    one = make(source="hf://acme/ocr-models@main/en.gguf").required[0]
    assert one.sources == []
    assert [s.text for s in one.fetch_from()] == ["hf://acme/ocr-models@main/en.gguf"]

    mirrors = [
        "https://mirror.example.com/en.gguf",
        "hf://acme/ocr-models@main/en.gguf",
        "/srv/mirror/en.gguf",
    ]
    listed = make(sources=mirrors).required[0]
    assert listed.source is None
    found = listed.fetch_from()
    assert [s.text for s in found] == mirrors  # in the policy's order
    assert [s.kind for s in found] == [SourceKind.HTTP, SourceKind.HUB, SourceKind.LOCAL]

    assert make().required[0].fetch_from() == ()
    assert make(source="/srv/m.gguf", sources=[]).required[0].fetch_from()[0].text == "/srv/m.gguf"


def test_source_and_sources_together_are_refused() -> None:
    found = errors_of(source="/srv/a.gguf", sources=["/srv/b.gguf"])
    assert [loc for loc, _ in found] == [("required", 0)]
    assert "source and sources are both set" in found[0][1]
    assert "drop source" in found[0][1]


def test_the_same_mirror_twice_is_refused() -> None:
    found = errors_of(sources=["hf://acme/r/en.gguf", "/srv/en.gguf", "hf://acme/r/en.gguf"])
    assert found == [(("required", 0, "sources"), "Value error, a mirror is listed twice")]


def test_a_bad_mirror_is_named_by_its_place() -> None:
    found = errors_of(sources=["/srv/en.gguf", "ftp://h/en.gguf"])
    assert len(found) == 1
    loc, msg = found[0]
    assert loc == ("required", 0, "sources")
    assert "sources[1]: 'ftp://h/en.gguf'" in msg
    assert "cannot fetch ftp://" in msg


@pytest.mark.parametrize(
    ("source", "pattern"),
    [
        ("hf://acme", r"expected hf://OWNER/REPO\[@REVISION\]/PATH"),
        ("https://u:pw@h/en.gguf", "credentials do not belong in the policy"),
        ("https://h/models/", "must name the model file"),
        ("hf://acme/r/../en.gguf", "is not a file path in the repository"),
        ("hf://acme/r@/en.gguf", "'@' must be followed"),
        ("ftp://h/en.gguf", "cannot fetch ftp://"),
        ("file://en.gguf", "needs an absolute path"),
    ],
)
def test_a_bad_source_is_an_error_at_its_key(source: str, pattern: str) -> None:
    found = errors_of(source=source)
    assert [loc for loc, _ in found] == [("required", 0, "source")]
    assert re.search(pattern, found[0][1]), found


def test_a_credential_in_a_policy_source_is_not_echoed_by_the_error() -> None:
    with pytest.raises(ValidationError) as exc:
        make(sources=["https://alice:hunter2@models.example.com/en.gguf"])
    # pydantic's str() of the error shows the input value too: only the message is ocrd's.
    [error] = exc.value.errors(include_url=False)
    assert "hunter2" not in error["msg"]
