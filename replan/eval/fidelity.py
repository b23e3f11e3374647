"""Pixel fidelity of a generation run: PSNR / SSIM (/ LPIPS) against a reference run, and background preservation.

    python -m replan.eval.fidelity --run outputs/eval/replan_flux_kontext \\
        --reference outputs/eval/baseline_flux_kontext --output_json outputs/eval/fidelity_replan_flux.json
    python -m replan.eval.fidelity --run outputs/eval/replan_flux_kontext --dataset TainU/IV-Edit \\
        --output_json outputs/eval/background_replan_flux.json

Two independent measurements, each on the samples of ``--run`` that have a ``result.png``:

* ``reference`` (with ``--reference DIR``): the run's result against the reference run's result of the same image id
  (e.g. an accelerated or modified pipeline against the stock one, as RegionE reports): PSNR, SSIM and, when
  available, LPIPS, plus ``ssim_7x7``: SSIM exactly as RegionE computes it (skimage's defaults: 7×7 uniform window),
  to set beside RegionE's tables (``ssim``, torchmetrics' 11-px Gaussian window, is not comparable to them); and
  ``speed``: the mean editor time of both runs (each sample's ``timings_s.edit``) and the
  speed-up, mean reference time / mean run time, with the passes an accelerated run recorded.
* ``original`` and ``background`` (with a dataset: ``--dataset``, else the one in the run's ``run_config.json``): the
  result against the ORIGINAL input image — over the whole image, and over the pixels outside the plan's boxes only
  (``plan.json`` boxes in original pixels; ``--boxes expanded`` uses the expanded boxes the editor used, from
  ``config.json``). A pixel is inside a box when any part of it is (boxes are rounded outwards). Background PSNR is
  computed from the mean squared error over the outside pixels; background SSIM is the mean of the SSIM map over
  them (the 11-px Gaussian window near a box still sees some of the box). A sample whose boxes cover the whole
  image has no background (``null``).

PSNR is in dB with data range 255 (8-bit RGB); identical images give ``inf`` (written as ``Infinity`` in the JSON).
Aggregates: ``psnr`` is the mean over samples (``inf`` if any sample is identical), ``psnr_finite`` the mean over
the samples that differ, ``identical`` their count; ``ssim``/``lpips`` are plain means.

LPIPS (torchmetrics, AlexNet) needs torchvision and pretrained weights. ``--lpips auto`` (default) computes it only
when torchvision is installed and the weights are already in the torch hub cache, and otherwise records why it was
skipped; ``--lpips on`` downloads the weights if needed (and fails clearly without torchvision); ``off`` skips it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from replan.eval.image_metrics import (  # noqa: F401  (re-exported: the metrics with the runs they measure)
    LPIPS,
    LPIPS_MODES,
    LPIPS_NETS,
    box_mask,
    masked_mean,
    psnr,
    ssim,
    ssim_7x7,
    ssim_full,
    to_tensor,
    unavailable_reason,
)
from replan.io import check_writable, write_atomically

logger = logging.getLogger("replan.eval.fidelity")

RESULT = "result.png"


# ---------------------------------------------------------------------------------------------------- runs
def result_ids(run: Path) -> list[str]:
    """Image ids of a run's finished samples (folders with result.png), sorted numerically when possible."""
    if not run.is_dir():
        raise ValueError(f"run directory {run} does not exist")
    ids = [p.name for p in run.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / RESULT).is_file()]
    return sorted(ids, key=lambda s: (0, int(s), s) if s.isdigit() else (1, 0, s))


def load_result(run: Path, image_id: str) -> Image.Image:
    with Image.open(run / image_id / RESULT) as im:
        return im.convert("RGB")


def sample_boxes(run: Path, image_id: str, size: tuple[int, int], source: str = "plan") -> list:
    """The sample's boxes in the original image's pixels: plan.json (``plan``) or config.json (``expanded``)."""
    from replan.plan import RegionPlan

    folder = run / image_id
    if source == "expanded":
        path = folder / "config.json"
        if not path.is_file():
            raise ValueError(f"{path} is missing (needed for --boxes expanded)")
        try:
            return json.loads(path.read_text(encoding="utf-8"))["edit"]["boxes"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path} has no edit.boxes: {e}") from None
    path = folder / "plan.json"
    if not path.is_file():
        return []  # no plan: nothing is protected, the whole image is background
    plan = RegionPlan.load(path)
    if plan.image_size is not None and tuple(plan.image_size) != tuple(size):
        plan = plan.rescaled(size)
    return [list(b) for b in plan.boxes]


def _run_dataset(run: Path) -> tuple[str | None, str | None]:
    path = run / "run_config.json"
    if not path.is_file():
        return None, None
    try:
        settings = json.loads(path.read_text(encoding="utf-8")).get("settings", {})
    except (ValueError, AttributeError):
        return None, None
    return settings.get("dataset"), settings.get("split")


def measure(run: str | Path, reference: str | Path | None = None, dataset: str | None = None,
            split: str | None = None, boxes: str = "plan", lpips: str = "auto", lpips_net: str = "alex",
            device: str = "cpu", limit: int | None = None) -> dict:
    """Compute every available measurement for ``run`` (see the module docstring); returns the report dict."""
    from replan.eval.dataset import load_samples

    run = Path(run)
    if boxes not in ("plan", "expanded"):
        raise ValueError(f"boxes must be plan or expanded, got {boxes!r}")
    ids = result_ids(run)
    if limit is not None:
        ids = ids[:limit]
    implicit = dataset is None
    if implicit:
        dataset, run_split = _run_dataset(run)
        split = split or run_split
    split = split or "test"
    if reference is None and dataset is None:
        raise ValueError("nothing to compare with: pass --reference DIR and/or --dataset (or keep the run's "
                         "run_config.json, which names its dataset)")
    report = {"metric": "fidelity", "run": str(run), "reference": str(reference) if reference else None,
              "dataset": dataset, "split": split if dataset else None, "boxes": boxes}
    missing: dict[str, list] = {}
    originals = {}
    if dataset is not None:
        try:
            samples = load_samples(dataset, split)
        except (ValueError, OSError) as e:
            if not (implicit and reference is not None):
                raise ValueError(f"cannot load the inputs from dataset {dataset!r} (split {split!r}): {e}") from e
            # the dataset only came from run_config.json: measure against the reference alone
            logger.warning("dataset %s (from run_config.json) cannot be loaded (%s); no input/background metrics",
                           dataset, e)
            report["inputs_skipped"] = f"dataset {dataset!r} from run_config.json cannot be loaded: {e}"
            samples = []
        else:
            known = {s.image_id for s in samples}
            missing["not_in_dataset"] = [i for i in ids if i not in known]
        originals = {s.image_id: s.image for s in samples}
    ref_ids = set()
    if reference is not None:
        reference = Path(reference)
        ref_ids = set(result_ids(reference))
        missing["not_in_reference"] = [i for i in ids if i not in ref_ids]
        missing["not_in_run"] = sorted(ref_ids - set(ids))
    lp = LPIPS(lpips if reference is not None else "off", lpips_net, device)
    if reference is not None:
        report["lpips"] = lp.status()

    rows = []
    for image_id in ids:
        row = {"image_id": image_id}
        result = load_result(run, image_id)
        a = to_tensor(result).to(device)
        if reference is not None and image_id in ref_ids:
            ref = load_result(reference, image_id)
            if ref.size != result.size:
                row["reference"] = {"error": f"size {result.size} differs from the reference's {ref.size}"}
            else:
                b = to_tensor(ref).to(device)
                row["reference"] = {"psnr": psnr(a, b), "ssim": ssim(a, b), "ssim_7x7": ssim_7x7(a, b),
                                    "lpips": lp(a, b)}
        if image_id in originals:
            original = originals[image_id]
            if original.size != result.size:
                row["original"] = {"error": f"size {result.size} differs from the input's {original.size}"}
            else:
                b = to_tensor(original).to(device)
                value, full = ssim_full(a, b)
                row["original"] = {"psnr": psnr(a, b), "ssim": value}
                try:
                    sample_box_list = sample_boxes(run, image_id, original.size, boxes)
                except ValueError as e:
                    row["background"] = {"error": str(e)}
                else:
                    outside = ~box_mask(original.size, sample_box_list)
                    row["background"] = {"psnr": psnr(a, b, outside), "ssim": masked_mean(full, outside),
                                         "fraction": float(outside.float().mean()), "boxes": len(sample_box_list)}
        rows.append(row)
    report["count"] = len(rows)
    report["aggregate"] = {group: aggregate(rows, group) for group in ("reference", "original", "background")
                           if any(group in r for r in rows)}
    if reference is not None:
        report["speed"] = speed(run, reference, [i for i in ids if i in ref_ids])
    report["missing"] = {k: v for k, v in missing.items() if v}
    report["samples"] = rows
    return report


def aggregate(rows: list[dict], group: str) -> dict:
    entries = [r[group] for r in rows if group in r and "error" not in r[group]]
    out = {"count": len(entries), "errors": sum(1 for r in rows if group in r and "error" in r[group])}
    values = [e["psnr"] for e in entries if e.get("psnr") is not None]
    finite = [v for v in values if math.isfinite(v)]
    out["psnr"] = float(np.mean(values)) if values else None
    out["psnr_finite"] = float(np.mean(finite)) if finite else None
    out["identical"] = len(values) - len(finite)
    for key in ("ssim", "ssim_7x7", "lpips"):
        vals = [e[key] for e in entries if e.get(key) is not None]
        if vals or key == "ssim":
            out[key] = float(np.mean(vals)) if vals else None
    if group == "background":
        out["no_background"] = sum(1 for e in entries if e.get("psnr") is None)
    return out


def sample_record(run: Path, image_id: str) -> dict:
    """The sample's config.json (``{}`` when missing or unreadable)."""
    try:
        return json.loads((run / image_id / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def speed(run: Path, reference: Path, ids: list[str]) -> dict:
    """Editor wall time of ``run`` against ``reference`` over the samples both timed (``timings_s.edit`` of each
    config.json, the planner excluded), as RegionE reports it: speed-up = mean reference time / mean run time.
    With acceleration, the mean passes and edited share the run recorded."""
    pairs, accel = [], []
    for image_id in ids:
        a = sample_record(run, image_id)
        b = sample_record(reference, image_id)
        ta, tb = (a.get("timings_s") or {}).get("edit"), (b.get("timings_s") or {}).get("edit")
        if ta and tb:
            pairs.append((float(ta), float(tb)))
        if isinstance(a.get("accel"), dict):
            accel.append(a["accel"])
    out: dict = {"count": len(pairs)}
    if pairs:
        run_s, ref_s = (float(np.mean(v)) for v in zip(*pairs))
        out.update(run_edit_s=run_s, reference_edit_s=ref_s, speedup=ref_s / run_s if run_s > 0 else None)
    if accel:
        out["accel"] = {"mode": accel[0].get("mode"), "samples": len(accel)}
        for key in ("full_passes", "edited_passes", "skipped_passes", "query_tokens"):
            vals = [a[key] for a in accel if isinstance(a.get(key), (int, float))]
            if vals:
                out["accel"][key] = float(np.mean(vals))
        shares = [a["edited_tokens"] / a["tokens"] for a in accel if a.get("tokens") and a.get("edited_tokens")
                  is not None]
        if shares:
            out["accel"]["edited_share"] = float(np.mean(shares))
    return out


# ---------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m replan.eval.fidelity", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a generation output directory (<id>/result.png)")
    ap.add_argument("--reference", help="a reference run to compare with, image id by image id")
    ap.add_argument("--dataset", help="the dataset of the original inputs (default: the run's run_config.json)")
    ap.add_argument("--split", help="dataset split (default: the run's, else test)")
    ap.add_argument("--boxes", choices=["plan", "expanded"], default="plan",
                    help="which boxes delimit the background: the plan's, or the expanded ones the editor used")
    ap.add_argument("--lpips", choices=LPIPS_MODES, default="auto")
    ap.add_argument("--lpips_net", choices=LPIPS_NETS, default="alex")
    ap.add_argument("--device", default="cpu", help="device for the metrics (cuda: much faster SSIM/LPIPS)")
    ap.add_argument("--limit", type=int, help="first N samples of the run")
    ap.add_argument("--output_json", required=True)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    out = Path(args.output_json)
    try:
        check_writable(out.parent, "the --output_json folder")
        report = measure(args.run, args.reference, args.dataset, args.split, args.boxes, args.lpips,
                         args.lpips_net, args.device, args.limit)
        write_atomically(out.parent, {out.name: lambda p: p.write_text(json.dumps(report, indent=2) + "\n")})
    except (ValueError, OSError, ImportError) as e:  # OSError: also an unwritable output (the report is rescued)
        print(f"error: {e}", file=sys.stderr)
        return 2
    for group, agg in report["aggregate"].items():
        parts = [f"{k} {_fmt(agg.get(k))}" for k in ("psnr", "psnr_finite", "ssim", "ssim_7x7", "lpips") if k in agg]
        print(f"{group}: n={agg['count']} " + ", ".join(parts), file=sys.stderr)
    sp = report.get("speed") or {}
    if sp.get("speedup"):
        print(f"speed: n={sp['count']} edit {sp['run_edit_s']:.3f}s vs {sp['reference_edit_s']:.3f}s "
              f"(speed-up {sp['speedup']:.2f}x)", file=sys.stderr)
    if report.get("lpips", {}).get("status") == "skipped":
        print(f"lpips skipped: {report['lpips']['reason']}", file=sys.stderr)
    for key, ids in report["missing"].items():
        print(f"{key}: {len(ids)} sample(s)", file=sys.stderr)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


if __name__ == "__main__":
    sys.exit(main())
