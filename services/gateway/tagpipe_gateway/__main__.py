"""`tagpipe-gateway`: settings validated first, then uvicorn serves the app."""

from __future__ import annotations

import logging

import uvicorn
from prometheus_client import start_http_server
from tagpipe_common.nats_io import require_nats
from tagpipe_common.redis_io import require_redis
from tagpipe_common.settings import load_settings
from tagpipe_common.telemetry import setup_logging, setup_tracing

from tagpipe_gateway.app import create_app
from tagpipe_gateway.auth import ApiKeys
from tagpipe_gateway.drain import DrainingServer
from tagpipe_gateway.settings import GatewaySettings

log = logging.getLogger("tagpipe_gateway")


def main() -> None:
    settings = load_settings(GatewaySettings)
    setup_logging("gateway", settings.log_level, settings.log_json)
    setup_tracing("tagpipe-gateway")
    try:
        keys = ApiKeys.load(settings.api_keys.get_secret_value(), settings.api_keys_file)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"GatewaySettings: cannot load API keys: {exc}") from None
    require_redis(settings.redis_url, "GatewaySettings", settings.redis_startup_timeout_s)
    require_nats(settings.nats_servers, "GatewaySettings", settings.nats_startup_timeout_s)
    app = create_app(settings, keys)
    if settings.metrics_port:
        # Also on the API port's /metrics; this one matches the other components' pods.
        start_http_server(settings.metrics_port)
    log.info("gateway listening on %s:%d", settings.host, settings.port)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep our JSON logging
        access_log=False,
        timeout_graceful_shutdown=10,
    )
    # SIGTERM sets the app's drain flag before uvicorn waits for requests (drain.py).
    DrainingServer(config, app.state.drain).run()


if __name__ == "__main__":
    main()
