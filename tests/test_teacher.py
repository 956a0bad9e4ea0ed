"""The URL teacher against a scripted OpenAI-compatible server on loopback: what it does when one request, the
server or the consumer fails (cancel the queue, keep what arrived, skip a refused question), and the reply shapes
and URLs it must read or refuse in one line. Plus the run-level guards of `distill` around it."""

from __future__ import annotations

import dataclasses
import http.server
import json
import threading
import time

import pytest

from nanoseek.train.distill import DistillConfig, add_traces_cost, collect_traces, trace_problems
from nanoseek.train.teacher import URLTeacher


class Script:
    """What the server answers to a question, by a word in it; every chat request is counted."""

    def __init__(self):
        self.asked: list[str] = []
        self.paths: list[str] = []
        self.delay = 0.0

    def reply(self, question: str, auth: str) -> tuple[int, dict | bytes, dict]:
        self.asked.append(question)
        time.sleep(self.delay)
        if "REFUSE" in question:
            return 400, {"error": {"message": "prompt too long"}}, {}
        if "FAIL" in question:  # a server that answers others but always fails on this one
            return 500, {"error": {"message": "internal error"}}, {}
        if "SLOW" in question:
            time.sleep(1.0)
        if "RATELIMIT" in question and self.asked.count(question) == 1:
            return 429, {"error": {"message": "slow down"}}, {"Retry-After": "7"}
        if "REDIRECT" in question:
            return 302, b"", {"Location": "/elsewhere/v1/chat/completions"}
        if "ECHO" in question:  # an error page that quotes the request's key, over several lines
            return 403, f"<html>\n<body>forbidden: {auth}</body>\n</html>".encode(), {}
        if "CHOICESDICT" in question:
            return 200, {"choices": {"a": 1}}, {}
        if "CLOSEONLY" in question:  # a server without a reasoning parser, after a template that prefilled <think>
            message = {"role": "assistant", "content": "2 + 2 = 4\n</think>\n\nThe answer is 4."}
        elif "PARTS" in question:
            message = {"role": "assistant", "content": [{"type": "text", "text": "<think>2 + 2 = 4</think>"},
                                                        {"type": "text", "text": "The answer is 4."}]}
        elif "CUTINSIDE" in question:  # a reasoning parser's reply cut off inside the reasoning: null content
            message = {"role": "assistant", "content": None, "reasoning_content": "2 + 2 = 4"}
        elif "CUTAFTER" in question:  # ... and one cut off right after </think>: an empty answer
            message = {"role": "assistant", "content": "", "reasoning_content": "2 + 2 = 4"}
        elif "NULL" in question:
            message = None
        else:
            message = {"role": "assistant", "content": "<think>add</think>The answer is 4."}
        return 200, {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}, {}


@pytest.fixture
def scripted():
    script = Script()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            script.paths.append(self.path)
            self._send(200, {"data": [{"id": "m"}]})

        def do_POST(self):
            script.paths.append(self.path)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            self._send(*script.reply(body["messages"][0]["content"], self.headers.get("Authorization", "")))

        def _send(self, code, obj, headers=None):
            raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
            self.send_response(code)
            headers = {"Content-Type": "application/json", "Content-Length": str(len(raw)), **(headers or {})}
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.handle_error = lambda request, address: None  # a client that gave up waiting (the SLOW question)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", script
    httpd.shutdown()


def test_a_stopped_consumer_cancels_the_queued_requests(scripted):
    """Ctrl-C, or an error while saving, used to let every queued request go out (and be paid for) unused."""
    url, script = scripted
    script.delay = 0.2
    teacher = URLTeacher(url, concurrency=2)
    gen = teacher.traces([f"q{i}" for i in range(20)], 8, 0.0, list(range(20)))
    next(gen)
    gen.close()
    time.sleep(0.6)
    assert len(script.asked) <= 4  # the first answer and the requests in flight, not 20


def test_a_failed_request_ends_the_run_after_the_answers_that_arrived(scripted, monkeypatch):
    url, script = scripted
    script.delay = 0.1
    teacher = URLTeacher(url, concurrency=2, retries=0)
    real_ask = teacher.ask
    monkeypatch.setattr(teacher, "ask", lambda q, *a: (_ for _ in ()).throw(ConnectionError("down")) if q == "q3"
                        else real_ask(q, *a))
    got = []
    with pytest.raises(ConnectionError, match="down"):
        for i, trace in teacher.traces([f"q{i}" for i in range(40)], 8, 0.0, list(range(40))):
            got.append(i)
    time.sleep(0.3)
    assert 3 not in got and len(script.asked) <= 8  # not the 39 others


def test_a_refused_question_is_skipped_and_asked_again_on_resume(scripted, tmp_path):
    url, script = scripted
    cfg = DistillConfig(teacher=url, out=str(tmp_path), n=6, max_tokens=8, progress=False)
    problems = trace_problems(cfg)
    problems[2] = dataclasses.replace(problems[2], question="REFUSE " + problems[2].question)  # never taken
    path = tmp_path / "traces.jsonl"
    records = collect_traces(cfg, URLTeacher(url, concurrency=3), problems, path)
    assert len(records) == 5 and len(path.read_text().splitlines()) == 5
    script.asked.clear()
    assert len(collect_traces(cfg, URLTeacher(url), problems, path)) == 5
    assert len(script.asked) == 1 and script.asked[0].startswith("REFUSE")


def test_a_server_that_refuses_everything_stops_the_run(scripted, tmp_path):
    url, script = scripted
    cfg = DistillConfig(teacher=url, out=str(tmp_path), n=40, max_tokens=8, progress=False)
    problems = [dataclasses.replace(p, question="REFUSE " + p.question) for p in trace_problems(cfg)]
    with pytest.raises(ConnectionError, match="refused the first 8 requests: .*prompt too long"):
        collect_traces(cfg, URLTeacher(url, concurrency=2), problems, tmp_path / "traces.jsonl")
    time.sleep(0.3)
    assert len(script.asked) <= 11  # and the rest were not asked


def test_reply_shapes(scripted):
    url, _ = scripted
    teacher = URLTeacher(url)
    for question in ("CLOSEONLY", "PARTS"):  # reasoning closed by </think> alone; content as a list of parts
        trace = teacher.ask(question, 8, 0.0, 0)
        assert (trace.reasoning, trace.answer, trace.closed) == ("2 + 2 = 4", "The answer is 4.", True), question
    assert [teacher.ask(q, 8, 0.0, 0).closed for q in ("CUTINSIDE", "CUTAFTER")] == [False, True]
    with pytest.raises(ConnectionError, match="without choices"):
        teacher.ask("NULL", 8, 0.0, 0)


@pytest.mark.parametrize("url, says", [("http://127.0.0.1:abc", "not a valid URL"), ("http://[::1", "not a valid URL"),
                                       ("http://", "no host"), ("http://127.0.0.1:8000/my api", "not a valid URL"),
                                       ("http://127.0.0.1:8000/ü", "not a valid URL"),
                                       ("http://127.0.0.1:8000/v1?x=1", "no query string"),
                                       ("http://me:s3cret@127.0.0.1:8000/v1", "takes no user:password@")])
def test_urls_no_retry_can_fix_fail_at_once(url, says):
    start = time.perf_counter()
    with pytest.raises(ConnectionError, match=says) as e:
        URLTeacher(url)
    assert time.perf_counter() - start < 5  # not ~30 s of retries
    assert "s3cret" not in str(e.value)  # it was printed twice, in a name-lookup error


@pytest.mark.parametrize("raw", [b'{"error": "invalid key sk-abc123"}', b"<html>key sk-abc123 refused</html>"])
def test_a_key_the_server_echoes_is_masked(raw):
    from nanoseek.train.teacher import _reply

    with pytest.raises(ConnectionError) as e:
        _reply(raw, "http://127.0.0.1:1/v1/chat/completions", "sk-abc123")
    assert "sk-abc123" not in str(e.value) and "***" in str(e.value)
    with pytest.raises(ConnectionError) as e:  # a short key: only what the server sent is masked, not the URL
        _reply(b"<html>1</html>", "http://127.0.0.1:8001/v1/chat/completions", "1")
    assert str(e.value).startswith("http://127.0.0.1:8001/v1/chat/completions: ")


def test_a_cut_line_is_dropped_before_new_records_are_appended(scripted, tmp_path):
    """A kill mid-write leaves a partial last line; the next record used to be appended to it and lost."""
    url, script = scripted
    cfg = DistillConfig(teacher=url, out=str(tmp_path), n=4, max_tokens=8, progress=False)
    problems, path = trace_problems(cfg), tmp_path / "traces.jsonl"
    collect_traces(cfg, URLTeacher(url), problems, path)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:3]) + "\n" + lines[3][:15])
    collect_traces(cfg, URLTeacher(url), problems, path)
    script.asked.clear()
    assert len(collect_traces(cfg, URLTeacher(url), problems, path)) == 4 and script.asked == []
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_a_cut_traces_cost_file_does_not_block_a_resume(tmp_path):
    (tmp_path / "traces_cost.json").write_text("")
    assert add_traces_cost(tmp_path, 2.0, 1e9) == {"wall_s": 2.0, "flops": 1e9}
    assert json.loads((tmp_path / "traces_cost.json").read_text()) == {"wall_s": 2.0, "flops": 1e9}


def test_logit_distillation_needs_the_teachers_tokenizer(tmp_path):
    """KL over the vocabulary pairs token ids: another tokenizer (here 300 tokens against 400) is refused before any
    teacher time is spent, not a size-mismatch traceback after it (or, at equal sizes, a KL of unrelated tokens)."""
    from conftest import tiny_model_dir
    from nanoseek.cli import UserError
    from nanoseek.train.distill import distill
    from test_serve import build_model_dir

    teacher = build_model_dir(tmp_path / "teacher")
    student, _, _ = tiny_model_dir(tmp_path / "student", ["What is 2 + 2? The answer is 4."] * 20, "d.jsonl", [])
    with pytest.raises(UserError, match="does not share the teacher's tokenizer"):
        distill(DistillConfig(teacher=str(teacher), student=str(student), out=str(tmp_path / "run"), n=2,
                              kd_weight=0.5, progress=False, device="cpu"))
    assert not (tmp_path / "run").exists()


def test_a_question_the_server_keeps_failing_on_is_skipped_and_asked_again(scripted, tmp_path, monkeypatch):
    """A 5xx on every retry for one question, while the server answers the others, used to end every rerun at the
    same question: the run could never finish. It is left out as a refused one is; a failing server still stops it."""
    url, script = scripted
    monkeypatch.setattr(URLTeacher, "_backoff", lambda self, delay: self.stop.is_set())  # no waiting
    cfg = DistillConfig(teacher=url, out=str(tmp_path), n=6, max_tokens=8, progress=False)
    problems = trace_problems(cfg)
    problems[3] = dataclasses.replace(problems[3], question="FAIL " + problems[3].question)
    path = tmp_path / "traces.jsonl"
    assert len(collect_traces(cfg, URLTeacher(url, concurrency=1), problems, path)) == 5
    assert script.asked.count(problems[3].question) == 6  # with its 5 retries
    script.asked.clear()
    collect_traces(cfg, URLTeacher(url), problems, path)
    assert script.asked == [problems[3].question] * 6
    failing = [dataclasses.replace(p, question="FAIL " + p.question) for p in trace_problems(
        dataclasses.replace(cfg, n=12, seed=1))]
    with pytest.raises(ConnectionError, match="failed on 8 requests in a row: .*internal error"):
        collect_traces(cfg, URLTeacher(url, concurrency=2), problems + failing, tmp_path / "t2.jsonl")


def test_eval_gives_no_score_when_the_server_kept_failing(scripted, tmp_path, monkeypatch):
    """A request that failed after its retries was scored as a wrong answer: an outage made a benchmark number."""
    from nanoseek.eval.evaluate import run_eval_url

    url, _ = scripted
    monkeypatch.setattr(URLTeacher, "_backoff", lambda self, delay: self.stop.is_set())  # no waiting
    problems = trace_problems(DistillConfig(teacher=url, out=str(tmp_path), n=4))
    problems[1] = dataclasses.replace(problems[1], question="FAIL " + problems[1].question)
    with pytest.raises(ConnectionError, match="failed on 1 of 4 requests, even after retries .*scored apart") as e:
        run_eval_url(URLTeacher(url), problems, progress=False)
    assert [r.problem for r in e.value.done] == [problems[0], *problems[2:]]  # the answered ones, for --out
    problems[1] = dataclasses.replace(problems[1], question="REFUSE " + problems[1].question)
    assert len(run_eval_url(URLTeacher(url), problems, progress=False)) == 4  # a refusal is scored as wrong


def test_retries_wait_what_retry_after_asks_and_never_follow_a_redirect(scripted, monkeypatch):
    url, script = scripted
    waits = []
    teacher = URLTeacher(url)
    monkeypatch.setattr(teacher, "_backoff", lambda delay: waits.append(delay) or False)
    assert teacher.ask("RATELIMIT", 8, 0.0, 0).answer == "The answer is 4." and waits == [7.0]  # not 1 s
    with pytest.raises(ConnectionError, match="HTTP 302: redirected to /elsewhere/v1/chat/completions"):
        teacher.ask("REDIRECT", 8, 0.0, 0)
    assert not any(p.startswith("/elsewhere") for p in script.paths)  # the API key went nowhere else


def test_error_replies_are_one_line_without_the_key(scripted, monkeypatch):
    url, _ = scripted
    monkeypatch.setenv("NANOSEEK_TEACHER_API_KEY", "sk-secret-123")
    teacher = URLTeacher(url)
    with pytest.raises(ConnectionError) as e:
        teacher.ask("ECHO", 8, 0.0, 0)
    assert "sk-secret-123" not in str(e.value) and "forbidden: Bearer ***" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConnectionError, match="without choices"):  # was a KeyError traceback
        teacher.ask("CHOICESDICT", 8, 0.0, 0)


def test_a_reply_that_never_comes_is_given_up_after_two_timeouts(scripted, monkeypatch):
    url, script = scripted
    monkeypatch.setattr(URLTeacher, "_backoff", lambda self, delay: self.stop.is_set())  # no waiting
    teacher = URLTeacher(url, timeout=0.3)
    trace = teacher.ask("SLOW", 8, 0.0, 0)
    assert trace.failed and "timed out" in trace.error and script.asked == ["SLOW"] * 2


@pytest.mark.parametrize("url, base", [("http://127.0.0.1:9", "http://127.0.0.1:9/v1"),
                                       ("http://127.0.0.1:9/", "http://127.0.0.1:9/v1"),
                                       ("http://127.0.0.1:9/v1/", "http://127.0.0.1:9/v1"),
                                       ("https://h.example/v1beta/openai/", "https://h.example/v1beta/openai"),
                                       ("http://h:9/v1/chat/completions", "http://h:9/v1")])
def test_api_base(url, base):
    from nanoseek.train.teacher import api_base

    assert api_base(url) == base


def test_a_run_no_teacher_answered_takes_new_settings(tmp_path):
    """A mistyped --teacher-model is only found when the first request fails, after the run is claimed: the rerun
    with the right name was refused as 'other settings' although the run held nothing."""
    from nanoseek.cli import UserError
    from nanoseek.train.distill import claim_run

    cfg = DistillConfig(teacher="http://127.0.0.1:9", teacher_model="deepseek-reasonr", out=str(tmp_path / "run"))
    claim_run(tmp_path / "run", cfg)
    (tmp_path / "run" / "traces_cost.json").write_text('{"wall_s": 3600.0}')  # the failed first try's time
    right = dataclasses.replace(cfg, teacher="http://127.0.0.1:9/v1/", teacher_model="deepseek-reasoner")
    claim_run(tmp_path / "run", right)
    assert not (tmp_path / "run" / "traces_cost.json").exists()  # not added to the new run's
    assert json.loads((tmp_path / "run" / "distill.json").read_text())["teacher_model"] == "deepseek-reasoner"
    (tmp_path / "run" / "traces.jsonl").write_text('{"index": 0}\n')
    claim_run(tmp_path / "run", dataclasses.replace(right, teacher="http://127.0.0.1:9"))  # the same teacher
    with pytest.raises(UserError, match="other settings"):
        claim_run(tmp_path / "run", cfg)


def test_eval_keeps_what_the_server_answered_before_it_failed(scripted, tmp_path, monkeypatch, capsys):
    """7 of 8 answered, then one request kept failing: the run ended with no score and nothing in --out."""
    import json

    from nanoseek.cli import main

    url, _ = scripted
    monkeypatch.setattr(URLTeacher, "_backoff", lambda self, delay: self.stop.is_set())  # no waiting
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({"question": ("FAIL " if i == 2 else "") + f"What is 2 + 2 ({i})?",
                                        "answer": "4"}) + "\n" for i in range(4)))
    out = tmp_path / "rows.jsonl"
    assert main(["eval", "--model", url, "--data", str(data), "--out", str(out), "--no-progress"]) == 1
    captured = capsys.readouterr()
    summary = json.loads(captured.out.splitlines()[-1])
    assert summary["n"] == 3 and summary["pass@1"] == 1.0 and "failed on 1 of 4" in summary["incomplete"]
    assert len(out.read_text().splitlines()) == 3 and "3 of 4 problems finished" in captured.err
