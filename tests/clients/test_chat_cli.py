"""`ember chat` driven through stdin against the live server: streaming, history, /system, /reset."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from clients import EmberClient
from client_helpers import API_KEY

SYSTEM = "Be brief."
OPTS = dict(max_tokens=8, temperature=0.0)


def ember_command() -> list[str]:
    script = Path(sys.executable).with_name("ember")
    return [str(script)] if script.exists() else [sys.executable, "-m", "ember_cli.main"]


def test_chat_cli_streams_keeps_history_and_handles_commands(server):
    script = "hello\nmore\n/system " + SYSTEM + "\nhi\n/reset\nagain\n/bogus\n/exit\nnever sent\n"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("EMBER_")}, "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.run([*ember_command(), "chat", "--base-url", server.url, "--api-key", API_KEY,
                           "--max-tokens", "8", "--temperature", "0"],
                          input=script.encode(), capture_output=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()

    with EmberClient(server.url, api_key=API_KEY) as client:
        def reply(messages):
            return client.chat(messages, **OPTS)["choices"][0]["message"]["content"]

        r1 = reply([{"role": "user", "content": "hello"}])
        r2 = reply([{"role": "user", "content": "hello"}, {"role": "assistant", "content": r1},
                    {"role": "user", "content": "more"}])
        system = {"role": "system", "content": SYSTEM}
        r3 = reply([system, {"role": "user", "content": "hi"}])
        r4 = reply([system, {"role": "user", "content": "again"}])
    expected = (f"{r1}\n{r2}\n[system prompt set; conversation cleared]\n{r3}\n[conversation cleared]\n{r4}\n"
                "[unknown command; commands: /reset, /system TEXT, /exit]\n")
    assert proc.stdout.decode("utf-8") == expected
