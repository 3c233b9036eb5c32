"""The README's HTTP examples, run verbatim with curl (only the address changes) against the
app over the fake engine serving under the default model's name: each must answer 200 with
JSON (a missing Content-Type header would get a 400)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import make_app, start_server
from .fake_engine import FakeEngine

README = Path(__file__).resolve().parents[2] / "README.md"
ADDRESS = "http://127.0.0.1:8000"


def _http_commands() -> list[str]:
    section = README.read_text().split("## HTTP", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands, current = [], ""
    for line in block.splitlines():
        current += line + "\n"
        try:
            shlex.split(current.replace("\\\n", " "))
        except ValueError:
            continue  # an open quote: the command goes on
        if not current.rstrip().endswith("\\"):
            commands.append(current.strip())
            current = ""
    return commands


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_readme_http_examples_run_verbatim() -> None:
    commands = _http_commands()
    assert len(commands) >= 3 and all(c.startswith("curl ") for c in commands)
    app, _ = make_app(FakeEngine(model_name="SmolLM2-135M-Instruct.Q4_1", max_model_len=1024))
    server, thread, url = start_server(app)
    try:
        for command in commands:
            run = subprocess.run(["bash", "-c", command.replace(ADDRESS, url)],
                                 capture_output=True, text=True, timeout=60)
            assert run.returncode == 0, run.stderr
            body = json.loads(run.stdout)
            assert "error" not in body or body["error"] is None, (command, body)
    finally:
        server.should_exit = True
        thread.join(10)
