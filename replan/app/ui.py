"""The Gradio page: plan, edit the plan by hand, control attention, run.

Built from stock Gradio components plus ``gradio_image_annotation`` for the boxes (drag to move, handles to resize,
draw on empty space to add; the box label is its hint). One edit runs at a time (Gradio's queue); the others wait.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import gradio as gr
from gradio_image_annotation import image_annotator

from replan.app.callbacks import (
    AppError,
    annotator_to_plan,
    as_image,
    default_matrix,
    kept_region_count,
    mask_preview,
    matrix_headers,
    matrix_to_rules,
    plan_to_annotator,
    resize_matrix,
)
from replan.pipeline import no_regions_note
from replan.plan import RegionPlan, draw_overlay

logger = logging.getLogger(__name__)

EXAMPLES = Path(__file__).resolve().parents[2] / "assets" / "examples"


def _examples() -> dict[str, tuple[Path, str]]:
    out = {}
    for image in sorted(EXAMPLES.glob("*.png")):
        text = image.with_suffix(".txt")
        out[image.stem] = (image, text.read_text().strip() if text.is_file() else "")
    return out


def build_app(pipe, title: str = "RePlan", attention: str = "dense") -> gr.Blocks:
    """The demo for a loaded ``RePlanPipeline`` (its planner may be None: then AI Plan explains how to get one).

    ``attention``: the mask implementation of every run (``dense`` or ``flex``)."""
    spec = pipe.editor.spec
    has_imgp = spec.has_image_prompt
    runs: list[dict] = []  # what each Run submitted, newest last (exposed as demo.replan_runs)
    entry = spec.defaults("app")
    examples = _examples()

    def fail(e: Exception):
        message = str(e)
        gr.Warning(message)
        return f"⚠️ {message}"

    def regions_view(value):
        boxes = (value or {}).get("boxes") or []
        rows = [[i, b.get("label", ""), *(int(round(b[k])) for k in ("xmin", "ymin", "xmax", "ymax"))]
                for i, b in enumerate(boxes, 1)]
        choices = [f"{i}: {b.get('label', '')}"[:60] for i, b in enumerate(boxes, 1)]
        return rows, gr.update(choices=choices, value=choices[0] if choices else None), len(boxes)

    def on_annotator_change(value, matrix):
        rows, pick, _ = regions_view(value)
        n = kept_region_count(value)  # the matrix covers the regions that will run, numbered as they will run
        new = resize_matrix(matrix, n, has_imgp)
        return rows, pick, gr.update(value=new, headers=matrix_headers(n, has_imgp))

    def load_example(name):
        if name not in examples:
            return gr.update(), gr.update(), ""
        image, text = examples[name]
        return {"image": str(image), "boxes": []}, text, f"Loaded example **{name}**."

    def ai_plan(value, instruction):
        try:
            image = as_image((value or {}).get("image"))
            if not (instruction or "").strip():
                raise AppError("Type an instruction for AI Plan (or draw boxes and write hints yourself).")
            if pipe.planner is None:
                raise AppError("No planner is loaded: start the app with --vlm_ckpt_path or --planner openai.")
            plan, _ = pipe.plan(image, instruction)
        except (AppError, ValueError) as e:
            return gr.update(), gr.update(), fail(e)
        except Exception as e:  # a planner that cannot be reached must not take the app down
            logger.exception("planning failed")
            return gr.update(), gr.update(), fail(RuntimeError(f"planning failed: {e}"))
        note = f"Planned {len(plan.regions)} region(s)."
        made_by = pipe.planner.provenance()  # which prompt template produced the plan (name and SHA-256)
        note += (f" Prompt template {made_by['template']} (sha256 {made_by['template_sha256'][:12]}), boxes read in "
                 f"the {made_by['box_frame']} frame.")
        why = no_regions_note(plan)
        if why:
            note += f" {why[0].upper()}{why[1:]}: draw boxes and write hints by hand."
        return plan_to_annotator(image, plan), plan.global_prompt, note

    def pick_region(value, pick):
        boxes = (value or {}).get("boxes") or []
        index = _index(pick)
        return boxes[index - 1].get("label", "") if index and index <= len(boxes) else ""

    def set_hint(value, pick, hint):
        boxes = (value or {}).get("boxes") or []
        index = _index(pick)
        if not index or index > len(boxes):
            return gr.update(), fail(AppError("Select a region first."))
        if not (hint or "").strip():
            return gr.update(), fail(AppError("A hint cannot be empty; delete the region instead."))
        boxes[index - 1]["label"] = hint.strip()
        return {**value, "boxes": boxes}, f"Hint of region {index} updated."

    def delete_region(value, pick):
        boxes = list((value or {}).get("boxes") or [])
        index = _index(pick)
        if not index or index > len(boxes):
            return gr.update(), fail(AppError("Select a region first."))
        del boxes[index - 1]
        return {**value, "boxes": boxes}, f"Region {index} deleted; the others were renumbered."

    def download_plan(value, global_prompt):
        try:
            plan, _ = annotator_to_plan(value, global_prompt)
        except (AppError, ValueError) as e:
            fail(e)
            return None
        path = Path(tempfile.mkdtemp(prefix="replan-plan-")) / "plan.json"
        plan.save(path)
        return str(path)

    def upload_plan(value, file):
        try:
            image = as_image((value or {}).get("image"))
            if file is None:
                raise AppError("Choose a plan JSON file.")
            plan = RegionPlan.load(file if isinstance(file, str) else file.name)
            note = f"Loaded a plan with {len(plan.regions)} region(s)."
            if plan.image_size and tuple(plan.image_size) != image.size:
                plan = plan.rescaled(image.size)
                note += " Its boxes were rescaled to this image."
            plan.validate(image.size)  # boxes partly outside stay as they are: expanded, then clamped (official)
        except (AppError, ValueError) as e:
            return gr.update(), gr.update(), fail(AppError(f"That plan cannot be used: {e}"))
        return plan_to_annotator(image, plan), plan.global_prompt, note

    def preview(value, global_prompt, matrix, expand):
        try:
            plan, _ = annotator_to_plan(value, global_prompt)
            image = as_image(value["image"])
            rules = matrix_to_rules(matrix, len(plan.regions), has_imgp)
            w, h = pipe.editor.generation_size(image.size)
            patch = pipe.editor.patch
            grid = (h // patch, w // patch)
            return mask_preview(image, plan, rules, grid, has_imgp, float(expand), spec.expand_mode), \
                "Mask preview updated."
        except (AppError, ValueError) as e:
            return None, fail(e)

    def run(value, global_prompt, matrix, switch, expand, steps, guidance, seed, progress=gr.Progress()):  # noqa: B008
        try:
            plan, notes = annotator_to_plan(value, global_prompt)
            image = as_image(value["image"])
            steps = int(steps)
            options = dict(steps=steps, seed=int(seed), expand=float(expand), entry="app", attention=attention)
            if plan.regions:
                options.update(rules=matrix_to_rules(matrix, len(plan.regions), has_imgp), switch=float(switch))
            if guidance is not None and spec.guidance is not None:
                options["guidance"] = float(guidance)

            def step(_pipe, i, _t, kwargs):
                progress((i + 1, steps), desc=f"step {i + 1}/{steps}")
                return kwargs

            out = pipe(image, plan=plan, callback=step, **options)
        except (AppError, ValueError) as e:
            return gr.update(), gr.update(), gr.update(), fail(e)
        submitted = {"plan": out.plan.to_dict(), "expanded_boxes": [list(b) for b in out.edit.boxes],
                     "steps": steps, "switch": float(switch), "expand": float(expand), "seed": int(seed),
                     "rules": sorted(f"{q}, {k}" for q, k in options["rules"].allowed) if plan.regions else None}
        runs.append(submitted)
        kind = f"{len(plan.regions)} region(s)" if plan.regions else "global prompt only (stock backbone)"
        if "hint_padding" in out.edit.extras:
            notes = [*notes, f"Hint padding {out.edit.extras['hint_padding']}."]
        note = f"Done in {out.timings['edit']:.1f}s — {kind}." + "".join(f"\n- {n}" for n in notes)
        return out.image, draw_overlay(image, out.plan, boxes=out.edit.boxes), submitted, note

    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"# {title}\nBackbone **{spec.name}** — {spec.description}")
        with gr.Row():
            with gr.Column(scale=3):
                annot = image_annotator(label="Image and regions (drag to move, handles to resize, draw to add)",
                                        image_type="numpy", use_default_label=True, elem_id="annotator")
                with gr.Row():
                    example = gr.Dropdown(choices=list(examples), label="Example", value=None, scale=2)
                    instruction = gr.Textbox(label="Instruction", lines=2, scale=5, elem_id="instruction")
                plan_btn = gr.Button("AI Plan", elem_id="ai-plan")
                global_prompt = gr.Textbox(label="Global Prompt", lines=2, elem_id="global-prompt")
                regions = gr.Dataframe(headers=["#", "hint", "x1", "y1", "x2", "y2"], label="Regions",
                                       interactive=False, elem_id="regions")
                with gr.Row():
                    pick = gr.Dropdown(label="Selected region", choices=[], elem_id="region-pick", scale=2)
                    hint = gr.Textbox(label="Hint of the selected region", elem_id="hint", scale=4)
                with gr.Row():
                    set_hint_btn = gr.Button("Set hint", elem_id="set-hint")
                    delete_btn = gr.Button("Delete region", elem_id="delete-region")
                with gr.Row():
                    download = gr.DownloadButton("Download plan (JSON)", elem_id="download-plan")
                    upload = gr.File(label="Upload a plan (JSON)", file_types=[".json"], elem_id="upload-plan")
            with gr.Column(scale=3):
                run_btn = gr.Button("Run Editing", variant="primary", elem_id="run")
                status = gr.Markdown(elem_id="status")
                result = gr.Image(label="Result", type="pil", elem_id="result", interactive=False)
                overlay = gr.Image(label="Plan as executed (expanded boxes)", type="pil", interactive=False)
                with gr.Accordion("Advanced: attention rules and settings", open=False):
                    gr.Markdown("Query row → key column. Before the switch step these rules apply; after it, the "
                                "default rules. Main: global prompt, Hi: hint i, N.Bi / I.Bi: noise / image patches "
                                "of box i, N.BG / I.BG: background." + (" ImgP: image prompt." if has_imgp else ""))
                    matrix = gr.Dataframe(value=default_matrix(0, has_imgp), headers=matrix_headers(0, has_imgp),
                                          datatype="bool", interactive=True, elem_id="matrix", label="Matrix")
                    reset = gr.Button("Reset matrix")
                    switch = gr.Slider(0, 1, value=entry.switch, step=0.05, label="Rule switch ratio")
                    expand = gr.Slider(0, 1, value=entry.expand, step=0.05, label="Expand value")
                    steps = gr.Slider(1, 100, value=spec.steps, step=1, label="Steps")
                    guidance = gr.Number(value=spec.guidance, label="Guidance (embedded; FLUX.1 Kontext only)")
                    seed = gr.Number(value=0, precision=0, label="Seed")
                    preview_btn = gr.Button("Preview mask")
                    mask = gr.Image(label="Which patches see which hint", type="pil", interactive=False)
                with gr.Accordion("Last run (the submitted plan and rules)", open=False):
                    submitted = gr.JSON(elem_id="submitted")

        example.change(load_example, example, [annot, instruction, status])
        annot.change(on_annotator_change, [annot, matrix], [regions, pick, matrix])
        plan_btn.click(ai_plan, [annot, instruction], [annot, global_prompt, status])
        pick.change(pick_region, [annot, pick], hint)
        set_hint_btn.click(set_hint, [annot, pick, hint], [annot, status])
        delete_btn.click(delete_region, [annot, pick], [annot, status])
        download.click(download_plan, [annot, global_prompt], download)
        upload.upload(upload_plan, [annot, upload], [annot, global_prompt, status])
        reset.click(lambda v: default_matrix(kept_region_count(v), has_imgp), annot, matrix)
        preview_btn.click(preview, [annot, global_prompt, matrix, expand], [mask, status])
        run_btn.click(run, [annot, global_prompt, matrix, switch, expand, steps, guidance, seed],
                      [result, overlay, submitted, status])
    demo.queue(default_concurrency_limit=1, max_size=16)
    demo.replan_runs = runs
    demo.replan_pipe = pipe
    return demo


def _index(pick) -> int | None:
    try:
        return int(str(pick).split(":", 1)[0])
    except (TypeError, ValueError):
        return None


def submitted_plan(payload: str | dict) -> RegionPlan:
    """The plan inside the 'Last run' JSON (for tests and scripts)."""
    data = json.loads(payload) if isinstance(payload, str) else payload
    return RegionPlan.from_dict(data["plan"])
