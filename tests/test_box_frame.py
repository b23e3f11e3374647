"""One box frame everywhere: one planner reply read at inference (planner → pipeline) and in the GRPO stage-2 reward
(TRL reward function → Stage2Reward → the real edit server) gives the same plan and the same pixel boxes, for
``box_frame="processor"`` (the frame comes from the processor's ``image_grid_thw`` on both sides) and ``"original"``.

The planner is the tiny Qwen2.5-VL with its real processor; only its decoded text is fixed, so the frame it reports
is the one the model saw. Its processor caps images at 64·28·28 pixels: desk.png (640x480) is seen as 252x168, far
from the default smart_resize frame (644x476), so a reward path that guessed the frame would get other boxes."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import uvicorn
from PIL import Image

from replan.coords import processor_frame
from replan.parse import parse_plan
from replan.pipeline import RePlanPipeline
from replan.plan import RegionPlan
from replan.planner.qwen_vl import QwenVLPlanner
from replan.serve import ServeConfig, create_app
from replan.testing.qwenvl import tiny_qwen25vl
from replan.testing.standins import JUDGE_MODEL, StandIns
from replan.train.grpo import Stage2RewardFn, planner_frame
from replan.train.remote import RewardConfig

ROOT = Path(__file__).resolve().parents[1]
DESK = Image.open(ROOT / "assets/examples/desk.png").convert("RGB")
REPLY = ('<think>The cup with coffee stains was used; the clean one was not, so only the stained one changes.</think>'
         '<gen_image>keep remaining part of image unchanged.</gen_image><region>[{"bbox_2d": [34, 69, 82, 111], '
         '"hint": "a small green cactus in a terracotta pot"}, {"bbox_2d": [150, 60, 190, 100], '
         '"hint": "keep this clean cup unchanged"}]</region>')


# a third region entirely outside the image (x from 260 in the 252-wide frame): the official reading keeps it and runs
# it clamped (it covers no patch); the reward asks the edit server for that reading (parse "official")
OUTSIDE = REPLY.replace(']</region>', ', {"bbox_2d": [260, 20, 300, 60], "hint": "a red balloon"}]</region>')


class FixedReplyPlanner(QwenVLPlanner):
    """The tiny Qwen2.5-VL planner whose decoded reply is fixed (prompt, processor and frame are the real ones)."""

    reply = REPLY

    def _decode(self, inputs):
        return 0, self.reply


@pytest.fixture(scope="module")
def processor():
    return tiny_qwen25vl()[1]


@pytest.fixture(scope="module")
def editor_pipe():
    return RePlanPipeline.from_pretrained("tiny", planner=None, device="cpu")


@pytest.fixture(scope="module")
def edit_server():
    app = create_app(ServeConfig(backbone="tiny", planner="none", device="cpu"))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 600  # a hang guard, generous for loaded machines
    # ready = its model is loaded: loading patches torch module construction process-wide (empty weights), so no
    # other model may be built while it runs
    while not server.started or app.state.service.status != "ready":
        assert time.time() < deadline and thread.is_alive(), f"edit server not ready: {app.state.service.status}"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def judge():
    with StandIns() as s:
        yield s.judge_url


@pytest.fixture(scope="module")
def planner_model(edit_server):  # built once the server's model has loaded (see edit_server)
    return tiny_qwen25vl()[0]


def infer(editor_pipe, processor, model, box_frame: str, reply: str = REPLY, parse: str = "lenient"):
    planner = FixedReplyPlanner(model, processor, box_frame=box_frame, parse=parse, max_new_tokens=4)
    planner.reply = reply
    pipe = RePlanPipeline(editor_pipe.editor, planner)
    out = pipe(DESK, "replace the cup that was used with a cactus", entry="server", steps=1)
    return out.plan, [list(b) for b in out.edit.boxes], planner.last_reply.frame


def reward_path(edit_server, judge, processor, box_frame: str, reply: str = REPLY):
    config = RewardConfig(edit_url=edit_server, judge_url=judge, judge_model=JUDGE_MODEL, box_frame=box_frame,
                          ready_timeout=120, ready_interval=0.05, backoff=0.1)
    reward = config.build()
    try:
        fn = Stage2RewardFn(reward, processor)  # as build_trainer wires it: the frame from image_grid_thw
        rewards = fn(prompts=[None], completions=[[{"role": "assistant", "content": reply}]], image=[DESK],
                     instruction=["replace the cup that was used with a cactus"],
                     referring_expression=["the cup that was used"])
        (details,) = reward.last_details
    finally:
        reward.close()
    assert details["edit_error"] is None and details["reason"] == "ok", details
    assert rewards[0] == pytest.approx(1.0 + 0.2 * 0.905)  # executed, judged 5/5/5
    executed = details["executed"]
    return RegionPlan.from_dict(executed["plan"]), executed["boxes"], executed


@pytest.mark.parametrize("box_frame", ["processor", "original"])
def test_one_reply_gives_the_same_pixel_boxes_at_inference_and_in_the_reward(box_frame, editor_pipe, processor,
                                                                             planner_model, edit_server, judge):
    plan, boxes, frame = infer(editor_pipe, processor, planner_model, box_frame)
    assert frame == planner_frame(processor, DESK) == (252, 168) != processor_frame(DESK.size)
    served_plan, served_boxes, executed = reward_path(edit_server, judge, processor, box_frame)
    assert served_plan.regions == plan.regions and len(plan.regions) == 2
    assert served_boxes == boxes
    if box_frame == "processor":
        assert executed["planner_size"] == [252, 168] and executed["box_frame"] == "processor"
        assert plan.regions == parse_plan(REPLY, DESK.size, planner_size=(252, 168)).regions
        assert plan.regions[0].bbox == pytest.approx((34 * 640 / 252, 69 * 480 / 168, 82 * 640 / 252, 111 * 480 / 168))
    else:
        assert executed["planner_size"] is None and executed["box_frame"] == "original"
        assert [r.bbox for r in plan.regions] == [(34, 69, 82, 111), (150, 60, 190, 100)]


def test_a_box_entirely_outside_the_image_is_executed_as_official_on_both_paths(editor_pipe, processor, planner_model,
                                                                               edit_server, judge):
    plan, boxes, _ = infer(editor_pipe, processor, planner_model, "processor", OUTSIDE, parse="official")
    served_plan, served_boxes, executed = reward_path(edit_server, judge, processor, "processor", OUTSIDE)
    assert [r.hint for r in served_plan.regions] == [r.hint for r in plan.regions] == [
        "a small green cactus in a terracotta pot", "keep this clean cup unchanged", "a red balloon"]
    assert served_plan.regions == plan.regions and served_boxes == boxes
    x1, _, x2, _ = boxes[2]
    assert x1 >= 640 and x2 == 640  # expanded, then clamped to the 640-wide image: no patch, but the region runs
