"""The black-box oracle: answers, budget, query ledger and crash safety (stealnb/extraction/oracle.py)."""
import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import warnings
import zlib

import httpx
import numpy as np
import pytest

from stealnb.report import results
from stealnb.extraction.oracle import (BudgetExceeded, HttpOracle, LedgerCorrupted, Oracle, OracleHTTPError, fingerprint,
                            read_ledger, record_dtype, softmax)

W = np.random.default_rng(0).standard_normal((32 * 32 * 3, 10)).astype(np.float32)


class LinearModel:
    """A numpy 'secret model' (logits = x W) that counts the samples it is asked about."""

    def __init__(self):
        self.seen = 0

    def __call__(self, x):
        self.seen += len(x)
        return x.reshape(len(x), -1) @ W


def images(n, seed):
    return np.random.default_rng(seed).random((n, 32, 32, 3), dtype=np.float32)


def ledger_oracle(path, **kw):
    model = LinearModel()
    return Oracle(model, ledger=path, num_classes=10, **kw), model


# -- answers -------------------------------------------------------------------------------------
def test_label_mode_is_argmax_of_the_models_logits(tiny_model):
    x = images(12, 1)
    logits = np.asarray(tiny_model(x, training=False))
    y = Oracle(tiny_model, batch_size=5).query(x)
    assert y.dtype == np.int64 and y.shape == (12,)
    np.testing.assert_array_equal(y, logits.argmax(axis=1))


def test_topk_and_probs_modes(tiny_model):
    x = images(9, 2)
    logits = np.asarray(tiny_model(x, training=False)).astype(np.float64)
    ref = np.exp(logits - logits.max(1, keepdims=True))
    ref /= ref.sum(1, keepdims=True)
    idx, p = Oracle(tiny_model, output="topk", top_k=4).query(x)
    assert idx.shape == p.shape == (9, 4) and idx.dtype == np.int64 and p.dtype == np.float32
    np.testing.assert_array_equal(idx[:, 0], logits.argmax(1))
    assert (np.diff(p, axis=1) <= 0).all()
    np.testing.assert_allclose(p, np.take_along_axis(ref, idx, 1), rtol=1e-5, atol=1e-7)
    probs = Oracle(tiny_model, output="probs").query(x)
    assert probs.shape == (9, 10) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    np.testing.assert_allclose(probs, ref, rtol=1e-5, atol=1e-7)


def test_softmax_is_stable_for_huge_logits():
    p = softmax(np.array([[1000.0, 0.0, -1000.0], [5.0, 5.0, 5.0]]))
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p, [[1, 0, 0], [1 / 3, 1 / 3, 1 / 3]], atol=1e-7)


def test_from_path_loads_a_keras_file(tiny_model, tmp_path):
    path = tmp_path / "secret.keras"
    tiny_model.save(path)
    x = images(6, 3)
    np.testing.assert_array_equal(Oracle.from_path(path).query(x), Oracle(tiny_model).query(x))
    with pytest.raises(FileNotFoundError, match="keras"):
        Oracle.from_path(tmp_path / "missing.keras")


def test_empty_batch_gives_empty_answers():
    o = Oracle(LinearModel(), num_classes=10, output="probs")
    assert o.query(np.zeros((0, 32, 32, 3), np.float32)).shape == (0, 10)
    idx, p = Oracle(LinearModel(), num_classes=10, output="topk").query(np.zeros((0, 32, 32, 3), np.float32))
    assert idx.shape == p.shape == (0, 3) and idx.dtype == np.int64
    assert o.spent == 0


def test_fingerprint_is_sha256_of_float32_bytes():
    x = images(3, 4)
    fps = fingerprint(x)
    assert fps == [hashlib.sha256(x[i].tobytes()).hexdigest() for i in range(3)]
    assert len(set(fps)) == 3
    assert fingerprint(-np.zeros((1, 32, 32, 3), np.float32)) == fingerprint(np.zeros((1, 32, 32, 3), np.float32))


# -- budget and replay ---------------------------------------------------------------------------
def test_counts_every_new_sample_and_repeats_are_free():
    model = LinearModel()
    o = Oracle(model, num_classes=10)
    x = images(5, 5)
    first = o.query(np.concatenate([x, x[:2], x[:1]]))  # duplicates inside one call are paid once
    assert (o.spent, o.replayed, model.seen, o.num_queries) == (5, 3, 5, 1)
    np.testing.assert_array_equal(first[5:], first[[0, 1, 0]])
    np.testing.assert_array_equal(o.query(x[::-1]), first[:5][::-1])  # across calls
    assert (o.spent, o.replayed, model.seen, o.num_queries) == (5, 8, 5, 2)
    assert o.remaining is None


def test_budget_refuses_a_whole_call_and_charges_nothing(tmp_path):
    path = tmp_path / "ledger.bin"
    o, model = ledger_oracle(path, budget=10)
    o.query(images(6, 6))
    before = path.read_bytes()
    with pytest.raises(BudgetExceeded) as err:
        o.query(images(5, 7))
    assert (err.value.budget, err.value.spent, err.value.asked, err.value.remaining) == (10, 6, 5, 4)
    assert "10" in str(err.value) and "4" in str(err.value)
    assert (o.spent, o.remaining, o.num_queries, model.seen) == (6, 4, 1, 6)
    assert path.read_bytes() == before
    o.query(np.concatenate([images(4, 7), images(6, 6)]))  # 4 new + 6 replayed: exactly the budget
    assert (o.spent, o.remaining, o.replayed) == (10, 0, 6)
    o.query(images(3, 6))  # replays still work at zero budget
    with pytest.raises(BudgetExceeded):
        o.query(images(1, 8))
    assert o.spent == 10


def test_ledger_survives_a_restart_with_spent_carried_over(tmp_path):
    path = tmp_path / "runs" / "ledger.bin"  # parent is created
    o, _ = ledger_oracle(path, output="probs", budget=20)
    x = images(8, 9)
    p1 = o.query(x)
    o2, model2 = ledger_oracle(path, output="probs", budget=20)
    assert (o2.spent, o2.remaining) == (8, 12)
    np.testing.assert_array_equal(o2.query(x), p1)  # bit-identical replay
    assert (o2.spent, o2.replayed, model2.seen) == (8, 8, 0)
    o2.query(images(2, 10))
    assert ledger_oracle(path, output="probs")[0].spent == 10


def test_ledger_mode_mismatch_is_refused(tmp_path):
    path = tmp_path / "ledger.bin"
    ledger_oracle(path, output="topk", top_k=3)[0].query(images(2, 11))
    with pytest.raises(ValueError, match="output='topk'"):
        ledger_oracle(path, output="label")
    with pytest.raises(ValueError, match="top_k=3"):
        ledger_oracle(path, output="topk", top_k=5)
    with pytest.raises(ValueError, match="num_classes=10"):
        Oracle(lambda x: x.reshape(len(x), -1)[:, :7], ledger=path, output="topk", num_classes=7)


# -- crash safety --------------------------------------------------------------------------------
def _two_calls(path):
    o, _ = ledger_oracle(path)
    x = images(8, 12)
    y = np.concatenate([o.query(x[:5]), o.query(x[5:])])
    return x, y


def test_torn_last_record_is_dropped_and_repaid_alone(tmp_path):
    path = tmp_path / "ledger.bin"
    x, y = _two_calls(path)
    full = path.read_bytes()
    path.write_bytes(full[:-3])  # crash in the middle of writing the last record
    with pytest.warns(UserWarning, match=r"dropped \d+ byte"):
        o, model = ledger_oracle(path)
    assert o.spent == 7 and len(path.read_bytes()) < len(full) - 3  # cut back to the last good record
    np.testing.assert_array_equal(o.query(x), y)
    assert (o.spent, o.replayed, model.seen) == (8, 7, 1)
    assert path.read_bytes() == full  # the re-paid sample was re-recorded identically


def test_torn_header_means_a_fresh_ledger(tmp_path):
    path = tmp_path / "ledger.bin"
    _two_calls(path)
    path.write_bytes(path.read_bytes()[:10])
    with pytest.warns(UserWarning, match="dropped 10 byte"):
        o, _ = ledger_oracle(path)
    assert o.spent == 0 and path.stat().st_size == 0
    o.query(images(2, 13))
    assert ledger_oracle(path)[0].spent == 2


def test_bad_checksum_on_the_last_record_counts_as_torn(tmp_path):
    path = tmp_path / "ledger.bin"
    _two_calls(path)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # a complete but garbled final record
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="dropped"):
        assert ledger_oracle(path)[0].spent == 7


def test_corruption_in_the_middle_is_an_error(tmp_path):
    path = tmp_path / "ledger.bin"
    _two_calls(path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(LedgerCorrupted, match="intact record follows"):
        ledger_oracle(path)
    assert path.read_bytes() == bytes(data)  # nothing truncated when refusing


def test_concurrent_writer_is_detected(tmp_path):
    path = tmp_path / "ledger.bin"
    a, _ = ledger_oracle(path)
    a.query(images(2, 14))
    b, _ = ledger_oracle(path)
    b.query(images(2, 15))
    with pytest.raises(RuntimeError, match="changed on disk"):
        a.query(images(2, 16))


def _rewrite_record(path, record, **answer):
    """Give ledger record ``record`` a new ``answer`` under a valid crc32, as an editor (or a bug) could."""
    payloads, _, _ = read_ledger(path)
    header = json.loads(payloads[0])
    row = np.frombuffer(payloads[record], record_dtype(header["output"], header["top_k"], header["num_classes"])).copy()
    for field, value in answer.items():
        row[field] = value
    payloads[record] = row.tobytes()
    heads = [struct.pack("<4sI", b"SNL1", len(p)) + p for p in payloads]
    path.write_bytes(b"".join(h + struct.pack("<I", zlib.crc32(h)) for h in heads))


OUT_OF_CONTRACT = [  # (output, new answer of record 2, why it is not an answer of a 10-class oracle)
    ("label", {"label": 99}, "a label outside [0, 10)"),
    ("label", {"label": -1}, "a label outside [0, 10)"),
    ("topk", {"idx": [99, 0, 1]}, "a class outside [0, 10)"),
    ("topk", {"idx": [4, 4, 1]}, "a class listed twice"),
    ("topk", {"prob": [0.2, 0.5, 0.1]}, "not in decreasing order"),
    ("topk", {"prob": [0.9, 0.8, 0.0]}, "summing to more than 1"),
    ("probs", {"prob": np.full(10, 0.5)}, "not summing to 1"),
    ("probs", {"prob": np.r_[np.nan, np.zeros(9)]}, "not finite or outside [0, 1]"),
    ("probs", {"prob": np.r_[1.5, -0.5, np.zeros(8)]}, "not finite or outside [0, 1]"),
]


@pytest.mark.parametrize("output, answer, why", OUT_OF_CONTRACT)
def test_an_intact_record_with_an_impossible_answer_is_refused_not_replayed(tmp_path, output, answer, why):
    path = tmp_path / "ledger.bin"
    x = images(3, 17)
    ledger_oracle(path, output=output)[0].query(x)
    _rewrite_record(path, 2, **answer)
    with pytest.raises(LedgerCorrupted) as err:
        ledger_oracle(path, output=output)[0].query(x)
    assert str(path) in str(err.value) and "record 2" in str(err.value) and why in str(err.value)
    with pytest.raises(LedgerCorrupted, match="record 2"):  # the notebooks' ledger reader is as strict
        results.ledger_labels(path, x)


def fake_server(predictions):
    """A stealnb top-3 server over 10 classes (no model) that answers with ``predictions``."""
    def handler(request):
        if request.method == "GET":
            return httpx.Response(200, json={"stealnb": {"output": "topk", "top_k": 3, "num_classes": 10,
                                                         "input_shape": [32, 32, 3], "max_batch": 256}})
        return httpx.Response(200, json={"predictions": predictions[: len(json.loads(request.content)["instances"])]})
    return httpx.MockTransport(handler)


def test_http_oracle_records_only_answers_its_ledger_can_replay(tmp_path):
    path, x = tmp_path / "ledger.bin", images(1, 18)
    o = HttpOracle("http://srv", output="topk", ledger=path, transport=fake_server(
        [{"classes": [3, 99, 1], "probabilities": [0.5, 0.3, 0.1]}]))
    with pytest.raises(OracleHTTPError, match="a class outside") as err:
        o.query(x)
    assert err.value.code == "bad_answer" and o.spent == 0 and not path.exists()
    rounded = [{"classes": [3, 0, 1], "probabilities": [0.5, 0.3, 0.1]}]  # a defended server's rows need not sum to 1
    HttpOracle("http://srv", output="topk", ledger=path, transport=fake_server(rounded)).query(x)
    idx, p = HttpOracle("http://srv", output="topk", ledger=path, transport=fake_server([])).query(x)
    assert idx.tolist() == [[3, 0, 1]] and p.tolist() == np.float32([[0.5, 0.3, 0.1]]).tolist()


CHILD = """
import sys
import numpy as np
from stealnb.extraction.oracle import Oracle
W = np.random.default_rng(0).standard_normal((3072, 10)).astype(np.float32)
o = Oracle(lambda x: x.reshape(len(x), -1) @ W, ledger=sys.argv[1], num_classes=10)
for i in range(100000):
    o.query(np.random.default_rng(1000 + i).random((16, 32, 32, 3), dtype=np.float32))
    print(i, flush=True)
"""


def test_sigkill_mid_run_loses_nothing_that_was_answered(tmp_path):
    path = tmp_path / "ledger.bin"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        lines = [proc.stdout.readline() for _ in range(5)]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        lines += proc.stdout.read().splitlines()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    answered = sorted(int(s) for s in lines if s.strip())
    assert proc.returncode == -signal.SIGKILL and answered[:5] == [0, 1, 2, 3, 4]
    last = answered[-1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a torn tail may or may not have been left behind
        o, model = ledger_oracle(path)
    assert 16 * len(answered) <= o.spent <= 16 * (last + 2)
    spent0 = o.spent
    for i in answered:  # every answered sample replays for free, with the same label
        x = np.random.default_rng(1000 + i).random((16, 32, 32, 3), dtype=np.float32)
        np.testing.assert_array_equal(o.query(x), (x.reshape(16, -1) @ W).argmax(1))
    assert o.spent == spent0 and model.seen == 0
    # The child never started iteration last + 2, so asking for 0..last+1 must bring the total
    # to exactly their distinct count: the ledger held no phantom or double-counted records.
    o.query(np.random.default_rng(1000 + last + 1).random((16, 32, 32, 3), dtype=np.float32))
    assert o.spent == 16 * (last + 2) == spent0 + model.seen


# -- input validation ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "x, exc, msg",
    [
        (np.zeros((2, 28, 28, 1), np.float32), ValueError, r"shape \(N, 32, 32, 3\)"),
        (np.zeros((32, 32, 3), np.float32), ValueError, r"shape \(N, 32, 32, 3\)"),
        (np.zeros((2, 32, 32, 3), np.float64), TypeError, "float32"),
        (np.zeros((2, 32, 32, 3), np.uint8), TypeError, "float32"),
        (np.full((2, 32, 32, 3), np.nan, np.float32), ValueError, "NaN or inf"),
        (np.full((2, 32, 32, 3), np.inf, np.float32), ValueError, "NaN or inf"),
        (np.full((2, 32, 32, 3), 255, np.float32), ValueError, r"\[0, 1\]"),
        ([[0.5]], TypeError, "numpy array"),
    ],
)
def test_bad_inputs_are_refused_with_what_was_expected(x, exc, msg):
    o = Oracle(LinearModel(), num_classes=10)
    with pytest.raises(exc, match=msg):
        o.query(x)
    assert o.spent == 0 and o.num_queries == 0


def test_bad_settings_are_refused(tiny_model):
    with pytest.raises(ValueError, match="output"):
        Oracle(tiny_model, output="logits")
    with pytest.raises(ValueError, match="top_k"):
        Oracle(tiny_model, output="topk", top_k=11)
    with pytest.raises(ValueError, match="num_classes"):
        Oracle(tiny_model, num_classes=5)
    with pytest.raises(ValueError, match="num_classes"):
        Oracle(LinearModel())
    with pytest.raises(TypeError, match="budget"):
        Oracle(tiny_model, budget=2.5)
    with pytest.raises(ValueError, match="logits of shape"):
        Oracle(LinearModel(), num_classes=7).query(images(1, 0))


def answering_server(output, answer):
    """A stealnb server over 10 classes (no model) answering ``answer(n)`` to a predict request of
    ``n`` instances, 200 OK whatever it is."""
    served = {"output": output, "top_k": 3 if output == "topk" else None, "num_classes": 10,
              "input_shape": [32, 32, 3], "max_batch": 256}

    def handler(request):
        if request.method == "GET":
            return httpx.Response(200, json={"stealnb": served})
        n = len(json.loads(request.content)["instances"])
        return httpx.Response(200, content=json.dumps({"predictions": answer(n)}).encode())  # NaN as JSON NaN
    return httpx.MockTransport(handler)


def _probs_row():
    return (np.arange(10) / 45).tolist()


MALFORMED_200 = [  # (id, server output, answer to n instances, what the error says)
    ("one prediction too few", "label", lambda n: [1] * (n - 1), "expected 2 predictions, got 1"),
    ("one prediction too many", "label", lambda n: [1] * (n + 1), "expected 2 predictions, got 3"),
    ("predictions not a list", "label", lambda n: {"0": 1}, "expected 2 predictions, got dict"),
    ("label = num_classes", "label", lambda n: [1, 10], "a label outside [0, 10)"),
    ("negative label", "label", lambda n: [-1, 0], "a label outside [0, 10)"),
    ("fractional label", "label", lambda n: [0.5, 1], "one integer label per instance"),
    ("NaN probability", "probs", lambda n: [_probs_row(), [float("nan")] + _probs_row()[1:]], "not finite"),
    ("probability above 1", "probs", lambda n: [_probs_row(), [1.5] + [0.0] * 9], "outside [0, 1]"),
    ("9 of 10 probabilities", "probs", lambda n: [_probs_row()[:9]] * n, "expected 10 probabilities"),
    ("NaN top-k probability", "topk", lambda n: [{"classes": [3, 2, 1], "probabilities": [float("nan"), 0.2, 0.1]}] * n,
     "not finite"),
    ("top-1 class out of range", "topk", lambda n: [{"classes": [12, 3, 1], "probabilities": [0.5, 0.2, 0.1]}] * n,
     "a label outside [0, 10)"),
]


@pytest.mark.parametrize("case", MALFORMED_200, ids=[c[0] for c in MALFORMED_200])
def test_http_oracle_refuses_a_malformed_200_answer_and_records_nothing(tmp_path, case):
    _, output, answer, why = case
    path, x = tmp_path / "ledger.bin", images(2, 19)
    o = HttpOracle("http://srv", output="label", ledger=path, transport=answering_server(output, answer))
    with pytest.raises(OracleHTTPError) as err:
        o.query(x)
    assert err.value.status == 200 and err.value.code == "bad_answer" and why in err.value.message
    assert o.spent == 0 and o.num_queries == 0 and not path.exists()  # nothing recorded, nothing replayable
    good = {"label": lambda n: [4] * n, "probs": lambda n: [_probs_row()] * n,
            "topk": lambda n: [{"classes": [9, 8, 7], "probabilities": [0.3, 0.2, 0.1]}] * n}[output]
    fixed = HttpOracle("http://srv", output="label", ledger=path, transport=answering_server(output, good))
    assert fixed.query(x).tolist() == ([4, 4] if output == "label" else [9, 9]) and fixed.spent == 2
