"""GRPO training data (replan.train.data): the tiny IV-Edit fixture → TRL dataset and verl parquet."""

import hashlib
import io
import json
import re

import pytest
from PIL import Image

from replan.eval.dataset import load_samples
from replan.planner.base import build_prompt, load_template
from replan.train import data as tdata

TINY = tdata.DataConfig(dataset="tiny", split="test")


@pytest.fixture(scope="module")
def samples():
    return {s.image_id: s for s in load_samples("tiny", "test")}


def test_trl_dataset_rows(samples):
    ds = tdata.to_trl_dataset(TINY)
    assert len(ds) == len(samples) == 5  # the fixture's "filtered" row is skipped, as in evaluation
    assert set(ds.column_names) == {"prompt", "image", "instruction", "referring_expression", "image_id", "width",
                                    "height", "template", "template_sha256"}
    template = load_template()
    for row in ds:
        assert row["template"] == "replan:planner/prompt.txt"
        assert row["template_sha256"] == hashlib.sha256(template.encode()).hexdigest()
        sample = samples[row["image_id"]]
        assert row["prompt"] == [{"role": "user", "content": build_prompt(template, sample.instruction)}]
        assert isinstance(row["image"], Image.Image) and row["image"].mode == "RGB"
        assert row["image"].size == sample.image.size == (row["width"], row["height"])
        details = sample.details["instruction_details"]
        assert row["instruction"] == details["editing_instruction"]
        assert row["referring_expression"] == sample.referring_expression != ""


def test_trl_prompt_renders_like_the_planner(samples):
    """TRL puts the image column's picture before the text: the chat text equals the planner's at inference."""
    pytest.importorskip("trl")
    from trl.data_utils import prepare_multimodal_messages

    from replan.testing.qwenvl import tiny_qwen25vl

    _, processor = tiny_qwen25vl()
    row = tdata.to_trl_dataset(TINY)[0]
    trl_messages = prepare_multimodal_messages(row["prompt"], images=[row["image"]])
    prompt = build_prompt(load_template(), samples[row["image_id"]].instruction)
    planner_messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    render = lambda m: processor.apply_chat_template(m, tokenize=False, add_generation_prompt=True)  # noqa: E731
    assert render(trl_messages) == render(planner_messages)
    assert trl_messages[0]["content"][0]["type"] == "image"


def test_verl_parquet(tmp_path, samples):
    import datasets

    out = tmp_path / "train.parquet"
    assert tdata.main(["--dataset", "tiny", "--split", "test", "--out", str(out), "--format", "verl"]) == 0
    ds = datasets.load_dataset("parquet", data_files=str(out), split="train")
    assert set(ds.column_names) == {"data_source", "prompt", "images", "ability", "reward_model", "extra_info"}
    template = load_template()
    for row in ds:
        info = row["extra_info"]
        sample = samples[info["image_id"]]
        assert row["data_source"] == tdata.DATA_SOURCE
        assert row["reward_model"] == {"style": "rule", "ground_truth": ""}
        (message,) = row["prompt"]
        assert message["role"] == "user"
        # verl splits the text at <image>: one image, then exactly the planner's prompt text
        parts = [p for p in re.split("(<image>|<video>|<audio>)", message["content"]) if p]
        assert parts == ["<image>", build_prompt(template, sample.instruction)]
        (image,) = row["images"]
        decoded = Image.open(io.BytesIO(image["bytes"]))
        assert decoded.size == sample.image.size == (info["width"], info["height"])
        assert info["instruction"] == sample.details["instruction_details"]["editing_instruction"]
        assert info["referring_expression"] == sample.referring_expression
        assert info["task_name"] == "text_refinement_edit" and info["split"] == "test"
        assert info["image_path"] == ""
        assert info["template"] == "replan:planner/prompt.txt"
        assert info["template_sha256"] == hashlib.sha256(template.encode()).hexdigest()


def test_prompt_template_file_builds_and_is_recorded_in_every_row(tmp_path):
    import datasets

    template = tmp_path / "my_prompt.txt"
    template.write_text("Plan the edit.\nThe user instruction: ", encoding="utf-8")
    out = tmp_path / "train.parquet"
    assert tdata.main(["--dataset", "tiny", "--split", "test", "--out", str(out), "--prompt_template", str(template),
                       "--limit", "2"]) == 0
    for row in datasets.load_dataset("parquet", data_files=str(out), split="train"):
        assert row["prompt"][0]["content"].startswith("<image>Plan the edit.\nThe user instruction: \n")
        assert row["extra_info"]["template"] == str(template)
        assert row["extra_info"]["template_sha256"] == hashlib.sha256(template.read_bytes()).hexdigest()
    assert tdata.main(["--dataset", "tiny", "--split", "test", "--out", str(out), "--prompt_template",
                       str(tmp_path / "missing.txt")]) == 2


def test_verl_stage2_rows_keep_an_image_store(tmp_path):
    import datasets

    out = tmp_path / "train_stage2.parquet"
    assert tdata.main(["--dataset", "tiny", "--split", "test", "--out", str(out), "--stage", "2", "--limit", "2"]) == 0
    ds = datasets.load_dataset("parquet", data_files=str(out), split="train")
    assert len(ds) == 2
    for row in ds:
        assert row["reward_model"]["style"] == "model"
        assert row["extra_info"]["task_name"] == "edit_region_planning"
        path = row["extra_info"]["image_path"]
        assert path.startswith(str(tmp_path)) and Image.open(path).size == (row["extra_info"]["width"],
                                                                            row["extra_info"]["height"])


def test_hf_format_on_disk(tmp_path):
    import datasets

    out = tmp_path / "hf"
    assert tdata.main(["--dataset", "tiny", "--split", "test", "--out", str(out), "--format", "hf"]) == 0
    ds = datasets.load_from_disk(str(out))
    assert len(ds) == 5 and isinstance(ds[0]["image"], Image.Image)


@pytest.mark.parametrize("flag, value", [("--instruction-column", "instruction"), ("--image-column", "picture"),
                                         ("--extra-info-column", "info")])
def test_missing_column_is_one_line_error(tmp_path, capsys, flag, value):
    out = tmp_path / "x.parquet"
    assert tdata.main(["--dataset", "tiny", "--split", "test", "--out", str(out), flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and repr(value) in err and "its columns are" in err
    assert not out.exists()


def test_missing_column_in_config_checked_before_rows():
    cfg = tdata.DataConfig(dataset="tiny", split="test", instruction_column="nope")
    with pytest.raises(ValueError, match="no column instruction_column='nope'"):
        tdata.open_split(cfg)


def test_optional_columns_and_custom_template(tmp_path):
    template = tmp_path / "t.txt"
    template.write_text("Plan the edit.", encoding="utf-8")
    cfg = tdata.DataConfig(dataset="tiny", split="test", extra_info_column=None, answer_column=None,
                           template=str(template), limit=1)
    (row,) = tdata.trl_rows(cfg)
    assert row["prompt"][0]["content"] == "Plan the edit.\n" + row["instruction"]
    assert row["referring_expression"] == ""  # no extra_info: no referring expression
    assert json.dumps(tdata.verl_rows(cfg)[0]["extra_info"])  # plain JSON-able values


def test_missing_template_is_an_error(tmp_path, capsys):
    assert tdata.main(["--dataset", "tiny", "--split", "test", "--out", str(tmp_path / "x.parquet"),
                       "--template", str(tmp_path / "none.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err
