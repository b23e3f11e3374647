"""Ulysses context parallelism on two (and four) gloo processes on the CPU, against one process.

The ranks run through ``replan.testing.parallel`` (the CPU stand-in for an accelerator; nothing else is patched):
the proof worker (``tests/cp_proof.py``) for the three backbone families, the CLI under torchrun, eval generation
in two groups of two, and the edit server starting its own follower rank."""

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from replan.backbones.registry import build_offline, resolve
from replan.testing.parallel import cpu_env, launch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DESK = ROOT / "assets/examples/desk.png"
TINY_YAML = str(ROOT / "configs/eval/tiny.yaml")
TOLERANCE = 1e-4  # final latents, float32; the runs agree to ~1e-6


def prebuild(*backbones, planner=False):
    """Build the offline components once here, not in every rank."""
    for name in backbones:
        spec = resolve(name)
        build_offline(spec.builder, f"{spec.name}-{spec.family}")
    if planner:
        build_offline("replan.testing.qwenvl:save_tiny_qwen25vl", "tiny-qwen25vl")


def check(result: subprocess.CompletedProcess):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


def pixels(path_or_image) -> np.ndarray:
    image = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    return np.asarray(image.convert("RGB"), dtype=int)


# ---------------------------------------------------------------------------------------------------- the proof
@pytest.fixture(scope="module")
def proof(tmp_path_factory):
    prebuild("tiny", "tiny_qwen", "tiny_klein")
    out = tmp_path_factory.mktemp("cp_proof")
    check(launch(2, "tests.cp_proof", [out], cwd=str(ROOT)))
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    return ranks


EXACT = ["tiny/unmasked", "tiny/unmasked_padded", "tiny/masked", "tiny/overlap", "tiny/switch", "tiny/trimmed",
         "tiny/trimmed_anything", "tiny/compiled", "tiny/compiled_again", "tiny_qwen/unmasked", "tiny_qwen/overlap",
         "tiny_qwen/one", "tiny_qwen/one_anything", "tiny_klein/unmasked", "tiny_klein/trimmed", "tiny_klein/switch"]


@pytest.mark.parametrize("case", EXACT)
def test_two_ranks_equal_one_process(proof, case):
    for rank in proof:
        assert rank[case]["diff"] < TOLERANCE, (case, rank[case])
        assert rank[case]["scale"] > 1  # real latents, not zeros


def test_the_cases_exercise_what_they_claim(proof):
    r = proof[0]
    # masks built once per rule set and rank, however many passes and blocks use them
    assert r["tiny/switch"]["builds"] == {"noise-isolation": 1, "default": 1} and r["tiny/switch"]["rule_sets"] == 2
    assert r["tiny_klein/switch"]["builds"] == {"noise-isolation": 1, "default": 1}
    assert all(n == 1 for v in r.values() for n in v["builds"].values())
    # text lengths that do not divide by 2: padded (and the padding masked out) or split unequally
    for case in ("tiny/trimmed", "tiny_qwen/one", "tiny_klein/trimmed"):
        assert r[case]["text_len"] % 2 == 1 and r[case]["pad"] == 1 and r[case]["padded_passes"] >= 2, case
    for case in ("tiny/trimmed_anything", "tiny_qwen/one_anything"):
        assert r[case]["text_len"] % 2 == 1 and r[case]["pad"] == 0 and r[case]["padded_passes"] == 0, case
    # an unmasked pass with padded text: the key-padding mask
    assert r["tiny/unmasked_padded"]["padded_passes"] == 2 and r["tiny/unmasked"]["padded_passes"] == 0
    # overlapping boxes and a rule switch on masked passes
    assert r["tiny/overlap"]["builds"] == {"default": 1} and r["tiny/overlap"]["pad"] == 0
    # compiled: whole graphs, one per block class for both rule sets, none on the second edit
    assert r["tiny/compiled"]["graphs"] == 2 and r["tiny/compiled_again"]["graphs"] == 0


def test_the_natural_token_order_would_be_wrong(proof):
    for rank in proof:
        natural = rank["tiny/natural_order"]
        assert natural["diff"] > 100 * TOLERANCE, natural


# ---------------------------------------------------------------------------------------------------- the CLI
def test_torchrun_infer_writes_once_and_matches_one_process(tmp_path):
    from replan.infer import main

    prebuild("tiny", planner=True)
    common = ["--backbone", "tiny", "--vlm_ckpt_path", "tiny", "--image", str(DESK), "--steps", "2",
              "--instruction", "replace the used cup with a cactus", "--device", "cpu"]
    assert main([*common, "--output_dir", str(tmp_path / "one")]) == 0
    result = launch(2, "replan.infer", [*common, "--ulysses", "2", "--output_dir", tmp_path / "two"], cwd=str(ROOT))
    check(result)
    one, two = tmp_path / "one", tmp_path / "two"
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # no other rank wrote anything
    assert result.stderr.count(f"wrote {two}") == 1
    assert (two / "planner_response.txt").read_text() == (one / "planner_response.txt").read_text() != ""
    assert json.loads((two / "plan.json").read_text()) == json.loads((one / "plan.json").read_text())
    assert np.abs(pixels(two / "result.png") - pixels(one / "result.png")).max() <= 1
    config = json.loads((two / "config.json").read_text())
    assert config["parallel"] == {"ulysses": 2, "ulysses_anything": False}


# ---------------------------------------------------------------------------------------------------- eval groups
def test_eval_generation_in_two_groups_of_two(tmp_path):
    from replan.eval.generate import main

    prebuild("tiny", planner=True)
    build_offline("replan.testing.ivedit:save_tiny_ivedit", "tiny-ivedit")
    common = ["--config", TINY_YAML, "--limit", "3", "steps=2"]
    assert main([*common, f"output_dir={tmp_path / 'one'}"]) == 0
    result = launch(4, "replan.eval.generate", [*common, f"output_dir={tmp_path / 'groups'}", "ulysses=2"],
                    cwd=str(ROOT))
    check(result)
    one, groups = tmp_path / "one", tmp_path / "groups"
    ids = sorted(p.name for p in one.iterdir() if p.is_dir())
    assert len(ids) == 3 and sorted(p.name for p in groups.iterdir() if p.is_dir()) == ids
    for image_id in ids:
        assert np.abs(pixels(groups / image_id / "result.png") - pixels(one / image_id / "result.png")).max() <= 1
        record = json.loads((groups / image_id / "config.json").read_text())
        assert record["settings"]["ulysses"] == {"degree": 2, "anything": False}
    # two shards (one per group), each summarised once, by its leader
    assert "(of 2 in shard 0/2)" in result.stderr and "(of 1 in shard 1/2)" in result.stderr
    assert result.stderr.count("generate:") == 2


# ---------------------------------------------------------------------------------------------------- the server
def test_server_replica_on_two_ranks(tmp_path):
    from replan.distributed import free_port
    from replan.parse import parse_plan
    from replan.pipeline import RePlanPipeline
    from replan.plan import RegionPlan

    prebuild("tiny")
    port = free_port()
    log = open(tmp_path / "server.log", "w+")
    cmd = [sys.executable, "-m", "replan.testing.parallel", "replan.serve", "--backbone", "tiny", "--planner", "none",
           "--device", "cpu", "--ulysses", "2", "--port", str(port), "--log_level", "info"]
    server = subprocess.Popen(cmd, cwd=str(ROOT), env=cpu_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 300
        while True:
            assert server.poll() is None and time.time() < deadline, "the server did not become ready"
            try:
                if httpx.get(url + "/health", timeout=5).json().get("status") == "ready":
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        plan = RegionPlan.load(ROOT / "assets/examples/desk.plan.json")
        body = {"image_base64": base64.b64encode(DESK.read_bytes()).decode(), "instruction": "replace the used cup",
                "steps": 2, "seed": 5, "response": plan.to_response(), "box_frame": "original"}
        replies = [httpx.post(url + "/v1/plans/execute", json=body, timeout=120) for _ in range(2)]
        # fails inside the edit, on every rank: rules that leave the hints nothing to attend to
        bad = httpx.post(url + "/v1/plans/execute", json={**body, "rules": {"Main Prompt, Main Prompt": True}},
                         timeout=120)
        after = httpx.post(url + "/v1/plans/execute", json=body, timeout=120)  # the followers went on
    finally:
        server.send_signal(signal.SIGINT)
        code = server.wait(timeout=120)
    log.seek(0)
    text = log.read()
    assert code == 0, text[-4000:]
    assert "replica spans 2 ranks" in text and "did not stop" not in text
    for r in (*replies, after):
        assert r.status_code == 200, r.text
    assert bad.status_code == 400 and "attend to nothing" in bad.text
    image = Image.open(DESK).convert("RGB")
    direct = RePlanPipeline.from_pretrained("tiny", planner=None, device="cpu")
    expected = direct(image, plan=parse_plan(plan.to_response(), image.size), seed=5, steps=2, entry="server")
    for r in (*replies, after):
        assert r.json()["boxes"] == [list(b) for b in expected.edit.boxes]
        got = pixels(Image.open(io.BytesIO(base64.b64decode(r.json()["image_base64"]))))
        assert np.abs(got - pixels(expected.image)).max() <= 1
    assert os.environ.get("RANK") is None  # nothing leaked into this process
