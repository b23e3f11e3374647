"""Context parallelism without a process group: the token order after the Ulysses all-to-all, text padding, masks in
that order, and every refusal (found before any model or process group is touched).

The runs on two gloo processes are in ``test_parallel_cp.py``."""

import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import ContextParallelConfig, ParallelConfig, TensorParallelConfig

from replan.attention import TokenLayout, UlyssesSplit, chunk_sizes, default_rules, pad_text_inputs
from replan.attention.masks import GroupMembership, additive_mask, dense_mask
from replan.attention.parallel import PAD
from replan.backbones.parallel import (
    accel_requested,
    check_accel_parallel,
    check_parallel_compile,
    check_parallel_edit,
    context_parallel_config,
    enable_context_parallel,
)
from replan.distributed import EditGroup
from replan.distributed import _portable as portable


# ---------------------------------------------------------------------------------------------------- token order
def test_chunk_sizes_equal_and_anything():
    assert chunk_sizes(8, 2) == [4, 4]
    assert chunk_sizes(7, 3, anything=True) == [3, 2, 2]  # torch.tensor_split's
    assert [len(c) for c in torch.arange(7).tensor_split(3)] == chunk_sizes(7, 3, anything=True)
    with pytest.raises(ValueError, match="do not split into 2 equal chunks"):
        chunk_sizes(7, 2)


def test_order_by_hand():
    # text 5 (padded to 6), image 4, two ranks: rank 0 holds text 0-2 + image 0-1, rank 1 text 3-4 + pad + image 2-3
    cp = UlyssesSplit(2).layout(text_len=5, image_len=4)
    assert cp.pad == 1 and cp.total_len == 10
    assert cp.order().tolist() == [0, 1, 2, 5, 6, 3, 4, PAD, 7, 8]
    anything = UlyssesSplit(2, anything=True).layout(5, 4)  # unequal chunks, no padding
    assert anything.pad == 0 and anything.order().tolist() == [0, 1, 2, 5, 6, 3, 4, 7, 8]


def simulated_all_to_all(text_len, image_len, degree, anything) -> list[int]:
    """What diffusers does to natural token ids: split text and image per rank (chunk / tensor_split, as its
    EquipartitionSharder / PartitionAnythingSharder), join [text_r ; image_r] per rank (the processor), gather the
    ranks in order (the all-to-all's sequence gather). Padding ids are -1."""
    cp = UlyssesSplit(degree, anything).layout(text_len, image_len)
    text = torch.cat([torch.arange(text_len), torch.full((cp.pad,), -1)])
    image = torch.arange(text_len, text_len + image_len)
    split = (lambda t: t.tensor_split(degree)) if anything else (lambda t: t.chunk(degree))
    return torch.cat([torch.cat([t, i]) for t, i in zip(split(text), split(image))]).tolist()


@pytest.mark.parametrize("text_len, image_len, degree, anything", [
    (512, 512, 2, False), (101, 512, 2, False), (77, 96, 4, False), (3, 8, 8, False),
    (101, 512, 2, True), (75, 130, 4, True), (5, 9, 3, True),
])
def test_order_is_the_layout_after_the_all_to_all(text_len, image_len, degree, anything):
    cp = UlyssesSplit(degree, anything).layout(text_len, image_len)
    assert cp.order().tolist() == simulated_all_to_all(text_len, image_len, degree, anything)
    order = cp.order()
    assert sorted(order[order >= 0].tolist()) == list(range(text_len + image_len))  # a permutation plus padding


def test_split_refuses_what_cannot_be_split():
    with pytest.raises(ValueError, match="at least 2"):
        UlyssesSplit(1)
    with pytest.raises(ValueError, match=r"image part \(130 patch tokens.*--ulysses_anything"):
        UlyssesSplit(4).layout(77, 130)
    with pytest.raises(ValueError, match="shorter than the Ulysses degree"):
        UlyssesSplit(8, anything=True).layout(10, 6)
    assert UlyssesSplit(8, anything=True).layout(3, 16).pad == 5  # every rank keeps at least one text token


def test_key_padding_mask_hides_only_the_padding():
    cp = UlyssesSplit(2).layout(5, 4)
    mask = cp.key_padding_mask(torch.float32)
    assert mask.shape == (1, 1, 1, 10)
    assert torch.isinf(mask[0, 0, 0]).tolist() == [o == PAD for o in cp.order().tolist()]


def test_pad_text_inputs_for_every_family():
    flux = {"encoder_hidden_states": torch.ones(1, 5, 8), "txt_ids": torch.ones(5, 3), "hidden_states": 1}
    out = pad_text_inputs(flux, 3)
    assert out["encoder_hidden_states"].shape == (1, 8, 8) and out["encoder_hidden_states"][0, 5:].abs().sum() == 0
    assert out["txt_ids"].shape == (8, 3) and out["hidden_states"] == 1
    flux2 = pad_text_inputs({"encoder_hidden_states": torch.ones(1, 5, 8), "txt_ids": torch.ones(1, 5, 4)}, 1)
    assert flux2["txt_ids"].shape == (1, 6, 4)
    qwen = pad_text_inputs({"encoder_hidden_states": torch.ones(1, 5, 8),
                            "encoder_hidden_states_mask": torch.ones(1, 5, dtype=torch.long)}, 1)
    assert qwen["encoder_hidden_states_mask"].tolist() == [[1, 1, 1, 1, 1, 0]]
    assert pad_text_inputs(flux, 0) is flux


# ---------------------------------------------------------------------------------------------------- masks
def region_layout():
    """Main prompt 6, two hints (3 + 4), a 4x4 noise grid and a 4x4 reference grid with two overlapping regions."""
    layout = TokenLayout.build(6, [3, 4], (4, 4), [(4, 4)], patch=16)
    return layout.with_box_regions([(0, 0, 40, 40), (20, 20, 64, 64)], (64, 64))


def test_arranged_mask_is_the_natural_mask_in_the_new_order():
    layout = region_layout()
    natural = GroupMembership.from_layout(layout)
    rules = default_rules(2)
    cp = UlyssesSplit(2).layout(layout.text_len, layout.total_len - layout.text_len)  # text 13 → pad 1
    order = cp.order()
    arranged = natural.arranged(order)
    assert arranged.padded and cp.pad == 1
    full = dense_mask(natural, rules)[0, 0]
    got = dense_mask(arranged, rules)[0, 0]
    real = order >= 0
    idx = order[real]
    assert torch.equal(got[real][:, real], full[idx][:, idx])
    pad = (~real).nonzero().flatten()
    assert got[pad][:, pad].all() and not got[pad][:, real].any() and not got[real][:, pad].any()
    # no padding needed: a plain permutation, no extra class
    no_pad = natural.arranged(UlyssesSplit(2, anything=True).layout(13, 32).order())
    assert not no_pad.padded and no_pad.class_groups.shape == natural.class_groups.shape
    with pytest.raises(ValueError, match="already arranged"):
        arranged.arranged(order)


def test_attention_in_the_arranged_order_equals_the_natural_attention():
    """One process, the math Ulysses does: the tokens in the order after the all-to-all (padding included) attend
    with the arranged mask and give every real token the output it has in the natural order — and the natural mask
    applied to the arranged tokens does not."""
    torch.manual_seed(0)
    layout = region_layout()
    natural = GroupMembership.from_layout(layout)
    rules = default_rules(2)
    cp = UlyssesSplit(2).layout(layout.text_len, layout.total_len - layout.text_len)
    order = cp.order()
    heads, dim, length = 2, 8, layout.total_len
    q, k, v = (torch.randn(1, heads, length, dim) for _ in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=additive_mask(natural, rules))

    def arrange(t):  # padding tokens get values of their own (what the zero text embeddings become)
        out = torch.randn(1, heads, cp.total_len, dim)
        out[:, :, order >= 0] = t[:, :, order[order >= 0]]
        return out

    qa, ka, va = arrange(q), arrange(k), arrange(v)
    got = torch.nn.functional.scaled_dot_product_attention(qa, ka, va,
                                                           attn_mask=additive_mask(natural.arranged(order), rules))
    real = order >= 0
    assert torch.allclose(got[:, :, real], expected[:, :, order[real]], atol=1e-6)
    unpadded = UlyssesSplit(2, anything=True).layout(layout.text_len, length - layout.text_len).order()
    wrong = torch.nn.functional.scaled_dot_product_attention(q[:, :, unpadded], k[:, :, unpadded], v[:, :, unpadded],
                                                             attn_mask=additive_mask(natural, rules))
    assert (wrong - expected[:, :, unpadded]).abs().max() > 1e-2


def test_a_padding_token_never_strands_and_rules_still_checked():
    layout = region_layout()
    arranged = GroupMembership.from_layout(layout).arranged(UlyssesSplit(4).layout(13, 32).order())
    allowed = arranged.class_mask(default_rules(2))
    assert allowed[-1, -1] and allowed[-1].sum() == 1 and allowed[:, -1].sum() == 1


# ---------------------------------------------------------------------------------------------------- refusals
def fake_editor(config=None, heads=24, compiled=False, ulysses=None):
    transformer = SimpleNamespace(config=SimpleNamespace(num_attention_heads=heads))
    return SimpleNamespace(parallel=config, compiled=compiled, pipe=SimpleNamespace(transformer=transformer),
                           processors=SimpleNamespace(ulysses=ulysses))


def test_config_must_be_context_parallel():
    cp = ContextParallelConfig(ulysses_degree=2)
    assert context_parallel_config(ParallelConfig(context_parallel_config=cp)) is cp
    with pytest.raises(ValueError, match="tensor parallelism is not supported"):
        context_parallel_config(ParallelConfig(tensor_parallel_config=TensorParallelConfig(tp_degree=2)))
    with pytest.raises(ValueError, match="must be a diffusers ContextParallelConfig"):
        context_parallel_config({"ulysses_degree": 2})


@pytest.mark.parametrize("editor, config, message", [
    (fake_editor(heads=3), ContextParallelConfig(ulysses_degree=2),
     r"3 attention heads do not split.*ulysses_anything"),
    (fake_editor(compiled=True), ContextParallelConfig(ulysses_degree=2), "before compile"),
    (fake_editor(config=ContextParallelConfig(ulysses_degree=2)), ContextParallelConfig(ulysses_degree=2),
     "already runs"),
    (fake_editor(), ContextParallelConfig(ulysses_degree=2), "launch with 'torchrun --nproc_per_node N'"),
])
def test_enable_refuses_before_touching_the_model(editor, config, message):
    with pytest.raises(ValueError, match=message):
        enable_context_parallel(editor, config)


def test_edit_refusals_ring_with_regions_and_flex():
    ring = fake_editor(ContextParallelConfig(ring_degree=2))
    with pytest.raises(ValueError, match="Ring attention cannot carry a region mask"):
        check_parallel_edit(ring, has_regions=True, attention="dense")
    assert check_parallel_edit(ring, has_regions=False, attention="dense") is None  # plain edits run as stock
    split = UlyssesSplit(2)
    ulysses = fake_editor(ContextParallelConfig(ulysses_degree=2), ulysses=split)
    with pytest.raises(ValueError, match="flex cannot run under context parallelism"):
        check_parallel_edit(ulysses, has_regions=True, attention="flex")
    assert check_parallel_edit(ulysses, has_regions=True, attention="dense") is split
    with pytest.raises(ValueError, match="accel.*cannot run under context parallelism"):
        check_parallel_edit(ulysses, has_regions=False, attention="dense", accel="regione")
    assert check_parallel_edit(ulysses, False, "dense", accel=SimpleNamespace(enabled=False)) is split
    assert check_parallel_edit(fake_editor(), has_regions=True, attention="flex") is None


def test_accel_refused_with_ulysses_everywhere_before_loading():
    """Region acceleration (replan.accel, issue 16) does not compose with context parallelism yet: every entry point
    refuses ``accel`` other than none with ``--ulysses N`` (N > 1) — through an ``accel`` field or flag once the
    entry point has one — and accepts it with one rank."""
    import dataclasses

    from replan.eval.gen_config import GenerateConfig, validate
    from replan.infer import parallel_config
    from replan.serve.service import ServeConfig

    for off in (None, "none", " None ", {"mode": "none"}, SimpleNamespace(enabled=False), {}, {"threshold": 0.1}):
        assert not accel_requested(off), off
        check_accel_parallel(off, 2)
    for on in ("regione", "plan+regione", {"mode": "plan", "threshold": 0.1},
               SimpleNamespace(enabled=True), SimpleNamespace(mode="x")):
        assert accel_requested(on), on
        check_accel_parallel(on, 1)  # one rank: nothing to refuse
        with pytest.raises(ValueError, match=r"--accel \S+\) cannot run under context parallelism \(--ulysses\)"):
            check_accel_parallel(on, 2)
    args = SimpleNamespace(ulysses=2, ulysses_anything=False, accel="regione")
    with pytest.raises(ValueError, match="use --accel none or --ulysses 1"):
        parallel_config(args)
    assert parallel_config(SimpleNamespace(ulysses=2, ulysses_anything=False, accel="none")).ulysses_degree == 2

    @dataclasses.dataclass
    class ServeWithAccel(ServeConfig):  # the field issue 16 adds
        accel: object = None

    @dataclasses.dataclass
    class GenerateWithAccel(GenerateConfig):
        accel: object = None

    with pytest.raises(ValueError, match="cannot run under context parallelism"):
        ServeWithAccel(ulysses=2, accel={"mode": "regione"})
    ServeWithAccel(ulysses=1, accel={"mode": "regione"})
    with pytest.raises(ValueError, match="cannot run under context parallelism"):
        validate(GenerateWithAccel(backbone="tiny", ulysses=2, accel="plan"))
    validate(GenerateWithAccel(backbone="tiny", ulysses=2, accel="none"))


def test_compile_refused_with_ulysses_anything():
    with pytest.raises(ValueError, match="ulysses_anything cannot be compiled"):
        check_parallel_compile(fake_editor(ContextParallelConfig(ulysses_degree=2, ulysses_anything=True)))
    check_parallel_compile(fake_editor(ContextParallelConfig(ulysses_degree=2)))
    check_parallel_compile(fake_editor())


def test_single_group_runs_locally():
    group = EditGroup.single()
    assert group.leader and not group.distributed and group.count == 1 and group.index == 0
    assert group.broadcast("x") == "x" and group.on_leader(lambda a, b=0: a + b, 1, b=2) == 3
    with pytest.raises(KeyError):
        group.on_leader(lambda: {}["missing"])
    group.barrier()


def test_exceptions_travel_or_become_runtime_errors():
    e = ValueError("bad plan")
    assert portable(e) is e

    class Local(Exception):  # defined in a function: cannot be unpickled
        pass

    copy = portable(Local("boom"))
    assert isinstance(copy, RuntimeError) and str(copy) == "Local: boom"
    pickle.dumps(copy)


# ---------------------------------------------------------------------------------------------------- entry points
def test_cli_refuses_before_loading(capsys, tmp_path):
    from replan.infer import main

    image = tmp_path / "x.png"
    assert main(["--image", str(image), "--instruction", "x", "--ulysses_anything"]) == 2
    assert "--ulysses_anything needs --ulysses N" in capsys.readouterr().err
    desk = str(Path(__file__).resolve().parents[1] / "assets/examples/desk.png")
    assert main(["--image", desk, "--instruction", "x", "--ulysses", "2", "--backbone", "tiny", "--no_plan",
                 "--device", "cpu", "--output_dir", str(tmp_path / "out")]) == 2
    assert "torchrun --nproc_per_node N" in capsys.readouterr().err


def test_pipeline_refuses_offload_with_parallel():
    from replan.pipeline import RePlanPipeline

    with pytest.raises(ValueError, match="drop --offload and --stage_offload"):
        RePlanPipeline.from_pretrained("tiny", planner=None, offload="model",
                                       parallel=ContextParallelConfig(ulysses_degree=2))


def test_server_and_eval_configs_check_ulysses(capsys):
    from replan.eval.gen_config import GenerateConfig, validate
    from replan.serve.__main__ import main as serve_main
    from replan.serve.service import ServeConfig

    with pytest.raises(ValueError, match="ulysses must be a positive integer"):
        ServeConfig(ulysses=0)
    with pytest.raises(ValueError, match="drop --offload"):
        ServeConfig(ulysses=2, offload="model")
    assert serve_main(["--backbone", "tiny", "--ulysses", "2", "--replicas", "1", "--gpus_per_replica", "1"]) == 2
    assert "needs at least 2 GPUs per replica" in capsys.readouterr().err
    for bad, message in (({"ulysses": 0}, "positive integer"), ({"ulysses": True}, "positive integer"),
                         ({"ulysses_anything": True}, "needs ulysses > 1"),
                         ({"ulysses": 2, "stage_offload": "cpu"}, "stage_offload: none")):
        with pytest.raises(ValueError, match=message):
            validate(GenerateConfig(backbone="tiny", **bad))
