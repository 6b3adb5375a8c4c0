"""A step's instruction built from its pinned plugin version (plugins.pins), so that an
official agent needs nothing written by hand: the entry point from the manifest's
`runtime.entry_point`, flags for a plugin that parses its own, and `input_data` holding
only the plugin's input — empty for a flags plugin, so the agent passes no `--input`
(its config goes in `plugin_configuration.config`, for our agent's socket).

Nothing the user did not write reaches the plugin: the step's config is its input (or
its flags), and what the agent needs besides (entry point, version, digest, protocol)
goes in `plugin_configuration`, which the agent reads and the plugin never sees."""

from __future__ import annotations

import json
from typing import Any


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return json.dumps(value)  # numbers as JSON writes them: 3, 0.5, 1e+20


def flag_arguments(config: dict[str, Any], flags: dict[str, dict[str, Any]]) -> list[str]:
    """`cpu_trigger_percentage: 90` → `--cpu-trigger-percentage 90`; a list is several
    values after one flag (argparse's nargs); `true` is the flag alone, `false` and null
    leave it out; a mapping is one JSON value."""
    arguments: list[str] = []
    for name, value in config.items():
        setting = flags.get(name) or {}
        flag = setting.get("flag") or "--" + name.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            arguments.append(flag)
        elif isinstance(value, list):
            if value:
                arguments.extend([flag, *map(_text, value)])
        else:
            arguments.extend([flag, _text(value)])
    return arguments


def build(spec: dict[str, Any], config: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(plugin_configuration, input_data) of a step's instruction, from its rendered
    config."""
    pin = spec.get("plugin")
    as_mapping = config if isinstance(config, dict) else {"config": config}
    if not pin:
        # Not in the registry (settings.unregistered_plugins: allow): as before it, the
        # agent gets the config in both, and finds the plugin where it was copied.
        configuration = dict(as_mapping)
        if spec.get("plugin_version"):
            configuration.setdefault("plugin_version", spec["plugin_version"])
        return configuration, as_mapping
    configuration = {
        "entrypoint": pin["entry_point"],
        "plugin_version": pin["version"],
        "sha256": pin["sha256"],
        "protocol": pin["protocol"],
    }
    if pin.get("socket"):
        configuration["socket"] = True  # it talks to its agent: not for official agents
    if pin["protocol"] == "flags":
        configuration["arguments"] = flag_arguments(as_mapping, pin.get("flags") or {})
        # for the agent's socket (`get_config`): the plugin reads its flags, not this
        configuration["config"] = as_mapping
        return configuration, {}
    return configuration, as_mapping


def official_can_run(configuration: Any) -> bool:
    """Whether an official agent can run an instruction: a plugin taking `--input`, or
    its own flags without the agent's socket; never the stdin conversation. The same
    test in SQL: queries.OFFICIAL_RUNNABLE."""
    if not isinstance(configuration, dict):
        return True
    protocol = configuration.get("protocol") or "input"
    return protocol == "input" or (protocol == "flags" and not configuration.get("socket"))
