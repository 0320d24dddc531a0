"""Predictions and serving: ``vpeft predict`` on image files and the HTTP server over a
MultiTaskModel, exercised with a real HTTP client against a server on the loopback address."""

from __future__ import annotations

import asyncio
import csv
import io
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from datagen import write_list_dataset
from vpeft.cli import main
from vpeft.engine import TrainConfig, train
from vpeft.engine.evaluate import evaluate_run, load_run
from vpeft.serve.batching import BatchQueue
from vpeft.serve.predict import run_transform, top_k

from conftest import TINY, TINY_DIMS, tiny_model

httpx = pytest.importorskip("httpx", reason="the serve extra (httpx) is not installed")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra (uvicorn) is not installed")


def tiny_run(data: Path, out: Path, method: str, weights: Path) -> Path:
    arch, extra = TINY["vit"]
    train(TrainConfig(model=arch, model_args={**TINY_DIMS, **extra}, weights=str(weights),
                      data=str(data), method=method, out=str(out), epochs=1, batch_size=8,
                      num_workers=0, progress=False))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve")
    sizes = {"train800": 16, "val200": 8, "test": 6}
    four = write_list_dataset(root / "four", sizes, classes=4)
    three = write_list_dataset(root / "three", sizes, classes=3)
    weights = root / "tiny.safetensors"  # the "pre-trained" backbone both tasks start from
    save_file(tiny_model().state_dict(), str(weights))
    return {"data": four, "lora": tiny_run(four, root / "lora", "lora", weights),
            "bitfit": tiny_run(three, root / "bitfit", "bitfit", weights)}


def png(color: tuple[int, int, int] = (200, 30, 40), size: int = 20) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


# -- vpeft predict --------------------------------------------------------------------------------
def test_predict_writes_top_k_in_the_runs_classes_as_eval_predicts(runs, tmp_path, capsys):
    out = tmp_path / "preds.csv"
    folder = runs["data"] / "images" / "test"
    assert main(["predict", "--run", str(runs["lora"]), "--images", str(folder), "--out",
                 str(out), "--top-k", "3", "--num-workers", "0"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [Path(r["image"]).name for r in rows] == sorted(p.name for p in folder.iterdir())
    classes = (runs["data"] / "classes.txt").read_text().split()
    probs = [[float(r[f"probability_{i}"]) for i in (1, 2, 3)] for r in rows]
    assert all(p == sorted(p, reverse=True) and 0 < sum(p) <= 1 + 1e-5 for p in probs)
    assert all(r[f"label_{i}"] in classes for r in rows for i in (1, 2, 3))
    # top-1 is what `vpeft eval` predicts for the same images (test.txt lists them in order)
    evaluated = evaluate_run(runs["lora"], show_progress=False, predictions=True, num_workers=0)
    assert [classes.index(r["label_1"]) for r in rows] == evaluated["predictions"]

    before = out.read_text()
    assert main(["predict", "--run", str(runs["lora"]), "--images", str(folder), "--out",
                 str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err and out.read_text() == before
    bad = tmp_path / "bad.png"
    bad.write_text("not a picture")
    assert main(["predict", "--run", str(runs["lora"]), "--images", str(bad), "--out",
                 str(tmp_path / "b.csv"), "--num-workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "cannot read image" in err and "bad.png" in err and len(err.strip().splitlines()) == 1
    assert main(["predict", "--run", str(runs["lora"]), "--images", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "c.csv")]) == 2
    assert "no such image file or folder" in capsys.readouterr().err
    assert not (tmp_path / "b.csv").exists() and not (tmp_path / "c.csv").exists()


# -- the batching queue ---------------------------------------------------------------------------
def test_requests_that_arrive_together_run_as_one_batch():
    calls = []

    def run(keys, items):
        calls.append(list(keys))
        return [f"{k}:{i}" for k, i in zip(keys, items)]

    async def go():
        queue = BatchQueue(run, max_batch=4, max_wait_ms=50)
        await queue.start()
        results = await asyncio.gather(*(queue.submit("ab"[i % 2], i) for i in range(6)))
        await queue.stop()
        return results, queue.stats.as_dict()

    results, stats = asyncio.run(go())
    assert results == [f"{'ab'[i % 2]}:{i}" for i in range(6)]
    assert calls == [["a", "b", "a", "b"], ["a", "b"]]  # at most max_batch, in arrival order
    assert stats["batches"] == 2 and stats["largest_batch"] == 4


# -- the HTTP server ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(runs):
    from vpeft.serve import create_app, load_server

    state = load_server({"digits": runs["lora"], "shapes": runs["bitfit"]})
    app = create_app(state, max_upload=50_000, max_wait_ms=20)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # a free port, held until uvicorn takes the socket
    config = uvicorn.Config(app, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert srv.started, "the server did not start"
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with httpx.Client(base_url=url, timeout=30) as client:
        yield client, state
    srv.should_exit = True
    thread.join(timeout=10)


def expected(run: Path, image: bytes, k: int) -> list[dict]:
    model, config, classes = load_run(run)
    x = run_transform(model, config)(Image.open(io.BytesIO(image)).convert("RGB"))
    with torch.no_grad():
        return top_k(model.eval()(x[None])[0], classes, k)


def test_server_predicts_each_task_as_its_run_does(server, runs):
    client, _ = server
    health = client.get("/health").json()
    assert health["status"] == "ok" and sorted(health["tasks"]) == ["digits", "shapes"]
    image = png()
    got = client.post("/predict/digits?top_k=2", files={"file": ("x.png", image, "image/png")})
    assert got.status_code == 200, got.text
    want = expected(runs["lora"], image, 2)
    body = got.json()
    assert body["task"] == "digits" and [p["label"] for p in body["predictions"]] == [
        p["label"] for p in want]
    for p, w in zip(body["predictions"], want):
        assert p["probability"] == pytest.approx(w["probability"], abs=1e-5)
    raw = client.post("/predict/shapes", content=png((10, 200, 90)),
                      headers={"content-type": "image/png"})
    assert raw.status_code == 200 and len(raw.json()["predictions"]) == 3  # 3 classes, top_k 5
    tasks = client.get("/tasks").json()
    counts = server[1].tasks.parameter_counts()
    assert {t["name"]: t["params"] for t in tasks["tasks"]} == {
        n: counts[n] for n in ("digits", "shapes")}
    assert tasks["backbone"]["params"] == counts["backbone"]
    assert {t["name"]: t["method"] for t in tasks["tasks"]} == {"digits": "lora",
                                                                 "shapes": "bitfit"}


def test_concurrent_mixed_requests_get_their_own_tasks_answers(server, runs):
    client, _ = server
    images = [png((40 * i, 255 - 30 * i, 90)) for i in range(6)]
    names = ["digits", "shapes"] * 3
    results: list = [None] * 6

    def ask(i: int) -> None:
        results[i] = client.post(f"/predict/{names[i]}?top_k=1",
                                 files={"file": ("x.png", images[i], "image/png")}).json()

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, r in enumerate(results):
        want = expected(runs["lora" if names[i] == "digits" else "bitfit"], images[i], 1)
        assert r["task"] == names[i] and r["predictions"][0]["label"] == want[0]["label"]


@pytest.mark.parametrize("path, kwargs, status, message", [
    ("/predict/cats", {"content": b"x"}, 404, "no task 'cats'"),
    ("/predict/digits", {"files": {"file": ("a.txt", b"hello", "text/plain")}}, 415,
     "not an image"),
    ("/predict/digits", {"content": b""}, 415, "upload is empty"),
    ("/predict/digits", {"files": {"other": ("x.png", b"1", "image/png")}}, 400,
     "no file field named 'file'"),
    ("/predict/digits", {"content": b"0" * 60_000}, 413, "larger than the limit"),
    ("/predict/digits?top_k=0", {"content": b"x"}, 422, "greater than or equal to 1"),
], ids=["unknown-task", "not-an-image", "empty", "no-file-field", "oversize", "bad-top-k"])
def test_bad_requests_get_a_clear_4xx_and_the_server_keeps_serving(server, path, kwargs, status,
                                                                   message):
    client, _ = server
    got = client.post(path, **kwargs)
    assert got.status_code == status
    assert message in str(got.json()["detail"])
    ok = client.post("/predict/digits", files={"file": ("x.png", png(), "image/png")})
    assert ok.status_code == 200 and client.get("/health").status_code == 200


def test_serve_command_names_bad_adapters(runs, tmp_path, capsys):
    assert main(["serve", "--adapter", f"a={tmp_path}"]) == 2
    assert "is not a vpeft run folder" in capsys.readouterr().err
    assert main(["serve", "--adapter", f"a={runs['lora']}", "--adapter",
                 f"a={runs['bitfit']}"]) == 2
    assert "given once" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--adapter", "no-equals-sign"])
    assert "expected NAME=RUN_FOLDER" in capsys.readouterr().err
