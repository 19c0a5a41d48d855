"""The network drop-in for remote sources: what it opens, and what it keeps closed.

The shipped unit has no network; `systemd/ocrd-network.conf` is the drop-in the README
tells operators to install for http(s):// and hf:// sources. Checked offline with
`systemd-analyze security` on the unit with the drop-in's settings applied, as systemd
merges them (a later assignment of these keys replaces or extends the unit's).
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.cli import OCRD

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "ocrd.service"
DROPIN = ROOT / "systemd" / "ocrd-network.conf"
README = ROOT / "README.md"
ANALYZE = shutil.which("systemd-analyze")
EXPOSURE = re.compile(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)")

needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def _settings(path: Path) -> list[tuple[str, str]]:
    """The drop-in's [Service] assignments, in order (comments and blanks dropped)."""
    found = []
    section = None
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
            continue
        assert section == "[Service]", line
        key, _, value = line.partition("=")
        found.append((key, value))
    return found


def _merged(tmp_path: Path) -> Path:
    """The unit with the drop-in applied: list keys extended, the others replaced."""
    lines = UNIT.read_text(encoding="utf-8").replace("/opt/ocrd/bin/ocrd ", f"{OCRD} ")
    settings = _settings(DROPIN)
    replaced = {key for key, _ in settings if key in ("PrivateNetwork", "RestrictAddressFamilies")}
    kept = [line for line in lines.splitlines() if line.partition("=")[0] not in replaced]
    service = kept.index("[Service]")
    merged = kept[: service + 1] + [f"{k}={v}" for k, v in settings] + kept[service + 1 :]
    path = tmp_path / "ocrd.service"
    path.write_text("\n".join(merged) + "\n", encoding="utf-8")
    return path


def test_the_dropin_opens_the_network_and_keeps_the_address_filter() -> None:
    """It turns PrivateNetwork off and allows IP sockets, but never lifts IPAddressDeny=any:
    only the addresses it lists become reachable."""
    settings = dict(_settings(DROPIN))
    assert settings["PrivateNetwork"] == "no"
    assert set(settings["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    keys = [key for key, _ in _settings(DROPIN)]
    assert "IPAddressDeny" not in keys
    allowed = [v for k, v in _settings(DROPIN) if k == "IPAddressAllow"]
    assert allowed and "any" not in allowed
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(UNIT.read_text(encoding="utf-8"))
    assert unit["Service"]["IPAddressDeny"] == "any"
    assert unit["Service"]["PrivateNetwork"] == "yes"


@needs_analyze
def test_the_unit_with_the_dropin_has_the_exposure_the_readme_states(tmp_path: Path) -> None:
    """`systemd-analyze security` of the unit with the drop-in: the figure in the README
    and in the drop-in's own comment, and still below 2.0."""
    assert ANALYZE is not None
    proc = subprocess.run(
        [ANALYZE, "security", "--offline=true", str(_merged(tmp_path))],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    found = EXPOSURE.search(proc.stdout + proc.stderr)
    assert found is not None, proc.stdout + proc.stderr
    exposure = found.group(1)
    assert float(exposure) < 2.0
    readme = README.read_text(encoding="utf-8")
    assert f"`systemd-analyze security` rates the unit {exposure} with it" in readme
    assert f"exposure with this drop-in: {exposure}" in DROPIN.read_text(encoding="utf-8")
