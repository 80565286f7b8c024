"""``packages:`` per runtime: installed once into a cached, content-hashed directory.

The directory is named after a hash of the runtime, its interpreter version and
the sorted package list, so a config that names the same packages reuses it
and a changed list gets a fresh one; an install goes to a temporary directory
renamed into place only when it succeeded, so a half install is never used.
Sandboxes bind it read-only (``/packages``).

pip and npm are run as the host user with the operator's package list (never a
script's); npm runs with ``--ignore-scripts`` so no package's install hook runs
on the host.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import orjson
import trio

__all__ = ["PackageInstallFailed", "ensure_packages", "packages_dir"]

log = logging.getLogger("supervisor.packages")

INSTALL_TIMEOUT = 600.0


class PackageInstallFailed(Exception):
    """What the installer said, with the config key and the packages."""


def _runtime_version(runtime: str) -> str:
    if runtime == "python":
        return f"python{sys.version_info.major}.{sys.version_info.minor}"
    node = shutil.which("node")
    if node is None:
        return "node-missing"
    out = subprocess.run([node, "--version"], capture_output=True, text=True, check=False)  # noqa: S603
    return "node" + out.stdout.strip()


def packages_dir(state_dir: Path, runtime: str, packages: Sequence[str]) -> Path:
    key = orjson.dumps([runtime, _runtime_version(runtime), sorted(packages)])
    return Path(state_dir) / "packages" / f"{runtime}-{hashlib.sha256(key).hexdigest()[:16]}"


def _command(runtime: str, target: Path, packages: Sequence[str]) -> list[str]:
    if runtime == "python":
        return [sys.executable, "-m", "pip", "install", "--quiet", "--no-input", "--disable-pip-version-check",
                "--no-warn-script-location", "--target", str(target), *packages]
    npm = shutil.which("npm")
    if npm is None:
        raise PackageInstallFailed("npm is not installed: it is needed for workspace.sandbox.javascript.packages")
    return [npm, "install", "--prefix", str(target), "--no-audit", "--no-fund", "--ignore-scripts",
            "--omit=dev", "--no-package-lock", "--loglevel=error", *packages]


def _why(output: str) -> str:
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(("ERROR", "npm ERR!", "npm error")) and "log of this run" not in ln]
    return "; ".join((errors or lines)[:3]) or "no output"


async def ensure_packages(state_dir: Path, runtime: str, packages: Sequence[str]) -> Path | None:
    """The directory holding ``packages`` for ``runtime``, installing them on first use.

    Raises PackageInstallFailed naming the config key, the packages and the installer's error.
    """
    if not packages:
        return None
    final = packages_dir(state_dir, runtime, packages)
    if (final / ".complete").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    key = f"workspace.sandbox.{runtime}.packages"
    log.info("installing %s packages (once; cached): %s", runtime, ", ".join(packages))
    try:
        cmd = _command(runtime, tmp, packages)
        with trio.fail_after(INSTALL_TIMEOUT):
            done = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False,
                                          cwd=str(tmp), env={**os.environ, "PIP_NO_COLOR": "1"})
    except trio.TooSlowError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise PackageInstallFailed(f"{key}: installing {', '.join(packages)} took over {INSTALL_TIMEOUT:.0f}s") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if done.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        why = _why(done.stderr.decode(errors="replace") + "\n" + done.stdout.decode(errors="replace"))
        raise PackageInstallFailed(f"{key}: could not install {', '.join(packages)}: {why}")
    (tmp / ".complete").write_text("\n".join(packages) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final
