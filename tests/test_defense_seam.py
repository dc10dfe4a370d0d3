"""The defence seam at the oracle (stealnb/core/defense_seam.py): one Defense contract, one registry and
one spec syntax, applied identically by the in-process Oracle and the HTTP server; a defence added
in one file (tests/toy_defense.py) works everywhere without touching another file."""
import base64
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

import toy_defense
from stealnb import cli, defenses
from stealnb.core import models
from stealnb.serve import server
from stealnb.core.defense_seam import DefenseChain
from stealnb.extraction.oracle import BudgetExceeded, Oracle, QueryRefused, read_ledger

ALICE = "alice-key-0001"
PRED = "/v1/models/secret:predict"


def images(n, seed):
    return np.random.default_rng(seed).random((n, 32, 32, 3), dtype=np.float32)


def body(x):
    return json.dumps({"instances": [{"b64": base64.b64encode(np.ascontiguousarray(i, "<f4").tobytes()).decode()}
                                     for i in x]}).encode()


def auth(key=ALICE):
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def tiny():
    return models.build("cnn-tiny", seed=0)


def test_a_defense_registered_in_one_file_works_in_process_over_http_and_from_the_cli_spec(tiny, tmp_path):
    x = images(12, 1)
    truth = Oracle(tiny).query(x)
    want = toy_defense.swapped(truth, 5, 9)
    assert (want != truth).any()  # the untrained model answers 5 and 9: the toy changes them
    # in-process
    got = Oracle(tiny, defenses=defenses.parse_defenses("toy-swap:a=5,b=9")).query(x)
    np.testing.assert_array_equal(got, want)
    # over HTTP
    app = server.create_app(tiny, keys={ALICE: None}, defenses=["toy-swap:a=5,b=9"])
    r = TestClient(app).post(PRED, content=body(x), headers=auth())
    assert r.status_code == 200 and r.json()["predictions"] == want.tolist()
    # from the CLI: `stealnb serve --defense toy-swap:...`
    tiny.save(tmp_path / "secret.keras")
    args = cli.build_parser().parse_args(["serve", "--model", str(tmp_path / "secret.keras"), "--key", ALICE,
                                          "--log-dir", str(tmp_path / "logs"), "--defense", "toy-swap:a=5,b=9"])
    app = server.app_from_args(args)
    r = TestClient(app).post(PRED, content=body(x), headers=auth())
    assert r.status_code == 200 and r.json()["predictions"] == want.tolist()


def test_an_alarm_blocks_the_same_query_in_process_and_over_http(tiny):
    x = images(30, 2)
    spec = "toy-swap:alarm_at=15,action=block"
    oracle = Oracle(tiny, defenses=defenses.parse_defenses(spec))
    oracle.query(x[:10])
    with pytest.raises(QueryRefused, match="toy-swap at query 15"):
        oracle.query(x[10:20])  # the call that raises the alarm is refused whole ...
    assert oracle.spent == 10  # ... and charged nothing
    with pytest.raises(QueryRefused):
        oracle.query(x[:10])  # blocked from then on, even repeats
    app = server.create_app(tiny, keys={ALICE: None}, defenses=[spec])
    client = TestClient(app)
    assert client.post(PRED, content=body(x[:10]), headers=auth()).status_code == 200
    r = client.post(PRED, content=body(x[10:20]), headers=auth())
    assert r.status_code == 403 and r.json()["code"] == "blocked"
    usage = app.state.service.key_usage()[server.key_id(ALICE)]
    assert usage["flagged_at"] == 15 and usage["spent"] == 10


def test_poison_after_an_alarm_lies_about_every_later_answer_in_process_like_the_server(tiny):
    x = images(30, 3)
    spec = "toy-swap:a=0,b=0,alarm_at=10,action=poison"  # a == b: answers unchanged until the alarm
    truth = Oracle(tiny).query(x)
    oracle = Oracle(tiny, defenses=defenses.parse_defenses(spec))
    got = np.concatenate([oracle.query(x[s:s + 5]) for s in range(0, 30, 5)])
    np.testing.assert_array_equal(got[:5], truth[:5])
    assert (got[5:] != truth[5:]).all()  # the alarm's call (samples 6-10) and every later one is poisoned
    client = TestClient(server.create_app(tiny, keys={ALICE: None}, defenses=[spec]))
    over_http = sum((client.post(PRED, content=body(x[s:s + 5]), headers=auth()).json()["predictions"]
                     for s in range(0, 30, 5)), [])
    assert over_http == got.tolist()


def test_prada_raises_its_alarm_at_the_same_query_in_process_and_in_the_server(tiny):
    rng = np.random.default_rng(0)
    base = list(rng.uniform(0.2, 0.8, (8, 32, 32, 3)).astype(np.float32))
    while len(base) < 200:  # a JbDA-like stream: small sign steps from earlier queries
        p = base[rng.integers(len(base))]
        base.append(np.clip(p + 0.02 * np.sign(rng.normal(size=p.shape)), 0, 1).astype(np.float32))
    x = np.asarray(base)
    spec = "prada:delta=0.9,min_queries=40,action=log"
    oracle = Oracle(tiny, defenses=defenses.parse_defenses(spec))
    for s in range(0, 200, 10):
        oracle.query(x[s:s + 10])
    app = server.create_app(tiny, keys={ALICE: None}, defenses=[spec])
    client = TestClient(app)
    for s in range(0, 200, 10):
        assert client.post(PRED, content=body(x[s:s + 10]), headers=auth()).status_code == 200
    at = oracle.defenses.flagged_at("local")
    assert at is not None and at == app.state.service.key_usage()[server.key_id(ALICE)]["flagged_at"]


def test_a_defended_ledger_records_what_was_answered_and_reopens_only_with_the_same_defenses(tiny, tmp_path):
    x = images(8, 4)
    led = tmp_path / "ledger.bin"
    d = defenses.parse_defenses("toy-swap:a=0,b=1")
    first = Oracle(tiny, ledger=led, defenses=d, budget=8).query(x)
    again = Oracle(tiny, ledger=led, defenses=defenses.parse_defenses("toy-swap:a=0,b=1"), budget=8)
    np.testing.assert_array_equal(again.query(x), first)
    assert again.spent == 8 and again.replayed == 8
    with pytest.raises(BudgetExceeded):
        again.query(images(1, 5))
    header = json.loads(read_ledger(led)[0][0])
    assert header["defenses"] == ["toy-swap:a=0,b=1,alarm_at=null,action=log"]
    with pytest.raises(ValueError, match="defenses"):
        Oracle(tiny, ledger=led)  # undefended answers are not the defended ones
    with pytest.raises(ValueError, match="defenses"):
        Oracle(tiny, ledger=led, defenses=defenses.parse_defenses("toy-swap:a=2,b=3"))


def test_a_reopened_oracle_still_blocks_a_client_its_defence_blocked_before_the_restart(tiny, tmp_path):
    x = images(30, 6)
    led, spec = tmp_path / "ledger.bin", "toy-swap:alarm_at=15,action=block"
    oracle = Oracle(tiny, ledger=led, defenses=defenses.parse_defenses(spec))
    oracle.query(x[:10])
    with pytest.raises(QueryRefused):
        oracle.query(x[10:20])  # the alarm's call: refused, nothing answered, the alarm on disk
    again = Oracle(tiny, ledger=led, defenses=defenses.parse_defenses(spec))  # a fresh detector
    assert again.spent == 10 and again.defenses.alarms("local") == {"toy-swap": 15}
    with pytest.raises(QueryRefused, match="toy-swap at query 15"):
        again.query(x[20:30])
    other = Oracle(tiny, ledger=led, defenses=defenses.parse_defenses(spec), client="bob")
    assert other.defenses.alarms("bob") == {}  # the alarm is the client's, not the ledger's


def test_a_reopened_oracle_keeps_poisoning_after_an_alarm_raised_before_the_restart(tiny, tmp_path):
    x = images(30, 7)
    led, spec = tmp_path / "ledger.bin", "toy-swap:a=0,b=0,alarm_at=10,action=poison"
    truth = Oracle(tiny).query(x)
    first = Oracle(tiny, ledger=led, defenses=defenses.parse_defenses(spec))
    got = np.concatenate([first.query(x[s:s + 5]) for s in range(0, 15, 5)])
    again = Oracle(tiny, ledger=led, defenses=defenses.parse_defenses(spec))
    np.testing.assert_array_equal(again.query(x[:15]), got)  # replayed as answered, lies included
    assert (again.query(x[15:]) != truth[15:]).all()  # still poisoned, though the new detector saw nothing
    assert again.spent == 30


def test_the_spec_syntax_is_one_parser_with_clear_errors():
    d = defenses.parse_defense("prada:delta=0.8,action=poison")
    assert (d.name, d.action, d.detector_options["delta"]) == ("prada", "poison", 0.8)
    assert defenses.parse_defense(d.spec()).options() == d.options()  # a spec round-trips
    assert defenses.parse_defense({"name": "round", "decimals": 3}).options() == {"decimals": 3}
    assert [x.name for x in defenses.parse_defenses("round:decimals=2;prada")] == ["round", "prada"]
    with pytest.raises(ValueError, match="unknown name 'firewall'; expected one of: .*prada"):
        defenses.parse_defense("firewall")
    with pytest.raises(ValueError, match="defense prada: .*unexpected keyword"):
        defenses.parse_defense("prada:beta=2")
    with pytest.raises(ValueError, match="action: expected one of"):
        defenses.parse_defense("prada:action=shout")
    with pytest.raises(ValueError, match="NAME"):
        defenses.parse_defense("round:decimals")
    with pytest.raises(ValueError, match="output 'topk' or 'probs'"):
        DefenseChain(defenses.parse_defenses("round"), output="label", num_classes=10)
    with pytest.raises(ValueError, match="each defence at most once"):
        DefenseChain(defenses.parse_defenses("round;round:decimals=1"), output="probs", num_classes=10)
    assert all(defenses.DEFENSES[n].__doc__.strip() for n in defenses.DEFENSES)
    assert "Juuti" in defenses.DEFENSES["prada"].__doc__ and "Kariyappa" in defenses.DEFENSES["admis"].__doc__


def test_a_bad_defense_spec_on_the_serve_cli_is_one_line_and_exit_2(tmp_path, capsys):
    code = cli.main(["serve", "--model", str(tmp_path / "missing.keras"), "--key", ALICE, "--log-dir",
                     str(tmp_path), "--defense", "prada:delta=2"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "delta" in err


def test_a_transform_after_one_that_answers_no_distribution_gets_the_rescaled_row():
    # round:decimals=1 answers rows summing to 1.1 here; reverse_sigmoid after it must still answer
    chain = DefenseChain(defenses.parse_defenses("round:decimals=1;reverse_sigmoid"), output="probs", num_classes=4)
    probs = np.array([[0.25, 0.25, 0.25, 0.25], [0.36, 0.36, 0.14, 0.14]])
    rounded = defenses.round_probs(probs, 1)
    assert not np.allclose(rounded.sum(axis=1), 1.0)
    got = chain.answer("alice", images(2, 0), probs, [b"a" * 32, b"b" * 32])
    want = defenses.reverse_sigmoid(rounded / rounded.sum(axis=1, keepdims=True))
    np.testing.assert_allclose(got, want)
    # the last transform's answer is returned as it is, not rescaled
    last = DefenseChain(defenses.parse_defenses("reverse_sigmoid;round:decimals=1"), output="probs", num_classes=4)
    np.testing.assert_allclose(last.answer("a", images(2, 0), probs, [b"a" * 32, b"b" * 32]),
                               defenses.round_probs(defenses.reverse_sigmoid(probs), 1))
