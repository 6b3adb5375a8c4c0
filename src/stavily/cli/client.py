"""The operator commands' side of the private API: a small client, errors, output helpers.

Every failure a user can cause (bad input, unknown names, conflicts, credentials, an
unreachable server) ends as a `CliError` and is printed once, on standard error, with the
exit code of its kind; never a traceback.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar
from urllib.parse import quote

import httpx
import typer
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

DEFAULT_URL = "http://127.0.0.1:8700"

# Exit codes: one per kind of failure.
EXIT_ERROR = 1
EXIT_INVALID = 2
EXIT_NOT_FOUND = 3
EXIT_CONFLICT = 4
EXIT_AUTH = 5


class Output(StrEnum):
    table = "table"
    json = "json"


UrlOpt = Annotated[
    str,
    typer.Option("--url", envvar="STAVILY_URL", help="The orchestrator's base URL"),
]
TokenOpt = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar="STAVILY_TOKEN",
        help="API token",
        show_default=False,
    ),
]
OutputOpt = Annotated[
    Output,
    typer.Option("--output", "-o", help="table for people, json for scripts"),
]


class CliError(Exception):
    """A failure to report to the user: a message, optional detail lines, an exit code."""

    def __init__(
        self,
        message: str,
        exit_code: int = EXIT_ERROR,
        details: Any = None,
        code: str = "error",
        hint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.details = details
        self.code = code
        self.hint = hint

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}


def exit_code_for(status: int) -> int:
    if status in (401, 403):
        return EXIT_AUTH
    if status == 404:
        return EXIT_NOT_FOUND
    if status == 409:
        return EXIT_CONFLICT
    if 400 <= status < 500:
        return EXIT_INVALID
    return EXIT_ERROR


def detail_lines(details: Any) -> list[str]:
    """Server details as lines: `path: message` for each located problem."""
    if details is None or details == [] or details == {}:
        return []
    if isinstance(details, list):
        lines = []
        for item in details:
            if isinstance(item, dict) and "message" in item:
                path = item.get("path")
                lines.append(f"{path}: {item['message']}" if path else str(item["message"]))
            else:
                lines.append(item if isinstance(item, str) else json.dumps(item, default=str))
        return lines
    if isinstance(details, dict):
        return [f"{key}: {value}" for key, value in details.items()]
    return [str(details)]


def report(error: CliError, output: Output = Output.table) -> None:
    """Print an error on standard error: JSON for scripts, else message and detail lines."""
    if output is Output.json:
        typer.echo(json.dumps(error.body(), indent=2, default=str), err=True)
        return
    typer.echo(f"error: {error.message}", err=True)
    for line in detail_lines(error.details):
        typer.echo(f"  {line}", err=True)
    if error.hint:
        typer.echo(error.hint, err=True)


F = TypeVar("F", bound=Callable[..., Any])


def handles_errors(func: F) -> F:
    """Turn a command's CliError into its message on stderr and its exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except CliError as error:
            report(error, kwargs.get("output") or Output.table)
            raise typer.Exit(error.exit_code) from None

    return wrapper  # type: ignore[return-value]


def segment(value: str) -> str:
    """A name or id as one URL path segment."""
    return quote(value, safe="")


def base_url(url: str) -> str:
    """The orchestrator's base URL as given, without what people paste along with it: a
    trailing slash, or the API's own path (`http://host:8700/api/v1/` is `http://host:8700`)."""
    url = url.strip().rstrip("/")
    while url.lower().endswith("/api/v1"):
        url = url[: -len("/api/v1")].rstrip("/")
    return url or DEFAULT_URL


# -- logins saved by `stavily login` ---------------------------------------------------------


def logins_file() -> Path:
    """Where `stavily login` keeps its sessions: one per server URL, readable only by
    the user ($STAVILY_CONFIG_DIR, else $XDG_CONFIG_HOME/stavily, else ~/.config/stavily)."""
    folder = os.environ.get("STAVILY_CONFIG_DIR")
    if not folder:
        config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
        folder = str(Path(config) / "stavily")
    return Path(folder) / "logins.json"


def saved_logins() -> dict[str, Any]:
    try:
        logins = json.loads(logins_file().read_text())
    except (OSError, ValueError):
        return {}
    return logins if isinstance(logins, dict) else {}


def save_login(url: str, login: dict[str, Any] | None) -> None:
    """Keep (or, with None, forget) the session for `url`: written whole to a new file
    made 0600, then renamed into place."""
    logins = saved_logins()
    if login is None:
        logins.pop(base_url(url), None)
    else:
        logins[base_url(url)] = login
    path = logins_file()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        json.dump(logins, handle, indent=2)
    os.replace(temporary, path)


class ApiClient:
    """Blocking calls to `/api/v1`; every non-2xx answer raises CliError. With no token
    given, the session `stavily login` saved for the URL, if any."""

    def __init__(
        self, url: str, token: str | None, timeout: float = 30, saved: bool = True
    ) -> None:
        self.url = base_url(url)
        if not token and saved:
            token = saved_logins().get(self.url, {}).get("token")
        self.token = token
        headers = {"Accept": "application/json", "User-Agent": "stavily-cli"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        return self.request("GET", path, params=params)

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.request("POST", path, **kwargs)

    def delete(self, path: str) -> None:
        self.request("DELETE", path)

    def request(self, method: str, path: str, api: bool = True, **kwargs: Any) -> Any:
        """The answer's JSON (None for 204) of `path` under /api/v1 (`api`), else of the
        server's `path` itself (a webhook's /hooks/...)."""
        if "params" in kwargs and kwargs["params"] is not None:
            kwargs["params"] = {k: v for k, v in kwargs["params"].items() if v is not None}
        try:
            response = self._http.request(method, f"/api/v1{path}" if api else path, **kwargs)
        except httpx.ConnectError as exc:
            raise CliError(
                f"cannot reach the orchestrator at {self.url}",
                details=[_reason(exc)],
                code="unreachable",
                hint="is it running? set STAVILY_URL or pass --url",
            ) from None
        except httpx.TimeoutException:
            raise CliError(
                f"the orchestrator at {self.url} did not answer in time", code="timeout"
            ) from None
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise CliError(
                f"cannot talk to the orchestrator at {self.url}",
                details=[_reason(exc)],
                code="unreachable",
            ) from None
        if response.status_code == 204:
            return None
        if response.is_success:
            try:
                return response.json()
            except ValueError:
                raise CliError(
                    f"unexpected answer from {self.url} (HTTP {response.status_code}): not JSON",
                    details=[response.text[:200]] if response.text else None,
                ) from None
        raise self._error(response)

    def _error(self, response: httpx.Response) -> CliError:
        status = response.status_code
        try:
            body = response.json()
            error = body["error"]
            message, code, details = error["message"], error["code"], error.get("details")
        except (ValueError, KeyError, TypeError):
            text = response.text.strip()
            message = f"HTTP {status}" + (f": {text[:200]}" if text else "")
            code, details = "http_error", None
        hint = None
        if status == 401:
            hint = (
                "log in again (stavily login), or pass a valid API token with --token or "
                "STAVILY_TOKEN"
                if self.token
                else "not logged in: run stavily login, or set STAVILY_TOKEN or pass --token"
            )
        return CliError(message, exit_code_for(status), details, code=code, hint=hint)


def _reason(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0]


# --- output ------------------------------------------------------------------------------


def console() -> Console:
    # Resolved per call: standard output may be swapped (tests, redirection).
    return Console(highlight=False)


def table(*columns: str, wrap: tuple[str, ...] = ()) -> Table:
    """A borderless table; only the columns named in `wrap` may wrap (they fold)."""
    out = Table(box=None, pad_edge=False, header_style="bold")
    for name in columns:
        if name in wrap:
            out.add_column(name, overflow="fold", min_width=min(len(name), 12))
        else:
            out.add_column(name, no_wrap=True)
    return out


def print_table(rendered: Table, wrapping_width: int = 24) -> None:
    """Print at least wide enough that no fixed column is cut: a wide table wraps in the
    terminal rather than losing ids; the columns that wrap get `wrapping_width` at least."""
    out = console()
    wide = out.options.update_width(100_000)
    needed = 2 * max(0, len(rendered.columns) - 1)
    for column in rendered.columns:
        widths = [Measurement.get(out, wide, c).maximum for c in column.cells]
        widths.append(len(str(column.header)))
        natural = max(widths)
        needed += natural if column.no_wrap else min(natural, wrapping_width)
    if needed > out.width:
        out = Console(highlight=False, width=needed)
    out.print(rendered)


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def fail(message: str, exit_code: int = EXIT_INVALID, details: Any = None) -> NoReturn:
    raise CliError(message, exit_code, details, code="invalid_input")


STATUS_STYLES = {
    "succeeded": "green",
    "completed": "green",
    "failed": "red",
    "expired": "red",
    "cancelled": "yellow",
    "running": "cyan",
    "executing": "cyan",
    "leased": "cyan",
    "queued": "blue",
    "pending": "dim",
    "skipped": "dim",
}


def status_text(status: str | None) -> Text:
    return Text(status or "-", style=STATUS_STYLES.get(status or "", ""))


def cell(value: Any, limit: int | None = None) -> Text:
    """A table cell, never read as Rich markup; long values abbreviated with an ellipsis."""
    if value is None or value == "":
        return Text("-", style="dim")
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = " ".join(text.split()) if limit else text
    if limit and len(text) > limit:
        text = text[: limit - 1] + "…"
    return Text(text)


def when(value: str | None) -> str:
    """An ISO timestamp, shortened for tables: date and time to the second."""
    if not value:
        return "-"
    return value.replace("T", " ")[:19]


def took(start: str | None, end: str | None) -> str:
    """How long from one ISO timestamp to another: `850ms`, `12.3s`, `4m05s`, `2h03m`."""
    if not start or not end:
        return "-"
    try:
        seconds = (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
    except ValueError:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


FINAL_EXECUTION = frozenset({"succeeded", "failed", "cancelled"})
