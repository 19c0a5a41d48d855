"""Crash consistency of the real `ocrd apply` and `ocrd run` under SIGKILL (DESIGN §4).

Every test builds the same kind of model dir (required models that are fine, missing
or corrupt; prunable files, an empty file, a directory tree and a symlink; whitelisted,
ignored and unmanaged entries; expired and fresh quarantine items, legacy v1 items and a
v2 batch), records the bytes of every model, kills ocrd with SIGKILL somewhere, audits
what the kill left, restarts ocrd, and audits again that the restart converged without
losing a byte:

- strace kills: `strace -e inject=SYSCALL:signal=KILL:when=N` for every N of every
  syscall that renames, unlinks, links, creates directories, syncs or writes, until a run
  with that N completes unkilled (strace counts N per syscall, so each one is walked).
- random kills: SIGKILL after a seeded random delay, from the start of the process or
  from its first log line (the instant before the actions start), for `apply` and `run`.
- bursts: new prunable files arrive at a running daemon, which is killed meanwhile.
- restarts: a seeded share of the restarts is itself killed at a seeded syscall, so
  recovery is crashed too before a final, clean restart.

`OCRD_CRASH_SEED` picks the seed (a fixed one by default). `OCRD_SOAK=1` is the long
mode, without a time limit: every write of `apply` and every syscall of the daemon is
walked too, and 2000 random kill points are added.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ocrd.observe.hashing import BLOCK  # the copy chunk: a bigger source takes several writes
from tests.support.cli import OCRD
from tests.support.daemon import Daemon, Daemons, daemon_env
from tests.support.trash import trash_batch, trash_item, write_tree

STRACE = shutil.which("strace")
pytestmark = pytest.mark.skipif(STRACE is None, reason="strace is not installed")

SEED = int(os.environ.get("OCRD_CRASH_SEED", "20251126"))
SOAK = os.environ.get("OCRD_SOAK") == "1"
WORKERS = 2  # the machine has two cores; each ocrd start is CPU-bound
MODES = ("quarantine", "delete")

# Every syscall by which ocrd changes the model dir (or writes what it later trusts).
# Everything in the model dir is relative to its descriptor: renames (renameat),
# unlinks and rmdirs (unlinkat), a restore's link (linkat), the quarantine's
# directories (mkdirat); the state dir's files are replaced by path (rename).
WALKED = ("rename", "renameat", "unlink", "unlinkat", "linkat", "rmdir", "mkdirat", "fsync")
# Variants ocrd does not call on these paths: one run proves none is (or walks them).
UNUSED = ("renameat2", "link", "mkdir", "fdatasync")
# Most writes are log lines; the CI walk takes the writes to files (fd > 2), the soak all.
SYSCALLS = (*WALKED, *UNUSED, "write")
MAX_N = 300  # a walk still killed at this N means the run never completes
# (syscall, highest N) a restart may be killed at: recovery removes, then the actions run.
RESTART_KILLS = (
    ("unlinkat", 8),
    ("renameat", 8),
    ("rename", 4),
    ("linkat", 2),
    ("mkdirat", 4),
    ("fsync", 12),
)
RESTART_KILL_SHARE = 0.35

APPLY_RANDOM = 1000 if SOAK else 30
STDOUT_SLACK = 3  # writes to stdout a run may make beyond the traced run's
DAEMON_STRACE = 16  # seeded (syscall, N) points of the first cycle; the soak walks them all
DAEMON_RANDOM = 500 if SOAK else 15
DAEMON_BURSTS = 500 if SOAK else 12
DEBOUNCE = 0.1
LONG = 0 if SOAK else 600  # pytest-timeout seconds (0: none) for the long tests

TRASH = ".ocrd-trash"
RECORD = ".ocrd-record.json"  # a batch's record: every model one cycle may move in (v2)
LEGACY_RECORD = "record.json"  # a v1 item's record: its one model
LOCK = ".ocrd-lock"
TMP_PREFIX = ".ocrd-tmp-"
DELETING_PREFIX = ".ocrd-deleting-"

Fingerprint = tuple[Any, ...]


# --------------------------------------------------------------------------- the audit


def fingerprint(path: Path) -> Fingerprint:
    """What is at *path* (never following a symlink): kind plus sha256 of every byte."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return ("link", os.readlink(path))
    if stat.S_ISREG(st.st_mode):
        return ("file", hashlib.sha256(path.read_bytes()).hexdigest())
    if stat.S_ISDIR(st.st_mode):
        return ("dir", tuple(sorted((c, fingerprint(path / c)) for c in os.listdir(path))))
    return ("other", stat.S_IFMT(st.st_mode))


def fp_bytes(data: bytes) -> Fingerprint:
    return ("file", hashlib.sha256(data).hexdigest())


@dataclass(frozen=True, slots=True)
class Model:
    """One model's known-good versions and where it may (and must) end up."""

    name: str
    orig: Fingerprint | None  # its bytes before the run (None: it was absent)
    real: frozenset[Fingerprint]  # what may ever be under its real name
    trash: frozenset[Fingerprint]  # what may ever be its payload in .ocrd-trash
    must_keep: bool  # its original bytes must survive (in place or quarantined)
    final_real: Fingerprint | None  # under its real name once converged (None: absent)
    final_trash: int  # quarantine items holding its original bytes once converged


@dataclass(frozen=True, slots=True)
class Scenario:
    """A model dir to copy for each run, the policy's invariant parts and the manifest."""

    mode: str
    template: Path  # a complete model dir, copied for every run
    sources: dict[str, bytes]  # restore sources by model name
    source_dir: Path
    outside: Path  # a symlink target outside the model dir: never touched
    outside_fp: Fingerprint
    pins: dict[str, str]
    manifest: dict[str, Model]


def audit(job: Job, *, converged: bool, where: str) -> None:
    """Fail unless every model is intact in place, quarantined, or an intended removal."""
    sc, root = job.scenario, job.root
    manifest = job.manifest
    problems: list[str] = []
    trash = root / TRASH

    # Top level: only models (each a known-good version), ocrd's own names, and leftovers
    # only between a kill and the next start.
    real: dict[str, Fingerprint] = {}
    for name in sorted(os.listdir(root)):
        path = root / name
        if name in (TRASH, LOCK):
            continue
        if name.startswith(TMP_PREFIX):
            if converged:
                problems.append(f"leftover {name} survived the restart")
            elif not path.is_file() or path.is_symlink():
                problems.append(f"{name} is not a plain file")
            elif not any(s.startswith(path.read_bytes()) for s in sc.sources.values()):
                problems.append(f"{name} is not a (partial) copy of a restore source")
            continue
        if name.startswith(DELETING_PREFIX):
            # A delete's target out of its name (two-phase), or a tree being removed.
            if converged:
                problems.append(f"leftover {name} survived the restart")
            elif not stat.S_ISDIR(os.lstat(path).st_mode) and not any(
                fingerprint(path) in (model.orig, *model.trash) for model in manifest.values()
            ):
                problems.append(f"{name} is not a known version of a model being deleted")
            continue
        model = manifest.get(name)
        if model is None:
            problems.append(f"unexpected entry {name!r} in the model dir")
            continue
        real[name] = fingerprint(path)
        if real[name] not in model.real:
            problems.append(f"{name}: partial or unknown content under its real name")

    # Quarantine: one dir per batch (v2) or per legacy item (v1). Every payload in it must
    # be listed in its readable record (written durably before anything moves in) and be a
    # known-good version of that model. A dir without payloads is left only by a kill (the
    # record was written but nothing moved, or its last model was restored or purged).
    payloads: dict[str, list[Fingerprint]] = collections.defaultdict(list)
    if trash.is_symlink() or (trash.exists() and not trash.is_dir()):
        problems.append(f"{TRASH} is not a directory")
    elif trash.is_dir():
        for batch_id in sorted(os.listdir(trash)):
            batch = trash / batch_id
            label = f"{TRASH}/{batch_id}"
            if batch_id.startswith("."):
                problems.append(f"hidden entry {label} in the quarantine")
                continue
            if batch.is_symlink() or not batch.is_dir():
                problems.append(f"{label} is not a directory")
                continue
            contents = set(os.listdir(batch))
            record_file, listed = _read_record(batch, contents, label, problems)
            own = {RECORD + ".tmp", LEGACY_RECORD + ".tmp"}
            payload = contents - own - {record_file or RECORD}
            if converged and not (record_file and payload and contents == payload | {record_file}):
                problems.append(f"{label} is not exactly a record and its models: {contents}")
            if not payload:
                continue
            if listed is None or not payload <= listed:
                problems.append(f"{label} holds {payload} but its record lists {listed!r}")
                continue
            for name in sorted(payload):
                model = manifest.get(name)
                found = fingerprint(batch / name)
                if model is None or found not in model.trash:
                    problems.append(f"{label}/{name}: not a known-good version of that model")
                payloads[name].append(found)

    # Conservation: nothing lost, nothing duplicated, everything where it belongs at the end.
    for name, model in manifest.items():
        copies = (real.get(name) == model.orig) + payloads[name].count(model.orig)
        if model.orig is not None and model.must_keep and copies != 1:
            problems.append(f"{name}: {copies} copies of its original bytes, expected 1")
        elif model.orig is not None and copies > 1:
            problems.append(f"{name}: its original bytes are in {copies} places")
        if converged:
            if real.get(name) != model.final_real:
                state = "absent" if name not in real else "a different version"
                problems.append(f"{name}: {state} under its real name after converging")
            if len(payloads[name]) != model.final_trash:
                problems.append(
                    f"{name}: {len(payloads[name])} quarantine items after converging, "
                    f"expected {model.final_trash}"
                )

    if fingerprint(sc.outside) != sc.outside_fp:
        problems.append("the symlink target outside the model dir was changed")
    for name, data in sc.sources.items():
        if fingerprint(sc.source_dir / name) != fp_bytes(data):
            problems.append(f"restore source {name} was changed")

    if problems:
        phase = "after converging" if converged else "right after the kill"
        raise AssertionError(f"{where}, {phase}:\n  " + "\n  ".join(problems))


def _read_record(
    batch: Path, contents: set[str], label: str, problems: list[str]
) -> tuple[str | None, set[str] | None]:
    """A quarantine dir's record file (None: none) and the names it lists (None: unreadable)."""
    if RECORD in contents:
        record_file = RECORD
    elif LEGACY_RECORD in contents:
        record_file = LEGACY_RECORD
    else:
        return None, None
    try:
        record = json.loads((batch / record_file).read_text(encoding="utf-8"))
        if record_file == LEGACY_RECORD:
            return record_file, {record["name"]}
        if record["version"] != 2 or not isinstance(record["trashed_at"], (int, float)):
            raise ValueError(f"not a v2 record: {record}")
        names = [item["name"] for item in record["items"]]
        if len(set(names)) != len(names):
            raise ValueError(f"a name listed twice: {names}")
        return record_file, set(names)
    except (ValueError, KeyError, TypeError) as exc:
        problems.append(f"{label}/{record_file} is unreadable: {exc!r}")
        return record_file, None


# --------------------------------------------------------------------------- the scenario


def build_scenario(base: Path, mode: str, rng: random.Random) -> Scenario:
    """The model dir every run starts from, with *mode* as prune.action."""

    def blob(low: int, high: int) -> bytes:
        return rng.randbytes(rng.randint(low, high))

    base.mkdir(parents=True)
    root, src = base / "template", base / "source"
    root.mkdir()
    src.mkdir()
    outside = base / "outside.bin"
    outside.write_bytes(blob(100, 2000))

    req_ok, corrupt = blob(20_000, 80_000), blob(1000, 30_000)
    # More than one copy chunk, so a kill can land between two writes of the .ocrd-tmp file.
    sources = {"req_missing.bin": rng.randbytes(BLOCK + rng.randint(1, 50_000)),
               "req_bad.bin": blob(30_000, 90_000)}  # fmt: skip
    for name, data in sources.items():
        (src / name).write_bytes(data)
    (root / "req_ok.bin").write_bytes(req_ok)
    (root / "req_bad.bin").write_bytes(corrupt)
    pins = {
        "req_ok.bin": hashlib.sha256(req_ok).hexdigest(),
        **{name: hashlib.sha256(data).hexdigest() for name, data in sources.items()},
    }

    kept: dict[str, Any] = {
        "keep.gguf": blob(0, 5000),  # whitelisted
        "custom_dir": {"a.bin": blob(1, 3000), "deep/b.bin": blob(1, 3000), "empty": None},
        "model.part": blob(1, 3000),  # ignored
    }
    pruned: dict[str, Any] = {
        "old_a.bin": blob(100_000, 400_000),
        "old_b.bin": blob(1, 20_000),  # a quarantine moves several models into one batch
        "old_empty.bin": b"",
        "old_dir2": {"m.bin": blob(1, 5000), "n/o.bin": blob(1, 5000)},
        "tmp_download.bin": blob(1, 20_000),
        "old_dir": {
            "x.bin": blob(1, 20_000),
            "sub/y.bin": blob(1, 20_000),
            "sub/deeper/z.bin": blob(0, 100),
            "sub/empty": None,
        },
    }
    unmanaged = {"notes.txt": blob(10, 300)}
    for name, data in {**kept, **pruned, **unmanaged}.items():
        if isinstance(data, bytes):
            (root / name).write_bytes(data)
        else:
            write_tree(root / name, data)
    (root / "old_link").symlink_to(outside)
    # Expired: a legacy item and a batch of two (whose record also lists a model that never
    # moved in), both purged; recent: a legacy item, kept.
    expired_file = trash_item(root, "20200101T000000Z-expired1", "old_gone.bin",
                              blob(1, 5000), trashed_at=0.0) / "old_gone.bin"  # fmt: skip
    gone_dir = {"p.bin": blob(1, 5000), "q/r.bin": blob(1, 5000)}
    expired_models = {"old_gone_dir": gone_dir, "old_gone_too.bin": blob(1, 5000)}
    expired = trash_batch(root, "20200101T000000Z-expired2", expired_models, trashed_at=1.0,
                          never_moved=("old_never_moved.bin",))  # fmt: skip
    expired_batch = [expired / name for name in expired_models]
    recent = trash_item(root, "20991231T000000Z-recent", "old_recent.bin", blob(1, 5000),
                        trashed_at=time.time() - 3600) / "old_recent.bin"  # fmt: skip

    manifest: dict[str, Model] = {}

    def add(name: str, orig: Fingerprint | None, **kw: Any) -> None:
        fields = {"real": frozenset({orig}), "trash": frozenset(), "must_keep": True,
                  "final_real": orig, "final_trash": 0, **kw}  # fmt: skip
        manifest[name] = Model(name=name, orig=orig, **fields)

    def add_pruned(name: str) -> None:
        orig = fingerprint(root / name)
        if mode == "quarantine":
            add(name, orig, trash=frozenset({orig}), final_real=None, final_trash=1)
        else:
            add(name, orig, must_keep=False, final_real=None)

    add("req_ok.bin", fp_bytes(req_ok))
    good_missing = fp_bytes(sources["req_missing.bin"])
    add("req_missing.bin", None, real=frozenset({good_missing}), must_keep=False,
        final_real=good_missing)  # fmt: skip
    good_bad = fp_bytes(sources["req_bad.bin"])
    add("req_bad.bin", fp_bytes(corrupt), real=frozenset({fp_bytes(corrupt), good_bad}),
        trash=frozenset({fp_bytes(corrupt)}), final_real=good_bad, final_trash=1)  # fmt: skip
    for name in kept:
        add(name, fingerprint(root / name))
    for name in [*pruned, "old_link"]:
        add_pruned(name)
    if mode == "quarantine":  # unmanaged: report
        add("notes.txt", fingerprint(root / "notes.txt"))
    else:  # unmanaged: prune
        add_pruned("notes.txt")
    for path in (expired_file, *expired_batch):  # purged: may only vanish
        orig = fingerprint(path)
        add(path.name, orig, real=frozenset(), trash=frozenset({orig}), must_keep=False,
            final_real=None)  # fmt: skip
    orig = fingerprint(recent)  # not due: stays quarantined
    add(recent.name, orig, real=frozenset(), trash=frozenset({orig}), final_real=None,
        final_trash=1)  # fmt: skip
    return Scenario(mode, root, sources, src, outside, fingerprint(outside), pins, manifest)


def policy_for(sc: Scenario, root: Path, state: Path) -> dict[str, Any]:
    return {
        "model_dir": str(root),
        "state_dir": str(state),
        "required": [
            {"name": "req_ok.bin", "sha256": sc.pins["req_ok.bin"]},
            *(
                {"name": name, "sha256": sc.pins[name], "source": str(sc.source_dir / name)}
                for name in sc.sources
            ),
        ],
        "whitelist": ["*.gguf", "custom_*"],
        "prune": {
            "prefixes": ["old_", "tmp_"],
            "min_age": "0s",
            "action": sc.mode,
            "max_per_cycle": 10_000,
            "max_fraction": 1.0,
        },
        "unmanaged": "report" if sc.mode == "quarantine" else "prune",
        "quarantine": {"retention": "7d"},
        "engine": {"backend": "none"},
        "reconcile": {"debounce": f"{round(DEBOUNCE * 1000)}ms", "resync": "1h"},
    }


@dataclass(slots=True)
class Job:
    """One run's own copy of a scenario."""

    scenario: Scenario
    dir: Path
    root: Path
    policy: Path
    manifest: dict[str, Model]


class Harness:
    """Runs the real `ocrd` on fresh copies of the scenarios and counts the kills."""

    def __init__(self, base: Path, env: dict[str, str]) -> None:
        rng = random.Random(f"{SEED}:scenario")
        self.scenarios = {mode: build_scenario(base / f"scenario-{mode}", mode, rng)
                          for mode in MODES}  # fmt: skip
        self.base = base / "runs"
        self.base.mkdir()
        self.env = daemon_env(env, runtime=None)
        self.env |= {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}
        self.kills: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._jobs = 0
        self.abort = threading.Event()  # set when one parallel job failed: the rest stop
        self.daemons = Daemons(self.env)  # every `ocrd` started in the background

    def count(self, kind: str) -> None:
        with self._lock:
            self.kills[kind] += 1

    def job(self, mode: str) -> Job:
        if self.abort.is_set():
            raise RuntimeError("stopped: another kill point failed")
        with self._lock:
            self._jobs += 1
            number = self._jobs
        sc = self.scenarios[mode]
        job_dir = self.base / f"{number:05d}-{mode}"
        root, state = job_dir / "models", job_dir / "state"
        shutil.copytree(sc.template, root, symlinks=True)
        state.mkdir()
        policy = job_dir / "policy.json"
        policy.write_text(json.dumps(policy_for(sc, root, state)), encoding="utf-8")
        return Job(sc, job_dir, root, policy, dict(sc.manifest))

    def done(self, job: Job) -> None:
        shutil.rmtree(job.dir)

    def live(self, job: Job, *args: str, prefix: tuple[str, ...] = ()) -> Daemon:
        """Start `ocrd ARGS` on *job* in the background, reading its log as it comes."""
        return self.daemons.launch(job.policy, *args, wrapper=prefix, stderr=job.dir / "stderr")

    def close(self) -> None:
        self.daemons.close()

    def run(self, job: Job, *args: str, prefix: tuple[str, ...] = ()) -> Ran:
        proc = subprocess.run(
            [*prefix, OCRD, "--config", str(job.policy), *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=120,
            check=False,
        )
        return Ran(proc.returncode, proc.stdout, proc.stderr)

    def converge(self, job: Job, where: str, rng: random.Random) -> None:
        """Restart (sometimes killing the restart too), then prove the dir converged."""
        if rng.random() < RESTART_KILL_SHARE:
            syscall, high = rng.choice(RESTART_KILLS)
            n = rng.randint(1, high)
            first = self.run(job, "apply", prefix=strace_kill(syscall, n))
            if first.killed:
                self.count(f"restart-strace/{syscall}")
                where = f"{where}, then its restart killed at {syscall} #{n}"
                audit(job, converged=False, where=where)
            else:
                assert first.code == 0, f"{where}: the restart failed: {first}"
        again = self.run(job, "apply")
        assert again.code == 0, f"{where}: `ocrd apply` after the kill failed: {again}"
        audit(job, converged=True, where=where)
        plan = self.run(job, "plan", "--exit-code")
        assert plan.code == 0, f"{where}: changes still pending after the restart: {plan}"


@dataclass(frozen=True, slots=True)
class Ran:
    code: int
    out: str
    err: str

    @property
    def killed(self) -> bool:
        return self.code in (-signal.SIGKILL, 128 + signal.SIGKILL)

    def __str__(self) -> str:
        return f"rc={self.code}\nstdout:\n{self.out[-3000:]}\nstderr:\n{self.err[-3000:]}"


def strace_kill(syscall: str, n: int) -> tuple[str, ...]:
    """A prefix running the command under strace, SIGKILLed at its *n*-th *syscall*.

    *syscall* may be a comma-separated set; strace counts each of them on its own.
    """
    assert STRACE is not None
    return (STRACE, "-f", "-qq", "-o", "/dev/null", "-e", f"trace={syscall}",
            "-e", f"inject={syscall}:signal=KILL:when={n}")  # fmt: skip


def strace_log(path: Path, syscalls: tuple[str, ...]) -> tuple[str, ...]:
    """A prefix tracing *syscalls* into *path* (no fault injected)."""
    assert STRACE is not None
    return (STRACE, "-f", "-qq", "-o", str(path), "-e", f"trace={','.join(syscalls)}")


def traced_calls(path: Path, pid: int | None = None) -> list[tuple[str, str]]:
    """(syscall, arguments) in the order strace logged them (of thread *pid* only, if set)."""
    calls = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        tid, _, rest = line.partition(" ")
        name, paren, args = rest.strip().partition("(")
        if paren and name.isidentifier() and (pid is None or int(tid) == pid):
            calls.append((name, args))
    return calls


# --------------------------------------------------------------------------- fixtures

_TESTS = (
    "test_apply_killed_at_every_syscall",
    "test_apply_killed_at_random_instants",
    "test_daemon_killed_at_syscalls_of_its_first_cycle",
    "test_daemon_killed_at_random_instants",
    "test_daemon_killed_while_new_models_arrive",
)
_MODULE_KILLS: dict[str, collections.Counter[str]] = {}


@pytest.fixture(scope="module", autouse=True)
def kill_summary() -> Iterator[None]:
    """Print the kill points exercised; with every test run, there must be 200 or more."""
    yield
    if not _MODULE_KILLS:
        return
    total: collections.Counter[str] = collections.Counter()
    for counts in _MODULE_KILLS.values():
        total.update(counts)
    kinds: collections.Counter[str] = collections.Counter()
    for kind, n in total.items():
        kinds[kind.split("/")[0]] += n
    print(f"\nocrd crash kill points (seed {SEED}{', soak' if SOAK else ''}): "
          f"{sum(total.values())} total; by kind {dict(sorted(kinds.items()))}; "
          f"by point {dict(sorted(total.items()))}")  # fmt: skip
    if set(_TESTS) <= set(_MODULE_KILLS):
        assert sum(total.values()) >= 200, f"only {sum(total.values())} kill points"


@pytest.fixture
def harness(
    request: pytest.FixtureRequest, tmp_path: Path, env: dict[str, str]
) -> Iterator[Harness]:
    """Fresh scenarios for one test; its kill counts go into the module summary."""
    h = Harness(tmp_path, env)
    try:
        yield h
    finally:
        h.close()
    name = request.node.originalname
    _MODULE_KILLS[name] = h.kills
    print(f"\n{name}: {sum(h.kills.values())} kill points {dict(sorted(h.kills.items()))}")


def parallel(h: Harness, jobs: list[Callable[[], None]]) -> None:
    """Run *jobs* on WORKERS threads; the first failure stops the others and fails the test."""
    with ThreadPoolExecutor(WORKERS) as pool:
        futures = [pool.submit(job) for job in jobs]
        try:
            for future in futures:
                future.result()
        except BaseException:
            h.abort.set()
            for future in futures:
                future.cancel()
            raise


def clean_run(h: Harness, mode: str) -> tuple[float, float]:
    """One unkilled `apply`: it converges; returns (whole run, first log line to exit) in s."""
    job = h.job(mode)
    live = h.live(job, "apply")
    code = live.finish()
    assert code == 0, f"a plain `ocrd apply` failed: {live}"
    audit(job, converged=True, where=f"an unkilled apply ({mode})")
    assert live.first_line_at is not None and live.ended_at is not None
    ended = live.ended_at  # not after finish(): the window is the process's own life
    h.done(job)
    return ended - live.started, ended - live.first_line_at


# --------------------------------------------------------------------------- ocrd apply


def apply_point(h: Harness, mode: str, syscall: str, n: int) -> bool:
    """`apply` under strace, killed at its *n*-th *syscall*: False when it ran to the end."""
    where = f"`ocrd apply` ({mode}) killed at {syscall} #{n} (seed {SEED})"
    job = h.job(mode)
    first = h.run(job, "apply", prefix=strace_kill(syscall, n))
    if not first.killed:
        assert first.code == 0, f"{where}: neither killed nor clean: {first}"
        audit(job, converged=True, where=f"`ocrd apply` ({mode}) unkilled at {syscall} #{n}")
        h.done(job)
        return False
    h.count(f"apply-strace/{syscall}")
    audit(job, converged=False, where=where)
    h.converge(job, where, random.Random(f"{SEED}:apply-strace:{mode}:{syscall}:{n}"))
    h.done(job)
    return True


@pytest.mark.timeout(LONG)
def test_apply_killed_at_every_syscall(harness: Harness) -> None:
    """A SIGKILL at every rename(at)/unlink(at)/linkat/rmdir/mkdirat/fsync/write of apply
    loses nothing."""
    h = harness
    calls: dict[str, int] = {}

    def walk(mode: str, syscall: str) -> None:
        # strace counts N per syscall: kill at its 1st, 2nd, ... call until a run ends unkilled.
        for n in range(1, MAX_N + 1):
            if not apply_point(h, mode, syscall, n):
                calls[f"{mode}/{syscall}"] = n - 1
                return
        pytest.fail(f"`ocrd apply` ({mode}) was still killed after {MAX_N} {syscall} calls")

    def unused(mode: str) -> None:
        if apply_point(h, mode, ",".join(UNUSED), 1):
            for syscall in UNUSED:
                walk(mode, syscall)
        else:
            calls.update({f"{mode}/{syscall}": 0 for syscall in UNUSED})

    def writes(mode: str) -> None:
        job = h.job(mode)
        trace = job.dir / "trace"
        ran = h.run(job, "apply", prefix=strace_log(trace, ("write",)))
        assert ran.code == 0, f"a traced `ocrd apply` failed: {ran}"
        audit(job, converged=True, where=f"a traced `ocrd apply` ({mode})")
        every = traced_calls(trace)
        to_files = [n for n, (_, args) in enumerate(every, 1) if int(args.split(",")[0]) > 2]
        h.done(job)
        # The hash cache, two chunks of one restore and one of the other, quarantine records.
        assert len(to_files) >= 4, f"too few writes to files traced ({mode}): {every}"
        for n in range(1, len(every) + 1) if SOAK else to_files:
            assert apply_point(h, mode, "write", n), f"write #{n} ({mode}) was not reached"
        # Log lines go out in blocks flushed by time (every 0.1 s), so a run may make a few
        # more or fewer writes to stdout than the traced one; its writes to files (walked
        # above) are the same each run.
        slack = STDOUT_SLACK + sum(1 for _, args in every if int(args.split(",")[0]) <= 2) // 4
        assert not apply_point(h, mode, "write", len(every) + slack + 1), "more writes than traced"
        calls[f"{mode}/write"] = len(every)

    # The longest walks first, so that the two workers finish together.
    tasks: list[Callable[[], None]] = []
    for syscall in ("fsync", "rename", "renameat", "unlinkat", "mkdirat"):
        tasks += [lambda m=m, s=syscall: walk(m, s) for m in MODES]
    tasks += [lambda m=m: writes(m) for m in MODES]
    for syscall in ("unlink", "rmdir", "linkat"):
        tasks += [lambda m=m, s=syscall: walk(m, s) for m in MODES]
    tasks += [lambda m=m: unused(m) for m in MODES]
    parallel(h, tasks)
    print(f"\n`ocrd apply` calls per syscall: {dict(sorted(calls.items()))}")
    for mode in MODES:
        for syscall in ("rename", "linkat", "unlinkat", "mkdirat", "fsync", "write"):
            assert calls[f"{mode}/{syscall}"] > 0, f"{mode}: no {syscall} was ever killed"
    assert calls["delete/unlinkat"] > 0, "no tree was removed with unlinkat"
    assert calls["quarantine/renameat"] > 0, "no model was moved into a quarantine batch"
    assert sum(h.kills.values()) >= 100, f"too few kill points: {h.kills}"


@pytest.mark.timeout(LONG)
def test_apply_killed_at_random_instants(harness: Harness) -> None:
    """SIGKILL at seeded random instants of `apply` (also between syscalls) loses nothing."""
    h = harness
    timing = {mode: clean_run(h, mode) for mode in MODES}

    def one(i: int) -> None:
        rng = random.Random(f"{SEED}:apply-delay:{i}")
        mode = rng.choice(MODES)
        whole, acting = timing[mode]
        job = h.job(mode)
        live = h.live(job, "apply")
        if rng.random() < 0.5:  # anywhere in the run, startup and recovery included
            delay = rng.uniform(0, whole)
            where = f"`ocrd apply` ({mode}) killed {delay * 1000:.1f} ms after its start"
        else:  # from the last log line before the actions (the plan's reports)
            live.wait_until(lambda: live.first_line_at is not None or live.ended, "a log line")
            delay = rng.uniform(0, acting)
            where = f"`ocrd apply` ({mode}) killed {delay * 1000:.1f} ms after its first log line"
        where += f" (seed {SEED}, run {i})"
        time.sleep(delay)  # an input: when the kill lands
        live.kill()
        code = live.finish()
        if code != -signal.SIGKILL:
            assert code == 0, f"{where}: neither killed nor clean: {live}"
            audit(job, converged=True, where=f"{where} (it had finished)")
            h.done(job)
            return
        h.count("apply-delay")
        audit(job, converged=False, where=where)
        h.converge(job, where, rng)
        h.done(job)

    parallel(h, [lambda i=i: one(i) for i in range(APPLY_RANDOM)])
    assert h.kills["apply-delay"] >= APPLY_RANDOM * 0.6, f"too many kills came late: {h.kills}"


# --------------------------------------------------------------------------- ocrd run


def start_daemon(h: Harness, job: Job, prefix: tuple[str, ...] = ()) -> Daemon:
    return h.live(job, "run", prefix=prefix)


def stop_daemon(live: Daemon) -> None:
    """SIGTERM ocrd itself (not a strace wrapper around it), unless it died meanwhile."""
    with contextlib.suppress(ProcessLookupError):
        live.send(signal.SIGTERM)


def daemon_point(h: Harness, mode: str, syscall: str, n: int) -> bool:
    """`run` under strace, killed at its *n*-th *syscall*: False when it ran to a clean stop."""
    where = f"`ocrd run` ({mode}) killed at {syscall} #{n} (seed {SEED})"
    job = h.job(mode)
    live = start_daemon(h, job, strace_kill(syscall, n))
    live.wait_until(lambda: live.ended or live.converged(), "the first cycle")
    if not live.ended:
        stop_daemon(live)  # its shutdown is a kill point too
    code = live.finish()
    if code != -signal.SIGKILL:
        assert code == 0, f"{where}: neither killed nor a clean stop: {live}"
        audit(job, converged=True, where=f"`ocrd run` ({mode}) unkilled at {syscall} #{n}")
        h.done(job)
        return False
    h.count(f"run-strace/{syscall}")
    audit(job, converged=False, where=where)
    h.converge(job, where, random.Random(f"{SEED}:daemon-strace:{mode}:{syscall}:{n}"))
    h.done(job)
    return True


def daemon_calls(h: Harness, mode: str) -> collections.Counter[str]:
    """How often the daemon's main thread makes each syscall until it converged and stopped."""
    job = h.job(mode)
    trace = job.dir / "trace"
    live = start_daemon(h, job, strace_log(trace, SYSCALLS))
    live.wait_until(lambda: live.ended or live.converged(), "the first cycle")
    stop_daemon(live)
    code = live.finish()
    assert code == 0, f"a traced daemon did not stop cleanly: {live}"
    audit(job, converged=True, where=f"a traced daemon ({mode})")
    pid = int(live.seen("daemon.started")[0]["pid"])
    counts = collections.Counter(name for name, _ in traced_calls(trace, pid))
    h.done(job)
    return counts


@pytest.mark.timeout(LONG)
def test_daemon_killed_at_syscalls_of_its_first_cycle(harness: Harness) -> None:
    """A SIGKILL at seeded syscalls of the daemon's start, first cycle and stop loses nothing."""
    h = harness
    calls = {mode: daemon_calls(h, mode) for mode in MODES}
    seen = {mode: dict(sorted(counts.items())) for mode, counts in calls.items()}
    print(f"\n`ocrd run` calls per syscall: {seen}")
    for mode in MODES:
        for syscall in ("rename", "linkat", "unlinkat", "mkdirat", "fsync"):
            assert calls[mode][syscall] > 0, f"the daemon ({mode}) made no {syscall}"
    if SOAK:  # every N of every syscall, until a run ends unkilled

        def walk(mode: str, syscall: str) -> None:
            for n in range(1, MAX_N + 1):
                if not daemon_point(h, mode, syscall, n):
                    return
            pytest.fail(f"`ocrd run` ({mode}) was still killed after {MAX_N} {syscall} calls")

        parallel(h, [lambda m=m, s=s: walk(m, s) for s in SYSCALLS for m in MODES])
        return
    rng = random.Random(f"{SEED}:daemon-strace")
    # Log-line writes are left to the soak: the seeded points go to the syscalls that act.
    every = [(m, s, n) for m in MODES for s, count in sorted(calls[m].items()) if s != "write"
             for n in range(1, count + 1)]  # fmt: skip
    points = rng.sample(every, DAEMON_STRACE)
    parallel(h, [lambda p=p: daemon_point(h, *p) and None for p in points])
    # The count of calls varies a little with timing (a second, idle cycle); most land.
    kills = sum(n for kind, n in h.kills.items() if kind.startswith("run-strace/"))
    assert kills >= DAEMON_STRACE * 0.75, f"too few seeded points were reached: {h.kills}"


def daemon_timing(h: Harness, mode: str) -> tuple[float, float]:
    """One unkilled daemon: (start to first converged cycle, daemon.started to it) in s."""
    job = h.job(mode)
    live = start_daemon(h, job)
    live.wait_until(lambda: live.ended or live.converged(), "the first cycle")
    converged_at = time.monotonic()
    started_at = live.first_line_at
    stop_daemon(live)
    code = live.finish()
    assert code == 0, f"an unkilled daemon did not stop cleanly: {live}"
    audit(job, converged=True, where=f"an unkilled daemon ({mode})")
    h.done(job)
    assert started_at is not None
    return converged_at - live.started, converged_at - started_at


@pytest.mark.timeout(LONG)
def test_daemon_killed_at_random_instants(harness: Harness) -> None:
    """SIGKILL at seeded random instants of the daemon's start and first cycle loses nothing."""
    h = harness
    timing = {mode: daemon_timing(h, mode) for mode in MODES}

    def one(i: int) -> None:
        rng = random.Random(f"{SEED}:daemon-delay:{i}")
        mode = rng.choice(MODES)
        whole, cycling = timing[mode]
        job = h.job(mode)
        live = start_daemon(h, job)
        if rng.random() < 0.3:
            delay = rng.uniform(0, whole)
            where = f"`ocrd run` ({mode}) killed {delay * 1000:.1f} ms after its start"
        else:
            live.wait_until(lambda: live.first_line_at is not None or live.ended, "a log line")
            delay = rng.uniform(0, cycling * 1.2)
            where = f"`ocrd run` ({mode}) killed {delay * 1000:.1f} ms after daemon.started"
        where += f" (seed {SEED}, run {i})"
        time.sleep(delay)  # an input: when the kill lands
        live.kill()
        code = live.finish()
        assert code == -signal.SIGKILL, f"{where}: the daemon had ended by itself: {live}"
        h.count("run-delay")
        audit(job, converged=False, where=where)
        h.converge(job, where, rng)
        h.done(job)

    parallel(h, [lambda i=i: one(i) for i in range(DAEMON_RANDOM)])
    assert h.kills["run-delay"] == DAEMON_RANDOM, f"kills missing: {h.kills}"


@pytest.mark.timeout(LONG)
def test_daemon_killed_while_new_models_arrive(harness: Harness) -> None:
    """A daemon killed while a burst of prunable files arrives loses none of them."""
    h = harness

    def one(i: int) -> None:
        rng = random.Random(f"{SEED}:daemon-burst:{i}")
        mode = rng.choice(MODES)
        job = h.job(mode)
        live = start_daemon(h, job)
        live.wait_until(lambda: live.ended or live.converged(), "the first cycle")
        assert not live.ended, f"the daemon ended: {live}"
        files = [(f"old_burst_{k:02d}.bin", rng.randbytes(rng.randint(0, 60_000)))
                 for k in range(rng.randint(4, 16))]  # fmt: skip
        gaps = [rng.uniform(0, 0.03) for _ in files]
        # From the first arrival until a few debounced cycles after the last one.
        delay = rng.uniform(0, sum(gaps) + 4 * DEBOUNCE + 0.2)
        where = f"`ocrd run` ({mode}) killed {delay * 1000:.1f} ms into a burst of {len(files)}"
        where += f" new files (seed {SEED}, run {i})"
        for name, data in files:
            orig = fp_bytes(data)
            if mode == "quarantine":
                model = Model(name, orig, frozenset({orig}), frozenset({orig}), True, None, 1)
            else:
                model = Model(name, orig, frozenset({orig}), frozenset(), False, None, 0)
            job.manifest[name] = model
        killer = threading.Timer(delay, live.kill)
        killer.start()
        for (name, data), gap in zip(files, gaps, strict=True):
            incoming = job.root / f".incoming-{name}"  # a dot-entry: ignored until renamed
            incoming.write_bytes(data)
            os.rename(incoming, job.root / name)
            time.sleep(gap)  # an input: the pace of arrivals
        killer.join()
        code = live.finish()
        assert code == -signal.SIGKILL, f"{where}: the daemon had ended by itself: {live}"
        h.count("run-burst")
        audit(job, converged=False, where=where)
        h.converge(job, where, rng)
        h.done(job)

    parallel(h, [lambda i=i: one(i) for i in range(DAEMON_BURSTS)])
    assert h.kills["run-burst"] == DAEMON_BURSTS, f"kills missing: {h.kills}"


def test_scenario_manifest_is_what_a_clean_apply_converges_to(harness: Harness) -> None:
    """The audit's idea of "converged" matches what an unkilled `ocrd apply` leaves."""
    for mode in MODES:
        job = harness.job(mode)
        audit(job, converged=False, where=f"the untouched scenario ({mode})")
        with pytest.raises(AssertionError, match="after converging"):
            audit(job, converged=True, where=f"the untouched scenario ({mode})")
        ran = harness.run(job, "apply")
        assert ran.code == 0, str(ran)
        audit(job, converged=True, where=f"an unkilled apply ({mode})")
        harness.done(job)
