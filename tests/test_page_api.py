"""The endpoints the lab extension writes through: reviews, decisions, the report."""

from __future__ import annotations

import json

import pytest
from tornado.httpclient import HTTPClientError

from jupyter_dua_guard import events
from jupyter_dua_guard.ledger import open_ledger


def post(jp_fetch, endpoint: str, payload: dict, **kwargs):
    return jp_fetch("dua-guard", "api", endpoint, method="POST", body=json.dumps(payload), **kwargs)


def records(url: str, kind: str) -> list[dict]:
    ledger = open_ledger(url)
    try:
        return list(ledger.records(kinds=[kind]))
    finally:
        ledger.close()


async def test_review_is_signed_in_the_ledger_without_values(jp_fetch, ledger_url):
    response = await post(
        jp_fetch,
        "reviews",
        {
            "path": "study/cases.ipynb",
            "cell_id": "c-1",
            "output_index": 0,
            "findings": [
                {"kind": "individual_level", "confidence": 0.9, "reasons": ["SYN00017 Smith"]},
                {"kind": "secret", "reasons": ["x"]},
            ],
            "reason": "Synthetic test listing; stays inside the enclave.",
        },
    )
    answer = json.loads(response.body)
    assert answer["reason"].startswith("Synthetic test listing")
    assert answer["reviewer"] and answer["time"]
    [record] = records(ledger_url, events.REVIEW_SIGNED)
    assert record["data"]["notebook"] == "study/cases.ipynb"
    assert record["data"]["scope"] == "output"
    assert record["data"]["findings"] == {"individual_level": 1}
    assert record["context"]["notebook"] == "study/cases.ipynb"
    assert "SYN00017" not in json.dumps(record)


@pytest.mark.parametrize(
    "payload",
    [
        {"path": "a.ipynb"},
        {"reason": "no path"},
        {"path": "a.ipynb", "reason": "   "},
    ],
)
async def test_review_needs_path_and_reason(jp_fetch, ledger_url, payload):
    with pytest.raises(HTTPClientError) as caught:
        await post(jp_fetch, "reviews", payload)
    assert caught.value.code == 400
    assert records(ledger_url, events.REVIEW_SIGNED) == []


async def test_copy_and_export_decisions_are_recorded(jp_fetch, ledger_url):
    await post(
        jp_fetch, "decisions", {"action": "copy", "decision": "cancelled", "path": "n.ipynb"}
    )
    await post(
        jp_fetch,
        "decisions",
        {
            "action": "export",
            "decision": "exported",
            "path": "n.ipynb",
            "command": "docmanager:download",
            "flagged_outputs": 2,
        },
    )
    found = records(ledger_url, events.DISCLOSURE_DECISION)
    assert [(r["data"]["action"], r["data"]["decision"]) for r in found] == [
        ("copy", "cancelled"),
        ("export", "exported"),
    ]
    assert found[1]["data"]["flagged_outputs"] == 2


@pytest.mark.parametrize(
    "payload",
    [{"action": "paste", "decision": "copied"}, {"action": "copy", "decision": "exported"}, []],
)
async def test_unknown_decisions_are_refused(jp_fetch, ledger_url, payload):
    with pytest.raises(HTTPClientError) as caught:
        await post(jp_fetch, "decisions", payload)
    assert caught.value.code == 400


@pytest.mark.parametrize("endpoint", ["reviews", "decisions"])
async def test_writes_need_authentication(jp_fetch, ledger_url, endpoint):
    with pytest.raises(HTTPClientError) as caught:
        await post(
            jp_fetch,
            endpoint,
            {"action": "copy", "decision": "copied", "path": "x", "reason": "r"},
            headers={"Authorization": "token wrong"},
        )
    assert caught.value.code == 403
    assert records(ledger_url, events.DISCLOSURE_DECISION) == []
    assert records(ledger_url, events.REVIEW_SIGNED) == []


@pytest.mark.parametrize("fmt,marker", [("html", b"<html"), ("json", b'"head"'), ("csv", b",")])
async def test_report_download(jp_fetch, ledger_url, fmt, marker):
    await post(jp_fetch, "reviews", {"path": "r.ipynb", "reason": "checked"})
    response = await jp_fetch("dua-guard", "api", "report", params={"format": fmt})
    assert response.code == 200
    assert marker in response.body
    assert "attachment" in response.headers["Content-Disposition"]


async def test_report_refuses_unknown_format(jp_fetch, ledger_url):
    with pytest.raises(HTTPClientError) as caught:
        await jp_fetch("dua-guard", "api", "report", params={"format": "docx"})
    assert caught.value.code == 400


async def test_events_filter_by_kernel(jp_fetch, ledger_url):
    ledger = open_ledger(ledger_url)
    try:
        for kernel in ("k-1", "k-2", "k-1"):
            ledger.append(
                events.EGRESS_BLOCKED,
                {"host": "api.openai.com", "port": 443, "rule": "catalogue"},
                {"kernel_id": kernel},
            )
    finally:
        ledger.close()
    response = await jp_fetch(
        "dua-guard", "api", "events", params={"kernel": "k-1", "kind": "egress_blocked"}
    )
    page = json.loads(response.body)
    assert page["total"] == 2
    assert {r["context"]["kernel_id"] for r in page["events"]} == {"k-1"}


def test_schema_documents_every_event_kind():
    schema = json.loads(events.SCHEMA_PATH.read_text())
    assert schema["properties"]["kind"]["enum"] == list(events.EVENT_KINDS)
    described = {
        rule["if"]["properties"]["kind"]["const"] for rule in schema["allOf"] if "if" in rule
    }
    assert described == set(events.EVENT_KINDS)
    assert set(events.EVENT_FIELDS) == set(events.EVENT_KINDS)


def _listing_html(rows: int) -> str:
    body = "".join(
        f"<tr><th>{i}</th><td>SYN{i:05d}</td><td>{30 + i % 40}</td><td>C{i % 80:02d}.9</td>"
        f"<td>{2000 + i % 20}</td></tr>"
        for i in range(rows)
    )
    return (
        '<table class="dataframe"><thead><tr><th></th><th>Patient ID</th><th>Age</th>'
        "<th>Primary Site</th><th>Year of diagnosis</th></tr></thead>"
        f"<tbody>{body}</tbody></table>"
    )


async def test_detect_flags_an_unchecked_case_listing_without_values(jp_fetch):
    output = {
        "output_type": "execute_result",
        "execution_count": 1,
        "metadata": {},
        "data": {"text/html": _listing_html(50), "text/plain": "..."},
    }
    response = await post(jp_fetch, "detect", {"output": output})
    findings = json.loads(response.body)["findings"]
    assert "individual_level" in {f["kind"] for f in findings}
    assert all(f["reasons"] for f in findings)
    assert "SYN00007" not in response.body.decode()


async def test_detect_leaves_a_large_aggregate_alone(jp_fetch):
    rows = "".join(
        f"<tr><th>Site {i}</th><td>{100 + i}</td><td>{200 + i}</td></tr>" for i in range(8)
    )
    html = (
        "<table><thead><tr><th>Primary Site</th><th>Female</th><th>Male</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>"
    )
    output = {"output_type": "display_data", "metadata": {}, "data": {"text/html": html}}
    response = await post(jp_fetch, "detect", {"output": output})
    assert json.loads(response.body)["findings"] == []


@pytest.mark.parametrize("body", ["not json", json.dumps({"output": "x"}), json.dumps([])])
async def test_detect_refuses_malformed_requests(jp_fetch, body):
    with pytest.raises(HTTPClientError) as caught:
        await jp_fetch("dua-guard", "api", "detect", method="POST", body=body)
    assert caught.value.code == 400
