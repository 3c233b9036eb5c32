"""`python -m jaxllm.server`: parse flags, build the engine, serve with uvicorn.

Shutdown (SIGINT/SIGTERM) stops accepting connections, lets in-flight requests drain
(`--drain-timeout`), then stops the engine (the app's lifespan does both).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import uvicorn

from .app import build_app
from .cli_args import parse_args


def main(argv: Sequence[str] | None = None) -> int:
    engine_config, server_config = parse_args(argv)
    logging.basicConfig(level=engine_config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Multi-host: join the process group before any JAX use; followers serve no HTTP, they
    # replay the leader's steps until it stops (jaxllm.multihost).
    from jaxllm.parallel import initialize_distributed

    if initialize_distributed(engine_config) and engine_config.process_id != 0:
        from jaxllm.multihost import run_follower

        run_follower(engine_config)
        return 0
    app = build_app(engine_config, None, server_config)
    kwargs = dict(log_level=engine_config.log_level, root_path=engine_config.root_path or "",
                  ssl_keyfile=engine_config.ssl_keyfile, ssl_certfile=engine_config.ssl_certfile,
                  timeout_graceful_shutdown=int(server_config.drain_timeout_s) + 1,
                  access_log=engine_config.log_level == "debug")
    if engine_config.uds:
        uvicorn.run(app, uds=engine_config.uds, **kwargs)
    else:
        uvicorn.run(app, host=engine_config.host, port=engine_config.port, **kwargs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
