"""The HTTP server: TEI's /rerank with depth x width per request, bad input -> 4xx, 429, graceful stop.

Served by a real uvicorn on a free loopback port (a subprocess of `matryoshka serve` for the CLI,
and an in-process server where a test needs a deliberately slow model).
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from matryoshka_reranker import OnnxReranker
from matryoshka_reranker.model.inputs import InputFormat
from matryoshka_reranker.pipeline.export import ExportOptions, export_models
from matryoshka_reranker.serving.server import ModelPool, ServerOptions, create_app

pytestmark = pytest.mark.slow  # one torch.onnx.export per module, and server start-ups

ROOT = Path(__file__).resolve().parents[1]
QUERY = "capital of France"
TEXTS = ["Paris is the capital of France.", "Rhinoviruses cause most colds.", "Berlin is in Germany."]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, llama_dir):
    out = tmp_path_factory.mktemp("serve") / "onnx"
    export_models(llama_dir, out, [2, 3], [1, 2], [2],
                  options=ExportOptions(start_layer=1, input_format=InputFormat(query_max_len=16, passage_max_len=16)))
    return out


def wait_until_healthy(process: subprocess.Popen, url: str, tries: int = 300) -> None:
    """Polls ``/health`` until the server answers; one that exits or never answers fails with its output."""
    for _ in range(tries):
        if process.poll() is not None:
            break
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise AssertionError(process.communicate()[0][-3000:])


@pytest.fixture(scope="module")
def server(exported):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "matryoshka_reranker.cli", "serve", "--models", str(exported),
                                "--port", str(port), "--max-texts", "5"], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    wait_until_healthy(process, url)
    yield url, process
    if process.poll() is None:
        process.terminate()
        process.wait(30)


def test_rerank_is_tei_compatible(server, exported):
    url, _ = server
    response = httpx.post(f"{url}/rerank", json={"query": QUERY, "texts": TEXTS, "return_text": True})
    assert response.status_code == 200, response.text
    ranked = response.json()
    raw = OnnxReranker(exported / "ratio-1", 3).compute_score([(QUERY, t) for t in TEXTS])  # default: deepest, ratio 1
    expected = 1 / (1 + np.exp(-np.array(raw)))
    assert [r["index"] for r in ranked] == sorted(range(3), key=lambda i: -expected[i])
    assert [r["score"] for r in ranked] == pytest.approx(sorted(expected, reverse=True), abs=1e-5)
    assert all(r["text"] == TEXTS[r["index"]] for r in ranked)
    plain = httpx.post(f"{url}/rerank", json={"query": QUERY, "texts": TEXTS, "raw_scores": True}).json()
    assert sorted(r["score"] for r in plain) == pytest.approx(sorted(raw), abs=1e-5) and "text" not in plain[0]


def test_depth_and_width_per_request(server, exported):
    url, _ = server
    for exit_layer, ratio in [(2, 1), (3, 2), (2, 2)]:
        body = {"query": QUERY, "texts": TEXTS, "raw_scores": True, "exit_layer": exit_layer, "ratio": ratio}
        got = {r["index"]: r["score"] for r in httpx.post(f"{url}/rerank", json=body).json()}
        want = OnnxReranker(exported / f"ratio-{ratio}", exit_layer).compute_score([(QUERY, t) for t in TEXTS])
        assert [got[i] for i in range(3)] == pytest.approx(want, abs=1e-5), (exit_layer, ratio)
    response = httpx.post(f"{url}/rerank", json={"query": QUERY, "texts": TEXTS, "exit_layer": 9, "ratio": 1})
    assert response.status_code == 422
    assert "exit_layer=9" in response.json()["error"] and "(exit_layer=3, ratio=2)" in response.json()["error"]


def test_first_stage_scores_are_fused_like_rank(server, exported):
    url, _ = server
    bm25 = [1.0, 7.5, 3.0]
    body = {"query": QUERY, "texts": TEXTS, "first_stage_scores": bm25, "first_stage_weight": 0.7}
    ranked = httpx.post(f"{url}/rerank", json=body).json()
    want = OnnxReranker(exported / "ratio-1", 3).rank(QUERY, TEXTS, first_stage_scores=bm25, first_stage_weight=0.7)
    assert [r["index"] for r in ranked] == [w["corpus_id"] for w in want]
    assert [r["score"] for r in ranked] == pytest.approx([w["score"] for w in want], abs=1e-5)
    probability = {r["index"]: r["score"] for r in httpx.post(f"{url}/rerank", json={"query": QUERY, "texts": TEXTS}).json()}
    assert [r["reranker_score"] for r in ranked] == pytest.approx([probability[r["index"]] for r in ranked], abs=1e-6)
    calibrated = OnnxReranker(exported / "ratio-1", 3).rank(QUERY, TEXTS, normalize=True, first_stage_scores=bm25,
                                                         first_stage_weight=0.7)  # fuses raw scores too
    assert [w["corpus_id"] for w in calibrated] == [w["corpus_id"] for w in want]
    assert [w["score"] for w in calibrated] == pytest.approx([w["score"] for w in want])
    assert [w["reranker_score"] for w in calibrated] == pytest.approx([r["reranker_score"] for r in ranked], abs=1e-6)
    first_stage_only = httpx.post(f"{url}/rerank", json={**body, "first_stage_weight": 1}).json()
    assert [r["index"] for r in first_stage_only] == [1, 2, 0]  # weight 1: BM25's order


@pytest.mark.parametrize("body, status, field", [
    ({"query": QUERY, "texts": TEXTS, "first_stage_scores": [1.0]}, 422, "first_stage_scores"),
    ({"query": QUERY, "texts": TEXTS, "first_stage_scores": [1, "2", 3]}, 422, "first_stage_scores"),
    ({"query": QUERY, "texts": TEXTS, "first_stage_scores": [1, 2, 3], "first_stage_weight": 1.5}, 422,
     "first_stage_weight"),
    ({"query": QUERY, "texts": []}, 400, "texts"),  # TEI: 400, error_type "Empty"
    # TEI (router/src/http/server.rs): a batch over --max-client-batch-size and an input over the token budget are
    # Validation errors, 422; only a body over --payload-limit is a 413
    ({"query": QUERY, "texts": TEXTS * 2}, 422, "texts"),
    ({"query": QUERY, "texts": ["word " * 200], "truncate": False}, 422, "texts[0]"),
    ({"query": "word " * 200, "texts": TEXTS, "truncate": False}, 422, "query"),
    ({"query": QUERY, "texts": "not a list"}, 422, "texts"),
    ({"query": QUERY, "texts": [1, 2]}, 422, "texts.0"),
    ({"query": 7, "texts": TEXTS}, 422, "query"),
    ({"texts": TEXTS}, 422, "query"),
    ({"query": QUERY, "texts": TEXTS, "raw_scores": "yes"}, 422, "raw_scores"),
    ({"query": QUERY, "texts": TEXTS, "ratio": "2"}, 422, "ratio"),
])
def test_bad_input_is_a_4xx_naming_the_field(server, body, status, field):
    url, _ = server
    response = httpx.post(f"{url}/rerank", json=body)
    assert response.status_code == status, response.text
    assert field in response.json()["error"]
    assert response.json()["error_type"] == ("Empty" if body.get("texts") == [] else "Validation")


def test_truncate_false_refuses_and_the_length_check_matches_the_encoder(server, exported):
    """``truncate: false`` refuses what is too long (left out or null: the server's ``auto_truncate``); a long
    query leaves a text less room (``PairEncoder.passage_room``), and the check refuses what encoding would cut."""
    url, _ = server
    long_text = {"query": QUERY, "texts": ["word " * 200], "truncate": False}
    assert httpx.post(f"{url}/rerank", json=long_text).status_code == 422
    assert httpx.post(f"{url}/rerank", json={"query": QUERY, "texts": TEXTS, "truncate": False}).status_code == 200
    encoder = OnnxReranker(exported / "ratio-1", 3).encoder
    fmt = encoder.format

    def fill(prefix: str, tokens: int) -> str:  # the longest "x y z ..." whose prefixed form has <= tokens
        words = []
        while len(encoder._ids(f"{prefix}{' '.join(words + ['x'])}")) <= tokens:
            words.append("x")
        return " ".join(words)

    query = fill("A: ", fmt.query_max_len)  # the query's whole budget: bos + separator overflow into the text's
    text = fill("B: ", fmt.passage_max_len)
    room = encoder.passage_room(len(encoder.bos) + len(encoder._ids(f"A: {query}")) + len(encoder.sep))
    assert room < len(encoder._ids(f"B: {text}")) <= fmt.passage_max_len  # encode_many would cut this text
    response = httpx.post(f"{url}/rerank", json={"query": query, "texts": [TEXTS[0], text], "truncate": False})
    assert response.status_code == 422 and "texts[1]" in response.json()["error"], response.text
    assert httpx.post(f"{url}/rerank", json={"query": QUERY, "texts": [text], "truncate": False}).status_code == 200


def test_undecodable_bodies_are_4xx_not_500(server):
    url, _ = server
    for content in (b"\xff\xfe\x00garbage", b'{"query": "q", "texts": [', b""):
        response = httpx.post(f"{url}/rerank", content=content, headers={"content-type": "application/json"})
        assert 400 <= response.status_code < 500, (content, response.status_code, response.text)
    assert httpx.post(f"{url}/rerank", json={"query": QUERY, "texts": ["word " * 200], "truncate": True}).status_code == 200


def test_a_lone_surrogate_escape_in_texts_is_a_422_not_a_500(server):
    """JSON may escape a lone surrogate (``"\\ud800"``); no tokenizer takes one. It is refused naming the text,
    with ``truncate: false`` (was a 500 from the length check) and ``true`` (was a 424 for its whole batch)."""
    url, _ = server
    for truncate in ("false", "true"):
        content = b'{"query": "q", "texts": ["fine", "bad \\ud800 text"], "truncate": %s}' % truncate.encode()
        response = httpx.post(f"{url}/rerank", content=content, headers={"content-type": "application/json"})
        assert response.status_code == 422, (truncate, response.status_code, response.text)
        assert "texts[1]" in response.json()["error"] and response.json()["error_type"] == "Validation"


def test_fields_tei_does_not_know_are_ignored_as_tei_ignores_them(server):
    """TEI's request struct ignores unknown fields (serde's default): clients send some, e.g. LiteLLM's
    ``top_n`` and others' ``model``. Refusing them (422) broke those clients; TEI returns every text."""
    url, _ = server
    response = httpx.post(f"{url}/rerank", json={"query": QUERY, "texts": TEXTS, "model": "any", "top_n": 1})
    assert response.status_code == 200, response.text
    assert sorted(r["index"] for r in response.json()) == [0, 1, 2]


def test_truncate_left_out_or_null_follows_auto_truncate_as_tei(server, exported):
    """TEI reads ``truncate`` left out or null as its ``--auto-truncate`` (true by default since TEI 1.9):
    a long text is cut and scored, not refused; ``--no-auto-truncate`` (``auto_truncate=False``) refuses it."""
    url, _ = server
    long_text = {"query": QUERY, "texts": ["word " * 200]}
    for body in (long_text, {**long_text, "truncate": None}):
        response = httpx.post(f"{url}/rerank", json=body)
        assert response.status_code == 200, response.text
    assert httpx.get(f"{url}/info").json()["auto_truncate"] is True
    options = ServerOptions(auto_truncate=False)
    refusing, thread, local = run_in_thread(create_app(ModelPool(exported, options), options))
    try:
        response = httpx.post(f"{local}/rerank", json={"query": QUERY, "texts": ["word " * 200]}, timeout=60)
        assert response.status_code == 422 and "texts[0]" in response.json()["error"], response.text
        assert httpx.post(f"{local}/rerank", json={"query": QUERY, "texts": ["word " * 200], "truncate": True},
                          timeout=60).status_code == 200
    finally:
        refusing.should_exit = True
        thread.join(30)


def test_a_body_over_the_payload_limit_is_a_413_before_it_is_read_whole(server, exported):
    """TEI refuses a body over ``--payload-limit`` (2 MB by default) with 413; a body of any size was read
    into memory and parsed (and, with ``truncate: true``, every text tokenized whole)."""
    url, _ = server
    huge = {"query": QUERY, "texts": ["word " * 700_000], "truncate": True}  # ~3.5 MB
    response = httpx.post(f"{url}/rerank", json=huge, timeout=60)
    assert response.status_code == 413 and response.json()["error_type"] == "Validation", response.text
    options = ServerOptions(payload_limit=1000)
    small, thread, local = run_in_thread(create_app(ModelPool(exported, options), options))
    try:
        body = json.dumps({"query": QUERY, "texts": ["word " * 300], "truncate": True}).encode()

        def chunks():  # no Content-Length: chunked transfer encoding
            for start in range(0, len(body), 100):
                yield body[start:start + 100]

        for content in (body, chunks()):
            response = httpx.post(f"{local}/rerank", content=content, headers={"content-type": "application/json"},
                                  timeout=60)
            assert response.status_code == 413 and "1000 bytes" in response.json()["error"], response.text
        assert httpx.post(f"{local}/rerank", json={"query": QUERY, "texts": TEXTS}, timeout=60).status_code == 200
        fits = json.dumps({"query": QUERY, "texts": TEXTS}).encode()  # chunked, under the limit: read and served
        response = httpx.post(f"{local}/rerank", content=iter([fits[:20], fits[20:]]),
                              headers={"content-type": "application/json"}, timeout=60)
        assert response.status_code == 200 and len(response.json()) == 3, response.text
    finally:
        small.should_exit = True
        thread.join(30)


def test_info_health_and_metrics(server):
    url, _ = server
    info = httpx.get(f"{url}/info").json()
    assert {(c["exit_layer"], c["ratio"]) for c in info["configs"]} == {(2, 1), (3, 1), (2, 2), (3, 2)}
    assert info["default"] == {"exit_layer": 3, "ratio": 1} and info["max_client_batch_size"] == 5
    assert info["input_format"]["query_max_len"] == 16
    # TEI's Info (router/src/lib.rs): clients read model_type to tell a reranker from an embedder / classifier
    assert info["model_type"] == {"reranker": {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}}
    tei = {"model_id", "model_sha", "model_dtype", "served_model_name", "max_concurrent_requests", "max_input_length",
           "max_batch_tokens", "max_batch_requests", "max_client_batch_size", "auto_truncate", "tokenization_workers",
           "version", "sha", "docker_label"}
    assert tei <= set(info), tei - set(info)
    assert info["max_batch_tokens"] == info["max_input_length"] * info["max_batch_pairs"]
    assert isinstance(info["version"], str) and info["version"]  # TEI's is a string: the package's, no release here
    ranked = httpx.post(f"{url}/rerank", json={"query": QUERY, "texts": TEXTS})
    assert ranked.status_code == 200  # one to count
    # TEI's aliases for a reranker: POST / and /invocations rank, GET / and /ping are the health check
    for path in ("/", "/invocations"):
        assert httpx.post(f"{url}{path}", json={"query": QUERY, "texts": TEXTS}).json() == ranked.json()
    assert httpx.get(f"{url}/ping").json() == httpx.get(f"{url}/").json() == {"status": "ok"}
    left = httpx.post(f"{url}/rerank", json={"query": QUERY, "texts": TEXTS, "truncation_direction": "Left"})
    assert left.status_code == 422 and left.json()["error"].startswith("truncation_direction: 'Left': only Right")
    metrics = httpx.get(f"{url}/metrics").text
    assert 'matryoshka_requests_total{config="exit-03-ratio-1",status="200"}' in metrics
    assert "matryoshka_request_seconds_bucket" in metrics


def test_sigterm_stops_cleanly(server):
    url, process = server
    assert httpx.get(f"{url}/health").status_code == 200
    process.terminate()  # SIGTERM
    output, _ = process.communicate(timeout=60)
    # uvicorn shuts down gracefully, then re-raises the signal so the exit status says why it stopped
    assert process.returncode in (0, -15), output[-2000:]
    assert "Shutting down" in output and "Finished server process" in output


# ---------------------------------------------------------------- in-process: a slow model on purpose
class SlowPool(ModelPool):
    """The real pool, with scoring slowed down: lets tests hold requests in flight."""

    def __init__(self, folder, options, delay):
        super().__init__(folder, options)
        self.delay = delay

    def get(self, key):
        reranker = super().get(key)
        real = reranker.compute_score

        def slow(pairs, **kwargs):
            time.sleep(self.delay)
            return real(pairs, **kwargs)

        reranker.compute_score = slow
        return reranker


def run_in_thread(app):
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(300):
        if server.started:
            break
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{port}"


def test_full_queue_answers_429_and_in_flight_requests_finish_on_shutdown(exported):
    options = ServerOptions(max_queue=1, max_batch_pairs=3, batch_window_ms=0)
    pool = SlowPool(exported, options, delay=1.0)
    pool.get(pool.default)  # loaded first: on a busy CPU the load outlasted the 0.3 s below, and the five requests,
    # no longer staggered by a length check (truncate left out: auto_truncate), reached the queue at once: all 429
    app = create_app(pool, options)
    server, thread, url = run_in_thread(app)

    async def burst():
        async with httpx.AsyncClient(timeout=30) as client:
            body = {"query": QUERY, "texts": TEXTS}
            first = asyncio.create_task(client.post(f"{url}/rerank", json=body))
            await asyncio.sleep(0.3)  # the first is being scored (1 s); the queue holds one more
            rest = await asyncio.gather(*[client.post(f"{url}/rerank", json=body) for _ in range(4)])
            server.should_exit = True  # what uvicorn's SIGTERM handler does
            return await first, rest

    first, rest = asyncio.run(burst())
    thread.join(30)
    assert first.status_code == 200 and len(first.json()) == 3  # in flight when shutdown began: finished
    codes = sorted(r.status_code for r in rest)
    assert 429 in codes and 200 in codes, codes
    assert all(json.loads(r.text)["error_type"] == "Overloaded" for r in rest if r.status_code == 429)
    assert not thread.is_alive()


def test_cli_score_and_rank_take_an_onnx_folder(exported, tmp_path):
    from typer.testing import CliRunner

    from matryoshka_reranker.cli import app

    folder = exported / "ratio-1"  # exits 2 and 3; the deepest by default
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": QUERY, "passage": t}) + "\n" for t in TEXTS))
    result = CliRunner().invoke(app, ["score", "--model", str(folder), "--pairs", str(pairs)])
    assert result.exit_code == 0, result.output
    expected = OnnxReranker(folder, 3).compute_score([(QUERY, t) for t in TEXTS])
    assert [json.loads(line)["3"] for line in result.stdout.strip().splitlines()] == pytest.approx(expected, abs=1e-5)
    docs = tmp_path / "docs.txt"
    docs.write_text("\n".join(TEXTS) + "\n")
    result = CliRunner().invoke(app, ["rank", "--model", str(folder), "--query", QUERY, "--documents", str(docs),
                                      "--top-k", "2", "--return-documents"])
    assert result.exit_code == 0, result.output
    ranked = json.loads(result.stdout)
    assert [r["corpus_id"] for r in ranked] == sorted(range(3), key=lambda i: -expected[i])[:2]
    result = CliRunner().invoke(app, ["score", "--model", str(folder), "--pairs", str(pairs), "--cutoff-layers", "2", "3"])
    assert result.exit_code == 0, result.output
    exit_2 = OnnxReranker(folder, 2).compute_score([(QUERY, t) for t in TEXTS])
    rows = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [r["2"] for r in rows] == pytest.approx(exit_2, abs=1e-5) and [r["3"] for r in rows] == pytest.approx(expected, abs=1e-5)
    result = CliRunner().invoke(app, ["rank", "--model", str(folder), "--query", QUERY, "--documents", str(docs),
                                      "--cutoff-layer", "2"])
    assert [r["corpus_id"] for r in json.loads(result.stdout)] == sorted(range(3), key=lambda i: -exit_2[i])
    result = CliRunner().invoke(app, ["score", "--model", str(folder), "--pairs", str(pairs), "--cutoff-layers", "9"])
    assert result.exit_code == 2 and "no exit layer 9" in result.output  # bad input, not a damaged model
    for command in (["score", "--pairs", str(pairs)], ["rank", "--query", QUERY, "--documents", str(docs)]):
        result = CliRunner().invoke(app, [*command, "--model", str(folder), "--compress-ratio", "2"])  # not ignored
        assert result.exit_code == 2 and "exported at compression ratio 1" in result.output, result.output
    result = CliRunner().invoke(app, ["score", "--model", str(exported / "ratio-2"), "--pairs", str(pairs),
                                      "--compress-ratio", "2"])  # the folder's own ratio: fine
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["score", "--model", str(exported / "ratio-2"), "--pairs", str(pairs),
                                      "--compress-ratio", "1"])  # ratio 1 asked of a ratio-2 folder: refused too
    assert result.exit_code == 2 and "exported at compression ratio 2" in result.output, result.output
    bad = tmp_path / "docs.jsonl"
    bad.write_text(json.dumps({"text": TEXTS[0]}) + '\n"a bare string"\n')
    for documents, message in ((bad, "docs.jsonl, document line 2"), (tmp_path, "no such file")):
        result = CliRunner().invoke(app, ["rank", "--model", str(folder), "--query", QUERY, "--documents", str(documents)])
        assert result.exit_code == 2 and message in result.output, result.output
    assert OnnxReranker(folder, np.int64(2)).exit_layer == 2  # a layer read from a metrics array


def test_default_config_is_the_deepest_exit_at_the_smallest_ratio():
    """A request naming neither exit nor ratio gets the deepest exit at ratio 1, or, when ratio 1 is not
    served, the deepest exit at its smallest ratio (both backends share ``Pool.default_key``)."""
    from matryoshka_reranker.serving.server import Pool

    assert Pool.default_key([(8, 1), (30, 1), (30, 2), (31, 4)]) == (30, 1)
    assert Pool.default_key([(8, 2), (30, 4), (30, 2), (16, 2)]) == (30, 2)


def test_a_request_naming_one_of_exit_and_ratio_gets_a_served_config():
    """Without ratio 1 served (``serve --ratios 2``), a request naming neither, or only the exit, still gets a
    served config (TEI clients name neither); only the ratio: the deepest exit at it."""
    from matryoshka_reranker.serving.server import Pool, ServerInputError

    pool = Pool()
    pool.configs = dict.fromkeys([(8, 2), (30, 2), (30, 4)])
    pool.default = Pool.default_key(pool.configs)
    assert pool.resolve(None, None) == (30, 2) and pool.resolve(8, None) == (8, 2)
    assert pool.resolve(None, 4) == (30, 4) and pool.resolve(30, 4) == (30, 4)
    pool.configs[(8, 1)] = None
    assert pool.resolve(8, None) == (8, 1) and pool.resolve(None, None) == (30, 2)  # default fixed at start
    for exit_layer, ratio in ((9, None), (None, 3), (8, 4)):
        with pytest.raises(ServerInputError, match="no exported model"):
            pool.resolve(exit_layer, ratio)


def test_release_folders_serve_every_exit_they_hold(exported, monkeypatch):
    """A downloaded release is a list of ratio folders (``fetch_release``): each exit in them is served,
    and ``OnnxReranker.from_release`` opens the asked exit of the fetched folder (default: the deepest)."""
    pool = ModelPool([exported / "ratio-1", exported / "ratio-2", exported / "ratio-1"])
    assert sorted(pool.configs) == [(2, 1), (2, 2), (3, 1), (3, 2)] and pool.default == (3, 1)
    assert pool.get((2, 2)).exit_layer == 2 and pool.get((2, 2)).compress_ratio == 2
    assert pool._shared[exported / "ratio-2"]  # the folder's weights mapped once, from its all-exits graph
    assert sorted(ModelPool([exported / "ratio-2"], exit_layers=[3]).configs) == [(3, 2)]  # serve --layers 3
    assert ModelPool([exported / "ratio-2"]).default == (3, 2)  # no ratio 1: the deepest exit, its smallest ratio

    from matryoshka_reranker.release import registry

    monkeypatch.setattr(registry, "fetch_release", lambda version, repo, exit_layers, ratios, **_: (
        "v1", [exported / f"ratio-{ratios[0]}"]))
    assert OnnxReranker.from_release("v1", exit_layer=2, ratio=2).exit_layer == 2
    assert OnnxReranker.from_release("v1", ratio=1).exit_layer == 3


# ---------------------------------------------------------------- the PyTorch backend (`serve --pipeline`)
def test_pytorch_backend_answers_like_the_onnx_export(exported, llama_dir):
    """``TorchPool``: the same API over ``MatryoshkaReranker``s, one per ratio, every exit; raw scores equal
    the ONNX export of the same model (fp32), probabilities use the export's Platt calibration."""
    from matryoshka_reranker.serving.reranker import MatryoshkaReranker
    from matryoshka_reranker.serving.server import TorchPool

    fmt = InputFormat(query_max_len=16, passage_max_len=16)
    rerankers = {1: MatryoshkaReranker(llama_dir, start_layer=1, input_format=fmt, dtype="float32"),
                 2: MatryoshkaReranker(llama_dir, start_layer=1, input_format=fmt, dtype="float32",
                                       compress_layers=[2], compress_ratio=2)}
    calibration = {"a": 0.5, "b": -1.0}
    options = ServerOptions(max_texts=5)
    pool = TorchPool(rerankers, options, exit_layers=[2, 3], calibrations={(3, 1): calibration})
    assert sorted(pool.configs) == [(2, 1), (2, 2), (3, 1), (3, 2)] and pool.default == (3, 1)
    server, thread, url = run_in_thread(create_app(pool, options))
    try:
        for exit_layer, ratio in [(2, 1), (3, 2), (2, 2), (None, None)]:
            body = {"query": QUERY, "texts": TEXTS, "raw_scores": True, "exit_layer": exit_layer, "ratio": ratio}
            got = {r["index"]: r["score"] for r in httpx.post(f"{url}/rerank", json=body).json()}
            want = OnnxReranker(exported / f"ratio-{ratio or 1}", exit_layer or 3).compute_score(
                [(QUERY, t) for t in TEXTS])
            assert [got[i] for i in range(3)] == pytest.approx(want, abs=1e-4), (exit_layer, ratio)
        raw = OnnxReranker(exported / "ratio-1", 3).compute_score([(QUERY, t) for t in TEXTS])
        ranked = httpx.post(f"{url}/rerank", json={"query": QUERY, "texts": TEXTS}).json()
        expected = 1 / (1 + np.exp(-(0.5 * np.array(raw) - 1.0)))
        assert sorted(r["score"] for r in ranked) == pytest.approx(sorted(expected), abs=1e-5)
        response = httpx.post(f"{url}/rerank", json={"query": QUERY, "texts": TEXTS, "exit_layer": 4})
        assert response.status_code == 422 and "(exit_layer=3, ratio=2)" in response.json()["error"]
        long = httpx.post(f"{url}/rerank", json={"query": QUERY, "texts": ["word " * 40], "truncate": False})
        assert long.status_code == 422 and "texts[0]" in long.json()["error"]  # the model's own token budget
        info = httpx.get(f"{url}/info").json()
        assert {c["backend"] for c in info["configs"]} == {"pytorch"} and info["input_format"]["passage_max_len"] == 16
    finally:
        server.should_exit = True
        thread.join(30)
    with pytest.raises(ValueError, match="no head at exit layer"):
        TorchPool(rerankers, options, exit_layers=[9])
    with pytest.raises(ValueError, match="no compression layers"):
        TorchPool({2: rerankers[1]}, options)


class BrokenPool(ModelPool):
    """The real pool with a failing backend: ``"load"`` (a damaged model file), ``"nan"`` scores, or ``"raise"``
    (the session fails while scoring, e.g. ONNX Runtime out of memory)."""

    def __init__(self, folder, options, failure):
        super().__init__(folder, options)
        self.failure = failure

    def get(self, key):
        if self.failure == "load":
            raise RuntimeError("sha256 mismatch in model.onnx")
        reranker = super().get(key)
        if self.failure == "raise":
            def fail(pairs, **kwargs):
                raise RuntimeError("onnxruntime: failed to allocate memory")

            reranker.compute_score = fail
        else:
            reranker.compute_score = lambda pairs, **kwargs: [float("nan")] * len(pairs)
        return reranker


@pytest.mark.parametrize("failure, message", [("load", "model unavailable"), ("nan", "non-finite"),
                                              ("raise", "scoring failed: onnxruntime: failed to allocate memory")])
def test_a_failing_backend_is_a_424_json_error_and_the_queue_gauge_drains(exported, failure, message):
    """TEI answers a backend failure with 424 and a JSON error; so does a model that cannot load (found
    while checking lengths, off the event loop) or that returns NaN. The queue gauge reads the live queue."""
    options = ServerOptions()
    server, thread, url = run_in_thread(create_app(BrokenPool(exported, options, failure), options))
    try:
        response = httpx.post(f"{url}/rerank", json={"query": QUERY, "texts": TEXTS}, timeout=60)
        assert response.status_code == 424, response.text
        assert response.json()["error_type"] == "Backend" and message in response.json()["error"]
        health = httpx.get(f"{url}/health")  # TEI's 503 Unhealthy while the default model cannot load
        assert health.status_code == (503 if failure == "load" else 200), health.text
        if failure == "load":
            assert health.json()["error_type"] == "Unhealthy" and "failed to load" in health.json()["error"]
        metrics = httpx.get(f"{url}/metrics").text
        assert 'matryoshka_requests_total{config="exit-03-ratio-1",status="424"} 1.0' in metrics
        if failure != "load":  # the request reached the batcher: its queue is empty again
            assert 'matryoshka_queue_depth{config="exit-03-ratio-1"} 0.0' in metrics
    finally:
        server.should_exit = True
        thread.join(30)


class OddPool(ModelPool):
    """A backend that misbehaves in ways no handler names: a length check that raises a TypeError, and a
    scorer that returns no list once."""

    def __init__(self, folder, options):
        super().__init__(folder, options)
        self.calls = 0

    def get(self, key):
        reranker = super().get(key)
        real = reranker.compute_score

        def once_none(pairs, **kwargs):
            self.calls += 1
            return None if self.calls == 1 else real(pairs, **kwargs)

        reranker.compute_score = once_none
        reranker.encoder.over_budget = lambda query, texts: (_ for _ in ()).throw(TypeError("tokenizer exploded"))
        return reranker


def test_unforeseen_errors_are_json_and_leave_the_config_serving(exported):
    """An unexpected exception is TEI's JSON error (500), not a plain-text page a client cannot parse; one inside
    the batcher fails the requests in hand (424) and the config's queue goes on serving the next ones."""
    options = ServerOptions()
    server, thread, url = run_in_thread(create_app(OddPool(exported, options), options))
    try:
        body = {"query": QUERY, "texts": TEXTS}
        odd = httpx.post(f"{url}/rerank", json=body, timeout=60)
        assert odd.status_code == 424 and odd.json()["error_type"] == "Backend", odd.text
        assert httpx.post(f"{url}/rerank", json=body, timeout=60).status_code == 200  # the batcher lives on
        crash = httpx.post(f"{url}/rerank", json={**body, "truncate": False}, timeout=60)
        assert crash.status_code == 500 and crash.json() == {
            "error": "internal error (TypeError); see the server log", "error_type": "Backend"}
    finally:
        server.should_exit = True
        thread.join(30)


class RecordingPool(ModelPool):
    """The real pool; each scoring call records the queries it was given, then takes ``delay`` seconds."""

    def __init__(self, folder, options, delay):
        super().__init__(folder, options)
        self.delay, self.scored = delay, []

    def get(self, key):
        reranker = super().get(key)
        if "compute_score" not in vars(reranker):  # wrapped once
            real = reranker.compute_score

            def recorded(pairs, **kwargs):
                self.scored.extend(q for q, _ in pairs)
                time.sleep(self.delay)
                return real(pairs, **kwargs)

            reranker.compute_score = recorded
        return reranker


def test_a_request_whose_client_went_away_is_not_scored(exported):
    """A client that disconnects (or times out) while its request waits in the queue: the request leaves
    the batch instead of being scored for nobody (under overload, clients giving up made the server score
    only abandoned requests), and counts as 499 in /metrics."""
    options = ServerOptions(max_batch_pairs=3, batch_window_ms=0)
    pool = RecordingPool(exported, options, delay=1.0)
    pool.get(pool.default)  # loaded: the first request is scored at once
    server, thread, url = run_in_thread(create_app(pool, options))
    try:
        async def abandon():
            async with httpx.AsyncClient(timeout=30) as client:
                first = asyncio.create_task(client.post(f"{url}/rerank", json={"query": QUERY, "texts": TEXTS}))
                while QUERY not in pool.scored:  # the first is being scored (1 s): the next one waits in the queue
                    await asyncio.sleep(0.02)
                with pytest.raises(httpx.ReadTimeout):
                    await client.post(f"{url}/rerank", json={"query": "abandoned", "texts": TEXTS}, timeout=0.3)
                return await first

        assert asyncio.run(abandon()).status_code == 200
        assert httpx.post(f"{url}/rerank", json={"query": "later", "texts": TEXTS}, timeout=30).status_code == 200
        assert pool.scored.count(QUERY) == 3 and pool.scored.count("later") == 3 and "abandoned" not in pool.scored
        assert 'matryoshka_requests_total{config="exit-03-ratio-1",status="499"} 1.0' in httpx.get(f"{url}/metrics").text
    finally:
        server.should_exit = True
        thread.join(30)


class SlowToFailPool(ModelPool):
    """The real pool, whose exit-2 ratio-1 model takes ``delay`` seconds to fail its checks (a damaged file
    found by hashing it) on every try; the other configs load as usual."""

    def __init__(self, folder, options, delay):
        super().__init__(folder, options)
        self.delay, self.events = delay, []  # "failed" once per finished load attempt, in order

    def get(self, key):
        if key == (2, 1):
            with self._lock(key):
                time.sleep(self.delay)
                self.events.append("failed")
                raise RuntimeError("sha256 mismatch in model.onnx")
        return super().get(key)


class BlockedPool(ModelPool):
    """The real pool, whose exit-2 ratio-1 load holds its lock until released, then fails."""

    def __init__(self, folder, options):
        super().__init__(folder, options)
        self.release = threading.Event()

    def get(self, key):
        if key == (2, 1):
            with self._lock(key):
                self.release.wait(60)
                raise RuntimeError("sha256 mismatch in model.onnx")
        return super().get(key)


def test_a_config_loads_while_another_configs_load_hangs(exported):
    """Loads take a lock per config: a config's first load (hashing its files, a session) proceeds while another
    config's load hangs, instead of queueing behind one lock for the whole pool."""
    options = ServerOptions()
    pool = BlockedPool(exported, options)
    server, thread, url = run_in_thread(create_app(pool, options))
    try:
        async def both():
            async with httpx.AsyncClient(timeout=120) as client:
                hung = asyncio.create_task(client.post(f"{url}/rerank", json={
                    "query": QUERY, "texts": TEXTS, "exit_layer": 2, "ratio": 1}))
                await asyncio.sleep(0.3)  # its load holds (2, 1)'s lock
                healthy = await client.post(f"{url}/rerank", json={"query": QUERY, "texts": TEXTS}, timeout=30)
                assert not hung.done()
                pool.release.set()
                return healthy, await hung

        healthy, hung = asyncio.run(both())
        assert healthy.status_code == 200
        assert hung.status_code == 424 and "sha256 mismatch" in hung.json()["error"]
    finally:
        pool.release.set()
        server.should_exit = True
        thread.join(30)


def test_a_model_failing_to_load_does_not_stall_the_other_configs(exported):
    """Requests for a config that fails to load slowly (sha256 over its files) each tried the load in a thread
    of the event loop's default pool: a burst of them filled the pool (and queued behind each other on the
    load lock), and requests for healthy, loaded configs, whose length check runs in that pool too, waited
    for all of it. Requests waiting for the same load share it."""
    options = ServerOptions()
    pool = SlowToFailPool(exported, options, delay=0.5)
    pool.get(pool.default)
    server, thread, url = run_in_thread(create_app(pool, options))
    try:
        async def burst():
            async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=100)) as client:
                broken = [asyncio.create_task(client.post(f"{url}/rerank", json={
                    "query": QUERY, "texts": TEXTS, "exit_layer": 2, "ratio": 1})) for _ in range(40)]
                await asyncio.sleep(0.2)  # the broken config's requests are waiting for its load
                healthy = await client.post(f"{url}/rerank", json={"query": QUERY, "texts": TEXTS})
                pool.events.append("healthy")
                return healthy, await asyncio.gather(*broken)

        healthy, broken = asyncio.run(burst())
        # ordered events, not wall-clock: the healthy request is answered while the broken config's first load
        # (or a retry) is still failing, not after a queue of them (before the fix: ~35 of 40 loads, one at a time)
        assert healthy.status_code == 200 and pool.events.index("healthy") <= 3, pool.events
        assert pool.events.count("failed") < 40  # requests waiting for the same load share it
        assert {r.status_code for r in broken} == {424}
        assert all("sha256 mismatch" in r.json()["error"] for r in broken)
    finally:
        server.should_exit = True
        thread.join(30)


def test_server_options_that_would_disable_their_limit_are_refused(tmp_path):
    """``--max-queue 0`` made asyncio's queue unbounded (never a 429: the opposite of a tighter limit), and
    ``--workers 0`` failed the server's start-up with a traceback."""
    from typer.testing import CliRunner

    from matryoshka_reranker.cli import app

    for name in ("max_queue", "workers", "max_texts", "max_batch_pairs"):
        with pytest.raises(ValueError, match=name):
            ServerOptions(**{name: 0})
    result = CliRunner().invoke(app, ["serve", "--models", str(tmp_path), "--max-queue", "0"])
    assert result.exit_code == 2 and "max_queue" in result.output, result.output


def test_max_batch_pairs_is_a_serve_option(tmp_path, monkeypatch):
    """The README names `--max-batch-pairs` among serve's limits; it was not an option ("No such option")."""
    from typer.testing import CliRunner

    import matryoshka_reranker.serving.server as server_module
    from matryoshka_reranker.cli import app

    seen = {}
    monkeypatch.setattr(server_module, "serve", lambda source, **kwargs: seen.update(kwargs))
    result = CliRunner().invoke(app, ["serve", "--models", str(tmp_path), "--max-batch-pairs", "64"])
    assert result.exit_code == 0, result.output
    assert seen["options"].max_batch_pairs == 64
    result = CliRunner().invoke(app, ["serve", "--models", str(tmp_path), "--max-batch-pairs", "0"])
    assert result.exit_code == 2 and "max_batch_pairs must be at least 1" in result.output, result.output


def test_every_limit_the_readme_names_is_a_serve_option(tmp_path):
    """The README names ``--max-batch-pairs`` (and TEI's ``--payload-limit`` / ``--auto-truncate``): ``serve``
    had no such options ("No such option"), so the limit could not be set from the shell."""
    from typer.testing import CliRunner

    from matryoshka_reranker.cli import app

    for flag, name in (("--max-batch-pairs", "max_batch_pairs"), ("--payload-limit", "payload_limit")):
        result = CliRunner().invoke(app, ["serve", "--models", str(tmp_path), flag, "0"])
        assert result.exit_code == 2 and name in result.output, result.output
    result = CliRunner().invoke(app, ["serve", "--models", str(tmp_path), "--no-auto-truncate", "--max-queue", "0"])
    assert result.exit_code == 2 and "max_queue" in result.output, result.output  # the flag parsed


def test_an_api_key_guards_everything_but_the_health_checks(exported):
    """TEI's --api-key: without `Authorization: Bearer <key>` (or with a wrong one) a request is a 401 JSON error;
    the health checks stay open for load balancers."""
    options = ServerOptions(api_key="s3cret")
    assert "s3cret" not in repr(options)  # not in logs of the options
    with pytest.raises(ValueError, match="white space"):
        ServerOptions(api_key="s3cret\n")
    server, thread, url = run_in_thread(create_app(ModelPool(exported, options), options))
    try:
        body = {"query": QUERY, "texts": TEXTS}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            refused = httpx.post(f"{url}/rerank", json=body, headers=headers)
            assert refused.status_code == 401 and refused.json()["error_type"] == "Unauthorized", refused.text
        assert httpx.get(f"{url}/info").status_code == 401 and httpx.get(f"{url}/metrics").status_code == 401
        for path in ("/health", "/ping", "/"):
            assert httpx.get(f"{url}{path}").status_code == 200
        ok = httpx.post(f"{url}/rerank", json=body, headers={"Authorization": "Bearer s3cret"}, timeout=60)
        assert ok.status_code == 200 and len(ok.json()) == len(TEXTS)
        assert httpx.post(f"{url}/", json=body, headers={"Authorization": "bearer s3cret"}, timeout=60).json() == ok.json()
        assert httpx.post(f"{url}/", json=body).status_code == 401  # the rerank alias is guarded too
        big = {"query": QUERY, "texts": ["x" * 4000] * 700}  # over --payload-limit: 401 before the body is read
        assert httpx.post(f"{url}/rerank", json=big).status_code == 401
        assert httpx.post(f"{url}/rerank", json=big, headers={"Authorization": "Bearer s3cret"}).status_code == 413
    finally:
        server.should_exit = True
        thread.join(30)
