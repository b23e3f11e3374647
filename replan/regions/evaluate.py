"""Score a run of edited images on Emu Edit or MagicBrush with the paper's metrics (spec §10, ``metrics.py``).

    python -m replan.regions.evaluate --benchmark emu --results_dir outputs/regions/emu \\
        --output_json outputs/regions/emu_metrics.json
    python -m replan.regions.evaluate --benchmark magicbrush --dataset /data/magicbrush/test \\
        --results_dir outputs/regions/magicbrush --output_json outputs/regions/magicbrush_metrics.json

Edited images are read from ``--results_dir``:

* Emu Edit: ``<DIR>/<idx>/result.png`` (edited from the dataset's source image).
* MagicBrush single-turn: ``<DIR>/<session>_<t>/result.png`` — turn t edited from the ground-truth input of turn t;
  every turn is compared with its GT output (the official "all turns" setting).
* MagicBrush multi-turn: ``<DIR>/<session>/turn_<t>.png`` — turn t edited from the model's own turn t−1 output
  (turn 1 from the session input); only the final turn is compared with the final GT output (official "final turn").

A sample without its image counts as missing (listed; excluded from the means — the means are over the scored
samples, and ``missing`` says how many were not). When nothing at all can be scored the command stops with one line
and exit status 2 (before loading any model when no result image exists). Emu Edit rows without an input (output)
caption get no CLIPdir (CLIPdir and CLIPout); those means are over the rows that have them
(``n_clip_dir``/``n_clip_out``).

Checkpoints (recorded in the output; hub ids or local directories, ``tiny`` = offline random stand-ins for tests):
CLIP ``openai/clip-vit-large-patch14`` for Emu Edit (spec §10.1's recommendation; InstructPix2Pix' ClipSimilarity),
``openai/clip-vit-base-patch32`` for MagicBrush (its official script); DINO ``facebook/dino-vits16`` for both.

Writes ``--output_json`` (per-sample values, means, Emu per-task means, missing ids, checkpoints, settings) and a
Markdown table in the paper's layout (Table 2 / Table 3, four decimals) next to it (``--output_md`` to choose), with
the paper's own row for reference.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

from PIL import Image

from replan.regions import benchmarks, metrics

logger = logging.getLogger("replan.regions.evaluate")

RESULT = "result.png"
EMU_KEYS = (("clip_dir", "CLIPdir"), ("clip_out", "CLIPout"), ("l1", "L1"), ("clip_img", "CLIPimg"),
            ("dino", "DINO"))
MAGICBRUSH_KEYS = (("l1", "L1"), ("l2", "L2"), ("clip_i", "CLIP-I"), ("dino", "DINO"))
PAPER = {  # the paper's best configuration, Tables 2 and 3 (spec §9)
    "emu": {"clip_dir": 0.1088, "clip_out": 0.2842, "l1": 0.0723, "clip_img": 0.8913, "dino": 0.8337},
    "single_turn": {"l1": 0.0657, "l2": 0.0212, "clip_i": 0.9383, "dino": 0.8589},
    "multi_turn": {"l1": 0.0972, "l2": 0.0332, "clip_i": 0.8985, "dino": 0.7962},
}
TINY_CLIP, TINY_DINO = "replan.testing.vision:save_tiny_clip", "replan.testing.vision:save_tiny_dino"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _resolve_model(name: str, builder: str, cache_name: str) -> str:
    if name != benchmarks.TINY:
        return name
    from replan.backbones.registry import build_offline

    return str(build_offline(builder, cache_name))


def load_scorers(clip: str, dino: str, device: str | None = None, batch_size: int = 16):
    clip_scorer = metrics.ClipScorer(_resolve_model(clip, TINY_CLIP, "tiny-clip"), device, batch_size)
    dino_scorer = metrics.DinoScorer(_resolve_model(dino, TINY_DINO, "tiny-dino"), device, batch_size)
    return clip_scorer, dino_scorer


def _open(path: Path) -> Image.Image | None:
    if not path.is_file():
        return None
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except OSError as e:
        logger.warning("unreadable image %s (%s); counted as missing", path, e)
        return None


def _means(samples: list[dict], keys) -> dict:
    out = {}
    for key, _ in keys:
        values = [s[key] for s in samples if s.get(key) is not None]
        out[key] = sum(values) / len(values) if values else None
        out[f"n_{key}"] = len(values)
    return out


# ---------------------------------------------------------------------------------------------------- benchmarks
def evaluate_emu(records, results_dir: Path, clip, dino) -> dict:
    samples, missing = [], []
    for r in records:
        edited = _open(results_dir / r.id / RESULT)
        if edited is None:
            missing.append(r.id)
            continue
        values = metrics.emu_metrics(r.source, edited, r.input_caption, r.output_caption, clip, dino)
        samples.append({"id": r.id, "task": r.task, **values})
    scores = {"count": len(samples), "missing": len(missing), "total": len(records), **_means(samples, EMU_KEYS)}
    by_task: dict[str, dict] = {}
    for task in sorted({s["task"] for s in samples if s["task"]}):
        subset = [s for s in samples if s["task"] == task]
        by_task[task] = {"count": len(subset), **_means(subset, EMU_KEYS)}
    return {"scores": {"emu": scores}, "breakdowns": {"task": by_task}, "samples": samples,
            "missing": {"emu": missing}}


def evaluate_magicbrush(records, results_dir: Path, clip, dino, settings=("single_turn", "multi_turn")) -> dict:
    out = {"scores": {}, "samples": [], "missing": {}}
    if "single_turn" in settings:
        samples, missing = [], []
        for r in records:
            generated = _open(results_dir / r.id / RESULT)
            if generated is None:
                missing.append(r.id)
                continue
            samples.append({"setting": "single_turn", "id": r.id, "session": r.session, "turn": r.turn,
                            **metrics.magicbrush_metrics(r.target, generated, clip, dino)})
        out["scores"]["single_turn"] = {"count": len(samples), "missing": len(missing), "total": len(records),
                                        **_means(samples, MAGICBRUSH_KEYS)}
        out["samples"] += samples
        out["missing"]["single_turn"] = missing
    if "multi_turn" in settings:
        finals = [r for r in records if r.turn == r.num_turns]
        samples, missing = [], []
        for r in finals:
            name = f"turn_{r.turn}.png"
            generated = _open(results_dir / r.session / name)
            if generated is None:
                missing.append(f"{r.session}/{name}")
                continue
            samples.append({"setting": "multi_turn", "id": r.session, "session": r.session, "turn": r.turn,
                            **metrics.magicbrush_metrics(r.target, generated, clip, dino)})
        out["scores"]["multi_turn"] = {"count": len(samples), "missing": len(missing), "total": len(finals),
                                       **_means(samples, MAGICBRUSH_KEYS)}
        out["samples"] += samples
        out["missing"]["multi_turn"] = missing
    return out


def result_paths(benchmark: str, records, results_dir: Path, settings=("single_turn", "multi_turn")) -> list[Path]:
    """Every result image the evaluation looks for (see the layout in the module docstring)."""
    if benchmark == "emu":
        return [results_dir / r.id / RESULT for r in records]
    paths = [results_dir / r.id / RESULT for r in records] if "single_turn" in settings else []
    if "multi_turn" in settings:
        paths += [results_dir / r.session / f"turn_{r.turn}.png" for r in records if r.turn == r.num_turns]
    return paths


def evaluate(benchmark: str, results_dir, dataset: str | None = None, split: str | None = None,
             clip: str | None = None, dino: str = metrics.DINO, device: str | None = None, limit: int | None = None,
             settings=("single_turn", "multi_turn"), batch_size: int = 16) -> dict:
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise ValueError(f"results_dir {results_dir} is not a directory")
    if benchmark == "emu":
        dataset, split = dataset or benchmarks.EMU_DATASET, split or benchmarks.EMU_SPLIT
        clip = clip or metrics.EMU_CLIP
        records = benchmarks.load_emu(dataset, split, limit)
    elif benchmark == "magicbrush":
        if not dataset:
            raise ValueError("MagicBrush needs --dataset: the test split is not on the hub (osunlp/MagicBrush holds "
                             "train/dev); pass the released test folder (edit_sessions.json) or a copy with the "
                             "hub columns")
        split = split or benchmarks.MAGICBRUSH_SPLIT
        clip = clip or metrics.MAGICBRUSH_CLIP
        records = benchmarks.load_magicbrush(dataset, split, limit)
    else:
        raise ValueError(f"benchmark must be 'emu' or 'magicbrush', got {benchmark!r}")
    paths = result_paths(benchmark, records, results_dir, settings)
    if not any(p.is_file() for p in paths):  # before any model loads
        example = paths[0].relative_to(results_dir) if paths else RESULT
        raise ValueError(f"nothing to score: none of the {len(paths)} result images exists under {results_dir} "
                         f"(expected e.g. {example}); generate the edits first or fix --results_dir")
    clip_scorer, dino_scorer = load_scorers(clip, dino, device, batch_size)
    if benchmark == "emu":
        body = evaluate_emu(records, results_dir, clip_scorer, dino_scorer)
    else:
        body = evaluate_magicbrush(records, results_dir, clip_scorer, dino_scorer, settings)
    if not any(s["count"] for s in body["scores"].values()):
        raise ValueError(f"nothing could be scored: the {len(paths)} result images under {results_dir} are missing "
                         f"or unreadable")
    return {
        "metric": f"regions_{benchmark}", "benchmark": benchmark, "results_dir": str(results_dir),
        "dataset": dataset, "split": split, "limit": limit,
        "checkpoints": {"clip": metrics.checkpoint_name(clip_scorer.checkpoint),
                        "dino": metrics.checkpoint_name(dino_scorer.checkpoint)},
        "preprocessing": {
            "clip": "checkpoint's CLIPImageProcessorPil (shorter side→crop, bicubic, CLIP mean/std); projected "
                    "embeddings, L2-normalised before CLIPdir differences",
            "dino": f"shorter side→{int(round(dino_scorer.crop * 256 / 224))} bicubic, centre crop "
                    f"{dino_scorer.crop}, ImageNet mean/std; last_hidden_state[:, 0]",
            "pixels": "RGB in [0,1]; edited/generated image resized (PIL bicubic) to the source (Emu) / GT "
                      "(MagicBrush) size; L1 = mean |d|, L2 = mean d^2"},
        **body,
    }


# ---------------------------------------------------------------------------------------------------- markdown
def _num(value) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{float(value):.4f}"


def _row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown(results: list[dict], labels: list[str] | None = None, paper: bool = True) -> str:
    """Table 2 (Emu Edit) or Table 3 (MagicBrush) layout for one or more runs of the same benchmark."""
    if not results:
        return ""
    benchmark = results[0]["benchmark"]
    labels = labels or [Path(str(r.get("results_dir", "run")).rstrip("/")).name for r in results]
    lines = [f"## {'Emu Edit' if benchmark == 'emu' else 'MagicBrush'} ({results[0].get('split')})", ""]
    if benchmark == "emu":
        lines += [_row(["Method", *(h for _, h in EMU_KEYS), "n", "missing"]),
                  "|:---|" + "---:|" * (len(EMU_KEYS) + 2)]
        for label, r in zip(labels, results):
            s = r["scores"]["emu"]
            lines.append(_row([label, *(_num(s.get(k)) for k, _ in EMU_KEYS), str(s["count"]), str(s["missing"])]))
        if paper:
            lines.append(_row(["paper: Ours (5M)", *(_num(PAPER["emu"][k]) for k, _ in EMU_KEYS), "–", "–"]))
        tasks = sorted({t for r in results for t in (r.get("breakdowns") or {}).get("task", {})})
        if tasks:
            lines += ["", "Per task:", "", _row(["Task", "Method", *(h for _, h in EMU_KEYS), "n"]),
                      "|:---|:---|" + "---:|" * (len(EMU_KEYS) + 1)]
            for task in tasks:
                for label, r in zip(labels, results):
                    s = r["breakdowns"]["task"].get(task)
                    if s:
                        lines.append(_row([task, label, *(_num(s.get(k)) for k, _ in EMU_KEYS), str(s["count"])]))
    else:
        lines += [_row(["Settings", "Method", *(h for _, h in MAGICBRUSH_KEYS), "n", "missing"]),
                  "|:---|:---|" + "---:|" * (len(MAGICBRUSH_KEYS) + 2)]
        for setting, title in (("single_turn", "Single-turn"), ("multi_turn", "Multi-turn")):
            for label, r in zip(labels, results):
                s = r["scores"].get(setting)
                if s is not None:
                    lines.append(_row([title, label, *(_num(s.get(k)) for k, _ in MAGICBRUSH_KEYS), str(s["count"]),
                                       str(s["missing"])]))
            if paper:
                lines.append(_row([title, "paper: Ours (5M)", *(_num(PAPER[setting][k]) for k, _ in MAGICBRUSH_KEYS),
                                   "–", "–"]))
    ckpts = sorted({json.dumps(r.get("checkpoints"), sort_keys=True) for r in results})
    lines += ["", "Checkpoints: " + "; ".join(ckpts) + ". Means over scored samples; missing images excluded."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m replan.regions.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--benchmark", required=True, choices=("emu", "magicbrush"))
    p.add_argument("--results_dir", required=True)
    p.add_argument("--dataset", default=None, help="hub id or local copy (default emu: facebook/emu_edit_test_set; "
                                                   "magicbrush: required); 'tiny' = offline fixture")
    p.add_argument("--split", default=None, help="default: test")
    p.add_argument("--clip", default=None, help="CLIP checkpoint (default emu: openai/clip-vit-large-patch14, "
                                                "magicbrush: openai/clip-vit-base-patch32); 'tiny' for tests")
    p.add_argument("--dino", default=metrics.DINO, help="DINO checkpoint (AutoModel); 'tiny' for tests")
    p.add_argument("--setting", default="both", choices=("single", "multi", "both"), help="MagicBrush settings")
    p.add_argument("--device", default=None)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--limit", type=int, default=None, help="first N rows (Emu) / sessions (MagicBrush)")
    p.add_argument("--label", default=None, help="the run's name in the table (default: results_dir's name)")
    p.add_argument("--output_json", required=True)
    p.add_argument("--output_md", default=None, help="default: output_json with .md")
    return p


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    settings = {"single": ("single_turn",), "multi": ("multi_turn",), "both": ("single_turn", "multi_turn")}
    try:
        result = evaluate(args.benchmark, args.results_dir, args.dataset, args.split, args.clip, args.dino,
                          args.device, args.limit, settings[args.setting], args.batch_size)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.output_json)
    _write(out, json.dumps(result, indent=1, allow_nan=False))
    md = markdown([result], [args.label] if args.label else None)
    _write(Path(args.output_md) if args.output_md else out.with_suffix(".md"), md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
