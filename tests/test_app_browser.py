"""The Gradio app driven in a real browser (Debian's Chromium through Playwright) on the tiny backbone.

Flow: upload an image, AI Plan (an OpenAI-compatible planner served by a local stand-in), move a box on the canvas,
edit a hint, toggle an attention-matrix cell, run — then check that the result appears and that the plan and rules
the app submitted are exactly what was drawn. A screenshot is saved to test-artifacts/app.png.

Every wait is for a state (a text, a box coordinate, a checked cell), never a fixed sleep; ``HANG_MS`` only stops a
hung run and is far above the normal time (the whole flow takes ~20 s alone, and its waits passed 30 s under load).
"""

import shutil
import socket
from pathlib import Path

import pytest

from tests.test_infer import _PlannerServer

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
REPLY = ('<think>the used cup has coffee in it</think><gen_image>keep remaining part of image unchanged.</gen_image>'
         '<region>[{"bbox_2d": [87, 197, 208, 311], "hint": "a small cactus"}, '
         '{"bbox_2d": [437, 117, 574, 314], "hint": "keep this plant unchanged"}]</region>')
HANG_MS = 300_000  # a hang guard for every wait (Playwright's default is 30 s), not a timing assert
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_plan_edit_and_run_in_a_browser():
    pytest.importorskip("gradio", reason="the app extra is not installed")
    pytest.importorskip("gradio_image_annotation", reason="the app extra is not installed")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    browser_path = chromium_path()
    if browser_path is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium)")
    from replan.app.ui import build_app
    from replan.pipeline import RePlanPipeline

    server = _PlannerServer(REPLY)
    pipe = RePlanPipeline.from_pretrained("tiny", planner="openai", device="cpu",
                                          planner_kwargs={"base_url": server.url, "max_retries": 0})
    demo = build_app(pipe)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True)
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=browser_path, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1400})
            page.set_default_timeout(HANG_MS)
            page.set_default_navigation_timeout(HANG_MS)
            page.goto(f"http://127.0.0.1:{port}", wait_until="networkidle")
            # upload and plan
            page.locator("#annotator input[type=file]").set_input_files(str(ROOT / "assets/examples/desk.png"))
            page.wait_for_selector("#annotator a[download='desk.png']")  # uploaded to the app
            page.locator("#instruction textarea").fill("replace the cup that was used with a small cactus")
            page.locator("#ai-plan").click()
            page.wait_for_function("document.querySelector('#regions').innerText.includes('a small cactus')")
            # move box 1 by (+60, +20) image pixels in drag mode
            page.get_by_role("button", name="Drag boxes").click()
            canvas = page.locator("#annotator canvas").first.bounding_box()
            sx, sy = canvas["width"] / 640, canvas["height"] / 480
            x, y = canvas["x"] + 146 * sx, canvas["y"] + 256 * sy
            page.mouse.move(x, y)
            page.mouse.down()
            page.mouse.move(x + 30 * sx, y + 10 * sy, steps=5)
            page.mouse.move(x + 60 * sx, y + 20 * sy, steps=5)
            page.mouse.up()
            # the table shows the moved box once the drag reached the app (x1 was 86 before the drag)
            page.wait_for_function("(() => { const m = /a small cactus\\s+(\\d+)/.exec("
                                   "document.querySelector('#regions').innerText); return m && +m[1] > 120; })()")
            # edit the hint of region 1 (selected by default)
            page.locator("#hint textarea, #hint input").first.fill("a tall green cactus")
            page.locator("#set-hint").click()
            page.wait_for_function("document.querySelector('#regions').innerText.includes('a tall green cactus')")
            # toggle the matrix cell (N.BG → N.B1): 10 header checkboxes, then 9 per row; row N.BG = 7, col N.B1 = 2
            page.get_by_text("Advanced: attention rules and settings").click()
            cell = page.locator("#matrix input[type=checkbox]").nth(10 + 7 * 9 + 2)
            assert not cell.is_checked()
            cell.click()
            sync_api.expect(cell).to_be_checked(timeout=HANG_MS)
            # run
            page.locator("#run").click()
            page.wait_for_function("document.querySelector('#status').innerText.includes('Done')")
            page.wait_for_selector("#result img")
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "app.png"), full_page=True)
            browser.close()
    finally:
        demo.close()
        server.close()

    run = demo.replan_runs[-1]
    regions = run["plan"]["regions"]
    assert [r["hint"] for r in regions] == ["a tall green cactus", "keep this plant unchanged"]
    planned = [87 * 640 / 644, 197 * 480 / 476, 208 * 640 / 644, 311 * 480 / 476]
    moved = [planned[0] + 60, planned[1] + 20, planned[2] + 60, planned[3] + 20]
    assert regions[0]["bbox"] == pytest.approx(moved, abs=3)  # dragged on screen: a pixel or two of rounding
    assert regions[1]["bbox"] == pytest.approx([437 * 640 / 644, 117 * 480 / 476, 574 * 640 / 644, 314 * 480 / 476],
                                               abs=1)
    assert "Noise Background, Noise BBox 1" in run["rules"]  # the toggled cell
    assert "Noise Background, Noise BBox 2" not in run["rules"]  # the untouched one keeps the default
