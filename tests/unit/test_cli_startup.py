"""The CLI starts without the server's code: every `stavily ...` process (each agent, each
command in a script) would otherwise spend more than a second importing FastAPI,
SQLAlchemy and the engine before doing anything."""

from __future__ import annotations

import subprocess
import sys

SERVER_MODULES = ("fastapi", "sqlalchemy", "stavily.app", "stavily.workflows.engine")


def test_the_cli_imports_no_server_code_until_a_command_needs_it() -> None:
    probe = (
        "import sys, stavily.cli.main\n"
        f"print(','.join(m for m in {SERVER_MODULES!r} if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "", f"imported at start: {done.stdout.strip()}"
