"""`hf://` sources through the real CLI against a fake Hugging Face Hub on 127.0.0.1.

The Hub (tests/support/hub.py) is a real HTTP server found by `HF_ENDPOINT`; its LFS files
are redirected (302) to a CDN on another host and port, as huggingface.co does. `ocrd
--config P apply` restores the required model from it; what ocrd asked, of which host,
with which headers, is in the servers' `seen`. No mocks: ocrd's own transport, the real
huggingface_hub, real sockets.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ocrd.act.fetching import partial_name
from tests.support.cli import OCRD, Result, ocrd
from tests.support.http import Seen
from tests.support.hub import FakeHub, ProxyTrap, Repo, Resolved, hub_env, token_file
from tests.support.policy import write_policy
from tests.support.wait import wait_for

MODEL = "en.gguf"
FILE = "en/en.gguf"
SOURCE = f"hf://acme/ocr-models@main/{FILE}"
TOKEN = "hf_fakeTOKENforTheTests0123456789"  # noqa: S105 - a test token, on a test Hub
COMMIT = re.compile(r"[0-9a-f]{40}")


def body(seed: str, size: int = 40_000) -> bytes:
    """*size* bytes that differ at every offset from those of another seed."""
    out = bytearray()
    block = seed.encode()
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:size])


DATA = body("en v1")
DATA2 = body("en v2")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub() as running:
        yield running


@pytest.fixture
def repo(hub: FakeHub) -> Repo:
    """acme/ocr-models with en/en.gguf (LFS) on main."""
    made = hub.repo("acme/ocr-models")
    made.commit({FILE: DATA, "README.md": b"# OCR models\n"})
    return made


@pytest.fixture
def hf_home(tmp_path: Path) -> Path:
    return tmp_path / "hf-home"


def required(source: str = SOURCE, name: str = MODEL, **keys: Any) -> dict[str, Any]:
    return {"name": name, "source": source, **keys}


class Runner:
    """Writes the policy and runs `ocrd --config P apply` against one fake Hub."""

    def __init__(
        self, env: dict[str, str], policy: Path, models: Path, state: Path, hf_home: Path
    ) -> None:
        self.env, self.policy, self.models, self.state = env, policy, models, state
        self.hf_home = hf_home

    def environment(
        self, endpoint: str, *, token: str | None = None, extra: dict[str, str] | None = None
    ) -> dict[str, str]:
        found = hub_env(self.env, hf_home=self.hf_home, endpoint=endpoint, token=token)
        return {**found, **(extra or {})}

    def write(self, *items: dict[str, Any], retries: int = 1) -> Path:
        return write_policy(
            self.policy,
            {
                "model_dir": str(self.models),
                "state_dir": str(self.state),
                "engine": {"backend": "none"},
                "required": list(items) or [required()],
                "download": {"retries": retries, "connect_timeout": "5s", "read_timeout": "10s"},
            },
        )

    def apply(
        self,
        hub: FakeHub,
        *items: dict[str, Any],
        retries: int = 1,
        token: str | None = None,
        extra: dict[str, str] | None = None,
    ) -> Result:
        self.write(*items, retries=retries)
        env = self.environment(hub.endpoint, token=token, extra=extra)
        return Result(ocrd("--config", self.policy, "apply", env=env))


@pytest.fixture
def run(env: dict[str, str], policy: Path, models: Path, state: Path, hf_home: Path) -> Runner:
    return Runner(env, policy, models, state, hf_home)


# -- what a run left ----------------------------------------------------------------------


def one(result: Result, event: str) -> dict[str, Any]:
    found = [r for r in result.logs() if r["event"] == event]
    assert len(found) == 1, f"expected one {event}, got {found}; {result!r}"
    return found[0]


def failure(result: Result, model: str = MODEL) -> str:
    """The error of the model's action.failed line (and the run did fail)."""
    found = [r for r in result.logs() if r["event"] == "action.failed" and r["model"] == model]
    assert found, f"no action.failed for {model}: {result!r}"
    assert result.code != 0, result
    error: str = found[-1]["error"]
    return error


def restored(result: Result, models: Path, data: bytes, model: str = MODEL) -> dict[str, Any]:
    """The run restored *model* with exactly *data*; its download.finished line."""
    assert result.code == 0, result
    assert (models / model).read_bytes() == data
    done = one(result, "model.restored")
    assert (done["model"], done["sha256"], done["bytes"]) == (model, sha(data), len(data))
    finished = one(result, "download.finished")
    assert (finished["sha256"], finished["bytes"]) == (sha(data), len(data))
    assert leftovers(models) == []
    return finished


def leftovers(models: Path) -> list[str]:
    """ocrd's hidden staging files in the model dir (a download or a copy in progress)."""
    return sorted(n for n in os.listdir(models) if n.startswith(".ocrd-tmp-"))


def nothing_in_place(models: Path, model: str = MODEL) -> None:
    assert not (models / model).exists(), f"{model} was put in place"
    assert leftovers(models) == []


def gets(seen: list[Seen]) -> list[Seen]:
    return [s for s in seen if s.method == "GET"]


def heads(seen: list[Seen]) -> list[Seen]:
    return [s for s in seen if s.method == "HEAD"]


# -- the fake Hub is a Hub ----------------------------------------------------------------


def test_the_fake_hub_answers_huggingface_hub_itself(
    hub: FakeHub, repo: Repo, tmp_path: Path
) -> None:
    """Calibration: huggingface_hub's own client reads the fake as it reads the Hub, so
    what ocrd is tested against is what the library ocrd builds on expects."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    meta = get_hf_file_metadata(hf_hub_url(repo.repo_id, FILE, endpoint=hub.endpoint), token=False)
    assert meta.commit_hash == repo.refs["main"]
    assert (meta.etag, meta.size) == (sha(DATA), len(DATA))
    assert meta.location.startswith(hub.cdn_base)  # the CDN: another host and port
    small = get_hf_file_metadata(
        hf_hub_url(repo.repo_id, "README.md", endpoint=hub.endpoint), token=False
    )
    assert small.etag == repo.blob("README.md").git_sha1
    path = hf_hub_download(
        repo.repo_id, FILE, endpoint=hub.endpoint, cache_dir=tmp_path / "c1", token=False
    )
    assert Path(path).read_bytes() == DATA

    gated = hub.repo("acme/gated", gated=True)
    gated.commit({"m.bin": DATA2})
    gated.grant(TOKEN)
    cases: list[tuple[dict[str, Any], type[Exception]]] = [
        ({"repo_id": "acme/nope", "filename": FILE}, RepositoryNotFoundError),
        ({"repo_id": repo.repo_id, "filename": FILE, "revision": "v9"}, RevisionNotFoundError),
        ({"repo_id": repo.repo_id, "filename": "en/nope.gguf"}, EntryNotFoundError),
        ({"repo_id": "acme/gated", "filename": "m.bin"}, GatedRepoError),
    ]
    for i, (kwargs, error) in enumerate(cases):
        with pytest.raises(error):
            hf_hub_download(
                **kwargs, endpoint=hub.endpoint, cache_dir=tmp_path / f"e{i}", token=False
            )
    path = hf_hub_download(
        "acme/gated", "m.bin", endpoint=hub.endpoint, cache_dir=tmp_path / "c2", token=TOKEN
    )
    assert Path(path).read_bytes() == DATA2


# -- an LFS file --------------------------------------------------------------------------


def test_an_lfs_file_comes_through_the_cdn_verified_by_the_hubs_sha256(
    hub: FakeHub, repo: Repo, run: Runner, models: Path
) -> None:
    result = run.apply(hub)

    finished = restored(result, models, DATA)
    assert finished["verified"] == "hub"  # no pin: the Hub's LFS sha256 checked the bytes
    assert finished["source"] == SOURCE
    assert one(result, "download.started")["bytes"] == len(DATA)  # X-Linked-Size
    assert (models / MODEL).stat().st_mode & 0o777 == 0o644
    # The Hub was asked first what `main` is (HEAD, not following the CDN redirect) ...
    first = hub.server.seen[0]
    assert (first.method, first.path) == ("HEAD", repo.resolve_path("main", FILE))
    assert heads(hub.cdn.seen) == []
    # ... and the bytes came from the CDN, through the Hub's redirect.
    [cdn] = gets(hub.cdn.seen)
    assert cdn.path.split("?")[0] == hub.lfs_path(sha(DATA))
    assert cdn.headers["host"].startswith("localhost:")
    assert cdn.sent == len(DATA)
    assert "Signature" not in result.out  # the CDN's signed URL is never logged


def test_the_body_is_fetched_at_the_commit_the_hub_named(
    hub: FakeHub, repo: Repo, run: Runner, models: Path
) -> None:
    commit = repo.refs["main"]
    result = run.apply(hub)

    restored(result, models, DATA)
    fetched = gets(hub.resolves(repo.repo_id, FILE))
    assert fetched, hub.server.seen
    for seen in fetched:
        assert seen.path == repo.resolve_path(commit, FILE)  # at the commit, not at `main`
        assert COMMIT.search(seen.path)
    assert one(result, "download.started")["url"].endswith(f"/resolve/{commit}/{FILE}")


def test_a_branch_that_moves_between_the_head_and_the_get_cannot_splice(
    hub: FakeHub, repo: Repo, run: Runner, models: Path
) -> None:
    """main moves to a new commit right after ocrd's HEAD resolved it (in the Hub's own
    thread, before ocrd has the answer): the body still comes from the commit ocrd saw,
    so the bytes are the version whose sha256 the Hub named."""
    old = repo.refs["main"]
    new = repo.commit({FILE: DATA2}, branch=None)
    moved: list[Resolved] = []

    def move(asked: Resolved) -> None:
        if asked.method == "HEAD" and asked.revision == "main" and not moved:
            moved.append(asked)
            repo.branch("main", new)

    hub.on_resolve = move
    result = run.apply(hub)

    restored(result, models, DATA)
    assert [m.commit for m in moved] == [old]
    assert repo.refs["main"] == new
    assert {s.path for s in gets(hub.resolves(repo.repo_id, FILE))} == {
        repo.resolve_path(old, FILE)
    }


def test_wrong_bytes_from_the_cdn_fail_the_hubs_sha256(
    hub: FakeHub, repo: Repo, run: Runner, models: Path
) -> None:
    wrong = bytearray(DATA)
    wrong[len(wrong) // 2] ^= 0xFF  # one byte flipped: the same length, other bytes
    hub.cdn.serve(hub.lfs_path(sha(DATA)), bytes(wrong))

    result = run.apply(hub)

    error = failure(result)
    assert "sha256" in error
    assert sha(DATA)[:12] in error  # what the Hub said
    assert sha(bytes(wrong))[:12] in error  # what came
    assert "Hub" in error
    nothing_in_place(models)
    assert gets(hub.cdn.seen), "the body was never fetched"
    assert [r["event"] for r in result.logs() if r["event"] == "model.restored"] == []


def test_a_pin_that_differs_from_the_hubs_sha256_names_both(
    hub: FakeHub, repo: Repo, run: Runner, models: Path
) -> None:
    pin = sha(DATA2)
    result = run.apply(hub, required(sha256=pin))

    error = failure(result)
    assert pin[:12] in error
    assert sha(DATA)[:12] in error
    assert "pin" in error and "Hub" in error
    nothing_in_place(models)
    # What the Hub said is known to be wrong before a byte comes: nothing was downloaded.
    assert hub.cdn.seen == []


def test_a_pin_that_matches_the_hub_verifies_as_the_pin(
    hub: FakeHub, repo: Repo, run: Runner, models: Path
) -> None:
    result = run.apply(hub, required(sha256=sha(DATA).upper()))
    assert restored(result, models, DATA)["verified"] == "pin"


def test_a_cdn_drop_resumes_from_the_cdn_with_a_range(
    hub: FakeHub, repo: Repo, run: Runner, models: Path
) -> None:
    hub.cdn.drop_after(hub.lfs_path(sha(DATA)), 12_345)
    result = run.apply(hub, retries=3)

    finished = restored(result, models, DATA)
    assert finished["resumed"] >= 1
    asked = gets(hub.cdn.seen)
    assert asked[0].sent == 12_345
    assert asked[-1].headers.get("range") == "bytes=12345-"
    assert asked[-1].sent == len(DATA) - 12_345
    for seen in gets(hub.resolves(repo.repo_id, FILE)):  # asked again at the commit
        assert seen.path == repo.resolve_path(repo.refs["main"], FILE)


def test_a_hub_5xx_on_the_head_is_retried(
    hub: FakeHub, repo: Repo, run: Runner, models: Path
) -> None:
    hub.server.fail(repo.resolve_path("main", FILE), 503, times=1, headers={"Retry-After": "0"})
    result = run.apply(hub, retries=2)

    restored(result, models, DATA)
    assert [s.method for s in hub.resolves(repo.repo_id, FILE)][:2] == ["HEAD", "HEAD"]


def test_the_get_after_the_head_needs_no_retry(
    hub: FakeHub, repo: Repo, run: Runner, models: Path
) -> None:
    result = run.apply(hub, retries=0)

    finished = restored(result, models, DATA)
    assert finished["retries"] == 0
    assert len(gets(hub.resolves(repo.repo_id, FILE))) == 1


def test_a_download_killed_halfway_resumes_from_the_cdn_in_the_next_run(
    hub: FakeHub, run: Runner, models: Path
) -> None:
    """SIGKILL while the CDN holds the body halfway: the partial file stays (with its
    record), and the next run asks the Hub again at the commit, whose redirect takes the
    Range to the CDN: only the rest comes, and the whole is checked against the Hub."""
    big = body("big", 3 * 1024 * 1024)
    repo = hub.repo("acme/ocr-models")
    repo.commit({FILE: big})
    release = hub.cdn.stall(hub.lfs_path(sha(big)), after=1536 * 1024)
    run.write()
    partial = models / partial_name(MODEL)
    proc = subprocess.Popen(
        [OCRD, "--config", str(run.policy), "apply"],
        env=run.environment(hub.endpoint),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(
            lambda: partial.exists() and partial.stat().st_size >= 1024 * 1024,
            timeout=30,
            what="the first MiB of the download in its hidden file",
        )
        landed = partial.stat().st_size
    finally:
        proc.kill()
        proc.wait(timeout=10)
        release.set()
    assert not (models / MODEL).exists()

    result = run.apply(hub)

    finished = restored(result, models, big)
    assert finished["verified"] == "hub"
    assert one(result, "download.resumed")["offset"] == landed
    rest = gets(hub.cdn.seen)[-1]
    assert rest.headers.get("range") == f"bytes={landed}-"
    assert rest.sent == len(big) - landed
    for seen in gets(hub.resolves(repo.repo_id, FILE)):
        assert seen.path == repo.resolve_path(repo.refs["main"], FILE)


def test_the_next_mirror_is_tried_when_the_hub_has_no_such_repo(
    hub: FakeHub, repo: Repo, run: Runner, models: Path
) -> None:
    missing = f"hf://acme/gone/{FILE}"
    result = run.apply(hub, {"name": MODEL, "sources": [missing, SOURCE]})

    restored(result, models, DATA)
    [failed] = [r for r in result.logs() if r["event"] == "download.failed"]
    assert failed["source"] == missing
    assert "no repository acme/gone" in failed["error"]
    assert "next source" in failed["next"]
    assert one(result, "model.restored")["source"] == SOURCE


# -- a file stored in git -----------------------------------------------------------------


def test_a_small_git_file_is_served_by_the_hub_itself_and_checked_by_length(
    hub: FakeHub, run: Runner, models: Path
) -> None:
    small = hub.repo("acme/tiny")
    data = b"tiny OCR charset table\n" * 40
    small.commit({"charset.tbl": data})
    result = run.apply(hub, required("hf://acme/tiny/charset.tbl", name="charset.tbl"))

    finished = restored(result, models, data, model="charset.tbl")
    assert finished["verified"] == "length"  # git's sha1 is no sha256: nothing to pin to
    assert hub.cdn.seen == []
    fetched = gets(hub.server.seen)
    assert fetched
    assert {s.path for s in fetched} == {small.resolve_path(small.refs["main"], "charset.tbl")}


# -- the token ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["private", "gated"])
def test_hf_token_goes_to_the_hub_as_bearer_but_never_to_the_cdn(
    hub: FakeHub, run: Runner, models: Path, kind: str
) -> None:
    locked = hub.repo("acme/ocr-models", private=kind == "private", gated=kind == "gated")
    locked.commit({FILE: DATA})
    locked.grant(TOKEN)

    result = run.apply(hub, token=TOKEN)

    restored(result, models, DATA)
    at_hub = hub.resolves(locked.repo_id, FILE)
    assert {s.method for s in at_hub} == {"HEAD", "GET"}
    for seen in at_hub:
        assert seen.headers.get("authorization") == f"Bearer {TOKEN}", seen
    assert hub.cdn.seen
    for seen in hub.cdn.seen:
        assert "authorization" not in seen.headers, seen
        assert TOKEN not in str(seen)
    assert TOKEN not in result.out and TOKEN not in result.err  # never logged


def test_the_token_file_of_hf_auth_login_is_used(
    hub: FakeHub, run: Runner, models: Path, hf_home: Path
) -> None:
    locked = hub.repo("acme/ocr-models", private=True)
    locked.commit({FILE: DATA})
    locked.grant(TOKEN)
    token_file(hf_home, TOKEN)

    result = run.apply(hub)  # no HF_TOKEN: the file under HF_HOME

    restored(result, models, DATA)
    assert hub.server.seen[0].headers.get("authorization") == f"Bearer {TOKEN}"
    assert all("authorization" not in s.headers for s in hub.cdn.seen)


@pytest.mark.parametrize(
    ("token", "status"),
    [(None, "401"), ("granted elsewhere", "403"), ("unknown to the Hub", "401")],
)
def test_a_gated_repo_without_access_says_to_set_hf_token(
    hub: FakeHub, run: Runner, models: Path, token: str | None, status: str
) -> None:
    gated = hub.repo("acme/ocr-models", gated=True)
    gated.commit({FILE: DATA})
    other = hub.repo("acme/other")
    other.grant("hf_knownButNotForThisRepo")
    sent = {"granted elsewhere": "hf_knownButNotForThisRepo", "unknown to the Hub": TOKEN}.get(
        token or ""
    )

    result = run.apply(hub, token=sent)

    error = failure(result)
    assert "HF_TOKEN" in error
    assert status in error
    assert "acme/ocr-models" in error
    nothing_in_place(models)
    assert hub.cdn.seen == []
    assert len(hub.server.seen) == 1  # a refusal is not retried


def test_a_private_repo_without_a_token_says_to_set_hf_token(
    hub: FakeHub, run: Runner, models: Path
) -> None:
    hub.repo("acme/ocr-models", private=True).commit({FILE: DATA})
    result = run.apply(hub)
    error = failure(result)
    assert "HF_TOKEN" in error
    assert "401" in error
    nothing_in_place(models)


# -- what is not there --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "code", "pattern"),
    [
        ("hf://acme/nope/en/en.gguf", "RepoNotFound", r"no repository acme/nope on the Hub"),
        (
            "hf://acme/ocr-models@v9/en/en.gguf",
            "RevisionNotFound",
            r"acme/ocr-models has no revision 'v9'",
        ),
        (
            "hf://acme/ocr-models@main/en/fr.gguf",
            "EntryNotFound",
            r"acme/ocr-models@main/en/fr\.gguf is not on the Hub \(HTTP 404\)",
        ),
        (
            "hf://acme/ocr-models/en/fr.gguf",
            "EntryNotFound",
            r"acme/ocr-models@main/en/fr\.gguf is not on the Hub",
        ),
    ],
)
def test_what_the_hub_does_not_have_is_named(
    hub: FakeHub, repo: Repo, run: Runner, models: Path, source: str, code: str, pattern: str
) -> None:
    result = run.apply(hub, required(source))

    error = failure(result)
    assert re.search(pattern, error), error
    nothing_in_place(models)
    [asked] = hub.server.seen  # one HEAD: a 404 is not retried
    assert asked.method == "HEAD"
    assert hub.cdn.seen == []
    assert [r for r in result.logs() if r["event"] == "download.started"] == []
    assert code  # the fake's X-Error-Code for this case (see tests/support/hub.py)


# -- where the Hub is ---------------------------------------------------------------------


@pytest.mark.parametrize("form", ["plain", "trailing slash", "path prefix"])
def test_hf_endpoint_is_honoured_and_nothing_goes_elsewhere(
    run: Runner, models: Path, form: str
) -> None:
    """Every proxy variable points at a trap that records what it is asked; only the fake
    Hub's hosts bypass it. The model lands, the fake Hub saw the requests, the trap
    nothing: no request went to huggingface.co or anywhere else."""
    with (
        FakeHub(prefix="/api/models/hf" if form == "path prefix" else "") as hub,
        ProxyTrap() as trap,
    ):
        repo = hub.repo("acme/ocr-models")
        repo.commit({FILE: DATA})
        run.write()
        endpoint = hub.endpoint + ("/" if form == "trailing slash" else "")
        env = run.environment(endpoint, extra=trap.env())
        result = Result(ocrd("--config", run.policy, "apply", env=env))

        restored(result, models, DATA)
        asked = hub.resolves(repo.repo_id, FILE)
        assert [s.method for s in asked][:2] == ["HEAD", "GET"]
        assert asked[0].path == repo.resolve_path("main", FILE)
        assert asked[0].path.startswith(hub.prefix + "/acme/ocr-models/resolve/")
        assert gets(hub.cdn.seen)
        assert trap.asked == []


def test_without_hf_endpoint_the_trap_sees_huggingface_co(run: Runner, models: Path) -> None:
    """The control of the test above: the trap does catch a request that leaves."""
    with ProxyTrap() as trap:
        run.write(retries=0)
        env = run.environment("unused", extra=trap.env())
        del env["HF_ENDPOINT"]
        result = Result(ocrd("--config", run.policy, "apply", env=env))

        failure(result)
        nothing_in_place(models)
        assert trap.asked, result
        assert all(line.startswith("CONNECT huggingface.co:443 ") for line in trap.asked)


# -- repo types and revisions -------------------------------------------------------------


@pytest.mark.parametrize(("kind", "prefix"), [("dataset", "datasets"), ("space", "spaces")])
def test_a_dataset_or_space_repo_uses_its_url_prefix(
    hub: FakeHub, run: Runner, models: Path, kind: str, prefix: str
) -> None:
    # A model repo of the same name holds other bytes: the wrong URL would fetch those.
    hub.repo("acme/corpus").commit({"ocr/en.gguf": DATA2})
    typed = hub.repo("acme/corpus", repo_type=kind)
    typed.commit({"ocr/en.gguf": DATA})

    result = run.apply(hub, required(f"hf://{prefix}/acme/corpus/ocr/en.gguf"))

    restored(result, models, DATA)
    assert hub.server.seen[0].path == f"/{prefix}/acme/corpus/resolve/main/ocr/en.gguf"
    for seen in hub.server.seen:
        assert seen.path.startswith(f"/{prefix}/acme/corpus/resolve/"), seen
    assert hub.resolves("acme/corpus", "ocr/en.gguf") == []  # the model repo: never asked


def test_a_revision_with_a_slash_is_sent_encoded(
    hub: FakeHub, repo: Repo, run: Runner, models: Path
) -> None:
    pr = repo.commit({FILE: DATA2}, branch="refs/pr/1")
    result = run.apply(hub, required(f"hf://acme/ocr-models@refs%2Fpr%2F1/{FILE}"))

    restored(result, models, DATA2)
    assert hub.server.seen[0].path == f"/acme/ocr-models/resolve/refs%2Fpr%2F1/{FILE}"
    assert {s.path for s in gets(hub.resolves(repo.repo_id, FILE))} == {repo.resolve_path(pr, FILE)}


@pytest.mark.parametrize("revision", ["tag", "commit", "default branch"])
def test_a_tag_a_commit_or_the_default_branch(
    hub: FakeHub, repo: Repo, run: Runner, models: Path, revision: str
) -> None:
    first = repo.refs["main"]
    repo.tag("v1.0", first)
    repo.commit({FILE: DATA2})  # main moves on
    source = {
        "tag": f"hf://acme/ocr-models@v1.0/{FILE}",
        "commit": f"hf://acme/ocr-models@{first}/{FILE}",
        "default branch": f"hf://acme/ocr-models/{FILE}",
    }[revision]

    result = run.apply(hub, required(source))

    restored(result, models, DATA2 if revision == "default branch" else DATA)
    asked = {"tag": "v1.0", "commit": first, "default branch": "main"}[revision]
    assert hub.server.seen[0].path == repo.resolve_path(asked, FILE)


def test_a_renamed_repo_is_followed_on_the_hub(
    hub: FakeHub, repo: Repo, run: Runner, models: Path
) -> None:
    hub.rename(repo, "acme/ocr-models-v2")
    result = run.apply(hub)  # the policy still names acme/ocr-models

    restored(result, models, DATA)
    paths = [s.path for s in hub.server.seen]
    assert paths[0] == f"/acme/ocr-models/resolve/main/{FILE}"  # answered 307
    assert paths[1] == f"/acme/ocr-models-v2/resolve/main/{FILE}"


# -- how it lands -------------------------------------------------------------------------


def test_the_download_lands_under_its_hidden_name_and_is_linked_into_place(
    hub: FakeHub, repo: Repo, run: Runner, models: Path, tmp_path: Path
) -> None:
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed")
    run.write()
    trace = tmp_path / "trace"
    env = run.environment(hub.endpoint)
    proc = subprocess.run(
        [
            strace,
            "-f",
            "-qq",
            "-o",
            str(trace),
            "-e",
            "trace=openat,link,linkat,rename,renameat,renameat2",
            OCRD,
            "--config",
            str(run.policy),
            "apply",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    result = Result(proc)

    restored(result, models, DATA)
    hidden = partial_name(MODEL)
    assert hidden.startswith(".ocrd-tmp-dl-")
    calls = trace.read_text()
    created = re.search(rf'openat\([^\n]*"{re.escape(hidden)}", [^\n]*O_CREAT[^\n]*= \d+', calls)
    assert created, f"no openat(O_CREAT) of {hidden} in the trace"
    # Linked into place through the descriptor it was verified by: the hidden name's
    # last read-only open, then linkat("/proc/self/fd/N", …, MODEL, AT_SYMLINK_FOLLOW).
    opened = re.findall(rf'openat\([^\n]*"{re.escape(hidden)}", O_RDONLY[^\n]*= (\d+)', calls)
    assert opened, f"{hidden} was never opened to be put in place"
    placed = re.search(
        rf'linkat\([^\n]*"/proc/self/fd/{opened[-1]}"[^\n]*"{re.escape(MODEL)}"'
        r"[^\n]*AT_SYMLINK_FOLLOW\) = 0",
        calls,
    ) or re.search(
        rf'(link|linkat|rename|renameat|renameat2)\([^\n]*"{re.escape(hidden)}"[^\n]*'
        rf'"{re.escape(MODEL)}"[^\n]*= 0',
        calls,
    )
    assert placed, f"{hidden} was not linked or renamed to {MODEL}:\n" + "\n".join(
        line for line in calls.splitlines() if "ocrd-tmp" in line or "link" in line
    )
    assert not (models / hidden).exists()
