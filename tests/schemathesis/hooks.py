"""Schemathesis hooks for tests/schemathesis/run.

Generated session and router ids are well formed but unknown, so every router call
would stop at the relay's session check (404) and the agent's validators would never
see the generated data. This hook puts the run's real session and router ids into the
router calls (query and body, both spellings), so the generated payloads reach the
simulated router. Session and admin operations keep their generated ids: ending or
revoking the run's own session or router would turn the rest of the run into 404s.
"""

import os
import uuid

import schemathesis

SESSION = os.environ["NETPILOT_SESSION_ID"]
ROUTER = os.environ["NETPILOT_ROUTER_ID"]
IDS = {"sessionId": SESSION, "session_id": SESSION, "routerId": ROUTER, "router_id": ROUTER}


def _router_call(path: str) -> bool:
    return path.startswith("/api/") and not path.startswith(("/api/session/", "/api/admin/"))


def _spare_own_session(case):
    # Schemathesis feeds ids from earlier answers into later requests (its resource
    # pool): the run's own session id, read from an answer, must not reach
    # `session/end` or a `session/start` that restarts it.
    for container in (case.query, case.body):
        if isinstance(container, dict):
            for k in ("sessionId", "session_id"):
                if container.get(k) == SESSION:
                    container[k] = str(uuid.uuid4())


@schemathesis.hook
def before_call(ctx, case, **kwargs):
    if case.operation.path in ("/api/session/end", "/api/session/start"):
        _spare_own_session(case)
    if not _router_call(case.operation.path):
        return
    if isinstance(case.query, dict):
        for k in IDS:
            if k in case.query:
                case.query[k] = IDS[k]
    if isinstance(case.body, dict):
        for k in IDS:
            if k in case.body:
                case.body[k] = IDS[k]


# Refusals of a schema-valid request that no schema can rule out, each with the words
# of its message that say which rule refused it: the request is well formed but names
# something this router does not have, or breaks a rule across fields or across the
# request that JSON Schema cannot state (README, "Fuzzing the API": each argued there).
# Every other 400 to a positive case is a finding: the document allows what the server
# refuses.
NOT_EXPRESSIBLE = [
    ("UNKNOWN_GROUP", ""),  # PUT .../policy for a group not synced yet
    ("GUEST_GROUP", ""),  # the guest group cannot be deleted
    ("UNKNOWN_CATEGORY", ""),  # a category this router does not have
    ("CATEGORY_IN_USE", ""),
    ("UNKNOWN_RADIO", ""),  # radio/interface names are the router's own UCI sections
    ("UNKNOWN_INTERFACE", ""),
    ("NO_AP_INTERFACE", ""),
    ("PASSWORD_NOT_APPLICABLE", ""),  # 64 hex digits on a WPA3 (sae) interface
    ("DUPLICATE_DEVICE", ""),  # one MAC twice (in any notation) across the groups sent
    ("LIMIT_EXCEEDED", ""),  # totals across groups (devices, categories, groups)
    ("INVALID_SCHEDULE", "start and end are equal"),  # two fields compared
    ("INVALID_GROUP", "listed twice"),  # sync-all: one group id twice in the array
    ("INVALID_PASSWORD", "WPA3"),  # 64 hex digits on a WPA3 (sae) interface
    ("INVALID_PARAMETER", "is not a router"),  # admin list: a cursor naming no router
]


@schemathesis.check
def positive_data_accepted(ctx, response, case):
    """`positive_data_acceptance` with the refusals above allowed."""
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code != 400:
        return None
    try:
        error = response.json()["error"]
        code, message = error["code"], error["message"]
    except Exception:
        code, message = None, ""
    if any(code == c and words in message for c, words in NOT_EXPRESSIBLE):
        return None
    raise AssertionError(f"a schema-valid request was refused: 400 {code}: {response.text[:300]}")
