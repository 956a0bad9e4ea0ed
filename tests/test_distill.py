"""Distillation against a real `nanoseek serve` on loopback: traces over HTTP with an API key from the environment,
resume without re-asking, rejection sampling, and clean errors. Plus trace filtering on crafted traces."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from nanoseek.cli import UserError
from nanoseek.train.distill import DistillConfig, collect_traces, filter_traces, trace_problems
from nanoseek.train.teacher import URLTeacher
from test_serve import ServerProcess, build_model_dir, free_port

KEY = "distill-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = build_model_dir(tmp_path_factory.mktemp("teacher"))
    s = ServerProcess(d, tmp_path_factory.mktemp("log") / "server.log", "--api-key", KEY, "--max-model-len", "256")
    yield s, d
    s.stop()


class CountingTeacher(URLTeacher):
    asked = 0

    def ask(self, *a, **kw):
        CountingTeacher.asked += 1
        return super().ask(*a, **kw)


def test_url_teacher_traces_resume_and_filter(server, tmp_path, monkeypatch):
    s, _ = server
    monkeypatch.setenv("NANOSEEK_TEACHER_API_KEY", KEY)
    cfg = DistillConfig(teacher=s.url, out=str(tmp_path), n=6, max_tokens=12, progress=False)
    problems = trace_problems(cfg)
    teacher = CountingTeacher(s.url, concurrency=3)
    path = tmp_path / "traces.jsonl"
    records = collect_traces(cfg, teacher, problems, path)
    assert len(records) == 6 and CountingTeacher.asked == 6
    assert all(r["reasoning"] and not r["finished"] for r in records)  # the template prefills <think>; cut at 12
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:4]) + "\n" + lines[4][:10])  # an interrupted run: 4 whole lines, one torn
    CountingTeacher.asked = 0
    assert len(collect_traces(cfg, teacher, problems, path)) == 6 and CountingTeacher.asked == 2
    kept, counts = filter_traces(records, problems)
    assert kept == [] and counts["malformed"] == 6


def test_local_teacher_resumed_traces_match_an_uninterrupted_run(server, tmp_path):
    from nanoseek.train.teacher import LocalTeacher

    _, d = server
    cfg = DistillConfig(teacher=str(d), out=str(tmp_path), n=6, samples=2, max_tokens=12, temperature=1.0, progress=False)
    problems = trace_problems(cfg)
    teacher = LocalTeacher(str(d), rows=4)  # 12 traces: chunks of 8 and 4 through 4 rows
    whole = collect_traces(cfg, teacher, problems, tmp_path / "whole.jsonl")
    path = tmp_path / "resumed.jsonl"
    path.write_text("".join(line + "\n" for line in (tmp_path / "whole.jsonl").read_text().splitlines()[:5]))
    resumed = collect_traces(cfg, teacher, problems, path)
    key = lambda r: (r["uid"], r["sample"])  # noqa: E731
    assert len(whole) == 12 and sorted(whole, key=key) == sorted(resumed, key=key)
    assert len({r["reasoning"] + r["answer"] for r in whole}) > 6  # sampled: the two samples of a problem differ


def test_ctrl_c_keeps_the_local_teacher_s_finished_traces_of_the_chunk(server, tmp_path, monkeypatch):
    """The traces of a chunk that had finished when Ctrl-C came were thrown away (96 of 1024 in an audit)."""
    from nanoseek.cli import Interrupted
    from nanoseek.engine.engine import Engine
    from nanoseek.train.teacher import LocalTeacher

    _, d = server
    cfg = DistillConfig(teacher=str(d), out=str(tmp_path), n=6, max_tokens=12, progress=False)
    problems = trace_problems(cfg)
    teacher = LocalTeacher(str(d), rows=4)
    whole = collect_traces(cfg, teacher, problems, tmp_path / "whole.jsonl")
    generate = Engine.generate

    def ctrl_c_after_two(self, prompts, **kw):  # rows 1 and 3 of the first chunk had finished
        outs = generate(self, prompts, **kw)
        raise Interrupted({1: outs[1], 3: outs[3]})

    monkeypatch.setattr(Engine, "generate", ctrl_c_after_two)
    path = tmp_path / "cut.jsonl"
    flops = teacher.flops
    with pytest.raises(KeyboardInterrupt):
        collect_traces(cfg, teacher, problems, path)
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert kept == [whole[1], whole[3]] and teacher.flops > flops
    monkeypatch.setattr(Engine, "generate", generate)
    assert collect_traces(cfg, teacher, problems, path) == whole  # the rerun asks the other four


def test_missing_key_is_a_clear_error(server, tmp_path, monkeypatch):
    s, d = server
    monkeypatch.delenv("NANOSEEK_TEACHER_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    r = subprocess.run([sys.executable, "-m", "nanoseek", "distill", "--teacher", s.url, "--student", str(d),
                        "--out", str(tmp_path / "run"), "--n", "2", "--no-progress"], capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if k not in ("NANOSEEK_TEACHER_API_KEY", "OPENAI_API_KEY")})
    assert r.returncode == 1 and "401" in r.stderr and "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def odd_server():
    """A loopback HTTP server whose every reply is 200 but not what an OpenAI-compatible API answers: an HTML page
    (/html: a proxy's login page, a wrong port), a JSON list (/list), a gateway's error object (/err), a model
    list without ids (/noid)."""
    import http.server
    import threading

    replies = {"/html": (b"<html>login</html>", "text/html"), "/list": (b"[]", "application/json"),
               "/err": (b'{"error": {"message": "quota exceeded"}}', "application/json"),
               "/noid": (b'{"data": [{"name": "m"}]}', "application/json")}

    class Handler(http.server.BaseHTTPRequestHandler):
        def _reply(self):
            body, kind = replies["/" + self.path.split("/")[1]]
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _reply

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_replies_that_are_not_the_api_are_one_line_errors_and_claim_nothing(server, odd_server, tmp_path):
    s, d = server
    env = {**os.environ, "NANOSEEK_TEACHER_API_KEY": KEY}
    for path, says in (("/html", "not JSON"), ("/list", "not a JSON object"), ("/err", "quota exceeded"),
                       ("/noid", "lists no model")):
        with pytest.raises(ConnectionError, match=says):
            URLTeacher(odd_server + path)
        for verb in (["distill", "--teacher", odd_server + path, "--student", str(d), "--out", str(tmp_path / "run"),
                      "--no-progress"], ["eval", "--model", odd_server + path]):
            r = subprocess.run([sys.executable, "-m", "nanoseek", *verb, "--n", "2"],
                               capture_output=True, text=True, env=env)
            assert r.returncode == 1 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
    teacher = URLTeacher(s.url, model="m")
    teacher.base = odd_server + "/err/v1"
    with pytest.raises(ConnectionError, match="quota exceeded"):
        teacher.ask("2 + 2?", 8, 0.0, 0)
    # the failed runs did not claim --out for their URL: the right teacher can use it
    r = subprocess.run([sys.executable, "-m", "nanoseek", "distill", "--teacher", s.url, "--student", str(d), "--out",
                        str(tmp_path / "run"), "--n", "2", "--max-tokens", "8", "--no-progress"],
                       capture_output=True, text=True, env=env)
    assert "no trace passed verification" in r.stderr, r.stderr  # it asked the teacher


def test_a_refused_connection_fails_at_once_until_the_server_has_answered(server, monkeypatch):
    """A wrong port is a one-line error without the ~30 s of retries; once the server has answered, a refused
    connection (a server restarting) is retried with backoff."""
    from nanoseek.train import teacher as teacher_module

    sleeps = []
    monkeypatch.setattr(teacher_module.URLTeacher, "_backoff", lambda self, delay: sleeps.append(delay) or False)
    refused = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ConnectionError, match="cannot reach .*is the server running"):
        URLTeacher(refused)
    with pytest.raises(ConnectionError, match="cannot reach"):
        URLTeacher(refused, model="m").ask("2 + 2?", 8, 0.0, 0)
    assert sleeps == []
    s, _ = server
    monkeypatch.setenv("NANOSEEK_TEACHER_API_KEY", KEY)
    teacher = URLTeacher(s.url, retries=2)  # asks /models: the server has answered
    teacher.base = refused + "/v1"
    with pytest.raises(ConnectionError) as e:
        teacher.ask("2 + 2?", 8, 0.0, 0)
    assert "cannot reach" not in str(e.value) and 0.5 <= sleeps[0] <= 1.0 <= sleeps[1] <= 2.0 and len(sleeps) == 2


def test_kd_weight_with_a_url_teacher_is_refused_before_asking(server, tmp_path):
    s, d = server
    r = subprocess.run([sys.executable, "-m", "nanoseek", "distill", "--teacher", s.url, "--student", str(d),
                        "--out", str(tmp_path / "run"), "--n", "2", "--kd-weight", "0.5", "--no-progress"],
                       capture_output=True, text=True, env={**os.environ, "NANOSEEK_TEACHER_API_KEY": KEY})
    assert r.returncode == 1 and "--kd-weight needs a local teacher" in r.stderr
    assert not (tmp_path / "run").exists()  # nothing asked, nothing claimed


def test_teacher_model_names_the_model_to_ask(server, tmp_path):
    s, d = server
    env = {**os.environ, "NANOSEEK_TEACHER_API_KEY": KEY}
    base = [sys.executable, "-m", "nanoseek", "distill", "--teacher", s.url, "--student", str(d), "--n", "2",
            "--max-tokens", "8", "--no-progress"]
    r = subprocess.run(base + ["--out", str(tmp_path / "a"), "--teacher-model", "gpt-17"], capture_output=True, text=True,
                       env=env)
    assert r.returncode == 1 and "gpt-17" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(base + ["--out", str(tmp_path / "b"), "--teacher-model", str(d)], capture_output=True, text=True,
                       env=env)  # the server's name for its model: its --model path
    assert "no trace passed verification" in r.stderr  # it answered (8 tokens cannot finish a trace)


def test_no_verified_trace_is_a_clear_error(server, tmp_path):
    s, d = server
    env = {**os.environ, "NANOSEEK_TEACHER_API_KEY": KEY}
    r = subprocess.run([sys.executable, "-m", "nanoseek", "distill", "--teacher", s.url, "--student", str(d),
                        "--out", str(tmp_path / "run"), "--n", "3", "--max-tokens", "8", "--no-progress"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 1 and "no trace passed verification" in r.stderr
    assert len((tmp_path / "run" / "traces.jsonl").read_text().splitlines()) == 3


def test_distill_on_data_files(server, tmp_path, monkeypatch, capsys):
    """--data: the teacher is asked the file's questions and each trace is verified against the file's answer;
    --eval-data: the student is scored on that file; a bad file is refused before the run directory is made."""
    import json

    import nanoseek.train.distill as distill_module
    from nanoseek.train.distill import distill
    from nanoseek.train.teacher import Trace

    _, d = server
    train, held = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text("".join(json.dumps({"question": f"Ann has {i} pens and gets 2 more. How many now?",
                                         "answer": f"{i} + 2 = {i + 2}\n#### {i + 2}"}) + "\n" for i in range(6)))
    held.write_text("".join(json.dumps({"question": f"What is {i} + 3?", "answer": str(i + 3)}) + "\n" for i in range(3)))

    class Scripted:  # right on even-numbered pens, one off on odd ones
        asked: list[str] = []

        def traces(self, questions, max_tokens, temperature, seeds):
            for i, q in enumerate(questions):
                Scripted.asked.append(q)
                n = int(q.split()[2])
                yield i, Trace(f"{n} + 2 = {n + 2}", f"The answer is {n + 2 + n % 2}.", True)

    monkeypatch.setattr(distill_module, "make_teacher", lambda *a, **kw: Scripted())
    common = dict(teacher="http://127.0.0.1:9/v1", student=str(d), data=str(train), steps=1, batch_size=2, eval_n=2,
                  progress=False)  # make_teacher is scripted below; a URL teacher is not checked for its context
    result = distill(DistillConfig(out=str(tmp_path / "run"), eval_data=str(held), **common))
    asked = [q for q in Scripted.asked if q.startswith("Ann")]  # then it is scored on the --eval-data questions
    assert sorted(asked) == sorted(json.loads(line)["question"] for line in train.read_text().splitlines())
    # a URL teacher is scored too: "What is i + 3?" gets i + 2 + i % 2, right for i = 1 of the first 2
    assert result["teacher"]["pass@1"] == 0.5 and result["teacher"]["params_total"] is None
    kept = [json.loads(line)["messages"][0]["content"] for line in (tmp_path / "run" / "kept.jsonl").read_text().splitlines()]
    assert sorted(kept) == [f"Ann has {i} pens and gets 2 more. How many now?" for i in (0, 2, 4)]
    assert result["traces"]["wrong"] == 3 and isinstance(result["student"]["pass@1"], float)
    alone = distill(DistillConfig(out=str(tmp_path / "alone"), **common))
    assert alone["student"]["pass@1"] is None and "--eval-data" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('\n{"question": "What is 1 + 1?"}\n')
    with pytest.raises(UserError, match="bad.jsonl:2: a record needs"):  # the line, blank lines counted
        distill(DistillConfig(out=str(tmp_path / "never"), **{**common, "data": str(bad)}))
    assert not (tmp_path / "never").exists()
    twice = tmp_path / "twice.jsonl"  # a question again in capitals, with another answer: asked once, checked by 1
    twice.write_text(train.read_text() + json.dumps({"question": "ANN HAS 0 PENS and gets 2 more. How many now?",
                                                     "answer": "5"}) + "\n")
    Scripted.asked.clear()
    again = distill(DistillConfig(out=str(tmp_path / "twice"), **{**common, "data": str(twice)}))
    assert len(Scripted.asked) == 6 and again["traces"]["total"] == 6 and again["traces"]["kept"] == 3
    assert "1 of 7 --data records repeat an earlier question" in capsys.readouterr().err
    train.write_text(train.read_text().replace("Ann", "Bea"))  # edited in place: its traces are not this file's
    with pytest.raises(UserError, match=f"the --data file {train} changed since"):
        distill(DistillConfig(out=str(tmp_path / "run"), eval_data=str(held), **common))


def test_eval_of_a_served_model_equals_eval_of_its_directory(server, tmp_path):
    """`nanoseek eval --model URL` (through `nanoseek serve`'s chat endpoint, concurrent requests) extracts the same
    answers and scores the same as `nanoseek eval --model DIR` of the directory it serves, greedy; a URL with another
    prompt style, or --served-model with a directory, is a one-line error."""
    s, d = server
    env = {**os.environ, "NANOSEEK_TEACHER_API_KEY": KEY}
    common = ["--task", "arithmetic:1", "--n", "6", "--max-new-tokens", "12"]

    def run(*argv):
        r = subprocess.run([sys.executable, "-m", "nanoseek", "eval", *argv, *common], capture_output=True, text=True,
                           env=env)
        return r

    local = run("--model", str(d), "--out", str(tmp_path / "local.jsonl"))
    remote = run("--model", s.url, "--served-model", str(d), "--concurrency", "3", "--out", str(tmp_path / "url.jsonl"))
    assert local.returncode == 0 and remote.returncode == 0, remote.stderr[-2000:]
    assert json.loads(local.stdout.splitlines()[-1]) == json.loads(remote.stdout.splitlines()[-1])
    rows = [[json.loads(line) for line in (tmp_path / f).read_text().splitlines()] for f in ("local.jsonl", "url.jsonl")]
    assert [r["extracted"] for r in rows[0]] == [r["extracted"] for r in rows[1]]
    # this model never writes </think>: both see replies cut off while reasoning, the same text, so no answer
    assert [[c.strip() for c in r["completions"]] for r in rows[0]] == [[c.strip() for c in r["completions"]] for r in rows[1]]
    assert all(c.startswith("<think>\n") and len(c) > 20 for r in rows[0] for c in r["completions"])
    # sampled, the two draw the same tokens with the same nucleus (a URL was asked top_p 0.95, a directory 1)
    sampled = ["--samples", "2", "--temperature", "1.0", "--top-p", "0.9"]
    run("--model", str(d), "--out", str(tmp_path / "local_t.jsonl"), *sampled)
    run("--model", s.url, "--served-model", str(d), "--out", str(tmp_path / "url_t.jsonl"), *sampled)
    rows = [[json.loads(line) for line in (tmp_path / f).read_text().splitlines()] for f in ("local_t.jsonl", "url_t.jsonl")]
    assert [[c.strip() for c in r["completions"]] for r in rows[0]] == [[c.strip() for c in r["completions"]] for r in rows[1]]
    for argv, says in (([s.url, "--prompt", "plain"], "--prompt chat only"), ([str(d), "--served-model", "x"], "URL")):
        r = run("--model", *argv)
        assert r.returncode == 1 and says in r.stderr and "Traceback" not in r.stderr


def test_a_run_recorded_before_a_setting_existed_resumes_at_its_default(tmp_path):
    import nanoseek.train.distill as distill_lib

    cfg = DistillConfig(teacher="t", out=str(tmp_path / "run"), student="s")
    distill_lib.claim_run(tmp_path / "run", cfg)
    record = json.loads((tmp_path / "run" / "distill.json").read_text())
    assert record.pop("seq_len") == 256
    (tmp_path / "run" / "distill.json").write_text(json.dumps(record))  # as written before --seq-len existed
    distill_lib.claim_run(tmp_path / "run", cfg)  # resumes
    (tmp_path / "run" / "traces.jsonl").write_text('{"index": 0}\n')  # (a run without traces takes new settings)
    with pytest.raises(UserError, match="seq_len 256 -> 512"):
        distill_lib.claim_run(tmp_path / "run", dataclasses.replace(cfg, seq_len=512))


def test_a_rerun_that_gets_answers_refused_before_trains_the_student_again(server, tmp_path, monkeypatch, capsys):
    import nanoseek.train.distill as distill_module
    from nanoseek.train.teacher import Trace

    _, d = server
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"question": f"What is {i} + 2?", "answer": str(i + 2)}) + "\n"
                             for i in range(4)))

    class Refusing:  # refuses "What is 3 + 2?" while `refuse` is set
        refuse = True

        def traces(self, questions, max_tokens, temperature, seeds):
            for i, q in enumerate(questions):
                n = int(q.split()[2])
                yield i, (Trace("", "", False, error="HTTP 400: busy") if Refusing.refuse and n == 3 else
                          Trace(f"{n} + 2 = {n + 2}", f"The answer is {n + 2}.", True))

    monkeypatch.setattr(distill_module, "make_teacher", lambda *a, **kw: Refusing())
    cfg = DistillConfig(teacher="http://127.0.0.1:9/v1", student=str(d), data=str(train), steps=2, batch_size=2,
                        out=str(tmp_path / "run"), progress=False)
    assert distill_module.distill(cfg)["traces"]["kept"] == 3
    Refusing.refuse = False
    again = distill_module.distill(cfg)  # was: "the training data is not what the run was trained on", every rerun
    assert again["traces"]["kept"] == 4 and "the student is trained again" in capsys.readouterr().err
    kept = (tmp_path / "run" / "kept.jsonl").read_text().splitlines()
    assert len(kept) == 4 and distill_module.distill(cfg)["traces"]["kept"] == 4  # a third run resumes as it is


def test_a_directory_of_someone_elses_files_is_refused_even_with_a_traces_jsonl(tmp_path):
    from nanoseek.train.distill import claim_run

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "traces.jsonl").write_text('{"my": "trace"}')
    with pytest.raises(UserError, match="holds no distillation run"):
        claim_run(mine, DistillConfig(teacher="t", out=str(mine), student="s"))
    assert (mine / "traces.jsonl").read_text() == '{"my": "trace"}'
    older = tmp_path / "older"  # a run from before distill.json: its own files, its own records (one cut short)
    older.mkdir()
    (older / "traces.jsonl").write_text('{"uid": "u", "sample": 0, "question": "q", "answer": "a"}\n{"uid": "v", "s')
    claim_run(older, DistillConfig(teacher="t", out=str(older), student="s"))
    assert (older / "distill.json").is_file()


def test_a_stopped_url_run_leaves_no_thread_the_process_must_wait_for(server, monkeypatch):
    """Ctrl-C on a URL teacher or eval: the process waited for every request in flight (up to 300 s) on its
    ThreadPoolExecutor's threads, and a second Ctrl-C there was a traceback."""
    import threading

    from nanoseek.train.teacher import Trace

    s, _ = server
    monkeypatch.setenv("NANOSEEK_TEACHER_API_KEY", KEY)
    release = threading.Event()

    class Hanging(URLTeacher):  # the first answer comes; the others hang like a slow server
        def ask(self, question, *a):
            if question != "0":
                release.wait()
            return Trace("", "The answer is 0.", True)

    teacher = Hanging(s.url, concurrency=3)
    before = set(threading.enumerate())
    traces = teacher.traces(["0", "1", "2", "3"], 8, 0.0, [0, 1, 2, 3])
    assert next(traces)[0] == 0
    traces.close()  # as Ctrl-C does
    hanging = [t for t in set(threading.enumerate()) - before if t.is_alive()]
    assert hanging and all(t.daemon for t in hanging)  # exiting does not wait for them
    release.set()
    for t in hanging:
        t.join(5)
    assert not any(t.is_alive() for t in hanging)  # and they asked nothing more once stopped


def test_a_student_without_weights_is_refused_before_the_teacher_is_asked(server, tmp_path):
    import shutil

    _, d = server
    student = tmp_path / "student"
    shutil.copytree(d, student, ignore=shutil.ignore_patterns("*.safetensors"))
    from nanoseek.train.distill import distill

    with pytest.raises(UserError, match="safetensors"):
        distill(DistillConfig(teacher=str(d), student=str(student), out=str(tmp_path / "run"), n=2, progress=False,
                              device="cpu"))
    assert not (tmp_path / "run").exists()


def test_the_teacher_is_not_kept_beside_the_students_training(server, tmp_path, monkeypatch):
    """Without logit distillation the local teacher's weights were held through the student's SFT, and the report
    loaded two more copies (one per engine)."""
    import gc
    import weakref

    import nanoseek.engine.engine as engine_mod
    import nanoseek.train.distill as distill_mod
    import nanoseek.train.sft as sft_mod
    from nanoseek.train.distill import distill

    _, d = server
    loaded, alive_in_sft = [], []
    real_load = engine_mod.load_for_inference

    def load(*a, **kw):
        gc.collect()
        loaded.append(sum(r() is not None for r in refs))
        model = real_load(*a, **kw)
        refs.append(weakref.ref(model))
        return model

    refs = []
    real_sft = sft_mod.sft

    def sft(*a, **kw):
        gc.collect()
        alive_in_sft.append(sum(r() is not None for r in refs))
        return real_sft(*a, **kw)

    def verified(records, problems):  # (this random teacher verifies none: keep the gold answers instead)
        return [{"messages": [{"role": "user", "content": p.question},
                              {"role": "assistant", "content": f"<think>\nr\n</think>\n\n{p.answer}"}]}
                for p in problems], {"total": len(problems), "kept": len(problems)}

    monkeypatch.setattr(engine_mod, "load_for_inference", load)
    monkeypatch.setattr(sft_mod, "sft", sft)
    monkeypatch.setattr(distill_mod, "filter_traces", verified)
    monkeypatch.setattr(distill_mod, "eval_budget", lambda cfg: 8)  # (a random model never ends: 320 tokens each)
    distill(DistillConfig(teacher=str(d), student_preset="cpu-student", out=str(tmp_path / "run"), n=4, steps=1,
                          batch_size=2, max_tokens=16, eval_n=2, progress=False, device="cpu"))
    assert alive_in_sft == [0]  # (kd_weight 0)
    assert max(loaded) == 0  # every model (teacher, student, their reports) loaded with no other alive
