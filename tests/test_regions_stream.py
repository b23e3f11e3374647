"""Streaming data for learnable-regions training: a few hundred tiny pairs in webdataset shards (and an HF dataset in
streaming mode) read by 2 ranks x 2 workers — every usable pair exactly once, bad rows and a broken shard counted,
resume by shard and offset continuing the exact sequence — and a 2-process training run killed and resumed."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from replan.regions.data import DataConfig
from replan.regions.stream import StreamData, expand_braces, list_shards
from replan.testing.regions import write_tiny_shards

ROOT = Path(__file__).resolve().parents[1]
SHARDS, PER_SHARD, BAD_EVERY = 6, 40, 7   # 240 pairs; shard 4 is cut in half (its second half is unreadable)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    write_tiny_shards(folder, SHARDS, PER_SHARD, bad_every=BAD_EVERY, truncate=(4,))
    return folder


def expected():
    """(usable sample ids, empty captions, bad images), computed from the writer's rules, not from the reader."""
    good, empty, bad = set(), 0, 0
    for k in range(SHARDS * PER_SHARD):
        if 4 * PER_SHARD + PER_SHARD // 2 <= k < 5 * PER_SHARD:   # after the cut of shard 4
            continue
        if k % BAD_EVERY == BAD_EVERY - 1:
            bad, empty = (bad + 1, empty) if (k // BAD_EVERY) % 2 else (bad, empty + 1)
        else:
            good.add(k)
    return good, empty, bad


def ids(items) -> list[int]:
    return [int(s["caption"].rsplit("#", 1)[1]) for item in items for s in item["samples"]]


def totals(items) -> dict:
    out = {}
    for item in items:
        for k, v in item["skipped"].items():
            out[k] = out.get(k, 0) + v
    return out


def wds(shards, **kw):
    return DataConfig(webdataset=str(shards / "shard-{0000..0005}.tar"), num_workers=2, **kw)


def test_shard_patterns(shards):
    assert expand_braces("s{8..10}-{a,b}") == ["s8-a", "s8-b", "s9-a", "s9-b", "s10-a", "s10-b"]
    assert list_shards(str(shards / "*.tar")) == list_shards(str(shards / "shard-{0000..0005}.tar"))
    with pytest.raises(ValueError, match="matches no shard"):
        StreamData(DataConfig(webdataset=str(shards / "none-*.tar")), 4, 0)
    with pytest.raises(ValueError, match="1 shard.*2 processes"):
        StreamData(DataConfig(webdataset=str(shards / "shard-0000.tar")), 4, 0, rank=0, world=2)


def test_two_ranks_two_workers_read_every_usable_pair_once(shards):
    good, empty, bad = expected()
    per_rank = [list(StreamData(wds(shards), 8, seed=3, rank=r, world=2).items(0, None)) for r in range(2)]
    seen = ids(per_rank[0]) + ids(per_rank[1])
    assert len(seen) == len(set(seen)) and set(seen) == good
    assert set(ids(per_rank[0])).isdisjoint(ids(per_rank[1]))
    skipped = totals(per_rank[0] + per_rank[1])
    assert skipped == {"empty_caption": empty, "bad_image": bad, "bad_shard": 1}
    assert all(len(item["samples"]) == 8 for item in per_rank[0][:-4])   # full batches until readers run dry
    # another epoch: another shard order, the same pairs
    again = [list(StreamData(wds(shards), 8, seed=3, rank=r, world=2).items(1, None)) for r in range(2)]
    assert set(ids(again[0]) + ids(again[1])) == good and ids(again[0]) != ids(per_rank[0])


@pytest.mark.parametrize("cut", [1, 5, 9, -2])
def test_resume_by_shard_and_offset_continues_the_exact_sequence(shards, cut):
    data = StreamData(wds(shards), 5, seed=1, rank=1, world=2)
    full = list(data.items(0, None))
    state = json.loads(json.dumps(full[cut]["state"]))   # checkpoints store it; JSON turns reader ids into strings
    rest = list(StreamData(wds(shards), 5, seed=1, rank=1, world=2).items(0, state))
    assert ids(rest) == ids(full[cut + 1:]) and totals(rest) == totals(full[cut + 1:])
    assert list(data.items(0, full[-1]["state"])) == []   # resumed at the end: nothing left, nothing repeated


def test_max_samples_splits_a_quota_over_the_readers(shards):
    cfg = wds(shards, max_samples=60, shuffle_shards=False)
    items = [list(StreamData(cfg, 4, 0, rank=r, world=2).items(0, None)) for r in range(2)]
    rows = sum(len(i["samples"]) for part in items for i in part) + sum(totals(items[0] + items[1]).values())
    assert rows == 60   # 4 readers x 15 rows


def test_hf_streaming_dataset(tmp_path):
    """data.path + data.streaming: the dataset's own shards (one per parquet file), decoding off, bad rows skipped."""
    import datasets

    from replan.testing.regions import tiny_image_text_dataset

    ds = tiny_image_text_dataset(36, size=16, bad_empty_caption=2, bad_image=2)
    files = []
    for i in range(4):
        files.append(str(tmp_path / f"part-{i}.parquet"))
        ds.shard(4, i, contiguous=True).to_parquet(files[-1])
    cfg = DataConfig(path="parquet", data_files=files, streaming=True, num_workers=2)
    per_rank = [list(StreamData(cfg, 4, 0, rank=r, world=2).items(0, None)) for r in range(2)]
    captions = [s["caption"] for part in per_rank for item in part for s in item["samples"]]
    assert len(captions) == 36 and totals(per_rank[0] + per_rank[1]) == {"empty_caption": 2, "bad_image": 2,
                                                                         "bad_shard": 0}
    full = per_rank[0]
    rest = list(StreamData(cfg, 4, 0, rank=0, world=2).items(0, full[2]["state"]))
    assert [s["caption"] for i in rest for s in i["samples"]] == [s["caption"] for i in full[3:] for s in i["samples"]]
    assert isinstance(datasets.load_dataset("parquet", data_files=files, split="train", streaming=True),
                      datasets.IterableDataset)


# ---------------------------------------------------------------------------------------------- 2 ranks, kill
def launch(shards, out: Path, max_steps: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "replan.regions.train", "--config", "configs/regions/tiny.yaml", "data.path=null",
           f"data.webdataset={shards / '*.tar'}", "data.num_workers=2", f"max_steps={max_steps}", "save_every=2",
           "keep_checkpoints=20", f"output_dir={out}", "progress=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process under it (torchrun starts its workers in their own sessions)."""
    import psutil

    parent = psutil.Process(proc.pid)
    family = [parent, *parent.children(recursive=True)]
    for p in family:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=60)
    proc.wait(timeout=60)


def finish(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]


@pytest.mark.slow
def test_two_process_training_killed_and_resumed_matches_an_uninterrupted_run(shards, tmp_path):
    from safetensors.torch import load_file

    full = launch(shards, tmp_path / "full", 10)
    finish(full)
    killed = launch(shards, tmp_path / "cut", 1000)
    deadline = time.monotonic() + 600
    while not (tmp_path / "cut" / "checkpoints" / "step-4").is_dir():
        assert killed.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    kill_tree(killed)   # the launcher, both ranks and their data workers, mid-run
    newest = max(int(p.name.split("-")[1]) for p in (tmp_path / "cut" / "checkpoints").glob("step-*"))
    assert 4 <= newest < 10
    finish(launch(shards, tmp_path / "cut", 10))   # resume: auto; max_steps is not part of the run's identity

    def rows(run):
        return [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    assert [r["step"] for r in rows("cut")] == list(range(1, 11))
    assert rows("cut") == rows("full")   # every loss term and every skip counter, step by step
    a = load_file(tmp_path / "full" / "final" / "region_head.safetensors")
    b = load_file(tmp_path / "cut" / "final" / "region_head.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_webdataset_repo_streamed_through_datasets_like_the_recipe(shards):
    """The 8-GPU recipe streams a hub webdataset repo by id with a shard pattern; a local folder of tars takes the
    same path (datasets' webdataset builder): jpg/png and txt become the image and caption columns."""
    good, empty, bad = expected()
    cfg = DataConfig(path=str(shards), data_files="shard-000[0-5].tar", streaming=True, num_workers=2)
    per_rank = [list(StreamData(cfg, 8, seed=0, rank=r, world=2).items(0, None)) for r in range(2)]
    seen = ids(per_rank[0]) + ids(per_rank[1])
    assert len(seen) == len(set(seen)) and set(seen) <= set(range(SHARDS * PER_SHARD))
    skipped = totals(per_rank[0] + per_rank[1])
    assert skipped == {"empty_caption": empty, "bad_image": bad, "bad_shard": 1} and set(seen) == good


def test_the_8_gpu_recipe_is_the_papers_setup():
    from accelerate.commands.config.config_args import load_config_from_file

    from replan.regions.config import load_config

    cfg = load_config(ROOT / "configs/regions/cc12m_8gpu.yaml")
    launch = load_config_from_file(str(ROOT / "configs/regions/accelerate_8gpu.yaml"))
    assert launch.num_processes * cfg.batch_size == 256 and launch.mixed_precision == cfg.mixed_precision == "bf16"
    assert (cfg.model.clip, cfg.model.t5) == ("openai/clip-vit-large-patch14", "google/flan-t5-base")
    assert cfg.data.streaming and cfg.data.path == "pixparse/cc12m-wds" and cfg.resume == "auto"
    assert cfg.descriptions.llm_model.startswith("Qwen/Qwen2.5-") and cfg.descriptions.cache
    assert cfg.generator.kind == "inpaint" and "xl" in cfg.generator.path
