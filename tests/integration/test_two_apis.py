"""Issue 12 §6: read-modify-write updates stay correct with several API instances. Two API
processes change the same tenant at the same moment (suspend a different batch each; set different
fields of PUT /tenant); no update may be lost. Without the shard fencing of
CommandWriter.update_config, the later write of a pair overwrites the earlier one."""

from __future__ import annotations

import asyncio
import contextlib

import httpx

from infra.supervisor import LocalSystem
from tests.conftest import Tenant
from tests.integration.test_domains import extra_api

ROUNDS = 12


async def _both(url_a: str, url_b: str, key: str, calls: list[tuple[str, str, dict, dict | None]]) -> list[object]:
    async with httpx.AsyncClient(headers={"X-API-Token": key}, timeout=60) as c:
        async def one(i: int, call: tuple[str, str, dict, dict | None]) -> object:
            method, path, params, body = call
            r = await c.request(method, (url_a if i % 2 == 0 else url_b) + path, params=params, json=body)
            return r.status_code if r.status_code == 200 else (r.status_code, r.text)
        return list(await asyncio.gather(*(one(i, call) for i, call in enumerate(calls))))


def test_concurrent_updates_through_two_api_instances_are_never_lost(system: LocalSystem, new_tenant) -> None:
    t: Tenant = new_tenant()
    with contextlib.ExitStack() as stack:
        url_b = stack.enter_context(extra_api(system, "api-second"))
        url_a = system.url("api")
        # suspensions: each round suspends two new batches at once, one through each API
        for i in range(ROUNDS):
            codes = asyncio.run(_both(url_a, url_b, t.api_key, [
                ("POST", "/commands/suspend", {"batch_code": f"a{i}"}, None),
                ("POST", "/commands/suspend", {"batch_code": f"b{i}"}, None)]))
            assert codes == [200, 200], codes
        for url in (url_a, url_b):  # either API, read at once (the views caught up to the end)
            r = httpx.post(url + "/commands/suspend", params={"batch_code": "check"},
                           headers={"X-API-Token": t.api_key}, timeout=30)
            held = set(r.json()["suspended_batches"])
            missing = {f"{p}{i}" for i in range(ROUNDS) for p in "ab"} - held
            assert not missing, f"lost updates: {sorted(missing)}"
        # PUT /tenant: two fields at once through the two APIs
        for i in range(ROUNDS):
            codes = asyncio.run(_both(url_a, url_b, t.api_key, [
                ("PUT", f"/tenant/{t.id}", {}, {"name": f"name-{i}"}),
                ("PUT", f"/tenant/{t.id}", {}, {"client_sync_path": f"/sync-{i}"})]))
            assert codes == [200, 200], codes
            got = httpx.get(url_b + f"/tenant/{t.id}", headers={"X-API-Token": t.api_key}, timeout=30).json()
            assert (got["name"], got["client_sync_path"]) == (f"name-{i}", f"/sync-{i}"), (i, got)
