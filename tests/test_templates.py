"""The shipped planner prompt and judge rubrics keep the official structure, and ``python -m replan.templates`` fetches
the official files only when their SHA-256 matches the pin (a local stand-in HTTP server plays GitHub; no network).

The structure facts below (line layout, headings, scales, placeholders, example line) were read off the official
files at the pinned commit; the official text itself is not stored anywhere in replan."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources

import pytest
from PIL import Image

from replan import templates as tpl
from replan.eval.judges import SCALES, SCORE_KEYS, build_parts, load_templates
from replan.planner import describe_template, load_template
from replan.train.rewards import BOX_PLACEHOLDERS, GEN_PLACEHOLDERS, HINT_PLACEHOLDERS, THINK_PLACEHOLDERS

EXAMPLE = ('<think>Reasoning process</think><gen_image>Global edit instruction</gen_image><region>[{"bbox_2d": '
           '[10,150,150,210], "point_2d": [30,175], "hint": "change the color of this one apple to blue"}, {"bbox_2d": '
           '[150,50,200,150], "point_2d": [175,75], "hint": "keep this one apple unchanged"}]</region>')


# --------------------------------------------------------------------------------------------------- planner prompt
def test_planner_prompt_has_the_official_line_layout():
    text = load_template()
    lines = text.split("\n")
    assert len(lines) == 16 and not text.endswith("\n")
    assert [i for i, line in enumerate(lines) if line == ""] == [1, 9, 12, 14]  # the official blank lines
    assert lines[2] == "### Rules" and lines[10] == "### Output Format"
    for n, line in enumerate(lines[3:9], 1):  # six numbered rules, each "N.  **Title:** text", as official
        assert re.match(rf"{n}\.  \*\*[^*]+:\*\* \S", line), line
    assert lines[13] == EXAMPLE  # the example line, exactly: the reward penalises copying it
    assert lines[15] == "The user instruction: "  # trailing space, no newline: the instruction follows "\n"
    assert "‘keep remaining part of image unchanged.’" in lines[7] and "`<gen_image>`" in lines[7]
    assert "`[]`" in lines[8] and "`<region>`" in lines[8]
    assert "`<region>`" in lines[4] and "`hint`" in lines[5] and "`<gen_image>`" in lines[6]
    assert "outside the tags" in lines[11]
    assert not re.search(r"\{\{|\}\}|\{[a-z_]+\}", text)  # a plain prefix: no placeholders


def test_the_example_line_is_what_the_rewards_penalise():
    think, gen, body = re.fullmatch(r"<think>(.*)</think><gen_image>(.*)</gen_image><region>(.*)</region>",
                                    EXAMPLE).groups()
    assert think in THINK_PLACEHOLDERS and gen in GEN_PLACEHOLDERS
    for item in json.loads(body):
        assert item["hint"] in HINT_PLACEHOLDERS and tuple(map(float, item["bbox_2d"])) in BOX_PLACEHOLDERS


# --------------------------------------------------------------------------------------------------- rubrics
# per rubric: line count, headings in order, how the scale entries start, the placeholders
RUBRICS = {
    "target_following": (40, ["## Core Task", "## Evaluation Scale", "## Reasoning Steps", "## Input",
                              "## Output Format"], ["- **5 - ", "- **1 - "], {"instruct", "ref_exp"}),
    "effect": (45, ["## Core Task", "### How to Evaluate Text Edits", "## Evaluation Scale (5, 3, 1)",
                    "## Reasoning Steps", "## Input", "## Output Format"],
               ["-   **5 - ", "-   **3 - ", "-   **1 - "], {"instruct", "ref_exp"}),
    "consistency": (39, ["## Core Task", "## Evaluation Scale (5, 3, 1)", "## Reasoning Steps", "## Input",
                         "## Output Format"], ["-   **5 - ", "-   **3 - ", "-   **1 - "], {"instruct", "ref_exp"}),
    "quality": (32, ["## Objective:", "## Evaluation Scale (1 to 5):", "## Guidance:", "## Input", "## Output Format:"],
                ["- **5 ", "- **4 ", "- **3 ", "- **2 ", "- **1 "], set()),
}


@pytest.mark.parametrize("dimension", list(RUBRICS))
def test_rubrics_keep_the_official_structure_scale_and_placeholders(dimension):
    n_lines, headings, scale, placeholders = RUBRICS[dimension]
    text = load_templates()[dimension]
    lines = text.split("\n")
    assert len(lines) == n_lines and not text.endswith("\n")
    assert [line for line in lines if line.startswith("#")] == headings
    entries = [line for line in lines if re.match(r"-\s+\*\*\d", line)]
    assert [e[:len(s)] for e, s in zip(entries, scale)] == scale and len(entries) == len(scale)
    assert [int(re.search(r"\d", e).group()) for e in entries] == sorted(SCALES[dimension], reverse=True)
    assert set(re.findall(r"\{\{\{([^{}]+)\}\}\}", text)) == placeholders
    # the input block and the JSON output block, laid out as official
    start = lines.index("## Input")
    if dimension == "quality":
        assert lines[start + 1:start + 3] == ["**Edited Image**:", ""]
    else:
        assert lines[start + 1:start + 7] == ["**Original Image**: ", "", "**Editing Instruction**: {{{instruct}}}",
                                              "**Referring Expression**: {{{ref_exp}}}", "", "**Edited Image**:"]
    assert lines[-4] == "{{" and lines[-1] == "}}" and lines[-3].startswith('"reasoning": "')
    assert lines[-2].startswith(f'"{SCORE_KEYS[dimension]}": ')
    allowed = {"target_following": "[5 or 1]", "effect": "[5, 3, or 1]", "consistency": "[5, 3, or 1]",
               "quality": "X"}[dimension]
    assert lines[-2] == f'"{SCORE_KEYS[dimension]}": {allowed}'


def test_rubric_criteria_are_the_official_ones_only():
    rubrics = load_templates()
    # the two criteria replan once added to target following are gone
    target = rubrics["target_following"].lower()
    assert "no change" not in target and "several instances" not in target and "spread" not in target
    assert target.count("**5 - correct association**") == 1 and target.count("**1 - incorrect association**") == 1
    effect, consistency = rubrics["effect"], rubrics["consistency"]
    assert "### How to Evaluate Text Edits" in effect and effect.count("*Text Example*") == 3
    assert effect.count("*Visual Example*") == 2
    for kind in ("**Edit Spillover**", "**Unwarranted Global Changes**", "**Misapplication**"):
        assert kind in consistency
    quality = rubrics["quality"]
    assert quality.count("✔") >= 5 and "Referring" not in quality and "Instruction" not in quality


def test_rubric_parts_render_the_official_placeholders():
    rubrics = load_templates()
    original, edited = Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8), (255, 0, 0))
    parts = build_parts("target_following", rubrics["target_following"], "turn it blue", "the left cup", original,
                        edited)
    assert [p for p in parts if not isinstance(p, str)] == [original, edited]
    text = "".join(p for p in parts if isinstance(p, str))
    assert "**Editing Instruction**: turn it blue\n**Referring Expression**: the left cup" in text and "{{{" not in text
    assert "{{\n" in text  # the double braces of the output block stay literal, as official


# --------------------------------------------------------------------------------------------------- pins
def test_pins_are_well_formed():
    assert re.fullmatch(r"[0-9a-f]{40}", tpl.OFFICIAL_COMMIT) and tpl.OFFICIAL_REPO == "dvlab-research/RePlan"
    names = [f.name for f in tpl.OFFICIAL_FILES]
    assert len(set(names)) == len(names) and len({f.sha256 for f in tpl.OFFICIAL_FILES}) == len(names)
    assert {"replan.txt", "quality.txt", "target_following.txt", "effect.txt", "consistency.txt"} <= set(names)
    for f in tpl.OFFICIAL_FILES:
        assert re.fullmatch(r"[0-9a-f]{64}", f.sha256) and f.path.endswith(f.name)
        assert f.url() == f"https://raw.githubusercontent.com/dvlab-research/RePlan/{tpl.OFFICIAL_COMMIT}/{f.path}"
    # replan's own wording is not an official file: nothing shipped claims to be official
    shipped = [load_template(), *load_templates().values()]
    assert all(tpl.official_name(text) is None for text in shipped)


def test_describe_names_official_shipped_and_user_templates(monkeypatch, tmp_path):
    text = "Plan this edit.\nThe user instruction: "
    digest = hashlib.sha256(text.encode()).hexdigest()
    assert tpl.describe(text) == {"name": "custom", "sha256": digest}
    assert describe_template(text, tmp_path / "p.txt") == {"name": str(tmp_path / "p.txt"), "sha256": digest}
    assert describe_template(load_template())["name"] == "replan:planner/prompt.txt"
    fake = tpl.OfficialFile("replan.txt", "replan/pipelines/prompt_template/replan.txt", digest, "planner")
    monkeypatch.setattr(tpl, "BY_HASH", {digest: fake})
    assert describe_template(text, tmp_path / "p.txt")["name"] == f"official:replan.txt@{tpl.OFFICIAL_COMMIT[:7]}"


# --------------------------------------------------------------------------------------------------- downloader
class GitHubStandin:
    """Serves ``files[path]`` at ``/<repo>/<commit>/<path>`` (404 otherwise) and counts requests."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests.append(self.path)
                prefix = f"/{tpl.OFFICIAL_REPO}/{tpl.OFFICIAL_COMMIT}/"
                data = outer.files.get(self.path[len(prefix):]) if self.path.startswith(prefix) else None
                self.send_response(200 if data is not None else 404)
                self.send_header("Content-Length", str(len(data or b"")))
                self.end_headers()
                self.wfile.write(data or b"")

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()


@pytest.fixture
def github():
    s = GitHubStandin()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def pinned(name: str, path: str, data: bytes) -> tpl.OfficialFile:
    return tpl.OfficialFile(name, path, hashlib.sha256(data).hexdigest(), "test")


def test_fetch_writes_only_files_whose_hash_matches(github, tmp_path):
    good, bad = b"rubric text\n", b"planner text"
    files = (pinned("effect.txt", "eval/effect.txt", good), pinned("replan.txt", "p/replan.txt", bad))
    github.files = {"eval/effect.txt": good, "p/replan.txt": bad + b" changed"}  # the second one was altered
    dest = tmp_path / "official"
    written, errors = tpl.fetch(dest, base=github.url, files=files)
    assert written == [dest / "effect.txt"] and (dest / "effect.txt").read_bytes() == good
    assert not (dest / "replan.txt").exists() and sorted(p.name for p in dest.iterdir()) == ["effect.txt"]
    (error,) = errors
    got = hashlib.sha256(bad + b" changed").hexdigest()
    assert error.startswith("replan.txt: the file at ") and f"SHA-256 {got}, not the pinned {files[1].sha256}" in error
    assert "nothing was written" in error and tpl.OFFICIAL_COMMIT[:7] in error
    # a file already there with the pinned hash is kept, not downloaded again; a 404 says so
    github.requests.clear()
    github.files = {}
    written, errors = tpl.fetch(dest, names=["effect.txt"], base=github.url, files=files)
    assert written == [dest / "effect.txt"] and errors == [] and github.requests == []
    (dest / "effect.txt").write_bytes(b"edited by hand")
    written, errors = tpl.fetch(dest, names=["effect.txt"], base=github.url, files=files)
    assert written == [] and "HTTP 404" in errors[0] and (dest / "effect.txt").read_bytes() == b"edited by hand"
    with pytest.raises(ValueError, match="unknown template"):
        tpl.fetch(dest, names=["nope.txt"], base=github.url, files=files)


def test_fetch_cli_with_the_real_pins_refuses_anything_else(github, tmp_path, capsys):
    github.files = {f.path: b"not the official text" for f in tpl.OFFICIAL_FILES}
    dest = tmp_path / "t"
    assert tpl.main(["fetch", "--dest", str(dest), "--base_url", github.url]) == 1
    err = capsys.readouterr().err
    assert err.count("error: ") == len(tpl.OFFICIAL_FILES) and "not the pinned" in err
    assert not dest.exists() or not any(dest.iterdir())
    assert len(github.requests) == len(tpl.OFFICIAL_FILES)
    assert all(r.startswith(f"/{tpl.OFFICIAL_REPO}/{tpl.OFFICIAL_COMMIT}/replan/") for r in github.requests)
    assert tpl.main(["fetch", "--only", "nope.txt", "--base_url", github.url]) == 2
    assert tpl.main(["fetch", "--dest", str(dest), "--base_url", "http://127.0.0.1:9", "--only", "replan.txt",
                     "--timeout", "5"]) == 1
    assert "cannot reach" in capsys.readouterr().err


def test_list_and_check_cli(tmp_path, capsys, monkeypatch):
    assert tpl.main(["list"]) == 0
    out = capsys.readouterr().out
    assert tpl.OFFICIAL_COMMIT in out and all(f.sha256 in out and f.url() in out for f in tpl.OFFICIAL_FILES)
    mine = tmp_path / "mine.txt"
    mine.write_text("x")
    assert tpl.main(["check", str(mine)]) == 0
    assert "not a pinned official file" in capsys.readouterr().out
    fake = tpl.OfficialFile("quality.txt", "q", hashlib.sha256(b"x").hexdigest(), "test")
    monkeypatch.setattr(tpl, "BY_HASH", {fake.sha256: fake})
    assert tpl.main(["check", str(mine)]) == 0 and "official quality.txt" in capsys.readouterr().out
    assert tpl.main(["check", str(tmp_path / "missing.txt")]) == 2


def test_a_fetched_folder_loads_as_rubrics_and_planner_prompt(tmp_path):
    """A folder laid out like the fetch destination (official names and placeholders) is what --prompts_dir and
    --prompt_template take; here filled with replan's own files, which share the official layout."""
    for dim, text in load_templates().items():
        (tmp_path / f"{dim}.txt").write_text(text, encoding="utf-8")
    prompt = resources.files("replan.planner").joinpath("prompt.txt").read_text(encoding="utf-8")
    (tmp_path / "replan.txt").write_text(prompt, encoding="utf-8")
    assert load_templates(tmp_path) == load_templates()
    assert load_template(tmp_path / "replan.txt") == load_template()
    with pytest.raises(ValueError, match="python -m replan.templates fetch"):
        load_template(tmp_path / "missing.txt")
