"""Caches of learnable-regions training are keyed by everything that produced them: descriptions by LLM id + prompt
hash (+ the t_o source), generated images by generator settings + sample + t_e. A changed producer regenerates, a
run reports how many entries it reused, and a row cut by a kill is ignored."""

import json

import pytest
import torch

from replan.regions import descriptions as D
from replan.regions.config import GeneratorConfig
from replan.regions.descriptions import Describer, DescriptionConfig
from replan.regions.model import RegionGenerator
from replan.regions.objective import ProxyGenerator
from replan.regions.train import train
from replan.testing.regions import save_tiny_regions_backbones, shape_image
from tests.test_regions_model import TINY
from tests.test_regions_train import cfg_for


def llm(answer):
    calls = []

    def reply(prompt):
        calls.append(prompt)
        return json.dumps({"instruction": "make it purple", "edited_caption": answer})

    reply.calls = calls
    return reply


def test_description_rows_are_reused_only_for_the_same_llm_and_prompt(tmp_path, monkeypatch):
    cache, img = tmp_path / "desc.jsonl", shape_image("red", "square")
    a = llm("a purple square")
    first = Describer(DescriptionConfig(cache=str(cache)), llm=a, llm_id="qwen-a")
    assert first.training_texts(img, "a red square")["t_e"] == "a purple square" and len(a.calls) == 1
    same = Describer(DescriptionConfig(cache=str(cache)), llm=a, llm_id="qwen-a")
    assert same.training_texts(img, "a red square")["t_e"] == "a purple square" and len(a.calls) == 1
    assert (same.reused, same.generated, same.stale) == (1, 0, 0)
    b = llm("a violet square")   # another LLM on the same cache file: regenerated, the old row left alone
    other = Describer(DescriptionConfig(cache=str(cache)), llm=b, llm_id="qwen-b")
    assert other.training_texts(img, "a red square")["t_e"] == "a violet square" and len(b.calls) == 1
    assert (other.reused, other.generated, other.stale) == (0, 1, 1)
    assert "0 reused" in other.summary() and "1 cached rows from another LLM/prompt ignored" in other.summary()
    # every part of the producer is in the key
    base = Describer(DescriptionConfig(llm="openai", llm_model="Qwen/Qwen2.5-7B-Instruct")).fingerprint("pair")
    for change in ({"llm_model": "Qwen/Qwen2.5-72B-Instruct"}, {"max_new_tokens": 64}, {"t_o_source": "vlm"},
                   {"llm": "transformers"}):
        cfg = DescriptionConfig(**{"llm": "openai", "llm_model": "Qwen/Qwen2.5-7B-Instruct", **change})
        assert Describer(cfg).fingerprint("pair") != base, change
    monkeypatch.setattr(D, "PAIR_PROMPT", D.PAIR_PROMPT + " Be brief.")
    assert Describer(DescriptionConfig(llm="openai", llm_model="Qwen/Qwen2.5-7B-Instruct")).fingerprint("pair") != base
    # rows of an older format (no fingerprint) and a line cut by a kill are never reused
    cache.write_text(json.dumps({"key": "x", "t_o": "a", "t_ins": "b", "t_e": "c"}) + "\n" + '{"key": "y", "t_')
    again = Describer(DescriptionConfig(cache=str(cache)), llm=a, llm_id="qwen-a")
    assert again.stale == 1 and not again.cache


@pytest.fixture(scope="module")
def region_model(tmp_path_factory):
    bb = save_tiny_regions_backbones(tmp_path_factory.mktemp("cache_bb"))
    return RegionGenerator.from_pretrained(str(bb / "clip"), str(bb / "t5"), **TINY)


@pytest.fixture(scope="module")
def inpaint_dir(tmp_path_factory):
    from replan.testing.inpaint import save_tiny_sd_inpaint

    return save_tiny_sd_inpaint(tmp_path_factory.mktemp("sd_inpaint"))


def texts(t_e="a blue square"):
    return [{"key": "k0", "t_e": t_e}, {"key": "k1", "t_e": "a hat"}]


def test_generated_images_are_keyed_by_generator_sample_and_target(region_model, inpaint_dir, tmp_path):
    images = [shape_image("red", "square"), shape_image("green", "circle")]
    pixels = region_model.preprocess(images)
    cfg = GeneratorConfig(kind="inpaint", path=str(inpaint_dir), steps=1, resolution=32, guidance_scale=1.0)
    gen = ProxyGenerator(cfg, region_model, tmp_path, seed=0)
    first = gen(images, pixels, texts())
    again = gen(images, pixels, texts())
    assert (gen.generated, gen.reused) == (2, 2) and torch.equal(first, again)
    manifest = json.loads((gen.cache_dir / "generator.json").read_text())
    assert manifest["steps"] == 1 and manifest["fingerprint"] == gen.fingerprint
    gen(images, pixels, texts(t_e="a yellow square"))   # another target text: that sample only is regenerated
    assert (gen.generated, gen.reused) == (3, 3)
    for change in ({"steps": 2}, {"guidance_scale": 3.0}, {"resolution": 64}, {"path": str(tmp_path)}):
        other = ProxyGenerator(GeneratorConfig(**{**vars(cfg), **change}), region_model, tmp_path, seed=0)
        assert other.cache_dir != gen.cache_dir, change
    assert ProxyGenerator(cfg, region_model, tmp_path, seed=1).cache_dir != gen.cache_dir
    other = ProxyGenerator(GeneratorConfig(**{**vars(cfg), "steps": 2}), region_model, tmp_path, seed=0)
    other(images, pixels, texts())
    assert (other.generated, other.reused) == (2, 0)
    fresh = ProxyGenerator(cfg, region_model, tmp_path / "fresh", seed=0)   # seeded: the same images again
    assert torch.equal(fresh(images, pixels, texts()), first) and fresh.generated == 2


@pytest.fixture(scope="module")
def train_setup(tmp_path_factory):
    from replan.testing.regions import tiny_image_text_dataset

    root = tmp_path_factory.mktemp("cache_train")
    save_tiny_regions_backbones(root / "bb")
    tiny_image_text_dataset(8).save_to_disk(str(root / "good"))
    return root


def test_training_runs_report_cache_reuse(train_setup, inpaint_dir, tmp_path):
    extra = {"generator.kind": "inpaint", "generator.path": str(inpaint_dir), "generator.steps": 1,
             "generator.resolution": 32, "generator.guidance_scale": 1.0, "generator.cache": str(tmp_path / "gen"),
             "descriptions.cache": str(tmp_path / "desc.jsonl"), "max_steps": 1, "batch_size": 4}
    first = train(cfg_for(train_setup, tmp_path / "one", **extra))
    assert first["cache"] == {"descriptions": {"reused": 0, "generated": 4, "stale": 0},
                              "generated_images": {"reused": 0, "generated": 4}}
    second = train(cfg_for(train_setup, tmp_path / "two", **extra))   # another run, the same producers
    assert second["cache"] == {"descriptions": {"reused": 4, "generated": 0, "stale": 0},
                               "generated_images": {"reused": 4, "generated": 0}}
    assert second["losses"] == first["losses"]


def test_describe_pass_fills_the_cache_the_trainer_reuses(tmp_path, capsys):
    from replan.regions.describe import main as describe_main
    from replan.regions.train import main as train_main

    cache = tmp_path / "desc.jsonl"
    args = ["--config", "configs/regions/tiny.yaml", f"descriptions.cache={cache}", "descriptions.concurrency=4"]
    assert describe_main([*args, "--part", "0/2"]) == 0 and describe_main([*args, "--part", "1/2"]) == 0
    keys = [json.loads(line)["key"] for line in cache.read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 24   # the tiny set's 32 pairs repeat after 24; split over two parts
    assert describe_main(args) == 0
    capsys.readouterr()
    assert train_main([*args, f"output_dir={tmp_path / 'run'}", "max_steps=1", "progress=false"]) == 0
    assert json.loads(capsys.readouterr().out)["cache"]["descriptions"] == {"reused": 4, "generated": 0, "stale": 0}
    assert describe_main(["--config", "configs/regions/tiny.yaml"]) == 2   # no cache file named: one line
    assert "descriptions.cache is not set" in capsys.readouterr().err


def test_concurrent_requests_keep_the_order_and_isolate_failures():
    import threading

    seen = set()

    def reply(prompt):
        seen.add(threading.get_ident())
        if "broken" in prompt:
            return "no json"
        return json.dumps({"instruction": "edit", "edited_caption": prompt.split("Caption: ")[1].split("\n")[0]})

    d = Describer(DescriptionConfig(concurrency=4), llm=reply)
    samples = [{"image": shape_image("red", "square"), "caption": c, "bytes": c.encode()}
               for c in ("one", "two", "broken three", "four", "five")]
    rows = d.many(samples)
    assert [r if isinstance(r, Exception) else r["t_e"] for r in rows][:2] == ["one", "two"]
    assert isinstance(rows[2], ValueError) and rows[4]["t_e"] == "five" and d.generated == 4
