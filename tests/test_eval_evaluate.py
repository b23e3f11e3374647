"""Scoring by hand, and ``python -m replan.eval.evaluate`` end to end on the tiny IV-Edit fixture against a real local
OpenAI-compatible judge server: caching, partial resume, corrupt caches, missing images, a killed run resumed."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from replan.eval import evaluate as ev
from replan.eval.dataset import load_samples
from replan.eval.judges import SCORE_KEYS, Judge, load_templates
from replan.eval.scoring import DIMENSIONS, format_table, sample_metrics, summarize
from replan.testing.ivedit import save_tiny_ivedit, tiny_ivedit_rows
from replan.testing.standins import JSONHandler

MODEL = "local/judge-vl"
KEY = "sk-eval-123"
REPO = Path(__file__).resolve().parents[1]
ENV_VARS = ("REPLAN_JUDGE_BASE_URL", "OPENAI_BASE_URL", "REPLAN_JUDGE_API_KEY", "OPENAI_API_KEY", "GEMINI_API_KEY",
            "GOOGLE_API_KEY", "GOOGLE_CLOUD_PROJECT", "GOOGLE_CLOUD_LOCATION", "GOOGLE_GENAI_USE_VERTEXAI",
            "GOOGLE_APPLICATION_CREDENTIALS",
            "http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")
# the judge's scores for the fixture samples (quality, target_following, effect, consistency); 1004 has no result
SCORES = {"1000": (4, 5, 3, 5), "1001": (5, 1, 1, 3), "1002": (3, 5, 5, 1), "1003": (2, 5, 3, 3)}
ID_OF = {json.loads(r["extra_info"])["instruction_details"]["editing_instruction"]: str(r["image_id"])
         for r in tiny_ivedit_rows()}
EXPECTED = {"count": 5, "quality": 2.8, "target": 3.2, "effect": 2.4, "consistency": 2.4, "overall": 2.7,
            "weighted": 2.1}  # by hand from SCORES, 1004 as zeros
EXPECTED_JUDGED = {"count": 4, "quality": 3.5, "target": 4.0, "effect": 3.0, "consistency": 3.0, "overall": 3.375,
                   "weighted": 2.625}


def close(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k] == pytest.approx(b[k]) for k in a)


# --------------------------------------------------------------------------------------------------- scoring
def test_aggregation_equals_a_hand_computation():
    samples = [
        {"scores": dict(zip(DIMENSIONS, (4, 5, 3, 5))), "status": "ok", "categories": {"referring_type": "Spatial"}},
        {"scores": dict(zip(DIMENSIONS, (5, 1, 1, 3))), "categories": {"referring_type": "Spatial", "task_type": "R"}},
        {"scores": dict(zip(DIMENSIONS, (3, 5, None, 5))), "categories": {"referring_type": "Text"}},  # judge failed
        {"scores": None, "status": "missing", "categories": {"referring_type": "Text", "task_type": "R"}},
    ]
    # per sample: w = e/5; overall = (q+t+e+c)/4; weighted = (q*w + t + e + c*w)/4; None -> 0, w = 0 without effect
    assert close(sample_metrics(samples[0]["scores"]), {"quality": 4, "target": 5, "effect": 3, "consistency": 5,
                                                        "overall": 4.25, "weighted": (2.4 + 5 + 3 + 3) / 4})
    assert close(sample_metrics(samples[2]["scores"]), {"quality": 3, "target": 5, "effect": 0, "consistency": 5,
                                                        "overall": 3.25, "weighted": 1.25})
    summary = summarize(samples)
    assert close(summary["aggregate"], {"count": 4, "quality": 3.0, "target": 2.75, "effect": 1.0,
                                        "consistency": 3.25, "overall": 2.5, "weighted": 1.375})
    assert close(summary["judged_only"], {"count": 2, "quality": 4.5, "target": 3.0, "effect": 2.0,
                                          "consistency": 4.0, "overall": 3.375, "weighted": 2.125})
    assert (summary["failed"], summary["missing"]) == (2, 1)
    by_ref = summary["breakdowns"]["referring_type"]
    assert list(by_ref) == ["Spatial", "Text"]
    assert close(by_ref["Spatial"], {**summary["judged_only"], "failed": 0})
    assert close(by_ref["Text"], {"count": 2, "failed": 2, "quality": 1.5, "target": 2.5, "effect": 0.0,
                                  "consistency": 2.5, "overall": 1.625, "weighted": 0.625})
    assert close(summary["breakdowns"]["task_type"]["R"], {"count": 2, "failed": 1, "quality": 2.5, "target": 0.5,
                                                           "effect": 0.5, "consistency": 1.5, "overall": 1.25,
                                                           "weighted": 0.45})
    table = format_table(summary, "title")
    assert "title" in table and "1.38" in table and "3.38" in table and "by referring_type:" in table
    empty = summarize([])
    assert empty["aggregate"]["count"] == 0 and empty["aggregate"]["overall"] is None and empty["failed"] == 0
    assert "-" in format_table(empty)


# --------------------------------------------------------------------------------------------------- judge server
class JudgeServer:
    """OpenAI-compatible judge that answers each (sample, dimension) with ``SCORES``, counting every call.

    ``fail``: (image_id, dimension) pairs answered with HTTP 400. ``hold_after``: requests after the first that many
    wait until ``release()``, then are dropped unanswered (their client was killed meanwhile).
    """

    def __init__(self, delay: float = 0.0):
        self.delay, self.fail, self.hold_after, self.epoch = delay, set(), None, 0
        self.override: dict[tuple[str, str], int] = {}  # (image_id, dimension) -> the score to answer instead
        self.received: list[tuple[str, str]] = []
        self.answered: list[tuple[str, str]] = []
        self.errors: list[str] = []
        self.lock, self.gate = threading.Lock(), threading.Event()
        server = self

        class Handler(JSONHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                try:
                    call = server.identify(self.headers, body)
                except Exception as e:  # noqa: BLE001
                    server.errors.append(repr(e))
                    return self._send(400, {"error": {"message": repr(e)}})
                with server.lock:  # admitted in arrival order: exactly ``hold_after`` calls pass the gate
                    held = server.hold_after is not None and len(server.received) >= server.hold_after
                    server.received.append(call)
                    epoch = server.epoch
                if held:
                    server.gate.wait(600)
                    if server.epoch != epoch:
                        return  # the client was killed meanwhile: close without an answer
                time.sleep(server.delay)
                if call in server.fail:
                    return self._send(400, {"error": {"message": "content policy"}})
                score = server.override.get(call, SCORES[call[0]][DIMENSIONS.index(call[1])])
                text = json.dumps({"reasoning": f"{call[1]} of {call[0]}", SCORE_KEYS[call[1]]: score})
                with server.lock:
                    server.answered.append(call)
                self._send(200, {"choices": [{"message": {"role": "assistant", "content": text}}]})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    @staticmethod
    def identify(headers, body) -> tuple[str, str]:
        assert headers.get("Authorization") == f"Bearer {KEY}" and body["model"] == MODEL
        assert body["response_format"] == {"type": "json_object"}
        content = body["messages"][0]["content"]
        text = "".join(p["text"] for p in content if p["type"] == "text")
        (key,) = [k for k in SCORE_KEYS.values() if f'"{k}"' in content[-1]["text"]]
        dimension = {v: k for k, v in SCORE_KEYS.items()}[key]
        assert sum(p["type"] == "image_url" for p in content) == (1 if dimension == "quality" else 2)
        if dimension == "quality":  # the quality judge sees the edited image only (as official): tell it by its pixels
            assert not any(instr in text for instr in ID_OF)
            url = next(p["image_url"]["url"] for p in content if p["type"] == "image_url")
            pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))
            return RESULT_IDS[pixels.tobytes()], dimension
        (image_id,) = [i for instr, i in ID_OF.items() if instr in text]
        return image_id, dimension

    def release(self) -> None:
        with self.lock:
            self.epoch += 1
            self.hold_after = None
        self.gate.set()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def server():
    s = JudgeServer()
    s.thread.start()
    yield s
    s.release()
    s.httpd.shutdown()
    s.httpd.server_close()
    s.thread.join(timeout=5)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return save_tiny_ivedit(tmp_path_factory.mktemp("ivedit"))


RESULT_IDS: dict[bytes, str] = {}  # result pixels -> image id, for the judge stand-in


def save_result(path: Path, image_id: str, image: Image.Image) -> None:
    RESULT_IDS[np.asarray(image).tobytes()] = image_id
    image.save(path / image_id / "result.png")


def make_results(path: Path) -> Path:
    """Result images for 1000-1003; 1004 has a folder (a failed generation) but no result.png."""
    for i, image_id in enumerate(SCORES):
        (path / image_id).mkdir(parents=True)
        arr = np.random.default_rng(i).integers(0, 255, (40, 48, 3), dtype=np.uint8)
        save_result(path, image_id, Image.fromarray(arr))
    (path / "1004").mkdir()
    (path / "1004" / "error.txt").write_text("edit failed: RuntimeError: out of memory\n\nTraceback ...")
    (path / "run_config.json").write_text(json.dumps({"backbone": "tiny"}))
    return path


def args(dataset, results, server_url, out, *extra) -> list[str]:
    return ["--results_dir", str(results), "--dataset", str(dataset), "--split", "test", "--judge", "openai",
            "--judge_model", MODEL, "--base_url", server_url, "--api_key", KEY, "--backoff", "0",
            "--output_json", str(out), *extra]


def cached_calls(results: Path) -> int:
    n = 0
    for f in results.glob(f"*/judge-{ev.sanitise(MODEL)}.json"):
        data = json.loads(f.read_text())
        n += sum(e.get("score") is not None for e in data["dimensions"].values())
    return n


# --------------------------------------------------------------------------------------------------- end to end
def test_evaluate_end_to_end_with_cache_resume_and_corrupt_files(dataset, tmp_path, server, capsys, caplog):
    results, out = make_results(tmp_path / "out"), tmp_path / "eval.json"
    assert ev.main(args(dataset, results, server.url, out, "--concurrency", "3")) == 0
    assert server.errors == [] and len(server.answered) == 16 and len(set(server.answered)) == 16
    printed = capsys.readouterr().out
    assert "2.80" in printed and "2.10" in printed and "3.38" in printed and "by referring_type:" in printed
    report = json.loads(out.read_text())
    assert (report["judge_model"], report["dataset"], report["split"]) == (MODEL, str(dataset), "test")
    assert report["results_dir"] == str(results) and report["generation"] == {"backbone": "tiny"}
    assert close(report["aggregate"], EXPECTED) and close(report["judged_only"], EXPECTED_JUDGED)
    assert (report["failed"], report["missing"]) == (1, 1)
    assert report["breakdowns"]["referring_type"]["Spatial"]["count"] == 2
    assert report["breakdowns"]["referring_type"]["Spatial"]["overall"] == pytest.approx(4.25 / 2)
    samples = {s["image_id"]: s for s in report["samples"]}
    assert list(samples) == ["1000", "1001", "1002", "1003", "1004"]
    assert samples["1004"]["status"] == "missing" and samples["1004"]["overall"] == 0
    assert samples["1004"]["errors"]["image"].endswith("(generation failed: edit failed: RuntimeError: out of memory)")
    assert samples["1000"]["scores"] == dict(zip(DIMENSIONS, SCORES["1000"])) and samples["1000"]["status"] == "ok"
    assert samples["1000"]["weighted"] == pytest.approx(3.35) and samples["1002"]["overall"] == 3.5
    assert samples["1001"]["categories"] == {"referring_type": "Attribute", "task_type": "Object Removal"}
    assert samples["1002"]["referring_expression"] == "the largest shape"
    cache = json.loads(ev.cache_path(results, "1000", MODEL).read_text())
    assert cache["model"] == MODEL and set(cache["templates_sha256"]) == set(DIMENSIONS)
    assert cache["dimensions"]["effect"]["score"] == 3 and cache["dimensions"]["effect"]["model"] == MODEL
    assert not (results / "1004" / f"judge-{ev.sanitise(MODEL)}.json").exists()

    # a re-run asks nothing
    assert ev.main(args(dataset, results, server.url, out)) == 0
    assert len(server.answered) == 16 and json.loads(out.read_text())["samples"][0]["cached"] == 4
    # a corrupt cache re-judges that sample (with a warning); a partial one only its missing dimensions
    ev.cache_path(results, "1000", MODEL).write_text("{not json")
    partial = json.loads(ev.cache_path(results, "1001", MODEL).read_text())
    del partial["dimensions"]["quality"], partial["dimensions"]["consistency"]
    ev.cache_path(results, "1001", MODEL).write_text(json.dumps(partial))
    caplog.clear()
    assert ev.main(args(dataset, results, server.url, out)) == 0
    assert sorted(server.answered[16:]) == sorted([("1000", d) for d in DIMENSIONS] +
                                                  [("1001", "quality"), ("1001", "consistency")])
    assert any("corrupt" in r.getMessage() for r in caplog.records)
    # a changed result image is judged again; the numbers stay the same (the same scripted scores)
    save_result(results, "1002", Image.new("RGB", (48, 40), (9, 9, 9)))
    assert ev.main(args(dataset, results, server.url, out)) == 0
    assert sorted(server.answered[22:]) == sorted(("1002", d) for d in DIMENSIONS)
    assert close(json.loads(out.read_text())["aggregate"], EXPECTED)


def test_off_scale_scores_count_as_given_are_counted_and_never_asked_again(dataset, tmp_path, server, capsys):
    results, out = make_results(tmp_path / "out"), tmp_path / "eval.json"
    server.override = {("1000", "effect"): 4, ("1001", "target_following"): 3}  # off 5|3|1 and off 5|1
    assert ev.main(args(dataset, results, server.url, out, "--limit", "2")) == 0
    assert len(server.answered) == 8  # one call each: an off-scale score is not retried
    report = json.loads(out.read_text())
    assert report["score_parse"] == "official"
    assert report["off_scale"] == {"used": 2, "failed": 0, "by_dimension": {"quality": 0, "target_following": 1,
                                                                          "effect": 1, "consistency": 0}}
    s1000, s1001 = report["samples"]
    assert s1000["scores"]["effect"] == 4 and s1000["off_scale"] == ["effect"] and s1000["status"] == "ok"
    # by hand: (q, t, e, c) = (4, 5, 4, 5); w = 4/5; overall = 18/4; weighted = (4·.8 + 5 + 4 + 5·.8)/4
    assert s1000["overall"] == pytest.approx(4.5) and s1000["weighted"] == pytest.approx(4.05)
    assert s1001["scores"]["target_following"] == 3 and s1001["off_scale"] == ["target_following"]
    assert s1001["overall"] == pytest.approx((5 + 3 + 1 + 3) / 4)
    assert report["aggregate"]["overall"] == pytest.approx((4.5 + 3) / 2)
    assert {d: t["name"] for d, t in report["templates"].items()} == {
        d: f"replan:eval/prompts/{d}.txt" for d in DIMENSIONS}
    assert report["templates"]["effect"]["sha256"] == report["templates_sha256"]["effect"]
    assert "2 off-scale score(s) used" in capsys.readouterr().out
    # strict reading re-reads the cached replies: the two off-scale calls fail, nothing is asked again
    assert ev.main(args(dataset, results, server.url, out, "--limit", "2", "--score_parse", "strict")) == 0
    assert len(server.answered) == 8
    strict = json.loads(out.read_text())
    assert strict["off_scale"]["used"] == 0 and strict["off_scale"]["failed"] == 2
    s1000 = strict["samples"][0]
    assert s1000["scores"]["effect"] is None and s1000["status"] == "failed"
    assert s1000["errors"]["effect"].startswith("off-scale")
    assert s1000["overall"] == pytest.approx((4 + 5 + 0 + 5) / 4) and strict["failed"] == 2
    assert ev.main(args(dataset, results, server.url, out, "--limit", "2")) == 0  # and back, still without calls
    assert len(server.answered) == 8 and json.loads(out.read_text())["samples"][0]["scores"]["effect"] == 4


def test_a_failed_judge_call_counts_as_zero_and_is_asked_again_next_run(dataset, tmp_path, server):
    results, out = make_results(tmp_path / "out"), tmp_path / "eval.json"
    server.fail = {("1003", "effect")}
    assert ev.main(args(dataset, results, server.url, out, "--limit", "4")) == 0
    report = json.loads(out.read_text())
    s1003 = report["samples"][3]
    assert s1003["status"] == "failed" and s1003["scores"]["effect"] is None
    assert "HTTP 400: content policy" in s1003["errors"]["effect"]
    # official semantics: the unscored dimension is 0 (and w = 0), the others still count
    assert s1003["overall"] == pytest.approx((2 + 5 + 0 + 3) / 4) and s1003["weighted"] == pytest.approx(5 / 4)
    assert report["failed"] == 1 and report["missing"] == 0 and report["judged_only"]["count"] == 3
    assert server.received.count(("1003", "effect")) == 1  # a 400 is not retried
    server.fail = set()
    assert ev.main(args(dataset, results, server.url, out, "--limit", "4")) == 0
    assert server.received[16:] == [("1003", "effect")]
    report = json.loads(out.read_text())
    assert report["failed"] == 0 and report["samples"][3]["status"] == "ok"


def test_configuration_errors_exit_2_with_one_line_before_any_request(dataset, tmp_path, server, capsys):
    results = make_results(tmp_path / "out")
    base = ["--results_dir", str(results), "--dataset", str(dataset), "--judge", "openai", "--base_url", server.url,
            "--judge_model", MODEL]
    cases = [
        (base, "REPLAN_JUDGE_API_KEY"),
        (base[:6] + ["--judge", "genai"], "GEMINI_API_KEY"),
        (base[:6] + ["--judge", "genai", "--vertex"], "GOOGLE_CLOUD_PROJECT"),
        (base + ["--api_key", KEY, "--prompts_dir", str(tmp_path)], "does not exist"),
        (base + ["--api_key", KEY, "--concurrency", "0"], "--concurrency"),
        ([*base[:1], str(tmp_path / "nowhere"), *base[2:], "--api_key", KEY], "is not a folder"),
        ([*base[:3], str(tmp_path / "no_dataset.parquet"), *base[4:], "--api_key", KEY], "no_dataset.parquet"),
        ([*base[:3], "nobody/no-such-dataset", *base[4:], "--api_key", KEY], "nobody/no-such-dataset"),  # offline hub
    ]
    for argv, needle in cases:
        assert ev.main(argv) == 2, needle
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    assert server.received == []
    # the same through a real process: the exit status and one line on stderr
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    proc = subprocess.run([sys.executable, "-m", "replan.eval.evaluate", *base[:6], "--judge", "genai"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)  # hang guard only
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "GEMINI_API_KEY" in proc.stderr, proc.stderr


# --------------------------------------------------------------------------------------------------- kill and resume
def test_a_killed_run_resumes_without_repeating_a_finished_call(dataset, tmp_path, server):
    server.delay = 0.05
    results, out = make_results(tmp_path / "out"), tmp_path / "eval.json"
    fresh = tmp_path / "fresh"
    shutil.copytree(results, fresh)
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    cmd = [sys.executable, "-m", "replan.eval.evaluate",
           *args(dataset, results, server.url, out, "--concurrency", "2")]
    server.hold_after = 6  # 6 calls finish; the next ones hang until the process is killed
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600  # a hang guard, generous for loaded machines
    while cached_calls(results) < 6 or len(server.received) < 8:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the first run made no progress"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    proc.stdout.close()
    proc.stderr.close()
    server.release()
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    assert len(server.answered) == 6 and cached_calls(results) == 6
    first_answered, in_flight = list(server.answered), server.received[6:]
    per_sample = [sum(c[0] == i for c in first_answered) for i in SCORES]
    assert any(0 < n < 4 for n in per_sample)  # at least one sample stopped between dimensions

    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert server.errors == []
    assert sorted(server.answered) == sorted((i, d) for i in SCORES for d in DIMENSIONS)  # each call answered once
    assert set(server.answered[6:]).isdisjoint(first_answered)  # nothing finished was asked again
    assert sorted(server.received[8:]) == sorted(server.answered[6:])
    assert set(in_flight) <= set(server.answered[6:])  # calls cut off by the kill were asked again
    resumed = json.loads(out.read_text())

    assert ev.main(args(dataset, fresh, server.url, tmp_path / "fresh.json", "--concurrency", "2")) == 0
    single = json.loads((tmp_path / "fresh.json").read_text())
    for key in ("aggregate", "judged_only", "failed", "missing", "breakdowns"):
        assert resumed[key] == single[key], key
    strip = ("cached", "errors")  # errors name the results folder
    assert [{k: v for k, v in s.items() if k not in strip} for s in resumed["samples"]] == \
        [{k: v for k, v in s.items() if k not in strip} for s in single["samples"]]
    assert close(resumed["aggregate"], EXPECTED)


class ScriptedJudge(Judge):
    """A judge backend without HTTP (the thing under test is ``evaluate``): fixed scores, one dimension raises."""

    name = "scripted"

    def __init__(self):
        super().__init__("scripted-judge", backoff=0.0)
        self.calls = []

    def _generate(self, dimension, parts):
        self.calls.append(dimension)
        if dimension == "consistency":
            raise RuntimeError("backend bug")
        return json.dumps({"reasoning": "r", SCORE_KEYS[dimension]: 5})


def test_unreadable_images_and_raising_judges_are_recorded_per_sample(dataset, tmp_path):
    results = make_results(tmp_path / "out")
    (results / "1001" / "result.png").write_bytes(b"not a png")
    samples = load_samples(str(dataset), "test", limit=2)
    judge = ScriptedJudge()
    report = ev.evaluate(samples, results, judge, load_templates(), concurrency=2)
    s1000, s1001 = report["samples"]
    assert s1000["status"] == "failed" and s1000["scores"] == {**dict.fromkeys(DIMENSIONS, 5), "consistency": None}
    assert "RuntimeError: backend bug" in s1000["errors"]["consistency"]
    assert s1001["status"] == "failed" and "cannot read" in s1001["errors"]["image"] and s1001["overall"] == 0
    assert judge.calls == list(DIMENSIONS) and report["failed"] == 2
    assert report["aggregate"]["quality"] == 2.5 and report["judged_only"]["count"] == 0
