"""The region-instruction K/V cache on stock tiny transformers of every family: a store pass is the stock pass, and an
edited-only pass against a fresh cache equals the full pass on the edited rows (with and without a region mask)."""

import pytest
import torch
from diffusers import Flux2Transformer2DModel, FluxTransformer2DModel, QwenImageTransformer2DModel

from replan.accel.kv import AccelFluxProcessor, AccelQwenProcessor, KVStore, restrict_region
from replan.accel.runtime import AccelRuntime
from replan.attention import RegionCall, wrap_processor
from replan.backbones.qwen_image_edit import RegionQwenAttnProcessor

H = W = 4
L = H * W
T = 5
IDS = torch.tensor([1, 5, 6, 10, 15])


class Probe:
    """Stands in for the RegionController: runs the transformer passes it is told to, one per call."""

    def __init__(self, *actions):
        self.tokens, self.plan, self.branch = L, "fixed", 0
        self.actions = list(actions)

    def forward(self, noise, reference, run):
        ids, kv, self.branch = self.actions.pop(0)
        return run(ids, kv)


def grid_ids(axes, t_ref, offset=0):
    rows = []
    for t in (0, t_ref):
        for r in range(H):
            for c in range(W):
                rows.append([t, r, c] + [0] * (axes - 3) if offset == 0 else [t, r, c, 0])
    return torch.tensor(rows, dtype=torch.float32)


def kontext():
    torch.manual_seed(0)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2,
                                attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6)).eval()
    inputs = dict(hidden_states=torch.randn(1, 2 * L, 64), encoder_hidden_states=torch.randn(1, T, 32),
                  pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.7]),
                  guidance=torch.tensor([2.5]), img_ids=grid_ids(3, 1), txt_ids=torch.zeros(T, 3), return_dict=False)
    return tr, inputs, "joint_attention_kwargs"


def klein():
    torch.manual_seed(0)
    tr = Flux2Transformer2DModel(patch_size=1, in_channels=128, num_layers=1, num_single_layers=2,
                                 attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
                                 timestep_guidance_channels=256, axes_dims_rope=(4, 4, 4, 4),
                                 guidance_embeds=False).eval()
    txt_ids = torch.zeros(T, 4)
    txt_ids[:, 3] = torch.arange(T)
    inputs = dict(hidden_states=torch.randn(1, 2 * L, 128), encoder_hidden_states=torch.randn(1, T, 48),
                  timestep=torch.tensor([0.7]), img_ids=grid_ids(4, 10, offset=1), txt_ids=txt_ids,
                  guidance=None, return_dict=False)
    return tr, inputs, "joint_attention_kwargs"


def qwen(zero_cond_t=False):
    torch.manual_seed(0)
    tr = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=2,
                                     attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                     guidance_embeds=False, axes_dims_rope=(4, 6, 6), zero_cond_t=zero_cond_t).eval()
    inputs = dict(hidden_states=torch.randn(1, 2 * L, 64), encoder_hidden_states=torch.randn(1, T, 16),
                  encoder_hidden_states_mask=torch.ones(1, T, dtype=torch.long), timestep=torch.tensor([0.7]),
                  img_shapes=[[(1, H, W), (1, H, W)]], return_dict=False)
    return tr, inputs, "attention_kwargs"


FAMILIES = {"kontext": kontext, "klein": klein, "qwen": qwen, "qwen2511": lambda: qwen(zero_cond_t=True)}


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return FAMILIES[request.param]()


@torch.no_grad()
def test_store_pass_is_stock_and_edited_pass_matches_full_rows(family):
    tr, inputs, _ = family
    stock = tr(**inputs)[0]
    runtime = AccelRuntime.install(tr)
    assert torch.equal(tr(**inputs)[0], stock)  # installed but inactive: the stock transformer
    probe = Probe((None, "store", 0), (IDS, "cached", 0), (IDS, "cached", 0))
    with runtime.activate(probe, None):
        full = tr(**inputs)[0]
        assert runtime.store.nbytes > 0
        short = tr(**inputs)[0]
        again = tr(**inputs)[0]  # the cache rows it rewrote are the same values
    assert torch.allclose(full, stock, atol=1e-6, rtol=0)
    assert short.shape == (1, len(IDS), stock.shape[-1])
    assert torch.allclose(short, stock[:, IDS], atol=1e-5, rtol=0)
    assert torch.equal(short, again)
    assert runtime.store.nbytes == 0  # freed with the edit
    runtime.remove()
    assert torch.equal(tr(**inputs)[0], stock)


@torch.no_grad()
def test_cache_is_kept_per_cfg_branch():
    tr, inputs, _ = kontext()
    negative = dict(inputs, encoder_hidden_states=torch.randn(1, T + 3, 32), txt_ids=torch.zeros(T + 3, 3))
    stock_pos, stock_neg = tr(**inputs)[0], tr(**negative)[0]
    runtime = AccelRuntime.install(tr)
    probe = Probe((None, "store", 0), (None, "store", 1), (IDS, "cached", 0), (IDS, "cached", 1))
    with runtime.activate(probe, None):
        tr(**inputs), tr(**negative)
        pos, neg = tr(**inputs)[0], tr(**negative)[0]
    assert torch.allclose(pos, stock_pos[:, IDS], atol=1e-5, rtol=0)
    assert torch.allclose(neg, stock_neg[:, IDS], atol=1e-5, rtol=0)
    runtime.remove()


def region_mask(seq, seed=0):
    """An additive region mask as ``replan.attention.additive_mask`` lays it out: rows 8-aligned in memory."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.rand(seq, seq, generator=g) < 0.6
    allowed |= torch.eye(seq, dtype=torch.bool)
    pitch = -(-seq // 8) * 8
    buffer = torch.zeros(seq, pitch)
    buffer[:, :seq].masked_fill_(~allowed, float("-inf"))
    return buffer[:, :seq][None, None]


def test_restricted_rows_keep_the_row_pitch():
    mask = region_mask(T + 2 * L)
    rows = torch.cat([torch.arange(T), IDS + T])
    region = restrict_region(RegionCall(mask), rows)
    assert region.kind == "dense" and region.mask.shape == (1, 1, len(rows), T + 2 * L)
    assert region.mask.stride(-2) == mask.stride(-2) == 40  # 37 keys, rows 40 apart: SDPA takes it as is
    assert torch.equal(region.mask, mask[:, :, rows])
    with pytest.raises(ValueError, match="attention dense"):
        restrict_region(RegionCall(object(), kind="flex"), rows)


@torch.no_grad()
def test_region_mask_is_restricted_to_the_edited_rows():
    tr, inputs, kwarg = kontext()
    tr.set_attn_processor({name: wrap_processor(p) for name, p in tr.attn_processors.items()})
    region = RegionCall(region_mask(T + 2 * L))
    masked = tr(**inputs, **{kwarg: {"region": region}})[0]
    assert not torch.allclose(masked, tr(**inputs)[0], atol=1e-3)  # the mask matters
    runtime = AccelRuntime.install(tr)
    assert all(isinstance(p, AccelFluxProcessor) for p in tr.attn_processors.values())
    with runtime.activate(Probe((None, "store", 0), (IDS, "cached", 0), (IDS, "cached", 0)), None):
        full = tr(**inputs, **{kwarg: {"region": region}})[0]
        short = tr(**inputs, **{kwarg: {"region": region}})[0]
        restricted = runtime._restriction[2]
        tr(**inputs, **{kwarg: {"region": region}})
        assert runtime._restriction[2] is restricted  # built once for the mask and edited set, not per pass
    assert torch.allclose(full, masked, atol=1e-6, rtol=0)
    assert torch.allclose(short, masked[:, IDS], atol=1e-5, rtol=0)


@torch.no_grad()
def test_qwen_region_mask_with_the_cache():
    tr, inputs, kwarg = qwen()
    tr.set_attn_processor({name: RegionQwenAttnProcessor(p) for name, p in tr.attn_processors.items()})
    region = RegionCall(region_mask(T + 2 * L, seed=1))
    masked = tr(**inputs, **{kwarg: {"region": region}})[0]
    runtime = AccelRuntime.install(tr)
    assert all(isinstance(p, AccelQwenProcessor) for p in tr.attn_processors.values())
    with runtime.activate(Probe((None, "store", 0), (IDS, "cached", 0), (None, "store", 0)), None):
        full = tr(**inputs, **{kwarg: {"region": region}})[0]
        short = tr(**inputs, **{kwarg: {"region": region}})[0]
        unmasked = tr(**inputs)[0]
    assert torch.allclose(full, masked, atol=1e-6, rtol=0)  # the store pass is region attention's masked pass
    assert torch.allclose(short, full[:, IDS], atol=1e-5, rtol=0)
    assert not torch.allclose(full, unmasked, atol=1e-3)


def test_edited_pass_without_a_store_pass_says_so():
    tr, inputs, _ = kontext()
    runtime = AccelRuntime.install(tr)
    probe = Probe((IDS, "cached", 0))
    with runtime.activate(probe, None), pytest.raises(RuntimeError, match="needs a full store pass"):
        tr(**inputs)
    assert KVStore().nbytes == 0


def test_one_runtime_per_transformer():
    tr, _, _ = kontext()
    runtime = AccelRuntime.install(tr)
    assert AccelRuntime.install(tr) is runtime  # a second editor over the same transformer shares it
    wrapped = dict(tr.attn_processors)
    runtime.remove()
    assert all(not isinstance(p, AccelFluxProcessor) for p in tr.attn_processors.values())
    assert AccelRuntime.install(tr) is not runtime and len(wrapped) == len(tr.attn_processors)


def test_processors_replaced_after_install_are_refused():
    tr, _, _ = kontext()
    runtime = AccelRuntime.install(tr)
    tr.set_attn_processor(dict(runtime.original))  # e.g. region processors installed on top of the K/V wrappers
    with pytest.raises(RuntimeError, match="install region processors first"):
        with runtime.activate(Probe(), None):
            pass
