"""`stealnb serve` and HttpOracle: the TF Serving REST API, keys, budgets, limits, persistence,
retries, and an extraction over HTTP that survives a server kill (stealnb/serve/server.py, oracle.py)."""
import base64
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from stealnb.core import data, models, train
from stealnb.extraction import loop, oracle
from stealnb.serve import server
from stealnb.extraction.oracle import BudgetExceeded, HttpOracle, Oracle, OracleHTTPError

ALICE, BOB = "alice-key-0001", "bob-key-00002"
PRED = "/v1/models/secret:predict"


def images(n, seed):
    return np.random.default_rng(seed).random((n, 32, 32, 3), dtype=np.float32)


def auth(key):
    return {"Authorization": f"Bearer {key}"}


def b64(x):
    return {"b64": base64.b64encode(np.ascontiguousarray(x, "<f4").tobytes()).decode()}


@pytest.fixture(scope="module")
def tiny():
    return models.build("cnn-tiny", seed=0)


def app_client(model, tmp_path=None, **kw):
    kw.setdefault("keys", {ALICE: {"budget": 100, "name": "alice"}, BOB: {"budget": 100, "name": "bob"}})
    app = server.create_app(model, log_dir=tmp_path, **kw)
    return app, TestClient(app, raise_server_exceptions=False)


def transport_for(client, fail=(), calls=None):
    """An httpx transport that forwards to a TestClient, first answering with the injected
    failures (an HTTP status or an exception instance) on predict requests."""
    fail = list(fail)

    def handler(request: httpx.Request):
        if request.url.path.endswith(":predict"):
            if calls is not None:
                calls.append(request)
            if fail:
                f = fail.pop(0)
                if isinstance(f, Exception):
                    raise f
                return httpx.Response(f, json={"error": "injected", "code": "injected"}, headers={"Retry-After": "0"})
        r = client.request(request.method, request.url.path, content=request.content, headers=dict(request.headers))
        return httpx.Response(r.status_code, content=r.content, headers=r.headers)

    return httpx.MockTransport(handler)


# -- the 4xx matrix -------------------------------------------------------------------------------
def _img(v=0.5, shape=(32, 32, 3)):
    return np.full(shape, v).tolist()


GOOD = json.dumps({"instances": [_img()]}).encode()
CASES = [
    # (id, path, headers, body, status, code)
    ("bad json", PRED, auth(ALICE), b'{"instances": [', 400, "bad_json"),
    ("not utf-8", PRED, auth(ALICE), b"\xff\xfe\xfa{", 400, "bad_json"),
    ("top-level list", PRED, auth(ALICE), b"[1, 2]", 400, "bad_request"),
    ("no instances", PRED, auth(ALICE), b'{"signature_name": "serving_default"}', 400, "bad_request"),
    ("columnar inputs", PRED, auth(ALICE), b'{"inputs": [[0.5]]}', 400, "bad_request"),
    ("unknown field", PRED, auth(ALICE), b'{"instances": [], "foo": 1}', 400, "bad_request"),
    ("other signature", PRED, auth(ALICE), json.dumps({"instances": [_img()], "signature_name": "x"}).encode(), 400,
     "bad_request"),
    ("instances not a list", PRED, auth(ALICE), b'{"instances": {"a": 1}}', 400, "bad_request"),
    ("empty batch", PRED, auth(ALICE), b'{"instances": []}', 400, "empty_batch"),
    ("wrong shape", PRED, auth(ALICE), json.dumps({"instances": [_img(shape=(28, 28, 1))]}).encode(), 400, "bad_shape"),
    ("ragged", PRED, auth(ALICE), json.dumps({"instances": [_img(), _img(shape=(32, 32))]}).encode(), 400, "bad_shape"),
    ("flat numbers", PRED, auth(ALICE), b'{"instances": [0.5, 0.5]}', 400, "bad_shape"),
    ("strings", PRED, auth(ALICE), json.dumps({"instances": [np.full((32, 32, 3), "0.5").tolist()]}).encode(), 400,
     "not_numeric"),
    ("bool", PRED, auth(ALICE), GOOD.replace(b"0.5", b"true", 1), 400, "not_numeric"),
    ("null", PRED, auth(ALICE), GOOD.replace(b"0.5", b"null", 1), 400, "not_numeric"),
    ("NaN", PRED, auth(ALICE), GOOD.replace(b"0.5", b"NaN", 1), 400, "non_finite"),
    ("Infinity", PRED, auth(ALICE), GOOD.replace(b"0.5", b"-Infinity", 1), 400, "non_finite"),
    ("1e400", PRED, auth(ALICE), GOOD.replace(b"0.5", b"1e400", 1), 400, "non_finite"),
    ("negative", PRED, auth(ALICE), GOOD.replace(b"0.5", b"-0.25", 1), 400, "out_of_range"),
    ("above one", PRED, auth(ALICE), GOOD.replace(b"0.5", b"255", 1), 400, "out_of_range"),
    ("huge int", PRED, auth(ALICE), GOOD.replace(b"0.5", b"1" + b"0" * 30, 1), 400, "out_of_range"),
    ("b64 not base64", PRED, auth(ALICE), b'{"instances": [{"b64": "***"}]}', 400, "bad_base64"),
    ("b64 wrong length", PRED, auth(ALICE), json.dumps({"instances": [b64(np.zeros(10))]}).encode(), 400, "bad_shape"),
    ("b64 NaN", PRED, auth(ALICE), json.dumps({"instances": [b64(np.full((32, 32, 3), np.nan))]}).encode(), 400,
     "non_finite"),
    ("b64 extra key", PRED, auth(ALICE), b'{"instances": [{"b64": "", "x": 1}]}', 400, "bad_request"),
    ("b64 mixed with lists", PRED, auth(ALICE), json.dumps({"instances": [b64(np.zeros((32, 32, 3))), _img()]}).encode(),
     400, "bad_request"),
    ("batch too large", PRED, auth(ALICE), json.dumps({"instances": [_img()] * 5}).encode(), 413, "batch_too_large"),
    ("body too large", PRED, auth(ALICE), GOOD[:-1] + b" " * (1 << 20) + b"}", 413, "body_too_large"),
    ("missing key", PRED, {}, GOOD, 401, "missing_key"),
    ("bad auth scheme", PRED, {"Authorization": f"Basic {ALICE}"}, GOOD, 401, "bad_auth"),
    ("unknown key", PRED, auth("mallory-key-0"), GOOD, 403, "unknown_key"),
    ("unknown model", "/v1/models/other:predict", auth(ALICE), GOOD, 404, "unknown_model"),
    ("unknown version", "/v1/models/secret/versions/2:predict", auth(ALICE), GOOD, 404, "unknown_version"),
    ("unknown path", "/v2/predict", auth(ALICE), GOOD, 404, "http_404"),
]


@pytest.fixture(scope="module")
def matrix_app(tiny, tmp_path_factory):
    return app_client(tiny, tmp_path_factory.mktemp("logs"), max_batch=4, max_body_bytes=1 << 20)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_malformed_requests_get_the_right_4xx_and_cost_nothing(matrix_app, case):
    app, client = matrix_app
    _, path, headers, body, status, code = case
    r = client.post(path, content=body, headers={**headers, "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()
    assert err["code"] == code and len(err["error"]) > 10
    assert all(u["spent"] == 0 for u in app.state.service.key_usage().values())


def test_streamed_body_without_length_and_wrong_method(matrix_app):
    app, client = matrix_app
    r = client.post(PRED, content=iter([GOOD[:-1], b" " * (1 << 20), b"}"]), headers=auth(ALICE))
    assert r.status_code == 413 and r.json()["code"] == "body_too_large"
    r = client.put(PRED, content=GOOD, headers=auth(ALICE))
    assert r.status_code == 405 and "POST" in r.json()["error"]
    r = client.post(PRED, content=GOOD, headers=auth(ALICE))  # after all that, a good request works
    assert r.status_code == 200 and len(r.json()["predictions"]) == 1


# -- answers, keys, budgets, persistence ----------------------------------------------------------
@pytest.mark.parametrize("output", ["label", "topk", "probs"])
def test_answers_equal_the_in_process_oracle_in_every_mode(tiny, output):
    _, client = app_client(tiny, output=output, top_k=3)
    x = images(20, 1)
    ref = Oracle(tiny, output=output, top_k=3).query(x)
    for encoding in ("b64", "list"):
        o = HttpOracle("http://srv", api_key=ALICE, output=output, encoding=encoding, transport=transport_for(client))
        got = o.query(x)
        for a, b in zip(ref if output == "topk" else [ref], got if output == "topk" else [got]):
            np.testing.assert_array_equal(a, b)
    if output == "probs":  # a client may ask for less than the server answers, never more
        o = HttpOracle("http://srv", api_key=BOB, output="topk", top_k=2, transport=transport_for(client))
        idx, p = o.query(x)
        ref_idx, ref_p = Oracle(tiny, output="topk", top_k=2).query(x)
        np.testing.assert_array_equal(idx, ref_idx)
        np.testing.assert_array_equal(p, ref_p)
    else:
        with pytest.raises(ValueError, match="does not contain 'probs'"):
            HttpOracle("http://srv", api_key=BOB, output="probs", transport=transport_for(client))


def test_keys_cannot_see_or_spend_each_others_budget(tiny, tmp_path):
    app, client = app_client(tiny, tmp_path, keys={ALICE: {"budget": 5, "name": "alice"}, BOB: {"budget": 5, "name": "bob"}})
    x = images(5, 2)
    body = lambda x: json.dumps({"instances": [b64(i) for i in x]}).encode()  # noqa: E731
    st = lambda k: client.get("/v1/models/secret", headers=auth(k)).json()["stealnb"]["key"]  # noqa: E731

    r = client.post(PRED, content=body(x[:3]), headers=auth(ALICE))
    assert r.status_code == 200 and r.headers["X-Budget-Remaining"] == "2"
    assert st(ALICE)["spent"] == 3 and st(BOB)["spent"] == 0
    text = client.get("/v1/models/secret", headers=auth(ALICE)).text
    assert "bob" not in text and server.key_id(BOB) not in text and BOB not in text
    # the same samples asked by bob are bob's to pay: alice's spending buys bob nothing
    assert client.post(PRED, content=body(x[:3]), headers=auth(BOB)).status_code == 200
    assert st(ALICE)["spent"] == 3 and st(BOB)["spent"] == 3
    # repeats are free for the key that paid them
    assert client.post(PRED, content=body(x[:3]), headers=auth(ALICE)).status_code == 200 and st(ALICE)["spent"] == 3
    # alice's budget ends: refused as a whole, nothing charged, bob unaffected
    r = client.post(PRED, content=body(images(3, 3)), headers=auth(ALICE))
    assert r.status_code == 402 and r.json() | {"error": ""} == {"error": "", "code": "budget_exceeded", "budget": 5,
                                                                "spent": 3, "asked": 3}
    assert st(ALICE)["spent"] == 3
    assert client.post(PRED, content=body(images(2, 4)), headers=auth(BOB)).status_code == 200 and st(BOB)["spent"] == 5
    # the client turns the server's 402 into BudgetExceeded and keeps what was answered
    o = HttpOracle("http://srv", api_key=ALICE, transport=transport_for(client), batch_size=1)
    with pytest.raises(BudgetExceeded) as e:
        o.query(images(3, 5))
    assert o.spent == 2 and e.value.budget == 5 and st(ALICE)["spent"] == 5
    logs = sorted((tmp_path / "keys").glob("*.jsonl"))
    assert {p.stem for p in logs} == {server.key_id(ALICE), server.key_id(BOB)}


def test_spending_survives_a_restart_and_a_torn_log_line(tiny, tmp_path):
    keys = {ALICE: {"budget": 10}}
    app, client = app_client(tiny, tmp_path, keys=keys)
    x = images(6, 7)
    body = json.dumps({"instances": [b64(i) for i in x]}).encode()
    first = client.post(PRED, content=body, headers=auth(ALICE)).json()["predictions"]
    app.state.service.close()
    log = tmp_path / "keys" / f"{server.key_id(ALICE)}.jsonl"
    with open(log, "ab") as f:
        f.write(b'{"t": 1, "status": 200, "fp": ["ab')  # crash mid-write
    with pytest.warns(UserWarning, match="torn last line"):
        app2, client2 = app_client(tiny, tmp_path, keys=keys)
    assert app2.state.service.key_usage()[server.key_id(ALICE)]["spent"] == 6
    r = client2.post(PRED, content=body, headers=auth(ALICE))  # already paid: free, same answers
    assert r.json()["predictions"] == first and r.headers["X-Budget-Spent"] == "6"
    r = client2.post(PRED, content=json.dumps({"instances": [b64(i) for i in images(5, 8)]}).encode(), headers=auth(ALICE))
    assert r.status_code == 402  # 6 + 5 > 10: the restart did not reset the budget
    with open(log, "r+b") as f:  # corruption in the middle is not guessed around
        f.seek(0)
        f.write(b"#")
    with pytest.raises(server.QueryLogError, match="line 1: checksum mismatch"):
        app_client(tiny, tmp_path, keys=keys)


class FakeClock:
    """Monotonic seconds that move only when a test says so."""

    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


def test_rate_limit_refills_its_bucket_at_the_rate_on_the_injected_clock(tiny):
    clock = FakeClock()
    _, client = app_client(tiny, keys={ALICE: {"rate": 0.5, "burst": 2}, BOB: {"rate": 0.5, "burst": 2}}, clock=clock)
    post = lambda key=ALICE: client.post(PRED, content=GOOD, headers=auth(key))  # noqa: E731
    assert [post().status_code for _ in range(2)] == [200, 200]  # a burst of 2
    r = post()
    assert r.status_code == 429 and r.json()["code"] == "rate_limited"
    assert r.headers["Retry-After"] == "2" and r.json()["retry_after"] == 2.0  # 1 token at 0.5/s
    clock.now += 1.0  # half a token refilled; the refusal above took none
    r = post()
    assert r.status_code == 429 and r.headers["Retry-After"] == "1" and r.json()["retry_after"] == 1.0
    clock.now += 1.0
    assert [post().status_code for _ in range(2)] == [200, 429]
    assert post(BOB).status_code == 200  # every key has its own bucket
    clock.now += 3600.0  # an idle hour refills at most the burst
    assert [post().status_code for _ in range(3)] == [200, 200, 429]


def _synthetic_attack(n=200):
    """A JbDA-like query stream: a few random seeds, then new seeds or small sign steps from earlier queries."""
    rng = np.random.default_rng(0)
    base = list(rng.uniform(0.2, 0.8, (8, 32, 32, 3)).astype(np.float32))
    while len(base) < n:
        if rng.random() < 0.3:
            base.append(rng.uniform(0.2, 0.8, (32, 32, 3)).astype(np.float32))
        else:
            p = base[rng.integers(len(base))]
            base.append(np.clip(p + 0.02 * np.sign(rng.normal(size=p.shape)), 0, 1).astype(np.float32))
    return np.asarray(base)


def _ask_in_requests(client, x, size=10, key=ALICE):
    """``x`` in requests of ``size`` images: the statuses and the predictions (None where refused)."""
    statuses, answers = [], []
    for s in range(0, len(x), size):
        r = client.post(PRED, content=json.dumps({"instances": [b64(i) for i in x[s : s + size]]}).encode(),
                        headers=auth(key))
        statuses.append(r.status_code)
        answers += r.json().get("predictions", [None] * len(x[s : s + size]))
    return statuses, answers


def test_server_side_prada_blocks_or_poisons_a_synthetic_attack(tiny, tmp_path):
    x = _synthetic_attack()
    truth = Oracle(tiny).query(x)
    prada = {"delta": 0.9, "min_queries": 40}
    for action in ("block", "poison"):
        app, client = app_client(tiny, tmp_path / action, keys={ALICE: None},
                                 defenses=[{"name": "prada", **prada, "action": action}])
        answers, statuses = [], []
        for s in range(0, len(x), 10):
            r = client.post(PRED, content=json.dumps({"instances": [b64(i) for i in x[s : s + 10]]}).encode(),
                            headers=auth(ALICE))
            statuses.append(r.status_code)
            answers += r.json().get("predictions", [None] * 10)
        flagged_at = app.state.service.key_usage()[server.key_id(ALICE)]["flagged_at"]
        assert flagged_at is not None and 40 < flagged_at <= len(x)
        req = (flagged_at - 1) // 10  # the request that raised the alarm
        assert all(s == 200 for s in statuses[:req])
        assert answers[: req * 10] == truth[: req * 10].tolist()
        if action == "block":
            assert all(s == 403 for s in statuses[req:])
            assert r.json()["code"] == "blocked"
        else:
            assert all(s == 200 for s in statuses)
            after = np.asarray(answers[req * 10 :])
            assert (after != truth[req * 10 :]).all()  # every answer after the alarm is a lie
        log = (tmp_path / action / "keys" / f"{server.key_id(ALICE)}.jsonl").read_text()
        assert f'"event":"prada_flag","query":{flagged_at}' in log
    app2, client2 = app_client(tiny, tmp_path / "block", keys={ALICE: None}, defenses=[{"name": "prada", **prada, "action": "block"}])
    assert client2.post(PRED, content=GOOD, headers=auth(ALICE)).status_code == 403  # the alarm survives a restart
    # a benign stream of independent images is not flagged
    app3, client3 = app_client(tiny, keys={ALICE: None}, defenses=[{"name": "prada", **prada, "action": "block"}])
    xb = images(200, 9)
    for s in range(0, 200, 20):
        r = client3.post(PRED, content=json.dumps({"instances": [b64(i) for i in xb[s : s + 20]]}).encode(),
                         headers=auth(ALICE))
        assert r.status_code == 200
    assert app3.state.service.key_usage()[server.key_id(ALICE)]["flagged_at"] is None


PRADA = {"delta": 0.9, "min_queries": 40}


@pytest.mark.parametrize("output", ["probs", "topk"])
def test_prada_poison_of_soft_labels_moves_the_top1_of_every_answer_after_the_alarm(tiny, output):
    x = _synthetic_attack()
    app, client = app_client(tiny, output=output, top_k=3, keys={ALICE: None},
                             defenses=[{"name": "prada", **PRADA, "action": "poison"}])
    statuses, answers = _ask_in_requests(client, x)
    assert set(statuses) == {200}
    flagged_at = app.state.service.key_usage()[server.key_id(ALICE)]["flagged_at"]
    assert flagged_at is not None and 40 < flagged_at <= len(x)
    cut = (flagged_at - 1) // 10 * 10  # the first answer of the request that raised the alarm
    probs = Oracle(tiny, output="probs").query(x).astype(np.float64)
    if output == "probs":
        got = np.asarray(answers, np.float64)
        np.testing.assert_allclose(got[:cut], probs[:cut], atol=1e-6)  # the truth before
        for g, p in zip(got[cut:], probs[cut:]):  # after: the same vector rolled by 1..C-1 classes
            assert any(np.allclose(g, np.roll(p, k), atol=1e-6) for k in range(1, 10)), (g, p)
        assert (got[cut:].argmax(1) != probs[cut:].argmax(1)).all()
    else:
        idx, ref = [a["classes"] for a in answers], Oracle(tiny, output="topk", top_k=3).query(x)[0]
        assert idx[:cut] == ref[:cut].tolist()
        assert all(c[0] != t for c, t in zip(idx[cut:], probs[cut:].argmax(1)))  # every top-1 is a lie
    # a poisoned sample asked again gets the same lie, and is not charged again
    spent = app.state.service.key_usage()[server.key_id(ALICE)]["spent"]
    again = _ask_in_requests(client, x[cut : cut + 10])[1]
    assert again == answers[cut : cut + 10] and app.state.service.key_usage()[server.key_id(ALICE)]["spent"] == spent


def test_prada_log_records_the_alarm_and_keeps_answering_the_truth(tiny, tmp_path):
    x = _synthetic_attack()
    keys, defense = {ALICE: None}, [{"name": "prada", **PRADA, "action": "log"}]
    app, client = app_client(tiny, tmp_path, keys=keys, defenses=defense)
    statuses, answers = _ask_in_requests(client, x)
    assert set(statuses) == {200} and answers == Oracle(tiny).query(x).tolist()
    flagged_at = app.state.service.key_usage()[server.key_id(ALICE)]["flagged_at"]
    assert flagged_at is not None and 40 < flagged_at <= len(x)
    log = (tmp_path / "keys" / f"{server.key_id(ALICE)}.jsonl").read_text()
    assert log.count('"event":"prada_flag"') == 1 and f'"query":{flagged_at}' in log and "poisoned" not in log
    app.state.service.close()
    app2, client2 = app_client(tiny, tmp_path, keys=keys, defenses=defense)  # the alarm survives a restart ...
    assert app2.state.service.key_usage()[server.key_id(ALICE)]["flagged_at"] == flagged_at
    r = client2.post(PRED, content=json.dumps({"instances": [b64(images(1, 50)[0])]}).encode(), headers=auth(ALICE))
    assert r.status_code == 200 and r.json()["predictions"] == Oracle(tiny).query(images(1, 50)).tolist()  # ... and only logs


def test_x_api_key_header_authenticates_like_a_bearer_token(tiny):
    app, client = app_client(tiny)
    x = images(3, 51)
    body = json.dumps({"instances": [b64(i) for i in x]}).encode()
    r = client.post(PRED, content=body, headers={"X-API-Key": ALICE})
    assert r.status_code == 200 and r.json()["predictions"] == Oracle(tiny).query(x).tolist()
    assert client.get("/v1/models/secret", headers={"X-API-Key": ALICE}).json()["stealnb"]["key"]["spent"] == 3
    assert client.get("/v1/models/secret", headers=auth(ALICE)).json()["stealnb"]["key"]["spent"] == 3  # the same key
    assert app.state.service.key_usage()[server.key_id(BOB)]["spent"] == 0
    r = client.post(PRED, content=body, headers={"X-API-Key": "mallory-key-0"})
    assert r.status_code == 403 and r.json()["code"] == "unknown_key"


def test_versions_1_is_the_same_model_and_the_same_budget(tiny):
    app, client = app_client(tiny)
    x = images(4, 52)
    body = json.dumps({"instances": [b64(i) for i in x]}).encode()
    r = client.post("/v1/models/secret/versions/1:predict", content=body, headers=auth(ALICE))
    assert r.status_code == 200 and r.headers["X-Budget-Spent"] == "4"
    assert r.json()["predictions"] == Oracle(tiny).query(x).tolist()
    r2 = client.post(PRED, content=body, headers=auth(ALICE))  # paid on either route, free on the other
    assert r2.json() == r.json() and r2.headers["X-Budget-Spent"] == "4"


def test_too_many_requests_in_progress_answer_503_with_retry_after_and_charge_nothing(tiny):
    carol = "carol-key-0003"
    app = server.create_app(tiny, keys={ALICE: None, BOB: None, carol: None}, max_pending=2, max_pending_per_key=1,
                            body_timeout=60.0)
    svc = app.state.service
    with server.BackgroundServer(app) as srv:
        stalled = [_stalled_predict(srv, key, GOOD, 10) for key in (ALICE, BOB)]  # two bodies that never end
        try:
            deadline = time.monotonic() + 30
            while svc.pending < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            r = httpx.post(srv.url + PRED, content=GOOD, headers=auth(carol), timeout=30)
            assert r.status_code == 503 and r.json()["code"] == "overloaded" and r.headers["Retry-After"] == "1"
            assert all(u["spent"] == 0 and u["requests"] == 0 for u in svc.key_usage().values())
        finally:
            for s in stalled:
                s.close()
        deadline = time.monotonic() + 30
        while svc.pending and time.monotonic() < deadline:  # the server notices the hang-ups
            time.sleep(0.01)
        r = httpx.post(srv.url + PRED, content=GOOD, headers=auth(carol), timeout=30)
        assert r.status_code == 200 and svc.key_usage()[server.key_id(carol)]["spent"] == 1


# -- faults: a stalling key, a full disk, damaged query logs --------------------------------------
def _stalled_predict(srv, key, body, sent):
    """A raw predict request announcing all of ``body`` but sending only its first ``sent`` bytes."""
    s = socket.create_connection((srv.host, srv.port), timeout=30)
    s.sendall(f"POST {PRED} HTTP/1.1\r\nHost: {srv.host}\r\nAuthorization: Bearer {key}\r\nContent-Type: "
              f"application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[:sent])
    return s


def _status_of(s):
    """The status code of the answer on socket ``s`` (waits at most its timeout)."""
    return int(s.recv(65536).split(b" ", 2)[1])


def _trickle(s, outcome, n=300, every=0.05):
    """Send one more byte of the body every ``every`` s, ``n`` times at most or until the server
    hangs up; ``outcome`` gets ``"cut off"`` in the second case, ``"sent all"`` in the first."""
    for _ in range(n):
        time.sleep(every)
        try:
            s.send(b" ")
        except OSError:
            outcome.append("cut off")
            return
    outcome.append("sent all")


def test_a_key_stalling_its_bodies_does_not_lock_out_other_keys(tiny):
    app = server.create_app(tiny, keys={ALICE: None, BOB: None}, max_pending=4, body_timeout=1.0)
    svc = app.state.service
    socks = []
    with server.BackgroundServer(app) as srv:
        try:
            socks.append(_stalled_predict(srv, ALICE, GOOD, 10))
            t0 = time.monotonic()
            trickled = []
            trickler = threading.Thread(target=_trickle, args=(socks[0], trickled), daemon=True)
            trickler.start()
            while svc.pending < 1 and time.monotonic() < t0 + 5:
                time.sleep(0.01)
            extra = [_stalled_predict(srv, ALICE, GOOD, 10) for _ in range(svc.max_pending)]
            socks += extra
            while len(select.select(extra, [], [], 0.05)[0]) + svc.pending < 1 + len(extra) \
                    and time.monotonic() < t0 + 5:
                pass  # each extra request is answered or in progress
            r = httpx.post(srv.url + PRED, content=GOOD, headers=auth(BOB), timeout=5)
            assert r.status_code == 200, r.text  # bob is served while alice stalls
            assert [_status_of(s) for s in extra] == [429] * len(extra)  # alice's own share is one request
            # body_timeout bounds the whole body, however it trickles in: the server answers 408 and
            # hangs up while bytes are still coming (15 s of them), not after they stop
            assert _status_of(socks[0]) == 408
            trickler.join(timeout=60)
            assert trickled == ["cut off"]
            r = httpx.post(srv.url + PRED, content=GOOD, headers=auth(ALICE), timeout=5)
            assert r.status_code == 200 and svc.pending == 0
        finally:
            for s in socks:
                s.close()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (a device that is always full)")
def test_a_full_disk_charges_and_answers_nothing_and_says_so(tiny, tmp_path):
    keys = {ALICE: {"budget": 10}}
    app, client = app_client(tiny, tmp_path, keys=keys)
    log = tmp_path / "keys" / f"{server.key_id(ALICE)}.jsonl"
    log.parent.mkdir(exist_ok=True)
    log.symlink_to("/dev/full")  # every write fails with ENOSPC
    body = json.dumps({"instances": [b64(i) for i in images(3, 20)]}).encode()
    r = client.post(PRED, content=body, headers=auth(ALICE))
    assert r.status_code == 507 and r.json()["code"] == "log_write_failed", r.text
    assert "nothing was answered or charged" in r.json()["error"] and "No space left" in r.json()["error"]
    usage = lambda a: a.state.service.key_usage()[server.key_id(ALICE)]  # noqa: E731
    assert usage(app)["spent"] == 0 and usage(app)["requests"] == 0
    log.unlink()  # space is freed: the retry is charged, once
    r = client.post(PRED, content=body, headers=auth(ALICE))
    assert r.status_code == 200 and r.headers["X-Budget-Spent"] == "3"
    app.state.service.close()
    app2, _ = app_client(tiny, tmp_path, keys=keys)
    assert usage(app2)["spent"] == 3 and usage(app2)["requests"] == 1
    assert [rec["status"] for rec in map(json.loads, log.read_text().splitlines())] == [200]


def test_deleted_edited_or_truncated_query_log_lines_stop_the_start_up(tiny, tmp_path):
    keys = {ALICE: {"budget": 50}}
    app, client = app_client(tiny, tmp_path, keys=keys)
    for seed in range(4):
        body = json.dumps({"instances": [b64(i) for i in images(2, 30 + seed)]}).encode()
        assert client.post(PRED, content=body, headers=auth(ALICE)).status_code == 200
    assert client.post(PRED, content=b"[]", headers=auth(ALICE)).status_code == 400  # a refusal is logged too
    app.state.service.close()
    log = tmp_path / "keys" / f"{server.key_id(ALICE)}.jsonl"
    intact = log.read_bytes()
    lines = intact.splitlines(keepends=True)
    damaged = {
        "line 2: holds record 3 where record 2 belongs": lines[:1] + lines[2:],  # a middle line deleted
        "holds 3 records but .* says 5": lines[:3],  # truncated at a line boundary
        "line 4: checksum mismatch": lines[:3] + [lines[3].replace(b'"spent":8', b'"spent":6')] + lines[4:],
    }
    for message, content in damaged.items():
        log.write_bytes(b"".join(content))
        with pytest.raises(server.QueryLogError, match=f"query log {log}.*{message}"):
            app_client(tiny, tmp_path, keys=keys)
    log.write_bytes(intact)
    app, _ = app_client(tiny, tmp_path, keys=keys)
    assert app.state.service.key_usage()[server.key_id(ALICE)]["spent"] == 8


def test_an_older_query_log_is_read_with_a_warning_and_continued_checked(tiny, tmp_path):
    keys = {ALICE: {"budget": 10}}
    log = tmp_path / "keys" / f"{server.key_id(ALICE)}.jsonl"
    log.parent.mkdir()
    fps = oracle.fingerprint(images(2, 40))
    log.write_text(json.dumps({"t": 1, "status": 200, "n": 2, "new": 2, "spent": 2, "fp": fps, "top1": [0, 1]}) + "\n")
    with pytest.warns(UserWarning) as caught:
        app, client = app_client(tiny, tmp_path, keys=keys)
    said = " ".join(str(w.message) for w in caught)
    assert "lines 1-1 have no checksums" in said and "no head file" in said
    r = client.post(PRED, content=json.dumps({"instances": [b64(images(1, 41)[0])]}).encode(), headers=auth(ALICE))
    assert r.headers["X-Budget-Spent"] == "3"
    app.state.service.close()
    with pytest.warns(UserWarning) as caught:
        app2, _ = app_client(tiny, tmp_path, keys=keys)
    assert [str(w.message) for w in caught if "no head file" in str(w.message)] == []  # the head now exists
    assert app2.state.service.key_usage()[server.key_id(ALICE)]["spent"] == 3


def test_malformed_query_logs_stop_serve_with_one_line_naming_the_file(tiny, tmp_path, capsys, monkeypatch):
    import uvicorn

    from stealnb import cli

    def started(*a, **kw):
        raise AssertionError("serve started despite a malformed query log")

    monkeypatch.setattr(uvicorn.Server, "run", started)
    model = tmp_path / "m.keras"
    tiny.save(model)
    log_dir = tmp_path / "serve"
    log = log_dir / "keys" / f"{server.key_id(ALICE)}.jsonl"
    log.parent.mkdir(parents=True)
    argv = ["serve", "--model", str(model), "--log-dir", str(log_dir), "--key", ALICE]
    ok = json.dumps({"t": 1, "status": 400, "code": "bad_json"})
    for content, message in [(f"{ok}\n[1, 2]\n{ok}\n", "line 2: expected a JSON object (one record), got a JSON list"),
                             (f'{ok}\n{{"status": 200, "fp": "abc"}}\n', "line 2: 'fp' must be a list"),
                             (None, "expected a file, found a directory")]:
        if content is None:
            log.unlink()
            log.mkdir()
        else:
            log.write_text(content)
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith(f"stealnb: error: query log {log}") and message in err, err
    keys_dir = tmp_path / "keys.json"
    keys_dir.mkdir()
    assert cli.main(["serve", "--model", str(model), "--log-dir", str(log_dir), "--keys", str(keys_dir)]) == 2
    assert capsys.readouterr().err.startswith(f"stealnb: error: --keys {keys_dir}: cannot be read")


def test_serve_refuses_a_defence_that_cannot_serve_the_model_before_loading_it(tiny, tmp_path, capsys, monkeypatch):
    from stealnb import cli

    def loaded(*a, **kw):
        raise AssertionError("the model was loaded before the defences were checked")

    monkeypatch.setattr(server, "load_model", loaded)
    model = tmp_path / "m.keras"
    tiny.save(model)
    assert models.saved_num_classes(model) == 10 and models.saved_num_classes(tmp_path / "none.keras") is None
    base = ["serve", "--model", str(model), "--log-dir", str(tmp_path / "serve"), "--key", ALICE]
    for extra, message in [(["--defense", "top_k:k=11", "--output", "probs"], "k: expected at most 10 (the number of classes), got 11"),
                           (["--defense", "round:decimals=2"], "defense round: applies to output 'topk' or 'probs', not output='label'")]:
        assert cli.main(base + extra) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


# -- HttpOracle: retries, errors, ledger ---------------------------------------------------------
def test_http_oracle_retries_with_backoff_then_succeeds(tiny, tmp_path):
    _, client = app_client(tiny)
    sleeps, calls = [], []
    fail = [503, 429, httpx.ConnectError("refused"), httpx.ReadTimeout("slow")]
    o = HttpOracle("http://srv", api_key=ALICE, ledger=tmp_path / "ledger.bin", sleep=sleeps.append, backoff=0.5,
                   transport=transport_for(client, fail, calls))
    x = images(8, 11)
    np.testing.assert_array_equal(o.query(x), Oracle(tiny).query(x))
    assert len(calls) == 5 and o.retried == 4 and o.requests == 1
    assert sleeps == [0.5, 1.0, 2.0, 4.0]  # exponential backoff (Retry-After: 0 is shorter)
    # a known sample is answered from the ledger, with no request, also by a new client
    o2 = HttpOracle("http://srv", api_key=ALICE, ledger=tmp_path / "ledger.bin", transport=transport_for(client, (), calls))
    np.testing.assert_array_equal(o2.query(x[::-1]), Oracle(tiny).query(x[::-1]))
    assert len(calls) == 5 and o2.spent == 8 and o2.replayed == 8


def test_http_oracle_gives_up_and_reports_4xx_at_once(tiny):
    _, client = app_client(tiny)
    sleeps = []
    o = HttpOracle("http://srv", api_key=ALICE, retries=3, sleep=sleeps.append, transport=transport_for(client, [503] * 4))
    with pytest.raises(OracleHTTPError, match="gave up after 4 attempts") as e:
        o.query(images(2, 12))
    assert e.value.status == 503 and len(sleeps) == 3 and o.spent == 0
    calls = []
    o = HttpOracle("http://srv", api_key=ALICE, sleep=sleeps.append, transport=transport_for(client, [400], calls))
    with pytest.raises(OracleHTTPError) as e:
        o.query(images(2, 12))
    assert e.value.status == 400 and len(calls) == 1  # not retried
    with pytest.raises(OracleHTTPError, match="unknown API key") as e:
        HttpOracle("http://srv", api_key="mallory-key-0", transport=transport_for(client))
    assert e.value.status == 403 and e.value.code == "unknown_key"
    with pytest.raises(OracleHTTPError, match="no model named"):
        HttpOracle("http://srv", model="other", api_key=ALICE, transport=transport_for(client))


# -- an extraction over real HTTP, with the server killed mid-attack ------------------------------
def _config():
    return loop.ExtractionConfig(strategy="kcenter", substitute="cnn-tiny", budgets=(80, 100), seed_size=40,
                                       val_size=20, round_size=20, epochs=2, patience=None, seed=3)


def _comparable(ex):
    drop = lambda d: {k: v for k, v in d.items() if k != "seconds"}  # noqa: E731
    return [drop(r) for r in ex.records], {b: drop(r) for b, r in ex.summary()["budgets"].items()}


def _start_server(secret_dir, listener, log_dir, keys_file):
    """`stealnb serve` on the test's own listening socket (``--fd``): the port stays the test's
    while the server is killed and restarted, so no other process can take it in between."""
    fd = listener.fileno()
    port = listener.getsockname()[1]
    cmd = [sys.executable, "-m", "stealnb.cli", "serve", "--model", str(secret_dir), "--fd", str(fd),
           "--log-dir", str(log_dir), "--keys", str(keys_file)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.Popen(cmd, env=env, pass_fds=(fd,), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()  # printed once the model and the query logs are loaded
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # drain the rest
    assert f"on http://127.0.0.1:{port}/v1/models/secret:predict" in line, (proc.poll(), line)
    r = httpx.get(f"http://127.0.0.1:{port}/v1/models/secret", headers=auth(ALICE), timeout=60)
    assert r.status_code == 200, r.text
    return proc


def _answered(log):
    return [json.loads(line) for line in log.read_text().splitlines() if json.loads(line).get("status") == 200] \
        if log.exists() else []


@pytest.mark.timeout(900)  # two server start-ups and an extraction: ~3 min on a loaded 2-core runner
def test_extraction_over_http_matches_in_process_and_survives_a_server_kill(secret_dir, tmp_path):
    model, _ = train.load_secret(secret_dir)
    ds = data.load_dataset("digits")
    pool = data.load_pool("natural-patches", n=500, seed=0)
    ref = loop.Extraction(Oracle(model, budget=100), pool, ds.x_test, ds.y_test, _config(), secret=model)
    ref.run()

    listener = server.listen_socket("127.0.0.1", 0)  # port 0: the kernel picks it, we read it back
    port = listener.getsockname()[1]
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps({ALICE: {"budget": 100}}))
    log_dir = tmp_path / "serve"
    log = log_dir / "keys" / f"{server.key_id(ALICE)}.jsonl"
    procs = [_start_server(secret_dir, listener, log_dir, keys_file)]
    killed = threading.Event()
    answered_by_first = []

    def killer():  # SIGKILL the server once it has answered 2 requests, then restart it
        while len(_answered(log)) < 2:
            time.sleep(0.02)
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait()
        answered_by_first.append(len(_answered(log)))
        killed.set()
        procs.append(_start_server(secret_dir, listener, log_dir, keys_file))

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        orc = HttpOracle(f"http://127.0.0.1:{port}", api_key=ALICE, budget=100, ledger=tmp_path / "ledger.bin",
                         backoff=0.25, max_backoff=4.0, retries=12)
        ex = loop.Extraction(orc, pool, ds.x_test, ds.y_test, _config(), secret=model, out=tmp_path / "run")
        ex.run()
        t.join(timeout=60)
        # the server died mid-attack: the restarted one answered the rest (while it was down, the
        # client's requests failed and were retried, or waited in the test's listen queue)
        assert killed.is_set() and len(procs) == 2 and 2 <= answered_by_first[0] < len(_answered(log))
        assert _comparable(ex) == _comparable(ref)
        # nothing paid twice: 100 distinct samples in the client's ledger and in the server's log
        assert len(oracle.read_ledger(tmp_path / "ledger.bin")[0]) - 1 == 100 == orc.spent
        fps = [fp for rec in _answered(log) for fp in rec["fp"]]
        assert len(fps) == len(set(fps)) == 100
        assert orc.server_status()["stealnb"]["key"]["spent"] == 100
        assert len(ex.records) == 3 and ex.summary()["oracle_spent"] == 100
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(timeout=10)
        listener.close()


def test_copycat_cli_takes_an_oracle_url():
    from stealnb import cli

    args = cli.build_parser().parse_args(["copycat", "--variant", "npdd", "--secret", "s", "--oracle-url",
                                          "http://127.0.0.1:8500", "--model-name", "m", "--api-key", "k"])
    assert (args.oracle_url, args.model_name, args.api_key) == ("http://127.0.0.1:8500", "m", "k")


@pytest.mark.parametrize("command", [
    ["extract", "--strategy", "random", "--budgets", "60,80", "--round-size", "20", "--seed-size", "40",
     "--val-size", "20"],
    ["copycat", "--variant", "npdd", "--budgets", "60,80", "--seed-size", "40", "--val-size", "20"],
])
def test_cli_over_http_keeps_its_ledger_and_a_resumed_run_pays_nothing(secret_dir, tmp_path, monkeypatch, command):
    """`stealnb extract|copycat --oracle-url`: the client's ledger in --out survives the run's own
    set-up (a fresh run clears --out *before* the client opens it), and rerunning with --resume
    asks the server for nothing new."""
    from stealnb import cli

    model, _ = train.load_secret(secret_dir)
    _, client = app_client(model, keys={ALICE: {"budget": 200}})
    real = oracle.HttpOracle
    monkeypatch.setattr(oracle, "HttpOracle", lambda *a, **kw: real(*a, transport=transport_for(client), **kw))
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text("from an earlier run")
    argv = command + ["--secret", str(secret_dir), "--profile", "ci", "--pool-size", "300", "--epochs", "1",
                      "--out", str(out), "--oracle-url", "http://srv", "--api-key", ALICE, "--quiet"]
    assert cli.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())  # a fresh run replaces an earlier one
    spent = summary["oracle_spent"]
    assert spent == 80  # the last budget, validation split included
    assert len(oracle.read_ledger(out / "ledger.bin")[0]) - 1 == spent
    status = lambda: client.get("/v1/models/secret", headers=auth(ALICE)).json()["stealnb"]["key"]["spent"]  # noqa: E731
    assert status() == spent
    assert cli.main(argv + ["--resume"]) == 0
    assert status() == spent and json.loads((out / "summary.json").read_text())["oracle_spent"] == spent


def test_output_defenses_in_the_server(tiny):
    x = images(6, 13)
    body = json.dumps({"instances": [b64(i) for i in x]}).encode()
    probs = Oracle(tiny, output="probs").query(x).astype(np.float64)
    _, client = app_client(tiny, output="probs", keys={ALICE: None}, defenses=["round:decimals=2"])
    got = np.asarray(client.post(PRED, content=body, headers=auth(ALICE)).json()["predictions"])
    np.testing.assert_allclose(got, np.round(probs, 2), atol=1e-6)
    # ADMIS with tau = 1 and a steep sigmoid answers (almost) only the misinformation model
    mis = models.build("cnn-tiny", seed=9)
    _, client = app_client(tiny, output="label", keys={ALICE: None},
                           defenses=[{"name": "admis", "misinformation_model": mis, "tau": 1.0, "nu": 1e6}])
    got = client.post(PRED, content=body, headers=auth(ALICE)).json()["predictions"]
    assert got == Oracle(mis).query(x).tolist()
    with pytest.raises(ValueError, match="applies to output 'topk' or 'probs', not output='label'"):
        server.create_app(tiny, keys={ALICE: None}, defenses=["round"])
    with pytest.raises(ValueError, match="unknown name 'firewall'"):
        server.create_app(tiny, keys={ALICE: None}, defenses=["firewall"])
    with pytest.raises(ValueError, match="at least 8 characters"):
        server.create_app(tiny, keys={"short": None})


def test_cli_key_arguments():
    assert server._parse_key_arg("abcdefgh:500:2.5") == ("abcdefgh", {"budget": 500, "rate": 2.5})
    assert server._parse_key_arg("abcdefgh::1") == ("abcdefgh", {"rate": 1.0})
    with pytest.raises(ValueError, match="KEY"):
        server._parse_key_arg("a:b:c:d")
