"""--lora_path is a LoRA for the diffusion editor (official), --vlm_lora_path the planner's adapter."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from replan.backbones import load_editor
from replan.backbones.lora import load_lora, lora_source
from replan.backbones.registry import BACKBONES, build_offline
from replan.infer import main
from replan.pipeline import RePlanPipeline
from replan.plan import Region, RegionPlan

peft = pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]
DESK, DESK_PLAN = str(ROOT / "assets/examples/desk.png"), str(ROOT / "assets/examples/desk.plan.json")
SMALL, FAST = {"max_area": 128 * 128}, {"max_sequence_length": 16}
PLAN = RegionPlan("make it warmer", (Region((10, 10, 70, 60), "a red cat"), Region((110, 70, 190, 140), "a dog")))


def make_image(size=(200, 150)):
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def editor_lora(tiny_kontext_dir, tmp_path_factory):
    from replan.testing.lora import save_tiny_editor_lora

    return save_tiny_editor_lora(tmp_path_factory.mktemp("lora") / "kontext", tiny_kontext_dir)


@pytest.fixture(scope="module")
def planner_adapter(tmp_path_factory):
    """A PEFT adapter of the (tiny) planner: the thing --vlm_lora_path takes."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    base = build_offline("replan.testing.qwenvl:save_tiny_qwen25vl", "tiny-qwen25vl")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(base)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    path = tmp_path_factory.mktemp("planner_adapter") / "adapter"
    peft.get_peft_model(model, config).save_pretrained(path)
    return base, path


def editor(tiny_kontext_dir, **kwargs):
    ed = load_editor("flux", str(tiny_kontext_dir), device="cpu", editor_kwargs=SMALL, **kwargs)
    ed.pipe.set_progress_bar_config(disable=True)
    return ed


def test_the_lora_adds_exactly_b_times_a_to_each_target(tiny_kontext_dir, editor_lora):
    plain, adapted = editor(tiny_kontext_dir), editor(tiny_kontext_dir, lora_path=str(editor_lora))
    assert adapted.pipe.get_list_adapters() == {"transformer": ["default"]}  # adapter_name="default", as official
    weights = load_file(editor_lora / "pytorch_lora_weights.safetensors")
    x = torch.randn(3, 5, plain.pipe.transformer.inner_dim)
    for name in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_out.0",
                 "single_transformer_blocks.0.attn.to_v"):
        base = plain.pipe.transformer.get_submodule(name)
        a, b = weights[f"transformer.{name}.lora_A.weight"], weights[f"transformer.{name}.lora_B.weight"]
        expected = torch.nn.functional.linear(x, base.weight + b @ a, base.bias)
        torch.testing.assert_close(adapted.pipe.transformer.get_submodule(name)(x), expected)
    # the region edit runs through the adapted layers: same seed, other pixels
    out_plain = plain.edit(make_image(), PLAN, steps=2, seed=0, **FAST).image
    out_lora = adapted.edit(make_image(), PLAN, steps=2, seed=0, **FAST).image
    assert not np.array_equal(np.asarray(out_plain), np.asarray(out_lora))
    again = adapted.edit(make_image(), PLAN, steps=2, seed=0, **FAST).image
    assert np.array_equal(np.asarray(out_lora), np.asarray(again))


def test_a_single_safetensors_file_is_accepted(tiny_kontext_dir, editor_lora):
    ed = editor(tiny_kontext_dir, lora_path=str(editor_lora / "pytorch_lora_weights.safetensors"))
    assert ed.pipe.get_list_adapters() == {"transformer": ["default"]}


def test_a_planner_adapter_given_as_lora_path_is_refused_clearly(tiny_kontext_dir, planner_adapter):
    _, adapter = planner_adapter
    with pytest.raises(ValueError, match="a LoRA of the planner goes to --vlm_lora_path"):
        editor(tiny_kontext_dir, lora_path=str(adapter))


def test_missing_lora_and_pipelines_without_lora_support(tiny_kontext_dir, tmp_path):
    with pytest.raises(ValueError, match="editor LoRA .*missing does not exist"):
        editor(tiny_kontext_dir, lora_path=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="cannot load LoRA weights .*drop --lora_path"):
        load_lora(object(), str(tmp_path))


@pytest.mark.parametrize("hub_id", ["owner/name", "alimama-creative/FLUX.1-Turbo-Alpha",
                                    "black-forest-labs/FLUX.1-Canny-dev-lora", "user_1/my.lora_v2"])
def test_hub_ids_are_taken_as_they_are_even_with_dots(hub_id, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing of that name exists here
    assert lora_source(hub_id) == (hub_id, {})


@pytest.mark.parametrize("path", ["./missing", "~/no/such/lora", "/no/such/lora", "a/b/c", "owner/lora.safetensors",
                                  "owner/", ".hidden/name", "name"])
def test_paths_that_do_not_exist_are_refused_before_loading(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        lora_source(path)


def test_existing_files_and_directories_are_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner" / "FLUX.1-lora").mkdir(parents=True)  # looks like a hub id, but is here: local wins
    (tmp_path / "w.safetensors").write_bytes(b"")
    assert lora_source("owner/FLUX.1-lora") == ("owner/FLUX.1-lora", {})
    assert lora_source(str(tmp_path / "w.safetensors")) == (str(tmp_path), {"weight_name": "w.safetensors"})


def test_every_registered_pipeline_takes_a_lora():
    import diffusers

    for spec in BACKBONES.values():
        assert callable(getattr(getattr(diffusers, spec.pipeline_class), "load_lora_weights", None)), spec.name


def test_cli_lora_path_is_the_editors_and_vlm_lora_path_the_planners(tmp_path, editor_lora, planner_adapter, capsys):
    common = ["--image", DESK, "--plan", DESK_PLAN, "--backbone", "tiny", "--steps", "2", "--device", "cpu"]
    assert main(common + ["--output_dir", str(tmp_path / "plain")]) == 0
    assert main(common + ["--output_dir", str(tmp_path / "lora"), "--lora_path", str(editor_lora)]) == 0
    config = json.loads((tmp_path / "lora" / "config.json").read_text())
    assert config["lora_path"] == str(editor_lora) and f"--lora_path {editor_lora}" in config["replay"]
    plain, lora = (np.asarray(Image.open(tmp_path / d / "result.png")) for d in ("plain", "lora"))
    assert not np.array_equal(plain, lora)
    # a missing LoRA is reported before any model loads; the planner's adapter is refused as an editor LoRA
    assert main(common + ["--output_dir", str(tmp_path / "x"), "--lora_path", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "x").exists()
    base, adapter = planner_adapter
    assert main(common + ["--output_dir", str(tmp_path / "y"), "--lora_path", str(adapter)]) == 2
    assert "--vlm_lora_path" in capsys.readouterr().err


def test_vlm_lora_path_reaches_the_planner(planner_adapter):
    base, adapter = planner_adapter
    plain = RePlanPipeline.from_pretrained("tiny", planner="local", vlm_ckpt_path=str(base), device="cpu")
    adapted = RePlanPipeline.from_pretrained("tiny", planner="local", vlm_ckpt_path=str(base),
                                             vlm_lora_path=str(adapter), device="cpu")
    name = next(n for n, _ in plain.planner.model.named_parameters() if "q_proj.weight" in n)
    assert not torch.equal(dict(plain.planner.model.named_parameters())[name],
                           dict(adapted.planner.model.named_parameters())[name])
    assert adapted.editor.pipe.get_list_adapters() == {}  # the editor got nothing
    with pytest.raises(ValueError, match="--vlm_lora_path applies to the local planner"):
        RePlanPipeline.from_pretrained("tiny", planner="openai", vlm_lora_path=str(adapter), device="cpu",
                                       planner_kwargs={"base_url": "http://127.0.0.1:9/v1"})
