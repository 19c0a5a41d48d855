"""Deleting so that no holder is ever deleted under: out of its name first, then decide.

Every delete (a prune with `action: delete`, a purge of the quarantine) is
two-phase (DESIGN §4):

1. **out**: the target is renamed from its name to a hidden name in the model
   dir: a file (or link) into one of the cycle's `.ocrd-deleting-*` directories
   (up to OUT_PER_DIR each: renaming into a small directory and unlinking
   there costs ext4 half of a rename and unlink among 100,000 names), a
   directory model to a `.ocrd-deleting-*` name of its own. The rename is
   atomic; from then on no process can open it by its name. The moved entry
   is checked to be the one planned (device, inode, and for a file its size
   and mtime); if it is not — a fresh copy was put under the name between the
   re-check and the rename — it goes back without replacing anything, and the
   target is `model.changed`.
2. **index**: the caller builds the cycle's one handle index after the last
   rename, over what moved out (each `Moved`'s keys and paths).
3. **finish**: what nobody holds is removed; a held one goes back under its
   name (never over an entry that appeared there meanwhile) and is reported
   busy. The last step before each removal is an exclusive `flock`
   (`LOCK_EX|LOCK_NB`) on what moved, held until it is gone: a lease (a shared
   flock, ocrd.lease) taken at any instant before it fails, and the target goes
   back as busy. One that cannot go back (a newer entry took its name) is kept in the
   quarantine under its name (the caller's *keep*), never deleted.

A crash between the phases leaves only hidden names, which recovery finishes
(after its own handle check; a `.ocrd-deleting-*` directory is one leftover,
removed whole once nobody holds anything in it). Nothing here logs; the caller reports.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

from ocrd.act.fs import Changed, hidden_name, rename_noreplace
from ocrd.act.tree import Leftover, refuse_mounts_at, remove_whole
from ocrd.core.names import DELETING_PREFIX, TRASH
from ocrd.observe.handles import OTHER_NAMESPACE, HandleIndex, Holder, Targets, add_leases
from ocrd.observe.scan import tree_members
from ocrd.openfile import DIR_FLAGS, give_to_owner_of

OUT_PER_DIR = 128  # files moved into one `.ocrd-deleting-*` directory


@dataclass(frozen=True, slots=True)
class Expect:
    """What the target must still be once it has moved out."""

    device: int
    inode: int
    mtime_ns: int | None = None  # checked when known
    size: int | None = None  # checked for files, when known


@dataclass(slots=True)
class Moved:
    """One target out of its name: where it came from, where it is, what it is."""

    number: int  # the caller's number for it (its action's index in the plan)
    back_fd: int  # the directory it came from (the model dir, or a quarantine batch)
    name: str  # its name there
    hidden: str  # where it is now, relative to the model dir (for messages)
    is_dir: bool
    out_fd: int  # the directory it is in now (the model dir, or a deleting dir)
    inner: str  # its name there
    ident: tuple[int, int] = (0, 0)  # (device, inode) of what moved: only that is removed
    regular: bool = False  # a regular file moved (settled by the fast path)
    keys: frozenset[tuple[int, int]] = frozenset()  # every (device, inode) in it
    paths: frozenset[str] = frozenset()  # and every path, for the mapping check


@dataclass(frozen=True, slots=True)
class Settled:
    """How phase 3 ended for one target."""

    moved: Moved
    holders: list[Holder]  # not empty: it was held, and went back (or was kept)
    kept: str | None = None  # held and could not go back: where it was kept instead
    error: str | None = None  # nobody held it, but it could not be removed (whole)

    @property
    def removed(self) -> bool:
        return not self.holders and self.error is None


def _matches(st: os.stat_result, expect: Expect) -> bool:
    if (st.st_dev, st.st_ino) != (expect.device, expect.inode):
        return False
    if expect.mtime_ns is not None and st.st_mtime_ns != expect.mtime_ns:
        return False
    return not (expect.size is not None and stat.S_ISREG(st.st_mode) and st.st_size != expect.size)


def exclusive(dir_fd: int, name: str, ident: tuple[int, int]) -> int | None:
    """A descriptor of *name* holding `LOCK_EX|LOCK_NB`, so no lease can be taken until it
    is closed; None for what cannot be leased (a link) or is not *ident* (which the
    removal then leaves alone).

    Raises BlockingIOError when a lease holds it, OSError when it cannot be checked.
    """
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        return None  # a symlink is removed as a link; a lease on its target is not on it
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    if stat.S_ISDIR(st.st_mode):
        flags |= os.O_DIRECTORY
    fd = os.open(name, flags, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != ident:
            os.close(fd)
            return None
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


class Leased(Exception):
    """The exclusive check failed: a lease holds the target (the handle index missed it)."""

    def __init__(self, holders: list[Holder]) -> None:
        super().__init__("held by a lease")
        self.holders = holders


def lease_holders(ident: tuple[int, int]) -> list[Holder]:
    """Who holds a lease on *ident* now, from /proc/locks; never empty, as the exclusive
    check failed: /proc/locks does not list a lock whose owner is outside ocrd's PID
    namespace (a worker in a parent or sibling container), yet the kernel enforces it."""
    index = HandleIndex()
    add_leases(index, Targets({ident}))
    return index.who({ident}) or [Holder(0, OTHER_NAMESPACE, "lease")]


class TwoPhase:
    """The targets of one cycle's deletes, between the phases."""

    def __init__(
        self, root: str, root_fd: int, *, keep: Callable[[Moved], str] | None = None
    ) -> None:
        """*keep* moves a target that cannot go back somewhere safe and says where."""
        self.root, self.root_fd, self.keep = root, root_fd, keep
        self.moved: list[Moved] = []
        self._trash_fd: int | None = None
        self._batches: dict[str, int] = {}
        self._out: list[tuple[str, int]] = []  # this cycle's deleting dirs: (name, fd)
        self._in_last = 0  # files moved into the newest one

    def _out_dir(self) -> tuple[str, int, str]:
        """Where the next file goes: (deleting dir's name, its fd, the name inside)."""
        if not self._out or self._in_last >= OUT_PER_DIR:
            name = hidden_name(DELETING_PREFIX)
            os.mkdir(name, 0o700, dir_fd=self.root_fd)
            fd = os.open(name, DIR_FLAGS, dir_fd=self.root_fd)
            st, top = os.fstat(fd), os.fstat(self.root_fd)
            # Ours and on the model dir's filesystem, else another dir took the name
            # between mkdir and open (not st_nlink: btrfs counts a directory's links as 1).
            if st.st_dev != top.st_dev or st.st_uid != os.geteuid():
                os.close(fd)
                raise OSError(f"{name} was replaced as it was made; nothing moved into it")
            give_to_owner_of(fd, top)
            self._out.append((name, fd))
            self._in_last = 0
        self._in_last += 1
        name, fd = self._out[-1]
        return name, fd, str(self._in_last)

    def batch_fd(self, batch_id: str) -> int:
        """A quarantine batch directory, opened through `.ocrd-trash` without following a
        link at either level (a symlinked trash is refused: ELOOP/ENOTDIR)."""
        if batch_id not in self._batches:
            if self._trash_fd is None:
                self._trash_fd = os.open(TRASH, DIR_FLAGS, dir_fd=self.root_fd)
            self._batches[batch_id] = os.open(batch_id, DIR_FLAGS, dir_fd=self._trash_fd)
        return self._batches[batch_id]

    def close(self) -> None:
        """Drop the deleting dirs left empty (one that still holds something stays for
        recovery) and close every descriptor."""
        for name, fd in self._out:
            with contextlib.suppress(OSError):
                st, there = os.fstat(fd), os.stat(name, dir_fd=self.root_fd, follow_symlinks=False)
                if (st.st_dev, st.st_ino) == (there.st_dev, there.st_ino):
                    os.rmdir(name, dir_fd=self.root_fd)  # fails unless empty
            os.close(fd)
        self._out.clear()
        for fd in self._batches.values():
            os.close(fd)
        self._batches.clear()
        if self._trash_fd is not None:
            os.close(self._trash_fd)
            self._trash_fd = None

    def move_out(
        self, number: int, *, back_fd: int, name: str, expect: Expect, is_dir: bool | None = None
    ) -> Moved:
        """Phase 1 for one target; raises Changed (after putting it back) when the entry
        that moved is not the one planned, OSError when the rename fails.

        *is_dir*: what the caller saw there (looked up when None); whatever moved is
        checked against *expect* either way.
        """
        if is_dir is None:
            is_dir = stat.S_ISDIR(os.stat(name, dir_fd=back_fd, follow_symlinks=False).st_mode)
        if is_dir:
            # A model with a mount point inside stays whole, under its name.
            refuse_mounts_at(back_fd, name)
            out_fd, inner = self.root_fd, hidden_name(DELETING_PREFIX)
            hidden, prefix = inner, self.root
        else:
            out_name, out_fd, inner = self._out_dir()
            hidden, prefix = f"{out_name}/{inner}", f"{self.root}/{out_name}"
        os.rename(name, inner, src_dir_fd=back_fd, dst_dir_fd=out_fd)
        st = os.stat(inner, dir_fd=out_fd, follow_symlinks=False)
        moved = Moved(
            number,
            back_fd,
            name,
            hidden,
            stat.S_ISDIR(st.st_mode),
            out_fd,
            inner,
            (st.st_dev, st.st_ino),
            stat.S_ISREG(st.st_mode),
        )
        if not _matches(st, expect):
            where = self.put_back(moved)
            raise Changed(
                "replaced since the re-check (a new entry took its name); "
                + ("put back, nothing deleted" if where is None else f"kept as {where}")
            )
        if moved.is_dir:
            try:
                # Again now it is out of its name: a mount made inside it after the
                # first check sends it back whole.
                refuse_mounts_at(out_fd, inner)
            except Leftover as exc:
                where = self.put_back(moved)
                back = "put back whole" if where is None else f"kept as {where}"
                raise Leftover(f"{exc}; {back}") from None
            try:
                keys, paths = tree_members(out_fd, inner, prefix)
            except OSError as exc:  # what cannot be looked into is not deleted
                where = self.put_back(moved)
                back = "put back" if where is None else f"kept as {where}"
                raise OSError(exc.errno, f"cannot look into it ({exc.strerror}); {back}") from None
            moved.keys, moved.paths = frozenset(keys), frozenset(paths)
        else:
            moved.keys = frozenset({(st.st_dev, st.st_ino)})
            moved.paths = frozenset({f"{prefix}/{inner}"})
        self.moved.append(moved)
        return moved

    def put_back(self, moved: Moved) -> str | None:
        """Back under its name, never over a new entry; returns None when it went back,
        else where it was kept instead (the quarantine; its hidden name as a last resort,
        which recovery removes only once nobody holds it)."""
        try:
            rename_noreplace(
                moved.inner, moved.name, src_dir_fd=moved.out_fd, dst_dir_fd=moved.back_fd
            )
        except OSError:
            if self.keep is None:
                return moved.hidden
            try:
                return self.keep(moved)
            except OSError:
                return moved.hidden
        return None

    def abandon(self) -> None:
        """Put every moved target back (the cycle is stopping before phase 3): nothing
        is deleted that was not decided on; what cannot go back stays for recovery."""
        for moved in self.moved:
            self.put_back(moved)
        self.moved = []

    def settle(self, who: Callable[[Moved], list[Holder]]) -> list[Settled]:
        """Phase 3: each moved target removed, or (held) put back; in the order moved.

        *who* answers from the cycle's one handle index, built after the renames.
        """
        settled = []
        for moved in self.moved:
            holders = who(moved)
            if holders:
                settled.append(Settled(moved, holders, kept=self.put_back(moved)))
            elif moved.regular:
                settled.append(self._finish_file(moved))
            else:
                settled.append(self._finish(moved))
        self.moved = []
        return settled

    def _finish(self, moved: Moved) -> Settled:
        """Phase 3 for anything nobody holds: the exclusive check, then removed whole."""
        try:
            lock_fd = exclusive(moved.out_fd, moved.inner, moved.ident)
        except BlockingIOError:  # a lease taken after the index was built: it wins
            return self._leased(moved)
        except OSError as exc:  # cannot tell whether it is leased: not deleted
            return self._unchecked(moved, exc)
        try:
            self.remove(moved)
        except OSError as exc:  # what stays is under its hidden name: recovery retries
            return Settled(moved, [], error=f"{exc} (kept as {moved.hidden})")
        finally:
            if lock_fd is not None:
                os.close(lock_fd)  # only now that it is gone
        return Settled(moved, [])

    def _leased(self, moved: Moved) -> Settled:
        return Settled(moved, lease_holders(moved.ident), kept=self.put_back(moved))

    def _unchecked(self, moved: Moved, exc: OSError) -> Settled:
        where = self.put_back(moved)
        back = "put back" if where is None else f"kept as {where}"
        text = exc.strerror or str(exc)
        return Settled(moved, [], error=f"cannot check it for a lease ({text}); {back}")

    def _finish_file(self, moved: Moved) -> Settled:
        """Phase 3 for a regular file nobody holds, in five syscalls: open it (never
        following a link, never blocking), check it is what moved, take the exclusive
        lock, unlink it, close. Anything else under its hidden name now (what moved
        was swapped in the cycle's own deleting dir, mode 0700: only ocrd's own user
        can) goes the general way, which leaves it alone."""
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
        try:
            fd = os.open(moved.inner, flags, dir_fd=moved.out_fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENXIO, errno.ENOENT):
                return self._finish(moved)  # not that file there now: the general path decides
            return self._unchecked(moved, exc)
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != moved.ident:
                os.close(fd)
                return self._finish(moved)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a lease taken after the index was built: it wins
            os.close(fd)
            return self._leased(moved)
        except OSError as exc:
            os.close(fd)
            return self._unchecked(moved, exc)
        try:
            os.unlink(moved.inner, dir_fd=moved.out_fd)
        except OSError as exc:  # what stays is under its hidden name: recovery retries
            return Settled(moved, [], error=f"{exc.strerror or exc} (kept as {moved.hidden})")
        finally:
            os.close(fd)  # only now that it is gone
        return Settled(moved, [])

    def remove(self, moved: Moved) -> None:
        """Phase 3 for a target nobody holds: gone for good (raises Leftover/OSError)."""
        # What is under the hidden name must still be what moved (and was looked up in
        # the handle index): anything put there since is left alone.
        remove_whole(moved.out_fd, moved.inner, expect=moved.ident)
