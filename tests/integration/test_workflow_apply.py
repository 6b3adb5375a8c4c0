"""Applying workflows over real HTTP, on each database: the same definition again is
"unchanged" (200, the same version, no audit record), whatever its spacing, comments or
key order; a change is a new version (201); identical applies at once make one version;
typos in keys and YAML syntax errors are answered 422 with what would fix them."""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any

import httpx
import pytest

from tests.harness import Orchestrator


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _source(name: str, message: str = "hi") -> str:
    return f"""
name: {name}
description: apply test
actions:
  steps:
    - name: first
      plugin: echo-v1.0.0
      config: {{message: {message}, count: 1}}
    - name: second
      plugin: echo
      depends_on: [first]
"""


def _post(
    client: httpx.Client, source: str, content_type: str = "application/yaml"
) -> httpx.Response:
    return client.post("/api/v1/workflows", content=source, headers={"Content-Type": content_type})


def _applied_records(orch: Orchestrator, workflow_id: str) -> list[dict[str, Any]]:
    response = orch.api.get(
        "/api/v1/audit", params={"subject_id": workflow_id, "action": "workflow.applied"}
    )
    assert response.status_code == 200, response.text
    return response.json()["records"]  # type: ignore[no-any-return]


def _problems(response: httpx.Response) -> list[dict[str, str]]:
    assert response.status_code == 422, response.text
    body = response.json()["error"]
    assert body["code"] == "invalid_input"
    return body["details"]  # type: ignore[no-any-return]


def test_the_same_definition_again_is_unchanged(orchestrator: Orchestrator) -> None:
    name = _name("same")
    first = _post(orchestrator.api, _source(name))
    assert first.status_code == 201, first.text
    assert first.json()["version"] == 1 and first.json()["unchanged"] is False

    again = _post(orchestrator.api, _source(name))
    assert again.status_code == 200, again.text
    body = again.json()
    assert body["unchanged"] is True
    assert body["version"] == 1 and body["version_id"] == first.json()["version_id"]
    assert body["id"] == first.json()["id"]

    versions = orchestrator.api.get(f"/api/v1/workflows/{name}/versions").json()["versions"]
    assert [v["version"] for v in versions] == [1]
    # nothing changed, so nothing is recorded: one record, of the one version made
    records = _applied_records(orchestrator, body["id"])
    assert [r["details"]["version"] for r in records] == [1]


def test_spacing_comments_key_order_and_format_do_not_count(orchestrator: Orchestrator) -> None:
    name = _name("layout")
    assert _post(orchestrator.api, _source(name)).status_code == 201
    rewritten = f"""# the same workflow, written differently
name:    {name}   # trailing comment
actions:
  steps:
    - plugin: echo-v1.0.0
      name: first

      config:
        count: 1
        message: hi
    - depends_on: [first]
      name: second
      plugin: {{id: echo}}
      error_handling: {{max_retries: 0}}   # the default, written out
description: apply test
"""
    response = _post(orchestrator.api, rewritten)
    assert response.status_code == 200, response.text
    assert response.json()["unchanged"] is True and response.json()["version"] == 1
    as_json = json.dumps(
        {
            "name": name,
            "description": "apply test",
            "actions": {
                "steps": [
                    {
                        "name": "first",
                        "plugin": "echo-v1.0.0",
                        "config": {"count": 1, "message": "hi"},
                    },
                    {"name": "second", "plugin": "echo", "depends_on": ["first"]},
                ]
            },
        }
    )
    response = _post(orchestrator.api, as_json, "application/json")
    assert response.status_code == 200, response.text
    assert response.json()["version"] == 1
    # the source kept is the one that made the version
    stored = orchestrator.api.get(f"/api/v1/workflows/{name}/versions/1").json()
    assert stored["source"] == _source(name)


def test_a_real_change_is_a_new_version(orchestrator: Orchestrator) -> None:
    name = _name("change")
    assert _post(orchestrator.api, _source(name)).status_code == 201
    changed = _post(orchestrator.api, _source(name, message="bye"))
    assert changed.status_code == 201, changed.text
    assert changed.json()["version"] == 2 and changed.json()["unchanged"] is False
    # true and 1 are equal in Python, not to a plugin: a change
    typed = _source(name, message="bye").replace("count: 1", "count: true")
    assert _post(orchestrator.api, typed).json()["version"] == 3
    # compared with the latest version only: going back is a change too
    back = _post(orchestrator.api, _source(name))
    assert back.status_code == 201 and back.json()["version"] == 4
    assert _post(orchestrator.api, _source(name)).json() | {"unchanged": None} == (
        back.json() | {"unchanged": None}
    )
    records = _applied_records(orchestrator, back.json()["id"])
    assert [r["details"]["version"] for r in records] == [4, 3, 2, 1]
    listed = orchestrator.api.get("/api/v1/workflows").json()["workflows"]
    assert [w["version"] for w in listed if w["name"] == name] == [4]


def _at_once(orch: Orchestrator, source: str, count: int = 8) -> list[httpx.Response]:
    clients = [orch.client(orch.token) for _ in range(count)]
    barrier = threading.Barrier(count)
    answers: list[httpx.Response | BaseException] = [RuntimeError("no answer")] * count

    def apply(i: int) -> None:
        barrier.wait()
        try:
            answers[i] = _post(clients[i], source)
        except BaseException as exc:  # reported below, in the test's thread
            answers[i] = exc

    threads = [threading.Thread(target=apply, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for answer in answers:
        if isinstance(answer, BaseException):
            raise answer
    return answers  # type: ignore[return-value]


def test_identical_applies_at_once_make_one_version(orchestrator: Orchestrator) -> None:
    name = _name("race")
    # a workflow not there yet, then a change to it: each applied by 8 clients at once
    for expected, source in ((1, _source(name)), (2, _source(name, message="two"))):
        answers = _at_once(orchestrator, source)
        statuses = sorted(a.status_code for a in answers)
        assert statuses == [200] * 7 + [201], [a.text for a in answers]
        assert {a.json()["version"] for a in answers} == {expected}
        assert len({a.json()["version_id"] for a in answers}) == 1
    versions = orchestrator.api.get(f"/api/v1/workflows/{name}/versions").json()["versions"]
    assert [v["version"] for v in versions] == [2, 1]
    workflow_id = orchestrator.api.get(f"/api/v1/workflows/{name}").json()["id"]
    assert [r["details"]["version"] for r in _applied_records(orchestrator, workflow_id)] == [2, 1]


def test_a_typo_in_a_key_suggests_the_key(orchestrator: Orchestrator) -> None:
    name = _name("typo")
    source = f"""
name: {name}
tagz: [a]
actions:
  steps:
    - name: first
      plugin: {{id: echo, versoin: 1.0.0}}
      confg: {{message: hi}}
      error_handling: {{max_retry: 2}}
      agents: {{pools: [{{pool_nam: p}}], labels: {{zone: {{exist: true}}}}}}
      zzzzzz: 1
"""
    problems = {p["path"]: p["message"] for p in _problems(_post(orchestrator.api, source))}
    assert problems["tagz"] == "unknown key 'tagz': did you mean `tags`?"
    assert problems["actions.steps[0].confg"] == "unknown key 'confg': did you mean `config`?"
    assert problems["actions.steps[0].plugin.versoin"] == (
        "unknown key 'versoin': did you mean `version`?"
    )
    assert problems["actions.steps[0].error_handling.max_retry"] == (
        "unknown key 'max_retry': did you mean `max_retries`?"
    )
    assert problems["actions.steps[0].agents.pools[0].pool_nam"] == (
        "unknown key 'pool_nam': did you mean `pool_name`?"
    )
    assert problems["actions.steps[0].agents.labels.zone.exist"] == (
        "unknown key 'exist': did you mean `exists`?"
    )
    # nothing close: the keys that would do
    unknown = problems["actions.steps[0].zzzzzz"]
    assert unknown.startswith("unknown key 'zzzzzz': expected one of name, description, plugin")
    assert orchestrator.api.get(f"/api/v1/workflows/{name}").status_code == 404
    # the dry run says the same
    checked = orchestrator.api.post(
        "/api/v1/workflows/validate", content=source, headers={"Content-Type": "application/yaml"}
    )
    assert {p["path"]: p["message"] for p in _problems(checked)} == problems


def test_a_yaml_syntax_error_has_its_line_and_column(orchestrator: Orchestrator) -> None:
    name = _name("syntax")
    source = f"name: {name}\nactions:\n  steps:\n    - name: first\n      plugin: echo: v1\n"
    (problem,) = _problems(_post(orchestrator.api, source))
    assert problem["path"] == "(root)"
    assert problem["message"] == (
        "line 5, column 19: mapping values are not allowed in this context: "
        "`      plugin: echo: v1`"
    )
    unclosed = f"name: {name}\nactions: {{steps: [\n  {{name: a, plugin: echo}}\n"
    (problem,) = _problems(_post(orchestrator.api, unclosed))
    assert problem["message"].startswith("line 4, column 1: ")
    assert "flow sequence at line 2" in problem["message"]
    tab = f"name: {name}\nactions:\n\tsteps: []\n"
    (problem,) = _problems(_post(orchestrator.api, tab))
    assert problem["message"].startswith("line 3, column 1: ")
    assert problem["message"].endswith("`\\tsteps: []`")
    bad_json = '{"name": ' + json.dumps(name) + ',\n "actions": }'
    # JSON bodies are checked before they reach the workflow parser: located too
    assert "line 2 column 13" in str(
        _problems(_post(orchestrator.api, bad_json, "application/json"))
    )
    # offline (`stavily workflow validate --offline`) the parser itself says it
    from stavily.errors import InvalidInput
    from stavily.workflows.definition import parse_source

    with pytest.raises(InvalidInput) as raised:
        parse_source(bad_json, "application/json")
    assert raised.value.details == [
        {"path": "(root)", "message": 'line 2, column 13: Expecting value: ` "actions": }`'}
    ]
    assert orchestrator.api.get(f"/api/v1/workflows/{name}").status_code == 404
