"""`ember chat`: a terminal chat with a running server, streaming the answer as it is generated.

Each line you type is a user turn; the conversation is kept and resent each turn. Commands:
/reset (forget the conversation), /system TEXT (set the system prompt and reset), /exit (or EOF).
"""
from __future__ import annotations

import argparse
import sys
from typing import TextIO

HELP = "commands: /reset, /system TEXT, /exit"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat with a running server in the terminal",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default=None, help="bearer key (default: $EMBER_API_KEY's first entry)")
    p.add_argument("--model", default=None, help="model name (default: the server's)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
    p.set_defaults(func=run_chat)


class ChatSession:
    """The conversation state and the commands that change it."""

    def __init__(self, system: str | None = None):
        self.system = system
        self.history: list[dict[str, str]] = []

    def messages(self, user_text: str) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history + [{"role": "user", "content": user_text}]

    def record(self, user_text: str, answer: str) -> None:
        self.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": answer}]

    def reset(self) -> None:
        self.history = []


def chat_loop(client, session: ChatSession, stdin: TextIO, stdout: TextIO, stderr: TextIO,
              max_tokens: int, temperature: float) -> int:
    """Read turns from `stdin` until /exit or EOF, streaming each answer to `stdout`."""
    import httpx

    from clients import EmberAPIError

    interactive = stdin.isatty()
    while True:
        if interactive:
            stdout.write("you> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            session.reset()
            stdout.write("[conversation cleared]\n")
            continue
        if text.startswith("/system"):
            session.system = text[len("/system"):].strip() or None
            session.reset()
            stdout.write(f"[system prompt {'set' if session.system else 'cleared'}; conversation cleared]\n")
            continue
        if text.startswith("/"):
            stdout.write(f"[unknown command; {HELP}]\n")
            continue
        pieces = []
        try:
            for piece in client.chat_text_stream(session.messages(text), max_tokens=max_tokens,
                                                 temperature=temperature):
                pieces.append(piece)
                stdout.write(piece)
                stdout.flush()
        except EmberAPIError as exc:
            hint = " (try /reset)" if exc.code == "context_length_exceeded" else ""
            stdout.write("\n" if pieces else "")
            stderr.write(f"error: {exc.message}{hint}\n")
            continue
        except httpx.HTTPError as exc:
            stdout.write("\n" if pieces else "")
            stderr.write(f"error: cannot reach the server: {exc}\n")
            continue
        stdout.write("\n")
        stdout.flush()
        session.record(text, "".join(pieces))


def run_chat(args: argparse.Namespace) -> int:
    import os

    from clients import EmberClient

    key = args.api_key or (os.environ.get("EMBER_API_KEY", "").split(",")[0].strip() or None)
    with EmberClient(args.base_url, api_key=key, model=args.model) as client:
        if sys.stdin.isatty():
            print(f"chatting with {args.base_url}; {HELP}")
        return chat_loop(client, ChatSession(args.system), sys.stdin, sys.stdout, sys.stderr,
                         args.max_tokens, args.temperature)
