"""The whole test suite, as the README's test command runs it.

Installs what the browser tests need when it is missing (Debian's chromium), runs ruff, then pytest.
pytest's exit code 5 ("no tests collected") is turned into a failure so an empty run never passes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")


def ensure_chromium() -> None:
    if CHROMIUM.exists():
        return
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        print("tests/run.py: /usr/bin/chromium is missing; install Debian's 'chromium' package", file=sys.stderr)
        return
    print("tests/run.py: installing Debian's chromium for the browser tests", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True, env=env)


def main(argv: list[str]) -> int:
    ensure_chromium()
    lint = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT)
    if lint.returncode != 0:
        return lint.returncode
    result = subprocess.run([sys.executable, "-m", "pytest", *argv], cwd=ROOT)
    if result.returncode == 5:
        print("tests/run.py: pytest collected no tests; that is a failure", file=sys.stderr)
        return 1
    return result.returncode


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
