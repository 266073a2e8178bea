"""`ember serve`: the OpenAI-compatible server on a checkpoint (the bundled default model if none).

Every option is also an environment variable: `--max-num-seqs 8` or `EMBER_MAX_NUM_SEQS=8`; a
command-line option wins over the variable. `--api-key` may be repeated (`EMBER_API_KEY=a,b`).
"""
from __future__ import annotations

import argparse

# option -> (type, help); the destination names equal ServerSettings fields.
OPTIONS: dict[str, tuple[type, str]] = {
    "--model": (str, "checkpoint directory (default: the bundled model, or a seeded tiny one)"),
    "--served-model-name": (str, "name clients pass as `model` (default: the directory name)"),
    "--host": (str, "address to listen on (default 127.0.0.1)"),
    "--port": (int, "port (default 8000; 0 picks a free one)"),
    "--max-model-len": (int, "context length (default: the model's)"),
    "--max-num-seqs": (int, "sequences in the running batch (default 64)"),
    "--max-num-batched-tokens": (int, "tokens per engine step (default 2048)"),
    "--max-queue": (int, "sequences allowed to wait beyond --max-num-seqs before 429 (default 256)"),
    "--kv-cache-tokens": (int, "KV cache size in tokens (CPU; default: sized by the engine)"),
    "--gpu-memory-utilization": (float, "fraction of GPU memory for weights + KV cache (default 0.9)"),
    "--dtype": (str, "float32, float16 or bfloat16 (default: the checkpoint's)"),
    "--device": (str, "cpu or cuda (default: cuda when available)"),
    "--seed": (int, "engine seed (default 0)"),
    "--cpu-threads": (int, "torch's intra-op CPU threads (default: one fewer than the usable cores, so the "
                           "event loop keeps one; OMP_NUM_THREADS, if set, is kept)"),
    "--drain-timeout": (float, "seconds SIGTERM waits for in-flight requests (default 30)"),
    "--log-level": (str, "critical, error, warning, info or debug (default info)"),
    "--max-tokens-cap": (int, "largest max_tokens a request may ask for (default 4096)"),
    "--max-body-bytes": (int, "largest request body (default 4 MiB)"),
    "--retry-after": (int, "seconds sent in Retry-After with 429 and 503 (default 1)"),
    "--lora-root": (str, "directory adapters may be loaded from (with --enable-lora)"),
    "--max-loras": (int, "distinct adapters one batch can mix: device slots (default 8)"),
    "--max-lora-rank": (int, "largest adapter rank accepted (default 16)"),
    "--max-cpu-loras": (int, "adapters loaded at once (default: no limit)"),
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, (kind, text) in OPTIONS.items():
        p.add_argument(flag, type=kind, default=None, help=f"{text}; env EMBER_{flag[2:].upper().replace('-', '_')}")
    p.add_argument("--api-key", action="append", default=None,
                   help="require 'Authorization: Bearer KEY' (repeatable); env EMBER_API_KEY=k1,k2")
    p.add_argument("--enable-lora", action="store_true", default=None,
                   help="serve LoRA/DoRA adapters (load them with --lora or POST /v1/load_lora_adapter)")
    p.add_argument("--lora", action="append", default=None, metavar="NAME=PATH",
                   help="adapter to load at start-up, PATH under --lora-root (repeatable)")
    p.set_defaults(func=run_serve)


def settings_from_args(args: argparse.Namespace):
    """ServerSettings from the options given; the rest come from EMBER_* variables or defaults."""
    from server.settings import ServerSettings

    given = {name: value for name, value in vars(args).items()
             if value is not None and name in ServerSettings.model_fields}
    return ServerSettings(**given)


def run_serve(args: argparse.Namespace) -> int:
    import logging
    import socket

    import uvicorn
    from pydantic import ValidationError

    from server.app import create_app
    from server.engine_loader import apply_cpu_threads, build_engine, model_dir
    from server.shutdown import DrainingServer

    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        raise ValueError("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())) from None
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("ember.server")

    # Bind first: a taken port fails in a second, not after the model has loaded.
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.host, settings.port))
    except OSError as exc:
        sock.close()
        raise ValueError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}") from None

    path = model_dir(settings)
    log.info("loading model from %s (torch CPU threads: %d)", path, apply_cpu_threads(settings))
    engine = build_engine(settings, path)
    app = create_app(settings, engine=engine)
    config = uvicorn.Config(app, log_level=settings.log_level, access_log=False, log_config=None,
                            timeout_graceful_shutdown=5, lifespan="on")
    server = DrainingServer(config, app.state.ember, settings.drain_timeout)
    server.run(sockets=[sock])
    return 0
