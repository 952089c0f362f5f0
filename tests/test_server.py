"""`adapterlab serve` as a real process on a free localhost port, asked with the official `openai` client: two
verified adapters and the base on one model, streaming, OpenAI-shaped errors, the key, the body limit, feedback over
HTTP; and the greedy answers are those `adapterlab generate` prints for the same prompt."""
import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from test_serve import _second_domain_artifact  # a second adapter on the same base, cheaply (no training)

KEY = "test-key-not-a-secret"
PROMPT = ("Return a JSON object with the keys \"name\", \"age\", \"city\" and \"job\" for this text:\n"
          "Lea Stein, 52, is a pilot in Graz.")
MAX_TOKENS = 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "adapterlab.cli", "serve", *args]


def _wait_healthy(proc: subprocess.Popen, url: str, log: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"adapterlab serve exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"adapterlab serve not healthy after {timeout}s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def server(ci_run, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    contacts = Path(ci_run.summary["artifact"])
    other = _second_domain_artifact(tmp / "other")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp / "server.log"
    env = {**os.environ, "ADAPTERLAB_API_KEY": KEY}
    with open(log, "wb") as out:
        proc = subprocess.Popen(_serve_cmd(f"contacts={contacts}", f"other={other}", "--port", str(port),
                                           "-f", "ci", "--set", f"queue.path={tmp / 'queue' / 'feedback.jsonl'}",
                                           "--set", "queue.threshold=3", "--set", f"output.root={tmp / 'out'}",
                                           "--set", "serve.max_tokens=64", "--set", "serve.max_request_bytes=20000"),
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_healthy(proc, url, log)
        yield {"url": url, "contacts": contacts, "other": other, "tmp": tmp, "log": log, "proc": proc,
               "client": openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=600)}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _generate_cli(*args: str) -> str:
    """`adapterlab generate` (its CLI entry point, in this process) and what it prints."""
    from adapterlab.cli import main
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["generate", *args]) == 0
    return out.getvalue().strip()


@pytest.mark.slow
def test_models_two_adapters_and_base_answer_as_generate(server):
    client = server["client"]
    listed = {m.id: m for m in client.models.list().data}
    assert set(listed) == {"base", "contacts", "other"}
    assert listed["contacts"].parent == "base" and listed["base"].root == "embedded:smollm2-135m-instruct"

    answers = {}
    for model in ("contacts", "other", "base"):
        r = client.chat.completions.create(model=model, max_tokens=MAX_TOKENS,
                                           messages=[{"role": "user", "content": PROMPT}])
        assert r.model == model and r.object == "chat.completion" and r.choices[0].message.role == "assistant"
        assert 0 < r.usage.completion_tokens <= MAX_TOKENS and r.usage.prompt_tokens > 20
        answers[model] = r.choices[0].message.content
    both = [f"contacts={server['contacts']}", f"other={server['other']}", "--prompt", PROMPT,
            "--max-new-tokens", str(MAX_TOKENS)]
    assert answers["contacts"] == _generate_cli(*both)
    assert answers["other"] == _generate_cli(*both, "--adapter", "other")
    assert answers["base"] == _generate_cli(*both, "--base")
    assert answers["contacts"] != answers["base"], answers  # the trained adapter really answers differently
    # greedy is deterministic: asking again (temperature 0 explicitly) gives the same text
    again = client.chat.completions.create(model="other", max_tokens=MAX_TOKENS, temperature=0,
                                           messages=[{"role": "user", "content": PROMPT}])
    assert again.choices[0].message.content == answers["other"]


@pytest.mark.slow
def test_streaming_chat_and_completions(server):
    client = server["client"]
    messages = [{"role": "user", "content": PROMPT}]
    whole = client.chat.completions.create(model="contacts", max_tokens=MAX_TOKENS, messages=messages)
    chunks = list(client.chat.completions.create(model="contacts", max_tokens=MAX_TOKENS, messages=messages,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1  # really streamed, piece by piece
    assert "".join(pieces).strip() == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    text = client.completions.create(model="other", prompt="The capital of France is", max_tokens=6)
    assert text.object == "text_completion" and text.usage.completion_tokens <= 6
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="other", prompt="The capital of France is", max_tokens=6, stream=True) if c.choices)
    assert streamed == text.choices[0].text and streamed


@pytest.mark.slow
def test_errors_are_openai_shaped_and_the_server_survives(server):
    client, url = server["client"], server["url"]
    msg = [{"role": "user", "content": "Hi"}]
    with pytest.raises(openai.NotFoundError, match="does not exist") as e:
        client.chat.completions.create(model="nope", messages=msg, max_tokens=4)
    assert e.value.body["code"] == "model_not_found" and "contacts" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="contacts", messages=[], max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="serve.max_tokens"):
        client.chat.completions.create(model="contacts", messages=msg, max_tokens=65)
    with pytest.raises(openai.BadRequestError, match="frequency_penalty: not supported"):
        client.chat.completions.create(model="contacts", messages=msg, max_tokens=4, frequency_penalty=0.5)
    with pytest.raises(openai.BadRequestError, match="stop sequences are not supported"):
        client.chat.completions.create(model="contacts", messages=msg, max_tokens=4, stop=["}"])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()

    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    bad = httpx.post(f"{url}/v1/chat/completions", content=b'{"model": "contacts", "messages": [', headers=auth)
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
    assert httpx.post(f"{url}/v1/chat/completions", content=b"[1, 2]", headers=auth).status_code == 400
    big = httpx.post(f"{url}/v1/completions", headers=auth,
                     json={"model": "contacts", "prompt": "x" * 30000, "max_tokens": 1})
    assert big.status_code == 413 and "serve.max_request_bytes" in big.json()["error"]["message"]
    assert httpx.post(f"{url}/v1/chat/completions", headers={"Content-Type": "application/json"},
                      json={"model": "contacts", "messages": msg}).status_code == 401
    missing = httpx.get(f"{url}/v1/nothing-here", headers=auth)
    assert missing.status_code == 404 and "error" in missing.json()
    assert httpx.get(f"{url}/health").json()["models"] == ["base", "contacts", "other"]  # still up, no key needed
    assert KEY not in server["log"].read_text()  # the key is never logged


@pytest.mark.slow
def test_feedback_and_training_over_http(server):
    url, auth = server["url"], {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(f"{url}/v1/feedback", headers=auth, json={
        "feedback": "critical", "query": "Who is Lea?", "response": "{}", "correction": '{"name": "Lea"}'})
    assert r.status_code == 200 and r.json()["queued"] == 1 and r.json()["threshold"] == 3, r.text
    r = httpx.post(f"{url}/v1/feedback", headers=auth, json={"feedback": "medium", "query": "Q?", "response": "A."})
    assert r.json()["class"] == "improvement" and r.json()["weight"] == 3 and r.json()["training_started"] is None
    assert httpx.post(f"{url}/v1/feedback", headers=auth, json={"feedback": "critical", "query": "Q?",
                                                               "response": "A."}).status_code == 400
    assert httpx.post(f"{url}/v1/feedback", headers=auth, json={"feedback": "awful", "query": "Q?",
                                                               "response": "A."}).status_code == 400
    queued = [json.loads(l) for l in (server["tmp"] / "queue" / "feedback.jsonl").read_text().splitlines()]
    assert queued[0] == {"query": "Who is Lea?", "response": '{"name": "Lea"}', "weight": 10.0, "feedback": "critical",
                         "rejected": "{}"}
    status = httpx.get(f"{url}/v1/training", headers=auth).json()
    assert status["queue"]["records"] == 2 and status["queue"]["by_class"] == {"critical": 1, "improvement": 1, "good": 0}
    assert status["training"] is None and status["adapters"] == ["contacts", "other"]
    below = httpx.post(f"{url}/v1/training", headers=auth, json={})
    assert below.status_code == 409 and "threshold 3" in below.json()["error"]["message"]


def test_tampered_adapter_refused_at_start(tmp_path):
    """A changed file in an artifact: the server does not start, and says which file and why (before loading a model)."""
    art = _second_domain_artifact(tmp_path / "run")
    cfg = json.loads((art / "adapter_config.json").read_text())
    (art / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": 99}))
    done = subprocess.run(_serve_cmd(f"bad={art}", "--port", str(_free_port())), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "refusing to load an artifact that fails verification" in done.stderr
    assert "adapter_config.json: sha256 mismatch" in done.stderr
