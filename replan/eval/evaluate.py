"""Judge IV-Edit results with a VLM and score them (step 2 of the benchmark, after ``replan.eval.generate``).

    python -m replan.eval.evaluate --results_dir output/replan_flux --judge genai --judge_model gemini-2.5-pro \\
        --output_json output/replan_flux.eval.json                       # GEMINI_API_KEY (or --vertex)
    python -m replan.eval.evaluate --results_dir output/replan_flux --judge openai --judge_model Qwen/Qwen2.5-VL-72B \\
        --base_url http://localhost:8000/v1 --api_key EMPTY --concurrency 8

Input: ``<results_dir>/<image_id>/result.png`` (``final_result.png``, the official name, is also read) for every
sample of the dataset split; a sample without one counts as 0 (status ``missing``). Each sample's four dimensions are
judged in order and cached, one atomic write per finished call, in ``<results_dir>/<image_id>/judge-<model>.json``
(the results, the model, the template hashes and a hash of exactly what the judge saw). A re-run reuses every
finished call whose inputs are unchanged and asks only the rest, so an interrupted run resumes where it stopped. A
call that failed (after retries) is recorded but asked again on the next run; a reply with a score is never asked
again, whatever its value.

Rubrics: replan's wording of the official ones by default; ``--prompts_dir`` takes a folder of the four files, e.g.
the official ones (``python -m replan.templates fetch``). Scores: ``--score_parse official`` (default) uses a numeric
score as given, as official (an off-scale 4 for effect counts 4); ``strict`` counts it as a failed call. The output
records each rubric's name and SHA-256 and how many off-scale scores were used (or failed).

Output: ``--output_json`` with every sample (scores, overall, weighted, status ``ok``/``failed``/``missing``), the
aggregate over all samples (failures as 0, as official), the same over fully judged samples, and breakdowns by
category; the table is printed with 2 decimals. Exit status 2 on configuration errors (no key, bad flags, no
dataset), before any judge call; failed samples do not change the exit status.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from replan.eval.dataset import DEFAULT_DATASET, DEFAULT_SPLIT, EvalSample, load_samples
from replan.eval.judges import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_MODEL,
    SCORE_PARSE,
    Judge,
    JudgeConfigError,
    JudgeParseError,
    JudgeResult,
    build_parts,
    describe_templates,
    load_templates,
    make_judge,
    parts_digest,
    template_hash,
)
from replan.eval.scoring import DIMENSIONS, format_table, sample_metrics, status_of, summarize
from replan.images import to_rgb
from replan.io import OutputError, check_writable, write_file, write_outputs

logger = logging.getLogger(__name__)

RESULT_NAMES = ("result.png", "final_result.png")


def sanitise(model: str) -> str:
    """A file-name-safe form of a model name: ``Qwen/Qwen2.5-VL-72B`` → ``Qwen_Qwen2.5-VL-72B``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model).strip("._") or "model"


def cache_path(results_dir: str | Path, image_id: str, model: str) -> Path:
    return Path(results_dir) / str(image_id) / f"judge-{sanitise(model)}.json"


def write_json_atomic(path: Path, data) -> None:
    """``replan.io.write_file``: staged beside ``path``, synced, renamed over it — a reader never sees half a file."""
    def dump(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())

    write_file(path, dump)


def read_cache(path: Path, model: str) -> dict[str, dict]:
    """``{dimension: entry}`` from a cache file; ``{}`` with a warning when it is unreadable or another model's."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("dimensions"), dict):
            raise ValueError("not a judge cache object")
    except (OSError, ValueError, RecursionError) as e:
        logger.warning("judge cache %s is corrupt (%s); judging the sample again", path, e)
        return {}
    if data.get("model") != model:
        logger.warning("judge cache %s is for model %r, not %r; judging the sample again", path, data.get("model"),
                       model)
        return {}
    return {d: e for d, e in data["dimensions"].items() if d in DIMENSIONS and isinstance(e, dict)}


def find_result(results_dir: Path, image_id: str, names=RESULT_NAMES) -> Path | None:
    for name in names:
        path = results_dir / str(image_id) / name
        if path.is_file():
            return path
    return None


def judge_sample(sample: EvalSample, results_dir: Path, judge: Judge, templates: dict[str, str],
                 names=RESULT_NAMES) -> dict:
    """Judge (or reuse the cached judgements of) one sample; the sample record for the output JSON."""
    record = _new_record(sample)
    path = find_result(results_dir, sample.image_id, names)
    if path is None:
        folder = results_dir / str(sample.image_id)
        record["errors"]["image"] = f"no {' or '.join(names)} in {folder}"
        error_file = folder / "error.txt"  # replan.eval.generate's record of a failed sample
        if error_file.is_file():
            first = error_file.read_text(encoding="utf-8", errors="replace").strip().split("\n", 1)[0]
            record["errors"]["image"] += f" (generation failed: {first[:300]})"
        return _finish(record, missing=True)
    try:
        with Image.open(path) as im:
            edited = to_rgb(im).copy()  # copy() reads the pixels while the file is open
    except (OSError, UnidentifiedImageError, ValueError) as e:
        logger.warning("sample %s: cannot read %s (%s)", sample.image_id, path, e)
        record["errors"]["image"] = f"cannot read {path}: {e}"
        return _finish(record)
    cache_file = cache_path(results_dir, sample.image_id, judge.model)
    entries = read_cache(cache_file, judge.model)
    for dim in DIMENSIONS:
        parts = build_parts(dim, templates[dim], sample.instruction, sample.referring_expression, sample.image, edited)
        digest = parts_digest(dim, parts)
        entry = entries.get(dim)
        cached = _reread(judge, dim, entry) if entry and entry.get("input_sha256") == digest else None
        if cached is not None:  # keep the call's own record (attempts, seconds); the reading may have changed
            entry = {**entry, **{k: getattr(cached, k) for k in ("score", "reasoning", "error", "off_scale")}}
            record["cached"] += 1
        else:
            if entry and entry.get("score") is not None:
                logger.info("sample %s %s: the judge's inputs changed; judging again", sample.image_id, dim)
            try:
                result = judge.judge(dim, parts)
            except JudgeConfigError:
                raise
            except Exception as e:  # a bug or an odd reply must not stop the batch: this call counts as failed
                logger.exception("sample %s %s: the judge call raised", sample.image_id, dim)
                result = JudgeResult(None, error=f"{type(e).__name__}: {e}", model=judge.model)
            entry = {**result.to_dict(), "input_sha256": digest, "template_sha256": template_hash(templates[dim])}
            entries[dim] = entry
            cache = {"image_id": sample.image_id, "model": judge.model, "judge": judge.name,
                     "templates_sha256": {d: template_hash(templates[d]) for d in DIMENSIONS},
                     "dimensions": {d: entries[d] for d in DIMENSIONS if d in entries}}
            write_json_atomic(cache_file, cache)
        record["scores"][dim] = entry.get("score")
        record["reasoning"][dim] = entry.get("reasoning", "")
        if entry.get("off_scale"):
            record["off_scale"].append(dim)
        if entry.get("error"):
            record["errors"][dim] = entry["error"]
    return _finish(record)


def _reread(judge: Judge, dimension: str, entry: dict) -> JudgeResult | None:
    """A cached reply read again with the judge's current ``score_parse``; None when it holds no score (ask again)."""
    raw = entry.get("raw")
    if not isinstance(raw, str):
        return None
    try:
        return judge.read(dimension, raw)
    except JudgeParseError:
        return None


def _new_record(sample: EvalSample) -> dict:
    return {"image_id": sample.image_id, "instruction": sample.instruction,
            "referring_expression": sample.referring_expression, "categories": dict(sample.categories),
            "scores": dict.fromkeys(DIMENSIONS), "reasoning": {}, "errors": {}, "off_scale": [], "cached": 0}


def _failed_record(sample: EvalSample, error: str) -> dict:
    record = _new_record(sample)
    record["errors"]["sample"] = error
    return _finish(record)


def _finish(record: dict, missing: bool = False) -> dict:
    scores = None if missing else record["scores"]
    metrics = sample_metrics(scores)
    record.update(overall=metrics["overall"], weighted=metrics["weighted"], status=status_of(scores))
    return record


def evaluate(samples: list[EvalSample], results_dir: str | Path, judge: Judge, templates: dict[str, str],
             concurrency: int = 4, names=RESULT_NAMES, rubrics: dict | None = None) -> dict:
    """Judge every sample (a thread pool of ``concurrency`` samples at a time) and summarise. ``JudgeConfigError``
    (e.g. a refused key) stops the run: pending samples are cancelled, finished calls stay cached. ``rubrics``:
    the templates' ``{"name", "sha256"}`` to record (default: ``describe_templates(templates)``)."""
    results_dir = Path(results_dir)
    records: dict[int, dict] = {}
    from tqdm.auto import tqdm

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool, \
            tqdm(total=len(samples), desc="judging", unit="sample", disable=None) as bar:
        futures = {pool.submit(judge_sample, s, results_dir, judge, templates, names): i for i, s in enumerate(samples)}
        try:
            for future in as_completed(futures):
                i = futures[future]
                try:
                    records[i] = future.result()
                except (JudgeConfigError, KeyboardInterrupt):
                    raise
                except Exception as e:  # e.g. the cache could not be written: record the sample, go on
                    logger.error("sample %s failed: %s: %s", samples[i].image_id, type(e).__name__, e)
                    records[i] = _failed_record(samples[i], f"{type(e).__name__}: {e}")
                bar.update(1)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    ordered = [records[i] for i in range(len(samples))]
    return {"judge": judge.name, "judge_model": judge.model, "results_dir": str(results_dir),
            "score_parse": judge.score_parse, "templates": rubrics or describe_templates(templates),
            "templates_sha256": {d: template_hash(templates[d]) for d in DIMENSIONS},
            "off_scale": off_scale_counts(ordered, judge.score_parse), "samples": ordered, **summarize(ordered)}


def off_scale_counts(records: list[dict], score_parse: str) -> dict:
    """How many judge scores were off their dimension's scale: ``used`` as given (official) or ``failed`` (strict),
    in total and per dimension."""
    by_dim = {d: sum(d in (r.get("off_scale") or ()) for r in records) for d in DIMENSIONS}
    total = sum(by_dim.values())
    return {"used": total if score_parse == "official" else 0, "failed": total if score_parse == "strict" else 0,
            "by_dimension": by_dim}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m replan.eval.evaluate", description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--results_dir", "--edited_images_dir", required=True,
      help="generation output: <results_dir>/<image_id>/result.png")
    a("--dataset", "--dataset_name", default=DEFAULT_DATASET,
      help=f"hub id or local copy: hub layout, save_to_disk folder, parquet/json file (default {DEFAULT_DATASET})")
    a("--split", "--dataset_split", default=DEFAULT_SPLIT, help=f"default {DEFAULT_SPLIT}")
    a("--limit", type=int, default=None, help="only the first N samples (after status filtering)")
    a("--judge", choices=("genai", "openai"), default="genai",
      help="genai: Gemini via google-genai (default); openai: any OpenAI-compatible endpoint")
    a("--judge_model", default=DEFAULT_MODEL, help=f"the judge model, recorded in every result (default "
      f"{DEFAULT_MODEL})")
    a("--base_url", default=None, help="openai: the /v1 endpoint (else $REPLAN_JUDGE_BASE_URL, $OPENAI_BASE_URL); "
      "genai: an API endpoint override")
    a("--api_key", default=None, help="else $GEMINI_API_KEY/$GOOGLE_API_KEY (genai) or "
      "$REPLAN_JUDGE_API_KEY/$OPENAI_API_KEY (openai)")
    a("--vertex", action="store_true", help="genai through Vertex AI (application-default credentials)")
    a("--project", default=None, help="Vertex AI project (else $GOOGLE_CLOUD_PROJECT)")
    a("--location", default=None, help="Vertex AI location (else $GOOGLE_CLOUD_LOCATION, else us-central1)")
    a("--concurrency", "--max_workers", type=int, default=4, help="samples judged at the same time (default 4)")
    a("--prompts_dir", default=None, help="a folder with quality/target_following/effect/consistency.txt rubrics, "
      "e.g. the official ones from 'python -m replan.templates fetch' (default: replan's wording)")
    a("--score_parse", choices=SCORE_PARSE, default="official", help="official (default): a numeric score counts as "
      "given, off-scale too, as official; strict: an off-scale score fails that call (never asked again)")
    a("--output_json", default=None, help="default: <results_dir>/evaluation-<model>.json")
    a("--image_name", default="result.png", help="the result file in each sample folder (default result.png; "
      "final_result.png is also tried)")
    a("--max_retries", type=int, default=3, help="retries per judge call (default 3)")
    a("--backoff", type=float, default=2.0, help="seconds before the first retry, doubling (default 2)")
    a("--timeout", type=float, default=300.0, help="seconds per judge request (default 300)")
    a("--max_tokens", type=int, default=DEFAULT_MAX_TOKENS,
      help=f"output token limit, thinking included (default {DEFAULT_MAX_TOKENS})")
    a("--temperature", type=float, default=None, help="default: the provider's")
    a("--log_level", default="WARNING", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="default WARNING")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    results_dir = Path(args.results_dir)
    names = tuple(dict.fromkeys((args.image_name, *RESULT_NAMES)))
    try:
        if args.concurrency < 1:
            raise ValueError(f"--concurrency must be >= 1, got {args.concurrency}")
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
        templates = load_templates(args.prompts_dir)
        if not results_dir.is_dir():
            raise ValueError(f"results_dir {results_dir} is not a folder; run replan.eval.generate first")
        judge = make_judge(args.judge, args.judge_model, base_url=args.base_url, api_key=args.api_key,
                           vertex=args.vertex, project=args.project, location=args.location,
                           max_retries=args.max_retries, backoff=args.backoff, timeout=args.timeout,
                           max_tokens=args.max_tokens, temperature=args.temperature, score_parse=args.score_parse)
        try:
            samples = load_samples(args.dataset, args.split, args.limit)
        except OSError as e:  # ConnectionError: the hub is unreachable and there is no local copy
            raise ValueError(f"cannot load dataset {args.dataset!r} (split {args.split!r}): {e}") from None
        if not samples:
            raise ValueError(f"dataset {args.dataset!r} split {args.split!r} has no samples to judge")
        check_writable(results_dir, "results_dir (judge replies are cached in it)")
        if args.output_json:
            check_writable(Path(args.output_json).parent, "the --output_json folder")
    except (ValueError, ImportError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        report = evaluate(samples, results_dir, judge, templates, args.concurrency, names,
                          describe_templates(templates, args.prompts_dir))
    except JudgeConfigError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    run_config = results_dir / "run_config.json"
    try:
        generation = json.loads(run_config.read_text(encoding="utf-8")) if run_config.is_file() else None
    except (OSError, ValueError):
        generation = None
    report = {"judge_model": judge.model, "dataset": args.dataset, "split": args.split, "limit": args.limit,
              **report, "seconds": round(time.perf_counter() - start, 3), "generation": generation}
    output = Path(args.output_json) if args.output_json else results_dir / f"evaluation-{sanitise(judge.model)}.json"
    try:
        write_outputs(output.parent, {output.name: lambda p: write_json_atomic(p, report)})
    except OutputError as e:
        print(f"error: {e}; rerun with a writable --output_json (cached judge replies are not asked again)",
              file=sys.stderr)
        return 2
    title = (f"IV-Edit {args.dataset} [{args.split}], judge {judge.model}: {len(samples)} samples, "
             f"{report['failed']} not fully judged ({report['missing']} without a result image)")
    print(format_table(report, title))
    off = report["off_scale"]
    rubrics = ", ".join(f"{d} {t['name']} ({t['sha256'][:12]})" for d, t in report["templates"].items())
    print(f"rubrics: {rubrics}; score_parse {judge.score_parse}: {off['used']} off-scale score(s) used, "
          f"{off['failed']} failed")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
