"""The orchestrator application: wiring of store, domain services, loops and HTTP routes."""

from __future__ import annotations

import gc
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import fastapi_offline
import structlog
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from limits import parse as parse_limit

from stavily import __version__
from stavily.api import agents_v1, errors, fleet, identities, plugins, schemas, v1, webhooks
from stavily.api import metrics as metrics_api
from stavily.api import schedules as schedules_api
from stavily.api import secrets as secrets_api
from stavily.api.access import AccessLog
from stavily.api.deps import BurstLimit, State, document_permissions
from stavily.api.headers import SecurityHeaders
from stavily.api.json import JSONResponse
from stavily.api.middleware import EdgeMiddleware
from stavily.api.ratelimits import RateLimits
from stavily.config import Settings
from stavily.fleet import HeartbeatBuffer
from stavily.fleet.agents import AgentLookups
from stavily.fleet.liveness import restart_deadlines
from stavily.logging import configure as configure_logging
from stavily.plugins.registry import Registry
from stavily.security import CredentialCache, agent_tokens, bootstrap, sealing
from stavily.security.access import Denials, TokenUse
from stavily.security.credentials import clear_caches
from stavily.security.store import SecretStore
from stavily.services.loops import LoopService
from stavily.services.scheduler import Scheduler
from stavily.store import migrate
from stavily.store.db import Database
from stavily.store.notify import WorkChannel
from stavily.workflows.engine import Engine
from stavily.workflows.watches import Events, Watches
from stavily.workflows.webhooks import Intake, Webhooks

log = structlog.get_logger("stavily")

OPENAPI_URL = "/api/v1/openapi.json"
DOCS_URL = "/api/v1/docs"
REDOC_URL = "/api/v1/redoc"
DOCS_STATIC_URL = "/api/v1/docs/static"
# Swagger UI's and ReDoc's files as the fastapi-offline package ships them, so the docs
# pages work with no route to a CDN (offline, air-gapped).
DOCS_STATIC_DIR = Path(fastapi_offline.__file__).parent / "static"


def tune_garbage_collector() -> None:
    """Keep the collector's pauses off the request path.

    Every object alive once the server has started (modules, tables, compiled
    statements: about 100,000) is moved out of the collector's sight, and the youngest
    generation is collected after 20,000 allocations instead of 700, so the objects of
    requests in flight (long polls hold theirs for seconds) mostly die before they are
    promoted. With the defaults, a busy server ran a full collection every second or two,
    each a pause of about 90 ms that every request waited through."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 10, 10)


def install_docs(app: FastAPI) -> None:
    """Swagger UI at /api/v1/docs and ReDoc at /api/v1/redoc, their scripts, styles and
    icon under /api/v1/docs/static: no page loads anything from another host. Like the
    OpenAPI document, they need no credential; Swagger UI's Authorize button takes an API
    token or agent credential for the document's bearer schemes and keeps it on reload."""
    # Fails at startup, not on the first page view, if the package's files are missing.
    app.mount(DOCS_STATIC_URL, StaticFiles(directory=DOCS_STATIC_DIR), name="docs-static")

    @app.get(DOCS_URL, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=root + OPENAPI_URL,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{DOCS_STATIC_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_STATIC_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_STATIC_URL}/favicon.png",
            oauth2_redirect_url=None,
            # No validator badge: it would send the document's URL to validator.swagger.io.
            swagger_ui_parameters={"persistAuthorization": True, "validatorUrl": None},
        )

    @app.get(REDOC_URL, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_redoc_html(
            openapi_url=root + OPENAPI_URL,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{DOCS_STATIC_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{DOCS_STATIC_URL}/favicon.png",
            with_google_fonts=False,
        )


def create_app(settings: Settings | None = None) -> FastAPI:
    if settings is None:  # a worker process of `stavily serve --workers N`
        settings = Settings()
        configure_logging(settings.log_level)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = Database(settings.effective_database_url, settings.database_pool_size)
        await migrate.upgrade(db)
        organization_id, generated = await bootstrap(db, settings.bootstrap_token)
        if generated:
            print(
                f"Bootstrap admin API token (shown once, store it now): {generated}",
                file=sys.stderr,
                flush=True,
            )
        await restart_deadlines(db)  # our downtime is not the agents' silence
        heartbeats = HeartbeatBuffer(settings)
        registry = Registry(db, settings)
        await registry.start()
        sealer = await sealing.sealer(
            db, settings.secrets_key, settings.data_dir, settings.secrets_key_previous
        )
        secret_store = SecretStore(db, sealer)
        engine = Engine(db, settings, heartbeats, secret_store)
        watches = Watches(db, engine)
        events = Events(db, engine, watches)
        hooks = Webhooks(db, sealer, settings.webhook_tolerance_seconds)
        intake = Intake(db, hooks, events, settings.webhook_max_body_bytes, settings.max_json_depth)
        # Shared through Redis when redis_url is set; the agents' own stay in memory.
        rate_limits = RateLimits(settings, organization_id)
        app.state.stavily = State(
            settings=settings,
            db=db,
            engine=engine,
            heartbeats=heartbeats,
            agent_cache=CredentialCache(settings.credential_cache_seconds),
            agent_lookups=AgentLookups(db),
            token_cache=CredentialCache(settings.credential_cache_seconds),
            # last use written often enough that a session in use never idles out
            token_use=TokenUse(min(60.0, settings.session_idle_seconds / 4)),
            denials=Denials(db, organization_id),
            organization_id=organization_id,
            jwt_key=await agent_tokens.signing_key(db, settings.agent_jwt_key, settings.data_dir),
            agent_limit=BurstLimit(
                rate_limits.local, parse_limit(settings.agent_rate_limit), "agent"
            ),
            heartbeat_limit=BurstLimit(
                rate_limits.local, parse_limit(settings.heartbeat_rate_limit), "heartbeat"
            ),
            rate_limits=rate_limits,
            plugins=registry,
            installs=engine.installs,
            watches=watches,
            events=events,
            webhooks=hooks,
            intake=intake,
            secret_store=secret_store,
        )
        flusher = LoopService(
            "heartbeat-flusher", settings.heartbeat_flush_interval, engine.flush_heartbeats
        )
        reaper = LoopService("lease-reaper", settings.reaper_interval, engine.expire_leases)
        if not db.is_sqlite:
            trusted = (app.state.stavily.agent_cache, app.state.stavily.token_cache)
            engine.channel = WorkChannel(
                settings.effective_database_url,
                engine.offer_queued,
                on_credentials=lambda: clear_caches(*trusted),  # changed on another replica
            )
            await engine.channel.start()
        flusher.start()
        reaper.start()
        intake.start()
        scheduler = Scheduler(db, app.state.stavily.events, settings)
        scheduler.start()  # fires only on the process holding the scheduler lease
        tune_garbage_collector()
        log.info("orchestrator started", database=db.dialect, version=__version__)
        try:
            yield
        finally:
            await scheduler.stop()  # and gives the lease up: another process takes over
            await intake.stop()
            await reaper.stop()
            await flusher.stop(final_run=True)
            if engine.channel is not None:
                await engine.channel.close()
            await rate_limits.close()
            await db.dispose()

    app = FastAPI(
        title="Stavily Orchestrator",
        version=__version__,
        openapi_url=OPENAPI_URL,
        docs_url=None,  # served by install_docs, from local files
        redoc_url=None,
        swagger_ui_oauth2_redirect_url=None,  # bearer schemes only: no OAuth2 flow
        default_response_class=JSONResponse,
        lifespan=lifespan,
    )
    errors.install(app)
    install_docs(app)
    app.add_middleware(
        EdgeMiddleware,
        max_body_bytes=settings.max_body_bytes,
        large_bodies={"/api/v1/plugins": settings.plugin_max_archive_bytes},
        fast_path=agents_v1.serve_fast,
        max_json_depth=settings.max_json_depth,
        refused_result=agents_v1.refuse_result,
        hooks=webhooks.serve_hook,
    )
    app.add_middleware(
        SecurityHeaders,
        pages=(DOCS_URL, REDOC_URL),
        static=DOCS_STATIC_URL,
        cors_origins=settings.cors_origins,
    )
    app.add_middleware(AccessLog)  # outermost: it sees every answer, the edge's too
    for router in (
        agents_v1.router,
        v1.router,
        identities.router,
        schedules_api.router,
        secrets_api.router,
        fleet.public,
        fleet.private,
        plugins.private,
        plugins.public,
        webhooks.private,
        webhooks.public,
        metrics_api.router,
    ):
        document_permissions(router)
        app.include_router(router)

    @app.get(
        "/healthz",
        tags=["health"],
        response_model=schemas.Health,
    )
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok", "version": __version__})

    @app.get("/health", tags=["health"], response_model=schemas.Healthy)
    async def health() -> JSONResponse:
        """Stavily's own scripts probe this; it says no more than that the server answers."""
        return JSONResponse({"status": "healthy"})

    return app
