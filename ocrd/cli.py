"""`ocrd` command line: subcommands -> exit codes (0 ok, 1 problems, 2 usage/policy, 3 pending)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import click

from ocrd import __version__
from ocrd.core.errors import EXIT_OK, EXIT_PENDING, EXIT_PROBLEMS, EXIT_USAGE, OcrdError

PROGRESS_MIN_BYTES = 256 * 1024 * 1024


def _fail(exc: OcrdError) -> NoReturn:
    for line in str(exc).splitlines() or [type(exc).__name__]:
        click.echo(f"ocrd: error: {line}", err=True)
    sys.exit(exc.exit_code)


class _Context:
    def __init__(self, config: str | None) -> None:
        self.config = config

    def load(self, *, log_stream: Any = None) -> Any:
        """Load the policy and configure logging; errors end the command with exit 2."""
        from ocrd import log
        from ocrd.config import load_policy, policy_path

        loaded = load_policy(policy_path(self.config))
        policy = loaded.policy
        log.configure(
            fmt=policy.log.format, level=policy.log.level, stream=log_stream or sys.stderr
        )
        return loaded


def _progress() -> Any:
    """A stderr progress line while hashing, copying or downloading big files, on a
    terminal only."""
    if not sys.stderr.isatty():
        return None
    last = [0.0]

    def show(name: str, done: int, total: int) -> None:
        # A restore says what it does ("downloading NAME"); the hasher passes the name.
        what = name if name.startswith(("downloading ", "copying ")) else f"hashing {name}"
        if max(total, done) < PROGRESS_MIN_BYTES:
            return
        now = time.monotonic()
        if (done < total or not total) and now - last[0] < 0.2:
            return
        last[0] = now
        if not total:  # a length the server did not say
            sys.stderr.write(f"\r{what}: {done / 2**20:.0f} MiB")
        else:
            pct = 100 * done // max(total, 1)
            end = "\n" if done >= total else ""
            sys.stderr.write(f"\r{what}: {pct:3d}% of {total / 2**30:.1f} GiB{end}")
        sys.stderr.flush()

    return show


def _run(fn: Any) -> Any:
    """Turn OcrdError into its one-line message and exit code; OCRD_DEBUG=1 keeps tracebacks."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except OcrdError as exc:
            if os.environ.get("OCRD_DEBUG") == "1":
                raise
            _fail(exc)

    return wrapper


def _set_config(ctx: click.Context, _: click.Parameter, value: str | None) -> None:
    if value:
        ctx.ensure_object(_Context).config = value


def _config_option(fn: Any) -> Any:
    """`--config` is accepted after the subcommand too (`ocrd run --config PATH`)."""
    return click.option(
        "--config",
        "-c",
        metavar="PATH",
        expose_value=False,
        is_eager=True,
        callback=_set_config,
        help="Policy file (same as the option before the command).",
    )(fn)


_json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "-c",
    "config",
    metavar="PATH",
    help="Policy file [default: $OCRD_CONFIG, else /etc/ocrd/policy.yaml].",
)
@click.version_option(__version__, "--version", "-V", prog_name="ocrd")
@click.pass_context
def cli(ctx: click.Context, config: str | None) -> None:
    """Keep a directory of OCR/AI model files converged with a YAML policy."""
    ctx.obj = _Context(config)


@cli.command()
@_config_option
@click.option(
    "--sources",
    "ask_sources",
    is_flag=True,
    help="Also ask every network source (HEAD) and print the Hub's sha256 pins.",
)
@click.pass_obj
@_run
def check(obj: _Context, ask_sources: bool) -> None:
    """Validate the policy and the environment; print every finding."""
    from ocrd.checks import remote_findings, run_checks

    loaded = obj.load()
    findings = run_checks(loaded)
    if ask_sources:
        findings += remote_findings(loaded.policy)
    for level, text in findings:
        click.echo(f"{level}: {text}")
    errors = sum(1 for level, _ in findings if level == "error")
    warnings = sum(1 for level, _ in findings if level == "warning")
    click.echo(f"{loaded.path}: {errors} error(s), {warnings} warning(s)")
    sys.exit(EXIT_PROBLEMS if errors else EXIT_OK)


@cli.command("list")
@_config_option
@_json_option
@click.option("--all", "show_all", is_flag=True, help="Include ignored entries.")
@click.pass_obj
@_run
def list_(obj: _Context, as_json: bool, show_all: bool) -> None:
    """Models with their class, the rule that decided it, size, age and pin."""
    from ocrd import log
    from ocrd.core import render
    from ocrd.core.model import Class, Pin
    from ocrd.core.plan import reconcile
    from ocrd.observe.scan import observe

    policy = obj.load().policy
    snapshot = observe(policy, log=log.get(), progress=_progress(), full=True)
    _warn_unseen(snapshot.unseen)
    now = time.time()
    plan = reconcile(policy, snapshot, now=now)
    shown = [c for c in plan.classified if show_all or c.cls is not Class.IGNORED]
    held = _deleted_held(str(policy.model_dir))
    pinned = sum({r["path"]: r["bytes"] for r in held}.values())
    if as_json:
        doc = render.models_json(str(policy.model_dir), shown, now=now)
        doc.update(deleted_held=held, pinned_bytes=pinned)
        click.echo(json.dumps(doc, indent=2))
    else:
        click.echo(render.models_table(shown, now=now) if shown else "The model dir is empty.")
        if held:
            click.echo("\n" + render.deleted_table(held, pinned))
    bad = any(c.cls is Class.MISSING or c.pin is Pin.CORRUPT for c in plan.classified)
    sys.exit(EXIT_PROBLEMS if bad else EXIT_OK)


@cli.command()
@_config_option
@_json_option
@click.option("--exit-code", is_flag=True, help="Exit 3 when changes are pending, 0 when none.")
@click.pass_obj
@_run
def plan(obj: _Context, as_json: bool, exit_code: bool) -> None:
    """What `apply` would do, with reasons and bytes freed. Changes nothing."""
    from ocrd import log
    from ocrd.core import render
    from ocrd.core.plan import reconcile
    from ocrd.observe.scan import no_gc_pauses, observe

    policy = obj.load().policy
    with no_gc_pauses():
        snapshot = observe(policy, log=log.get(), progress=_progress())
        _warn_unseen(snapshot.unseen)
        result = reconcile(policy, snapshot, now=time.time())
        if as_json:
            text = json.dumps(render.plan_json(str(policy.model_dir), result), indent=2)
        else:
            text = render.plan_text(result)
    click.echo(text)
    if result.errors:
        sys.exit(EXIT_PROBLEMS)
    sys.exit(EXIT_PENDING if exit_code and result.actions else EXIT_OK)


@cli.command()
@_config_option
@click.option("--dry-run", is_flag=True, help="Log what would be done; change nothing.")
@click.pass_obj
@_run
def apply(obj: _Context, dry_run: bool) -> None:
    """Run one reconcile cycle, then exit. Logs go to stdout."""
    from ocrd import log
    from ocrd.cycle import run_cycle
    from ocrd.daemon.lock import DirLock
    from ocrd.engine.auto import make_engine
    from ocrd.engine.base import EngineError

    loaded = obj.load(log_stream=sys.stdout)
    policy = loaded.policy
    logger = log.get()
    try:
        engine, warning = make_engine(policy, log=logger)
    except EngineError as exc:
        logger.error("engine.unavailable", error=str(exc))
        sys.exit(EXIT_PROBLEMS)
    if warning:
        logger.warning("engine.fallback", warning=warning)
    if dry_run:
        result = run_cycle(policy, engine=engine, log=logger, dry_run=True, progress=_progress())
    else:
        _require_dir(policy.model_dir)
        with DirLock(policy.model_dir):
            try:
                result = run_cycle(policy, engine=engine, log=logger, progress=_progress())
            finally:
                try:
                    engine.release()
                except EngineError as exc:
                    logger.error("engine.release_failed", engine=engine.name, error=str(exc))
    if result.snapshot.unseen:
        logger.warning("scan.unseen", unseen=list(result.snapshot.unseen))
    sys.exit(EXIT_PROBLEMS if result.problems else EXIT_OK)


def _warn_unseen(unseen: tuple[str, ...]) -> None:
    """What a read-only command could not look at, and what that leaves out: on stderr."""
    for text in unseen:
        click.echo(f"ocrd: warning: {text}", err=True)


def _deleted_held(root: str) -> list[dict[str, Any]]:
    from ocrd.observe.handles import deleted_held

    return [row.as_dict() for row in deleted_held(root)]


def _require_dir(path: Path) -> None:
    from ocrd.core.errors import ModelDirError

    if not path.is_dir():
        raise ModelDirError(
            f"model_dir {path} does not exist or is not a directory; create it or fix model_dir"
        )


@cli.group()
def trash() -> None:
    """Inspect, restore from, or purge the quarantine (`model_dir/.ocrd-trash/`)."""


@trash.command("list")
@_config_option
@_json_option
@click.pass_obj
@_run
def trash_list(obj: _Context, as_json: bool) -> None:
    """Quarantined models, oldest first."""
    from ocrd.core import render
    from ocrd.observe.trash import look_at_trash

    policy = obj.load().policy
    _require_dir(policy.model_dir)
    items, unreadable = look_at_trash(str(policy.model_dir))
    if unreadable:
        click.echo(f"ocrd: warning: {policy.model_dir}/{unreadable}", err=True)
    now = time.time()
    if as_json:
        click.echo(json.dumps(render.trash_json(str(policy.model_dir), items, now=now), indent=2))
    else:
        click.echo(render.trash_table(items, now=now))


@trash.command("restore")
@_config_option
@click.argument("name")
@click.option("--as", "as_name", metavar="NEW", help="Restore under another name.")
@click.pass_obj
@_run
def trash_restore(obj: _Context, name: str, as_name: str | None) -> None:
    """Put a quarantined model back (NAME: its id, or its name for the newest copy)."""
    from ocrd import log
    from ocrd.act.fs import ActionError
    from ocrd.act.trash import restore_from_trash
    from ocrd.core.errors import UsageError
    from ocrd.core.policy import check_name
    from ocrd.daemon.lock import DirLock
    from ocrd.observe.trash import read_trash

    policy = obj.load(log_stream=sys.stdout).policy
    _require_dir(policy.model_dir)
    if as_name is not None:
        try:
            check_name(as_name)
        except ValueError as exc:
            raise UsageError(f"--as: {exc}") from None
    root = str(policy.model_dir)
    with DirLock(policy.model_dir):
        items = read_trash(root)
        matches = [t for t in items if t.id == name] or [t for t in items if t.name == name]
        if not matches:
            raise UsageError(f"nothing named {name!r} in the quarantine; see `ocrd trash list`")
        item = matches[-1]
        try:
            restored = restore_from_trash(root, item, as_name=as_name)
        except (OSError, ActionError) as exc:
            log.get().error(
                "action.failed", model=item.name, action="trash.restore", error=str(exc)
            )
            sys.exit(EXIT_PROBLEMS)
        _warn_if_pruned_again(policy, restored)
        log.get().info(
            "trash.restored", model=restored, trash_id=item.id, bytes=item.size, dest=restored
        )


def _warn_if_pruned_again(policy: Any, name: str) -> None:
    from ocrd.core.model import Class
    from ocrd.core.plan import classify, classify_all, families
    from ocrd.observe.scan import stat_entry

    root = str(policy.model_dir)
    verdict = classify(policy, stat_entry(root, name))
    family = families(policy)
    if family.member(name) is not None:  # its class depends on the family's other members
        members = [n for n in os.listdir(root) if family.member(n) is not None]
        ranked = classify_all(policy, [stat_entry(root, n) for n in members])
        verdict = next((c for c in ranked if c.name == name), verdict)
    if verdict.cls is Class.PRUNE or (
        verdict.cls is Class.UNMANAGED and policy.unmanaged == "prune"
    ):
        click.echo(
            f"ocrd: warning: {name!r} matches {verdict.rule}; the next cycle will prune it "
            "again once it is older than prune.min_age. Restore it under another name "
            "(--as) or change the policy.",
            err=True,
        )


@trash.command("purge")
@_config_option
@click.option("--all", "purge_all", is_flag=True, help="Purge every item, not only expired ones.")
@click.pass_obj
@_run
def trash_purge(obj: _Context, purge_all: bool) -> None:
    """Delete quarantined models older than quarantine.retention (or all of them)."""
    from ocrd import log
    from ocrd.act.apply import purge
    from ocrd.daemon.lock import DirLock
    from ocrd.observe.trash import read_trash, trash_problem

    policy = obj.load(log_stream=sys.stdout).policy
    _require_dir(policy.model_dir)
    root = str(policy.model_dir)
    problem = trash_problem(root)
    if problem:
        click.echo(f"ocrd: error: {root}/{problem}; nothing purged. Remove it.", err=True)
        sys.exit(EXIT_PROBLEMS)
    with DirLock(policy.model_dir):
        now = time.time()
        due = [
            item
            for item in read_trash(root)
            if purge_all or now - item.trashed_at >= policy.quarantine.retention
        ]
        reason = "ocrd trash purge" + (" --all" if purge_all else "")
        outcome = purge(due, root=root, log=log.get(), reason=reason)
    failed = len(outcome.failed) + len(outcome.skipped)  # failed, changed, or held by a process
    sys.exit(EXIT_PROBLEMS if failed else EXIT_OK)


@cli.command()
def schema() -> None:
    """Print the policy's JSON Schema (for editors; see policy.schema.json)."""
    from ocrd.core.policy import json_schema

    click.echo(json.dumps(json_schema(), indent=2, ensure_ascii=False))


@cli.command()
@_config_option
@click.option("--polling", is_flag=True, help="Poll the directories instead of using inotify.")
@click.pass_obj
def run(obj: _Context, polling: bool) -> None:
    """The daemon, in the foreground (systemd runs it). Logs go to stdout."""
    from ocrd.config import policy_path
    from ocrd.daemon.loop import Daemon

    sys.exit(Daemon(policy_path(obj.config), force_polling=polling).run())


@cli.command()
@_config_option
@click.option("--json", "as_json", is_flag=True, help="Print the status document.")
@click.pass_obj
@_run
def status(obj: _Context, as_json: bool) -> None:
    """The running daemon's last cycle. Exit 0 healthy, 1 degraded, 3 not running."""
    from ocrd.daemon import status as statusfile

    state_dir = _state_dir_even_if_invalid(obj)
    found = statusfile.read(state_dir)
    if found is None:
        click.echo(
            f"ocrd: no status file (looked in: "
            f"{', '.join(map(str, statusfile.candidates(state_dir)))}); "
            "is the daemon running?",
            err=True,
        )
        sys.exit(EXIT_PENDING)
    path, doc = found
    running = doc.get("state") == "running" and statusfile.pid_alive(doc.get("pid"))
    if as_json:
        click.echo(json.dumps({**doc, "running": running, "status_file": str(path)}, indent=2))
    else:
        click.echo(statusfile.summary(doc, running=running, path=path))
    if not running:
        sys.exit(EXIT_PENDING)
    sys.exit(EXIT_PROBLEMS if doc.get("degraded") else EXIT_OK)


@cli.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("model_path", type=click.Path(path_type=Path))
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def lease(model_path: Path, command: tuple[str, ...]) -> None:
    """Run COMMAND holding a lease on MODEL_PATH: ocrd never deletes it meanwhile.

    `ocrd lease MODEL_PATH -- COMMAND ARGS`. The shared lock is taken, then ocrd
    becomes COMMAND (same pid), which keeps it until it ends however it ends; its
    exit code is the exit code. Needs read access to the model only.
    """
    from ocrd.lease import acquire

    if command[:1] == ("--",):
        command = command[1:]
    if not command:
        raise click.UsageError("no command: ocrd lease MODEL_PATH -- COMMAND ARGS")
    try:
        fd = acquire(model_path)
    except OSError as exc:
        click.echo(f"ocrd: error: cannot lease {model_path}: {exc.strerror or exc}", err=True)
        sys.exit(EXIT_PROBLEMS)
    os.set_inheritable(fd, True)  # the lock lives in the command's descriptor table
    try:
        os.execvp(command[0], list(command))  # noqa: S606 -- like flock(1): argv as given, no shell
    except OSError as exc:
        click.echo(f"ocrd: error: cannot run {command[0]}: {exc.strerror or exc}", err=True)
        sys.exit(127 if isinstance(exc, FileNotFoundError) else 126)


@cli.command()
@_config_option
@_json_option
@click.pass_obj
@_run
def leases(obj: _Context, as_json: bool) -> None:
    """Who holds a lease (or any lock) on which model of the model dir, from /proc/locks."""
    from ocrd.observe.locks import leases_in

    root = str(obj.load().policy.model_dir)
    found = leases_in(root)
    if as_json:
        doc = {"model_dir": root, "leases": [x.as_dict() for x in found]}
        click.echo(json.dumps(doc, indent=2))
        return
    if not found:
        click.echo(f"No leases on the models of {root}.")
        return
    rows = [("MODEL", "PID", "PROCESS", "MODE")]
    rows += [(x.model, str(x.pid) if x.pid else "-", x.process, x.mode) for x in found]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        cells = [c.ljust(w) for c, w in zip(row[:3], widths, strict=True)]
        click.echo("  ".join([*cells, row[3]]))


def _state_dir_even_if_invalid(obj: _Context) -> Path:
    """The policy's state dir; when the policy does not load (an operator is mid-edit,
    the daemon keeps the last good one), its raw `state_dir` or the default."""
    from ocrd.config import default_state_dir, policy_path, yamlsafe
    from ocrd.core.errors import PolicyError

    try:
        policy = obj.load().policy
    except PolicyError as exc:
        click.echo(
            f"ocrd: warning: the policy does not load ({exc.problems[0]}); "
            "showing the daemon's status anyway",
            err=True,
        )
        path = policy_path(obj.config)
        try:
            raw, _ = yamlsafe.load(path.read_bytes())
        except (OSError, yamlsafe.YamlError):
            raw = None
        value = raw.get("state_dir") if isinstance(raw, dict) else None
        if isinstance(value, str) and value:
            return (path.resolve().parent / value).resolve()
        return default_state_dir()
    state_dir: Path | None = policy.state_dir
    assert state_dir is not None
    return state_dir


def main() -> None:
    """The `ocrd` entry point: run the command, end with its exit code."""
    try:
        cli.main(prog_name="ocrd", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("ocrd: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(EXIT_USAGE)
    except OcrdError as exc:
        _fail(exc)
    except OSError as exc:  # a file ocrd needs: one line naming it and the fix
        if os.environ.get("OCRD_DEBUG") == "1":
            raise
        from ocrd.openfile import explain_os_error

        click.echo(f"ocrd: error: {explain_os_error(exc)}", err=True)
        sys.exit(EXIT_PROBLEMS)
    except Exception as exc:  # a bug: one line for the user, the traceback on request
        if os.environ.get("OCRD_DEBUG") == "1":
            raise
        click.echo(
            f"ocrd: internal error: {type(exc).__name__}: {exc} (set OCRD_DEBUG=1 for a traceback)",
            err=True,
        )
        sys.exit(EXIT_PROBLEMS)
    sys.exit(EXIT_OK)
