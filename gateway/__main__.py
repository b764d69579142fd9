"""`python -m gateway` / `tidegate gateway`: serves the app with uvicorn (uvloop, httptools)."""

from __future__ import annotations

import argparse
import os

import uvicorn

from gateway.app import create_app
from gateway.keys import ApiKeys
from streams.config import Settings
from streams.exceptions import TidegateError


def serve(host: str, port: int, keys_file: str | None) -> None:
    keys_file = keys_file or os.environ.get("TIDEGATE_API_KEYS_FILE")
    if not keys_file:
        raise TidegateError("no API keys: pass --api-keys FILE or set TIDEGATE_API_KEYS_FILE (gateway/keys.py)")
    app = create_app(Settings(), ApiKeys.load(keys_file))
    uvicorn.run(app, host=host, port=port, loop="uvloop", http="httptools", log_level="warning", access_log=False)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m gateway")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--api-keys")
    args = parser.parse_args()
    serve(args.host, args.port, args.api_keys)


if __name__ == "__main__":
    main()
