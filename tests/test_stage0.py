"""Stage 0 (generate_instructions.py) against a loopback OpenAI-compatible server and a tiny local VLM."""
import base64
import dataclasses
import hashlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import REPO, run_script
from data.annotations import ANNOTATIONS_FILE, read_annotations
from data.datasets import load_dataset
from fake_openai_server import (FakeOpenAIServer, Reply, good_answer, image_urls, leaking_answer, prompt_text,
                                refusing_key)
import generate_instructions
from utils.errors import UserError, run_cli

KEY = "sk-test-Zq81secretvalue"


def argv(root, out, server=None, *extra):
    args = ["--dataname", "toy", "--data_root", str(root), "--output_dir", str(out)]
    return args + (["--base_url", server.url] if server else []) + [str(e) for e in extra]


def stage0(argv):
    """``python generate_instructions.py <argv>`` in this process (the command is recorded in run.json)."""
    generate_instructions.main(generate_instructions.parse(argv), argv)


def folder(out):
    return out / "toy" / "instructions"


def annotations(out):
    path = folder(out) / ANNOTATIONS_FILE
    return read_annotations(path) if path.exists() else []


def rejected(out):
    path = folder(out) / "rejected.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def assert_key_nowhere(out, *texts):
    for path in out.rglob("*"):
        if path.is_file():
            assert KEY not in path.read_text(encoding="utf-8", errors="ignore"), path
    for text in texts:
        assert KEY not in text


def test_normal_run_covers_training_images_only(toy_root, tmp_path, capsys):
    out = tmp_path / "out"
    with FakeOpenAIServer() as server:
        stage0(argv(toy_root, out, server, "--api_key", KEY, "--workers", 4))
        printed = capsys.readouterr()
        splits = load_dataset(toy_root, "toy", out)
        words = len(good_answer({}, {}).content.split())  # the fake's completion_tokens
        assert f"total {len(splits.train) * (100 + words)}" in printed.out
        records = annotations(out)
        assert sorted(a.image for a in records) == sorted(s.path for s in splits.train)
        assert not {a.image for a in records} & {s.path for s in splits.val}
        by_path = {s.path: splits.class_names[s.label] for s in splits.train}
        assert all(a.label == by_path[a.image] and a.generator == "gpt-4o" for a in records)
        assert records[0].key_elements.startswith("a bright shape") and records[0].reasoning.startswith("the contrast")

        bodies = server.chat_bodies()
        assert len(bodies) == len(splits.train)
        assert {r["headers"]["authorization"] for r in server.requests} == {f"Bearer {KEY}"}
        train_bytes = {(toy_root / s.path).read_bytes(): s.path for s in splits.train}
        sent = []
        for body in bodies:
            assert body["model"] == "gpt-4o"
            (url,) = image_urls(body)
            assert url.startswith("data:image/png;base64,")
            image = train_bytes[base64.b64decode(url.split(",", 1)[1])]  # KeyError: not a train image
            sent.append(image)
            assert f"evokes '{by_path[image]}'" in prompt_text(body)
            assert ", ".join(splits.class_names) in prompt_text(body)
        assert sorted(sent) == sorted(by_path)

        stage0(argv(toy_root, out, server, "--api_key", KEY))  # resume: nothing left to ask
        assert len(server.chat_bodies()) == len(splits.train)
    assert len(annotations(out)) == len(splits.train)
    meta = json.loads((folder(out) / "meta.json").read_text())
    assert meta["stage"] == "instructions" and meta["class_names"] == splits.class_names
    assert meta["generator"] == "gpt-4o" and meta["complete"] is True
    run = json.loads((folder(out) / "run.json").read_text())
    assert "--api_key ***" in run["command"] and "api_key" not in run["args"]
    assert_key_nowhere(out, printed.out, printed.err, *capsys.readouterr())


def test_rate_limit_retried_by_client_and_failed_requests_retried_next_run(toy_root, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    out = tmp_path / "out"
    limit = argv(toy_root, out, None, "--limit", 1, "--workers", 1, "--max_retries", 1)
    with FakeOpenAIServer() as server:
        server.queue(Reply(status=429, headers={"retry-after-ms": "10"}))
        stage0(limit + ["--base_url", server.url])
        assert len(server.chat_bodies()) == 2 and len(annotations(out)) == 1

        # Rate limited beyond --max_retries: counted as failed, nothing written, asked again next run.
        server.queue(*[Reply(status=429, headers={"retry-after-ms": "10"})] * 2)
        stage0(limit + ["--base_url", server.url])
        assert len(server.chat_bodies()) == 4 and len(annotations(out)) == 1 and rejected(out) == []
        stage0(limit + ["--base_url", server.url])
        assert len(server.chat_bodies()) == 5 and len(annotations(out)) == 2
        assert server.chat_bodies()[2] == server.chat_bodies()[4]  # the failed image came back


def test_malformed_answers_are_asked_again(toy_root, tmp_path):
    out = tmp_path / "out"
    with FakeOpenAIServer() as server:
        server.queue(Reply("A lovely picture without any sections."), Reply(raw=b"<html>proxy error</html>"))
        stage0(argv(toy_root, out, server, "--api_key", KEY, "--limit", 2, "--workers", 1))
        # first image: unstructured answer, then a good one; second image: a body that is not JSON
        assert len(server.chat_bodies()) == 3
        assert len(annotations(out)) == 1 and rejected(out) == []
        stage0(argv(toy_root, out, server, "--api_key", KEY, "--limit", 2, "--workers", 1))
    assert len(annotations(out)) == 3


def test_answers_naming_the_emotion_are_asked_again_then_kept_marked_and_counted(toy_root, tmp_path, capsys):
    """The whole-word check also catches innocent words, so after --max_attempts the image keeps
    its answer, marked, instead of silently leaving the training set."""
    out = tmp_path / "out"
    with FakeOpenAIServer(default=leaking_answer) as server:
        server.queue(Reply("1. Key elements: a shape.\n2. Reasoning: calm colours."))  # first image, 1st ask: clean
        stage0(argv(toy_root, out, server, "--api_key", KEY, "--limit", 3, "--workers", 1, "--max_attempts", 2))
        assert len(server.chat_bodies()) == 1 + 2 + 2
    kept = annotations(out)
    assert [a.mentions_label for a in kept] == [False, True, True] and rejected(out) == []
    assert all(a.label in a.reasoning for a in kept[1:])
    printed = capsys.readouterr().out
    assert "3 annotated (2 kept although naming the emotion)" in printed
    meta = json.loads((folder(out) / "meta.json").read_text())
    run = json.loads((folder(out) / "run.json").read_text())
    assert meta["num_mentions_label"] == 2 and run["counts"]["mentions_label"] == 2


def test_answers_naming_the_emotion_are_rejected_then_retried_on_rerun(toy_root, tmp_path):
    out = tmp_path / "out"
    with FakeOpenAIServer(default=leaking_answer) as server:
        stage0(argv(toy_root, out, server, "--api_key", KEY, "--limit", 2, "--workers", 1, "--max_attempts", 2,
                  "--reject_label_mentions"))
        assert len(server.chat_bodies()) == 4
    assert annotations(out) == []
    refused = rejected(out)
    assert len(refused) == 2 and all(r["attempts"] == 2 for r in refused)
    assert all(r["reason"] == f"names the emotion {r['label']!r}" and r["label"] in r["answer"] for r in refused)

    with FakeOpenAIServer() as server:
        stage0(argv(toy_root, out, server, "--api_key", KEY, "--limit", 1, "--skip_rejected"))
        assert annotations(out)[0].image not in {r["image"] for r in refused}
        stage0(argv(toy_root, out, server, "--api_key", KEY, "--limit", 2))
    assert {a.image for a in annotations(out)} >= {r["image"] for r in refused}
    assert rejected(out) == []  # answered images leave rejected.jsonl


def test_bad_key_stops_with_one_line_and_exit_2(toy_root, tmp_path):
    out = tmp_path / "out"
    with FakeOpenAIServer(default=refusing_key) as server:
        server.queue(*[Reply(f"1. Key elements: shapes {i}.\n2. Reasoning: colours.") for i in range(3)])
        with pytest.raises(UserError):
            stage0(argv(toy_root, out, server, "--api_key", KEY, "--workers", 1))
        before = (folder(out) / ANNOTATIONS_FILE).read_bytes()
        assert len(annotations(out)) == 3

        result = run_script("generate_instructions.py", *argv(toy_root, out, server, "--api_key", KEY),
                            timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "refused the API key" in lines[-1]
    assert "Traceback" not in result.stderr and "***" in lines[-1]
    assert (folder(out) / ANNOTATIONS_FILE).read_bytes() == before
    assert not (folder(out) / "meta.json").exists()
    assert_key_nowhere(out, result.stdout, result.stderr)


def test_fatal_error_mid_run_stops_and_a_rerun_resumes(toy_root, tmp_path):
    out = tmp_path / "out"
    with FakeOpenAIServer(default=lambda body, headers: Reply(status=503)) as server:
        server.queue(*[Reply(f"1. Key elements: shapes {i}.\n2. Reasoning: colours.") for i in range(10)],
                     Reply(status=403, error="model not allowed"))
        # The key loses access half-way: stop at once, keep what was written.
        with pytest.raises(UserError, match="may not use --model"):
            stage0(argv(toy_root, out, server, "--api_key", KEY, "--workers", 3, "--max_retries", 0))
        first = annotations(out)
        assert 7 <= len(first) <= 10  # at most the requests in flight are lost
        with open(folder(out) / ANNOTATIONS_FILE, "a") as fh:  # a write cut off by a kill
            fh.write('{"image": "toy/train/awe/half')
        server.default = good_answer
        stage0(argv(toy_root, out, server, "--api_key", KEY, "--workers", 3))
    splits = load_dataset(toy_root, "toy", out)
    images = [a.image for a in annotations(out)]
    assert sorted(images) == sorted(s.path for s in splits.train)  # each once, no val image
    assert images[:len(first)] == [a.image for a in first]


def test_ctrl_c_then_resume(toy_root, tmp_path):
    out, release = tmp_path / "out", threading.Event()

    def stalled(body, headers):
        release.wait(20)
        return good_answer(body, headers)

    with FakeOpenAIServer(default=stalled) as server:
        server.queue(*[good_answer] * 5)
        child = subprocess.Popen([sys.executable, "generate_instructions.py", *argv(toy_root, out, server, "--workers", 2)],
                                 cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "OPENAI_API_KEY": KEY},
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        path, deadline = folder(out) / ANNOTATIONS_FILE, time.monotonic() + 30
        while time.monotonic() < deadline and not (path.exists() and path.read_text().count("\n") == 5):
            time.sleep(0.05)
        time.sleep(0.2)  # the two stalled requests are in flight
        child.send_signal(signal.SIGINT)
        _, stderr = child.communicate(timeout=10)  # exits without waiting for the stalled answers
        release.set()
        assert child.returncode == 130 and "rerun the same command to resume" in stderr
        assert len(annotations(out)) == 5
        server.default = good_answer
        stage0(argv(toy_root, out, server, "--api_key", KEY, "--workers", 3))
    splits = load_dataset(toy_root, "toy", out)
    assert sorted(a.image for a in annotations(out)) == sorted(s.path for s in splits.train)


def test_every_request_failing_stops_the_run(toy_root, tmp_path):
    out = tmp_path / "out"
    with FakeOpenAIServer(default=lambda body, headers: Reply(status=400, error="image input not supported")) as server:
        with pytest.raises(UserError, match="last 20 requests all failed.*image input not supported"):
            stage0(argv(toy_root, out, server, "--api_key", KEY, "--workers", 1))
        # the one worker may already have sent the next request when the 20th failure stops the run
        assert 20 <= len(server.chat_bodies()) <= 21
    assert annotations(out) == [] and rejected(out) == []


PROXY_PAGE = Reply(raw=b"<!DOCTYPE html><html><body><h1>Proxy login</h1></body></html>", content_type="text/html")


def test_a_proxys_html_page_is_a_failed_request_asked_again_next_run(toy_root, tmp_path):
    out = tmp_path / "out"
    with FakeOpenAIServer() as server:
        server.queue(PROXY_PAGE)  # status 200, but no chat completion
        stage0(argv(toy_root, out, server, "--api_key", KEY, "--limit", 2, "--workers", 1))
        assert len(server.chat_bodies()) == 2 and len(annotations(out)) == 1 and rejected(out) == []
        stage0(argv(toy_root, out, server, "--api_key", KEY, "--limit", 2, "--workers", 1))
        assert len(server.chat_bodies()) == 4 and len(annotations(out)) == 3
        assert server.chat_bodies()[0] == server.chat_bodies()[2]  # the failed image came back


def test_a_proxys_html_page_for_every_request_is_one_line(toy_root, tmp_path, capsys):
    from utils.errors import run_cli

    out = tmp_path / "out"
    with FakeOpenAIServer(default=lambda body, headers: PROXY_PAGE) as server:
        code = run_cli(generate_instructions.main, argv(toy_root, out, server, "--api_key", KEY, "--workers", 1),
                       parse=generate_instructions.parse)
        assert 20 <= len(server.chat_bodies()) <= 21
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert "last 20 requests all failed" in lines[0] and "Proxy login" in lines[0], lines[0]
    assert annotations(out) == [] and rejected(out) == []


def test_unreachable_server_stops_at_once(toy_root, tmp_path):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(UserError, match=f"cannot reach http://127.0.0.1:{port}/v1"):
        stage0(argv(toy_root, tmp_path / "out", None, "--api_key", KEY, "--max_retries", 0,
                  "--base_url", f"http://127.0.0.1:{port}/v1"))


def test_images_and_answer_checks(tmp_path):
    from PIL import Image

    from engine.instructions import approx_image_tokens, check_answer, image_data_url

    Image.new("RGB", (300, 200), "red").save(tmp_path / "big.bmp")
    Image.new("RGB", (300, 200), "red").save(tmp_path / "big.png")
    for name, mime in (("big.bmp", "image/jpeg"), ("big.png", "image/png")):
        url, size = image_data_url(tmp_path / name, max_side=100)
        assert url.startswith(f"data:{mime};base64,") and size == (100, 67)
        sent = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
        assert sent.size == (100, 67) and sent.get_format_mimetype() == mime
    assert approx_image_tokens(1024, 1024) == 765  # OpenAI's published example
    good = "1. Key elements: a clown.\n2. Reasoning: silly faces."
    assert check_answer(good, "awe") == (("a clown.", "silly faces."), "")
    assert check_answer(good.replace("silly", "Amusement and silly"), "amusement")[0] is None
    assert check_answer("just text", "awe")[1].startswith("missing")
    assert check_answer("just text", "awe", accept_unstructured=True)[0] == ("just text", "just text")
    assert check_answer(None, "awe") == (None, "empty answer")


def test_dry_run_and_missing_key(toy_root, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    out = tmp_path / "out"
    with pytest.raises(UserError, match="OPENAI_API_KEY"):
        stage0(argv(toy_root, out))
    stage0(argv(toy_root, out, None, "--dry_run", "--limit", 5))
    printed = capsys.readouterr().out
    assert "Write two numbered sections" in printed and "image/png data URL, 64x64 px" in printed
    assert "images to ask: 5" in printed and "max output tokens per image: 512" in printed
    assert not folder(out).exists()


def test_local_backend_on_tiny_vlm(tiny_vlm_dir, tmp_path):
    from data.toy import make_toy_dataset

    root, out = tmp_path / "images", tmp_path / "out"
    make_toy_dataset(root / "toy", num_classes=2, per_class=4, test_per_class=1, seed=0, size=64)
    stage0(argv(root, out, None, "--backend", "local", "--vlm_model", tiny_vlm_dir, "--accept_unstructured",
              "--max_new_tokens", 8, "--batch_size", 4))
    splits = load_dataset(root, "toy", out)
    records = annotations(out)
    assert sorted(a.image for a in records) == sorted(s.path for s in splits.train)
    assert all(a.generator == str(tiny_vlm_dir) and a.key_elements == a.reasoning for a in records)
    meta = json.loads((folder(out) / "meta.json").read_text())
    assert meta["generator"] == str(tiny_vlm_dir) and meta["complete"] is True


def test_sigkill_between_records_then_rerun_loses_and_duplicates_nothing(toy_root, tmp_path):
    out, whole = tmp_path / "out", tmp_path / "whole"
    with FakeOpenAIServer() as server:
        result = run_script("tests/kill_at.py", "engine.instructions:append_annotation", "6", "generate_instructions.py",
                            *argv(toy_root, out, server, "--api_key", KEY, "--workers", 1), timeout=120)
        assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
        first = annotations(out)
        assert len(first) == 5 and not (folder(out) / "meta.json").exists()
        stage0(argv(toy_root, out, server, "--api_key", KEY, "--workers", 2))
        stage0(argv(toy_root, whole, server, "--api_key", KEY, "--workers", 2))
    resumed = annotations(out)
    assert resumed[:5] == first  # kept as written
    key = lambda a: (a.image, a.label, a.key_elements, a.reasoning)  # noqa: E731
    assert sorted(map(key, resumed)) == sorted(map(key, annotations(whole)))  # each image once, as uninterrupted


# ---------------------------------------------------------------------------- the Batch API (--batch_api)

def batch_argv(root, out, server, *extra):
    return argv(root, out, server, "--api_key", KEY, "--batch_api", "--poll_seconds", 0.01, *extra)


def batch_state(out):
    return json.loads((folder(out) / "batches.json").read_text())


class ByImage:
    """Answers by image and by how often that image was asked, so per-request and batched runs get
    the same answers: some good at once, some after one unstructured answer, some naming the emotion
    twice and then clean, some naming it every time (kept, marked), some never structured (rejected)."""

    def __init__(self):
        self.asks, self.lock = {}, threading.Lock()

    def __call__(self, body, headers):
        (url,) = image_urls(body)
        with self.lock:
            self.asks[url] = ask = self.asks.get(url, 0) + 1
        kind = int(hashlib.sha1(url.encode()).hexdigest(), 16) % 5
        if kind == 0 or (kind == 1 and ask < 3):
            return leaking_answer(body, headers)
        if kind == 2 and ask == 1 or kind == 3:
            return Reply(f"A lovely picture, asked {ask} times, without any sections.")
        return Reply(f"1. Key elements: shapes seen at ask {ask}.\n2. Reasoning: the colours of {url[-20:]}.")


def test_batch_api_outputs_equal_the_per_request_ones(toy_root, tmp_path, capsys):
    flags = ("--limit", 20, "--max_attempts", 3)
    per, batched = tmp_path / "per", tmp_path / "batched"
    with FakeOpenAIServer(default=ByImage()) as server:
        stage0(argv(toy_root, per, server, "--api_key", KEY, "--workers", 1, *flags))
        sync_bodies = server.chat_bodies()
    printed_per = capsys.readouterr().out
    with FakeOpenAIServer(default=ByImage()) as server:
        server.batch_polls = 2
        stage0(batch_argv(toy_root, batched, server, *flags))
        printed = capsys.readouterr()
        assert server.chat_bodies() == []
        # the bodies of the batches are exactly the per-request ones
        assert sorted(map(json.dumps, server.batch_bodies())) == sorted(map(json.dumps, sync_bodies))
        batches = list(server.batches.values())
        sizes = [len(server.batch_lines(b["id"])) for b in batches]
        assert server.batch_creations == 3 and sizes[0] == 20 and 20 > sizes[1] > sizes[2] > 0  # follow-ups
        assert all(b["endpoint"] == "/v1/chat/completions" and b["completion_window"] == "24h" for b in batches)
        uploads = [r for r in server.requests if r["path"] == "/v1/files"]
        assert len(uploads) == 3 and {u["body"]["purpose"] for u in uploads} == {"batch"}
        lines = server.batch_lines(batches[0]["id"])
        assert {(line["method"], line["url"]) for line in lines} == {("POST", "/v1/chat/completions")}
        assert len({line["custom_id"] for line in lines}) == 20
        assert "submitted batch" in printed.out and "batch round 1" in printed.err  # the progress line
    assert_key_nowhere(batched, printed.out, printed.err)

    as_records = lambda out: sorted(json.dumps(dataclasses.asdict(a), sort_keys=True) for a in annotations(out))  # noqa: E731
    assert as_records(batched) == as_records(per)
    assert sorted(map(json.dumps, rejected(batched))) == sorted(map(json.dumps, rejected(per)))
    kept = annotations(per)
    assert rejected(per) and any(a.mentions_label for a in kept) and not all(a.mentions_label for a in kept)
    summary = lambda text: re.search(r"this run: [^;]*", text).group(0)  # noqa: E731
    assert summary(printed.out) == summary(printed_per)
    usage = lambda text: re.search(r"token usage: prompt \d+, completion \d+, total \d+", text).group(0)  # noqa: E731
    assert usage(printed.out) == usage(printed_per)
    for name in ("meta.json", "run.json"):
        per_record, batched_record = (json.loads((folder(o) / name).read_text()) for o in (per, batched))
        for key in ("counts", "usage", "num_annotated", "num_rejected", "num_mentions_label", "complete"):
            assert per_record.get(key) == batched_record.get(key), (name, key)
    state = batch_state(batched)
    assert state["pending"] is None and [h["batch_id"] for h in state["history"]] == [b["id"] for b in batches]
    assert not (folder(batched) / "batch_input.jsonl").exists()


def test_batch_api_asks_refused_answers_again_in_follow_up_batches_up_to_max_attempts(toy_root, tmp_path):
    out = tmp_path / "out"
    with FakeOpenAIServer(default=leaking_answer) as server:
        server.queue(Reply("1. Key elements: a shape.\n2. Reasoning: calm colours."))  # the first line: clean
        stage0(batch_argv(toy_root, out, server, "--limit", 4, "--max_attempts", 2, "--reject_label_mentions"))
        first, second = (server.batch_lines(b) for b in server.batches)
        assert server.batch_creations == 2 and len(first) == 4
        assert [line["custom_id"] for line in second] == [line["custom_id"] for line in first[1:]]
        assert [line["body"] for line in second] == [line["body"] for line in first[1:]]
    assert len(annotations(out)) == 1
    refused = rejected(out)
    assert len(refused) == 3 and all(r["attempts"] == 2 and r["reason"].startswith("names the emotion") for r in refused)


def test_batch_api_killed_after_submitting_resumes_the_same_batch(toy_root, tmp_path):
    out = tmp_path / "out"
    with FakeOpenAIServer() as server:
        server.batch_polls = 10 ** 6  # running until told otherwise
        # killed right after the batch was created, before its id was recorded (the 2nd state write)
        result = run_script("tests/kill_at.py", "engine.batch_api:save_state", "2", "generate_instructions.py",
                            *batch_argv(toy_root, out, server, "--limit", 10), timeout=120)
        assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
        assert server.batch_creations == 1
        (part,) = batch_state(out)["pending"]["parts"]
        assert part["batch_id"] is None and part["input_file_id"]
        with pytest.raises(UserError, match="still pending for 10 images; rerun with --batch_api"):
            stage0(argv(toy_root, out, server, "--api_key", KEY, "--limit", 10))  # per request: would pay twice

        # The rerun finds the batch by its input file and waits for it, holding the folder lock; killed again.
        child = subprocess.Popen([sys.executable, "generate_instructions.py",
                                  *batch_argv(toy_root, out, server, "--limit", 10)], cwd=REPO,
                                 env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        (batch_id,) = server.batches
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and sum(r["path"].endswith(f"/batches/{batch_id}")
                                                  for r in server.requests) < 3:
            time.sleep(0.05)
        assert batch_state(out)["pending"]["parts"][0]["batch_id"] == batch_id
        assert json.loads((folder(out) / ".lock.json").read_text())["pid"] == child.pid
        child.kill()
        child.communicate(timeout=10)

        server.batch_polls = 0  # the batch ends at the next check
        stage0(batch_argv(toy_root, out, server, "--limit", 10))
        assert server.batch_creations == 1 and server.chat_bodies() == []
    images = [a.image for a in annotations(out)]
    assert len(images) == len(set(images)) == 10
    state = batch_state(out)
    assert state["pending"] is None and [h["batch_id"] for h in state["history"]] == [batch_id]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_batch_api_expired_failed_or_refused_stops_with_one_line_and_keeps_what_was_written(toy_root, tmp_path,
                                                                                            capsys):
    out = tmp_path / "out"
    with FakeOpenAIServer() as server:
        def run(*extra):
            return run_cli(generate_instructions.main, batch_argv(toy_root, out, server, *extra),
                           parse=generate_instructions.parse)

        assert run("--limit", 4) == 0
        capsys.readouterr()
        written, meta = ((folder(out) / name).read_bytes() for name in (ANNOTATIONS_FILE, "meta.json"))

        server.batch_end, server.expire_after = "expired", 3
        assert run("--limit", 10) == 2
        line = one_error_line(capsys)
        assert "expired (not finished within 24h); 3 of its 10 images have their answer written" in line
        assert "rerun the same command" in line
        assert (folder(out) / ANNOTATIONS_FILE).read_bytes().startswith(written) and len(annotations(out)) == 7
        assert batch_state(out)["pending"] is None
        written = (folder(out) / ANNOTATIONS_FILE).read_bytes()

        server.batch_end = "failed"
        assert run("--limit", 10) == 2
        line = one_error_line(capsys)
        assert "failed (token_limit_exceeded: Enqueued token limit reached" in line and "none of its 10" in line
        assert (folder(out) / ANNOTATIONS_FILE).read_bytes() == written and batch_state(out)["pending"] is None

        creations = server.batch_creations
        server.upload_reply = Reply(status=400, error="File is too large")
        assert run() == 2
        line = one_error_line(capsys)
        assert "refused the batch input file" in line and "File is too large" in line and "--batch_max_mb" in line
        server.upload_reply = Reply(status=401, error=f"Incorrect API key provided: {KEY}")
        assert run() == 2
        line = one_error_line(capsys)
        assert "refused the API key" in line and "***" in line
        assert server.batch_creations == creations and batch_state(out)["pending"] is None
        assert (folder(out) / ANNOTATIONS_FILE).read_bytes() == written
        assert (folder(out) / "meta.json").read_bytes() == meta  # the last good run's

        server.upload_reply, server.batch_end = None, "completed"
        assert run() == 0
    splits = load_dataset(toy_root, "toy", out)
    assert sorted(a.image for a in annotations(out)) == sorted(s.path for s in splits.train)
    assert_key_nowhere(out, *capsys.readouterr())


def test_dry_run_prints_the_cost_per_request_and_with_the_batch_api(toy_root, tmp_path, capsys):
    out = tmp_path / "out"
    stage0(argv(toy_root, out, None, "--dry_run", "--limit", 4, "--price_in", 2.5, "--price_out", 10))
    printed = capsys.readouterr().out
    found = re.search(r"~([\d,]+) prompt tokens, at most ([\d,]+) output tokens", printed)
    prompt_tokens, output_tokens = (int(n.replace(",", "")) for n in found.groups())
    assert output_tokens == 4 * 512 and prompt_tokens > 4 * 255  # 64x64 images: 255 tokens each, plus the text
    cost = (prompt_tokens * 2.5 + output_tokens * 10) / 1e6
    assert f"per request ~${cost:.4f} at most, with --batch_api ~${cost / 2:.4f} at most (half price)" in printed
    stage0(argv(toy_root, out, None, "--dry_run", "--limit", 4))
    assert "add --price_in and --price_out" in capsys.readouterr().out
    with pytest.raises(UserError, match="--price_in and --price_out go together"):
        stage0(argv(toy_root, out, None, "--dry_run", "--price_in", 2.5))
    assert not folder(out).exists()


def test_batch_api_splits_a_round_past_batch_max_mb(toy_root, tmp_path):
    out = tmp_path / "out"
    with FakeOpenAIServer() as server:
        stage0(batch_argv(toy_root, out, server, "--limit", 6, "--batch_max_mb", 0.01))  # ~10 KB per input file
        sizes = [len(server.batch_lines(b)) for b in server.batches]
        files = [f["data"] for f in server.files.values() if f["purpose"] == "batch"]
        assert len(sizes) > 1 and sum(sizes) == 6 and all(len(data) <= 0.01 * 2 ** 20 or data.count(b"\n") == 1
                                                          for data in files)
        (round_,) = {h["round"] for h in batch_state(out)["history"]}
    assert len(annotations(out)) == 6 and round_ == 1
