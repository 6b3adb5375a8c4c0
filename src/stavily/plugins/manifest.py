"""`plugin.yaml`: read in either layout, validated with every problem located, and the
check of a workflow step's `config` against the manifest's `configuration` schema.

PLUGINS.md fixes the manifest's keys. Ours, optional: `protocol` (how the plugin takes
its input: `input`, `stdin` or `flags`; told from the folder when absent) and, in a
setting's schema, `flag` (the option it becomes for a flags plugin)."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import semantic_version
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from stavily.errors import InvalidInput
from stavily.workflows.definition import parse_duration

MANIFEST_NAMES = ("plugin.yaml", "plugin.yml")
PLUGIN_ID = r"^[a-z0-9](?:[a-z0-9-]*[a-z0-9])?$"
RUNTIMES = ("python", "go", "javascript", "node", "rust", "shell", "bash", "binary")
TYPES = ("trigger", "action", "output", "monitor")
PROTOCOLS = ("input", "stdin", "flags")
SETTING_TYPES = ("string", "integer", "number", "boolean", "array", "object")
_MEMORY = re.compile(r"^\s*\d+\s*(KB|MB|GB|K|M|G|B)?\s*$", re.IGNORECASE)
_FLAG = re.compile(r"^--[A-Za-z0-9][A-Za-z0-9-]*$")


class _Open(BaseModel):
    """Keys we do not know are kept (a manifest may say more than we read)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, strict=True)


class Runtime(_Open):
    type: Literal[RUNTIMES]  # type: ignore[valid-type]
    version: str | None = None
    entry_point: str = Field(min_length=1, max_length=500)
    requirements: str | None = None

    @field_validator("version", mode="before")
    @classmethod
    def _text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int | float) else value

    @field_validator("entry_point", "requirements")
    @classmethod
    def _inside(cls, value: str | None) -> str | None:
        if value is not None and (value.startswith("/") or ".." in Path(value).parts):
            raise ValueError(f"'{value}' must be a path inside the plugin's folder")
        return value


class Setting(_Open):
    type: Literal[SETTING_TYPES] = "string"  # type: ignore[valid-type]
    description: str | None = None
    default: Any = None
    enum: list[Any] | None = None
    minimum: float | None = None
    maximum: float | None = None
    items: dict[str, Any] | None = None
    required: bool = False
    sensitive: bool = False
    flag: str | None = Field(default=None, pattern=_FLAG.pattern)


class Limits(_Open):
    memory: str | None = None
    cpu: float | None = Field(default=None, gt=0)
    execution_time: str | int | float | None = None

    @field_validator("memory", mode="before")
    @classmethod
    def _memory(cls, value: Any) -> Any:
        if value is not None and not (isinstance(value, str) and _MEMORY.match(value)):
            raise ValueError(f"'{value}' is not a size such as '128MB'")
        return value

    @field_validator("execution_time")
    @classmethod
    def _time(cls, value: Any) -> Any:
        if value is not None:
            parse_duration(value)
        return value


class FilesystemPermissions(_Open):
    read: list[str] = Field(default_factory=list)
    write: list[str] = Field(default_factory=list)


class Permissions(_Open):
    network: bool = False
    filesystem: FilesystemPermissions = Field(default_factory=FilesystemPermissions)
    system_calls: list[str] = Field(default_factory=list)
    capabilities: list[str] = Field(default_factory=list)
    environment: list[str] = Field(default_factory=list)


class Manifest(_Open):
    id: str = Field(pattern=PLUGIN_ID, max_length=200)
    name: str | None = None
    description: str | None = None
    author: str | None = None
    license: str | None = None
    version: str
    type: Literal[TYPES]  # type: ignore[valid-type]
    runtime: Runtime
    configuration: dict[str, Setting] = Field(default_factory=dict)
    limits: Limits = Field(default_factory=Limits)
    permissions: Permissions = Field(default_factory=Permissions)
    protocol: Literal[PROTOCOLS] | None = None  # type: ignore[valid-type]

    @field_validator("version", mode="before")
    @classmethod
    def _semver(cls, value: Any) -> Any:
        if not isinstance(value, str) or not semantic_version.validate(value):
            raise ValueError(f"'{value}' is not a semantic version such as '1.2.0'")
        return value

    @field_validator("configuration", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return {} if value is None else value

    @property
    def execution_seconds(self) -> int | None:
        limit = self.limits.execution_time
        return max(1, int(parse_duration(limit))) if limit is not None else None


def read_manifest(folder: Path) -> tuple[dict[str, Any], str]:
    """The manifest's fields (either layout) and its file's name; InvalidInput if there
    is none or it is not YAML."""
    for name in MANIFEST_NAMES:
        path = folder / name
        if path.is_file() and not path.is_symlink():
            try:
                data = yaml.safe_load(path.read_text(encoding="utf-8"))
            except (yaml.YAMLError, UnicodeDecodeError) as exc:
                raise InvalidInput(
                    "invalid plugin manifest", [{"path": name, "message": f"not YAML: {exc}"}]
                ) from None
            if isinstance(data, dict) and isinstance(data.get("plugin"), dict):
                data = data["plugin"]
            if not isinstance(data, dict):
                raise InvalidInput(
                    "invalid plugin manifest",
                    [{"path": name, "message": "a manifest is a mapping of id, version, ..."}],
                )
            return data, name
    raise InvalidInput(
        "no plugin manifest",
        [{"path": "plugin.yaml", "message": "the plugin's folder has no plugin.yaml"}],
    )


def validate_manifest(data: dict[str, Any]) -> Manifest:
    """Every problem in one InvalidInput, each with its path (`runtime.entry_point`)."""
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        problems = [
            {
                "path": ".".join(str(p) for p in err["loc"]) or "(root)",
                "message": err["msg"].removeprefix("Value error, "),
            }
            for err in exc.errors(include_url=False)
        ]
        raise InvalidInput("invalid plugin manifest", problems) from None


# -- how a plugin takes its input (PLUGINS.md, "How plugins speak") ------------------------

_SIGNS: tuple[tuple[str, re.Pattern[bytes]], ...] = (
    ("input", re.compile(rb"""["']--input["']""")),
    ("stdin", re.compile(rb"sys\.stdin|process\.stdin|os\.Stdin|bufio\.NewScanner\(os\.Stdin")),
    ("flags", re.compile(rb"add_argument\(|flag\.(String|Int|Bool)\(|\.option\(")),
)


_SOCKET_SIGN = b"STAVILY_AGENT_SOCKET"


def uses_socket(folder: Path, limit: int = 1024 * 1024) -> bool:
    """Whether any file of the plugin names STAVILY_AGENT_SOCKET (the published client,
    `stavily_agent_client.py`, reads it): it talks to its agent while it runs."""
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            with path.open("rb") as handle:
                if _SOCKET_SIGN in handle.read(limit):
                    return True
    return False


def protocol_sign(text: bytes) -> str | None:
    """The protocol the first sign found in an entry point's text points to, or None."""
    for protocol, sign in _SIGNS:
        if sign.search(text):
            return protocol
    return None


def protocol_of(manifest: Manifest, folder: Path) -> str:
    """The manifest's `protocol`, else the first sign in the entry point's text: it
    reads `--input` (the official convention), a loop on stdin (the older plugins), or
    parses flags of its own (the newest). InvalidInput when it cannot be told."""
    if manifest.protocol:
        return manifest.protocol
    entry = folder / manifest.runtime.entry_point
    try:
        text = entry.read_bytes()[: 1024 * 1024]
    except OSError:
        text = b""
    protocol = protocol_sign(text)
    if protocol is not None:
        return protocol
    raise InvalidInput(
        "cannot tell how the plugin takes its input",
        [
            {
                "path": "protocol",
                "message": f"'{manifest.runtime.entry_point}' shows no sign of reading "
                "--input, stdin or flags of its own: set `protocol: input`, `stdin` or "
                "`flags` in plugin.yaml",
            }
        ],
    )


def flag_of(name: str, setting: dict[str, Any] | None) -> str:
    """A setting's option for a flags plugin: its `flag`, else its name with dashes."""
    if setting and setting.get("flag"):
        return str(setting["flag"])
    return "--" + name.replace("_", "-")


# -- a step's config against the manifest's schema ------------------------------------------

_PYTHON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list,),
    "object": (dict,),
}


def _templated(value: Any) -> bool:
    """A value rendered at run time: it cannot be checked before."""
    return isinstance(value, str) and ("{{" in value or "{%" in value)


def _check_value(value: Any, schema: dict[str, Any], path: str, out: list[dict[str, str]]) -> None:
    if _templated(value):
        return
    kind = schema.get("type") or "string"
    types = _PYTHON_TYPES.get(kind)
    if types is not None:
        wrong = not isinstance(value, types) or (
            kind in ("integer", "number") and isinstance(value, bool)
        )
        if wrong:
            out.append({"path": path, "message": f"must be of type {kind}"})
            return
    enum = schema.get("enum")
    if enum is not None and value not in enum:
        out.append({"path": path, "message": f"must be one of {', '.join(map(repr, enum))}"})
    if isinstance(value, int | float) and not isinstance(value, bool):
        low, high = schema.get("minimum"), schema.get("maximum")
        if low is not None and value < low:
            out.append({"path": path, "message": f"must be at least {low:g}"})
        if high is not None and value > high:
            out.append({"path": path, "message": f"must be at most {high:g}"})
    items = schema.get("items")
    if isinstance(value, list) and isinstance(items, dict):
        for index, item in enumerate(value):
            _check_value(item, items, f"{path}[{index}]", out)


def config_problems(
    config: Any, configuration: dict[str, dict[str, Any]], path: str
) -> list[dict[str, str]]:
    """What is wrong with a step's `config` for a plugin whose manifest declares
    `configuration` (types, required, enum, minimum/maximum, items; unknown keys)."""
    if not configuration or _templated(config):
        return []
    if not isinstance(config, dict):
        return [{"path": path, "message": "must be a mapping of the plugin's settings"}]
    problems: list[dict[str, str]] = []
    for name, schema in configuration.items():
        if schema.get("required") and name not in config:
            problems.append({"path": f"{path}.{name}", "message": "required by the plugin"})
    known = sorted(configuration)
    for key, value in config.items():
        schema = configuration.get(key)
        if schema is None:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f"did you mean `{close[0]}`?" if close else f"expected one of {', '.join(known)}"
            problems.append(
                {"path": f"{path}.{key}", "message": f"the plugin has no setting '{key}': {hint}"}
            )
            continue
        _check_value(value, schema, f"{path}.{key}", problems)
    return problems
