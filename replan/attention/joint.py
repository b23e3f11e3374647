"""The arithmetic of diffusers' Qwen-Image double-stream attention that our processors re-run with a mask of their
own: per-stream Q/K/V with QK-norm and RoPE going in, the two output projections coming out. Shared by region
attention (``replan/backbones/qwen_image_edit.py``) and the K/V-cache processor (``replan/accel/kv.py``), so both
compute exactly what the stock processor does around the attention call."""

from __future__ import annotations

import torch


def qwen_joint_qkv(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, image_rotary_emb=None,
                   image_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Joint ``[text; image]`` queries, keys and values ``(B, S, heads, head_dim)`` of a Qwen-Image attention module.

    ``image_rows``: the image positions ``hidden_states`` holds, when it is a subset of the image stream (edited-only
    passes): the rotary table, built for the whole stream, is indexed by them."""
    from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

    head_dim = attn.inner_dim // attn.heads

    def heads(x):
        return x.unflatten(-1, (-1, head_dim))

    img_q, img_k, img_v = (heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)),
                           heads(attn.to_v(hidden_states)))
    txt_q, txt_k, txt_v = (heads(attn.add_q_proj(encoder_hidden_states)),
                           heads(attn.add_k_proj(encoder_hidden_states)),
                           heads(attn.add_v_proj(encoder_hidden_states)))
    if attn.norm_q is not None:
        img_q = attn.norm_q(img_q)
    if attn.norm_k is not None:
        img_k = attn.norm_k(img_k)
    if attn.norm_added_q is not None:
        txt_q = attn.norm_added_q(txt_q)
    if attn.norm_added_k is not None:
        txt_k = attn.norm_added_k(txt_k)
    if image_rotary_emb is not None:
        img_freqs, txt_freqs = image_rotary_emb
        if image_rows is not None:
            img_freqs = img_freqs[image_rows.to(img_freqs.device)]
        img_q = apply_rotary_emb_qwen(img_q, img_freqs, use_real=False)
        img_k = apply_rotary_emb_qwen(img_k, img_freqs, use_real=False)
        txt_q = apply_rotary_emb_qwen(txt_q, txt_freqs, use_real=False)
        txt_k = apply_rotary_emb_qwen(txt_k, txt_freqs, use_real=False)
    return (torch.cat([txt_q, img_q], dim=1), torch.cat([txt_k, img_k], dim=1), torch.cat([txt_v, img_v], dim=1))


def qwen_joint_out(attn, joint: torch.Tensor, text_len: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(image, text)`` outputs of a Qwen-Image attention module from the joint attention output
    ``(B, S, heads, head_dim)``: flattened, cast to ``dtype`` and through the two output projections."""
    joint = joint.flatten(2, 3).to(dtype)
    image = attn.to_out[0](joint[:, text_len:].contiguous())
    if len(attn.to_out) > 1:
        image = attn.to_out[1](image)
    return image, attn.to_add_out(joint[:, :text_len].contiguous())
