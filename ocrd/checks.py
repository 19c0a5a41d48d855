"""`ocrd check`: findings about a loaded policy and the machine it runs on."""

from __future__ import annotations

import os
import stat

from ocrd.config import LoadedPolicy, ignored_note
from ocrd.core.names import TRASH
from ocrd.core.policy import Policy, conflicts
from ocrd.engine.auto import make_engine
from ocrd.engine.base import EngineError
from ocrd.engine.none import NoEngine
from ocrd.observe.handles import visibility

Finding = tuple[str, str]  # (ok | info | warning | error, text)


def _local_source(name: str, path: str) -> Finding | None:
    if not os.path.isfile(path):
        return (
            "warning",
            f"required {name!r}: source {path} is not a readable file; "
            "it cannot be restored from there",
        )
    if not os.access(path, os.R_OK):
        return ("warning", f"required {name!r}: source {path} is not readable by this user")
    return None


def _source_findings(policy: Policy) -> list[Finding]:
    """Local sources are looked at; remote ones only counted (`--sources` asks them)."""
    found: list[Finding] = []
    remote = 0
    for item in policy.required:
        for source in item.fetch_from():
            if source.remote:
                remote += 1
                continue
            finding = _local_source(item.name, str(source.path))
            if finding is not None:
                found.append(finding)
    if remote:
        found.append(
            (
                "info",
                f"{remote} source(s) on the network; `ocrd check --sources` asks each of "
                "them (and prints the Hub's sha256 pins)",
            )
        )
    for name in ("netrc", "ca_bundle"):
        path = getattr(policy.download, name)
        if path is not None and not os.path.isfile(path):
            found.append(("error", f"download.{name}: {path} is not a file"))
    return found


def remote_findings(policy: Policy) -> list[Finding]:
    """`ocrd check --sources`: ask every remote source whether it has the model, and
    what the Hub says its sha256 is (the pin to paste into the policy)."""
    from ocrd.core.sources import redact
    from ocrd.fetch import hub
    from ocrd.fetch.transport import FetchError, Settings, Transport, http_error

    found: list[Finding] = []
    settings = Settings.of(policy.download)
    for item in policy.required:
        for source in item.fetch_from():
            if not source.remote:
                continue
            where = f"required {item.name!r}: {source.text}"
            try:
                transport = Transport(settings)
            except FetchError as exc:
                return [*found, ("error", f"download: {exc}")]
            try:
                if source.url is not None:
                    answer = transport.open("HEAD", source.url, {"Accept-Encoding": "identity"})
                    answer.close()
                    if answer.status >= 400:
                        raise http_error(answer.status, answer.url, answer.headers)
                    size = answer.headers.get("Content-Length")
                    bytes_text = f", {size} bytes" if size else ""
                    found.append(("ok", f"{where} answers (at {redact(answer.url)}{bytes_text})"))
                    continue
                meta = hub.resolve(source, transport)
            except FetchError as exc:
                found.append(("error", f"{where}: {exc}"))
                continue
            finally:
                transport.close()
            commit = f" at commit {meta.commit}" if meta.commit else ""
            if meta.sha256 is None:
                found.append(
                    (
                        "warning" if item.sha256 is None else "ok",
                        f"{where} is on the Hub{commit}, stored in git (no LFS sha256); "
                        + (
                            "pin it with its sha256sum to have it verified"
                            if item.sha256 is None
                            else "verified against the policy's pin"
                        ),
                    )
                )
            elif item.sha256 is None:
                found.append(
                    (
                        "info",
                        f"{where} is on the Hub{commit}; its pin (verified on download "
                        f"anyway): sha256: {meta.sha256}",
                    )
                )
            elif item.sha256 == meta.sha256:
                found.append(("ok", f"{where} is on the Hub{commit}; the pin matches"))
            else:
                found.append(
                    (
                        "error",
                        f"{where}: the policy pins {item.sha256}, the Hub{commit} says "
                        f"{meta.sha256}; fix the pin or the revision",
                    )
                )
    return found


def _dir_findings(label: str, path: str, *, must_exist: bool) -> list[Finding]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if must_exist:
            return [
                ("error", f"{label} {path} does not exist; create it (mkdir -p) or fix {label}")
            ]
        parent = os.path.dirname(path.rstrip("/")) or "/"
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if os.access(parent, os.W_OK | os.X_OK):
            return [("ok", f"{label} {path} will be created on first use")]
        return [
            (
                "warning",
                f"{label} {path} does not exist and cannot be created by this user "
                "(the hash cache will not persist)",
            )
        ]
    except PermissionError:
        return [("error", f"{label} {path} cannot be inspected by this user")]
    if not stat.S_ISDIR(st.st_mode):
        return [("error", f"{label} {path} is not a directory")]
    found: list[Finding] = []
    if not os.access(path, os.R_OK | os.X_OK):
        found.append(("error", f"{label} {path} is not readable by this user"))
    if not os.access(path, os.W_OK):
        level = "error" if must_exist else "warning"
        found.append(
            (
                level,
                f"{label} {path} is not writable by this user; nothing can be pruned or restored"
                if must_exist
                else f"{label} {path} is not writable; the hash cache will not persist",
            )
        )
    if not found:
        found.append(("ok", f"{label} {path} exists and is writable"))
    return found


def _engine_findings(policy: Policy) -> list[Finding]:
    """Create the engine, and for a real one start its host once and ask where it looks."""
    try:
        engine, fallback = make_engine(policy)
    except EngineError as exc:
        return [("error", str(exc))]
    if fallback:
        return [("warning", fallback)]
    if isinstance(engine, NoEngine):
        return [("ok", "engine backend 'none' loads")]
    if not policy.model_dir.is_dir():
        return [("warning", "engine not started: model_dir does not exist")]
    try:
        engine.open(policy.model_dir)
        where = engine.local_path()
        seen = engine.list_local()
    except EngineError as exc:
        return [("error", f"engine backend {engine.name!r} does not start: {exc}")]
    finally:
        try:
            engine.release()
        except EngineError as exc:
            return [("error", f"engine backend {engine.name!r} could not be released: {exc}")]
    return [
        (
            "ok",
            f"engine backend {engine.name!r} starts; it looks for models in {where} "
            f"and lists {len(seen)} of them",
        )
    ]


def run_checks(loaded: LoadedPolicy) -> list[Finding]:
    policy = loaded.policy
    root = str(policy.model_dir)
    found: list[Finding] = [("ok", f"policy {loaded.path} is valid")]
    found += [("warning", text) for text in loaded.warnings]
    found += [("info", ignored_note(name)) for name in loaded.ignored_env]
    found += _dir_findings("model_dir", root, must_exist=True)
    trash = os.path.join(root, TRASH)
    if os.path.islink(trash) or (os.path.lexists(trash) and not os.path.isdir(trash)):
        found.append(
            (
                "error",
                f"{trash} is not a plain directory; ocrd refuses to "
                "quarantine into it. Move it away.",
            )
        )
    assert policy.state_dir is not None
    found += _dir_findings("state_dir", str(policy.state_dir), must_exist=False)
    found += [("warning", text) for text in conflicts(policy)]
    found += _source_findings(policy)
    found += _engine_findings(policy)
    inspected, total = visibility()
    if inspected < total:
        found.append(
            (
                "warning",
                f"the handle check can inspect {inspected} of "
                f"{total} processes; models open in the others are not "
                "seen. Run ocrd as the OCR workers' user, or grant it "
                "CAP_SYS_PTRACE.",
            )
        )
    else:
        found.append(("ok", f"the handle check can inspect all {total} processes"))
    if policy.suspend:
        found.append(("warning", "suspend: true; nothing will be changed on disk"))
    return found
