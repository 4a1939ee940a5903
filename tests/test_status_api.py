"""The status API against a real jupyter_server started by pytest-jupyter."""

import json

import pytest
from tornado.httpclient import HTTPClientError

from jupyter_dua_guard import __version__


async def test_status_reports_version_and_active(jp_fetch):
    response = await jp_fetch("dua-guard", "api", "status")
    assert response.code == 200
    payload = json.loads(response.body)
    assert payload["version"] == __version__
    assert payload["active"] is True


@pytest.mark.parametrize("headers", [{"Authorization": ""}, {"Authorization": "token wrong"}])
async def test_status_refuses_requests_without_a_valid_token(jp_fetch, headers):
    with pytest.raises(HTTPClientError) as caught:
        await jp_fetch("dua-guard", "api", "status", headers=headers)
    assert caught.value.code == 403
    assert b"version" not in (caught.value.response.body or b"")


@pytest.mark.parametrize(
    "jp_server_config",
    [
        {
            "ServerApp": {"jpserver_extensions": {"jupyter_dua_guard": True}},
            "DUAGuard": {"enabled": False},
        }
    ],
)
async def test_status_follows_config(jp_fetch):
    payload = json.loads((await jp_fetch("dua-guard", "api", "status")).body)
    assert payload["active"] is False
