"""Tiny random stand-ins for the learnable-regions module, built offline (no hub).

``save_tiny_regions_backbones(dir)`` writes ``dir/clip`` (a ``CLIPModel``: vision tower for the patch features and
L_CLIP, text tower for T_o/T_e, plus a ``CLIPImageProcessor`` and a character-level tokenizer) and ``dir/t5`` (a
``T5EncoderModel`` with a character-level tokenizer); both load back with the real ``from_pretrained``.
``tiny_image_text_dataset(...)`` builds a LAION-style ``datasets.Dataset`` (``image``/``caption``) of coloured shapes,
optionally with bad rows (empty caption, undecodable image bytes); ``save_tiny_image_text(dir)`` saves one to disk
(``data.path: tiny``). ``write_tiny_shards(dir, ...)`` writes the same pairs as webdataset tar shards.
"""

from __future__ import annotations

import io
from pathlib import Path

from replan.testing.tokenizers import tiny_clip_tokenizer, tiny_t5_tokenizer

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 60), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle")


def save_tiny_regions_backbones(path: str | Path, seed: int = 0, image_size: int = 32, patch_size: int = 8,
                                width: int = 32, proj_dim: int = 32, t5_width: int = 24) -> Path:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, T5Config, T5EncoderModel

    path = Path(path)
    torch.manual_seed(seed)
    tok = tiny_clip_tokenizer()
    text_cfg = dict(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                    num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                    projection_dim=proj_dim)
    vision_cfg = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=2,
                      image_size=image_size, patch_size=patch_size, projection_dim=proj_dim)
    clip = CLIPModel(CLIPConfig(text_config=text_cfg, vision_config=vision_cfg, projection_dim=proj_dim)).eval()
    clip.save_pretrained(path / "clip")
    tok.save_pretrained(path / "clip")
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
                       ).save_pretrained(path / "clip")
    t5tok = tiny_t5_tokenizer()
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5tok), d_model=t5_width, d_kv=8, d_ff=2 * t5_width, num_layers=2,
                                 num_heads=3, feed_forward_proj="gated-gelu", is_encoder_decoder=False)).eval()
    t5.save_pretrained(path / "t5")
    t5tok.save_pretrained(path / "t5")
    return path


def shape_image(colour: str, shape: str, size: int = 48, offset: int = 0):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (245, 245, 245))
    draw = ImageDraw.Draw(img)
    box = (size // 4 + offset, size // 4, size // 4 + size // 2 + offset, 3 * size // 4)
    (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=COLOURS[colour])
    return img


def tiny_image_text_dataset(n: int = 8, size: int = 48, bad_empty_caption: int = 0, bad_image: int = 0):
    """``n`` good rows then the bad ones; ``image`` holds PNG bytes (binary column) so bad bytes survive."""
    from datasets import Dataset

    images, captions = [], []
    names = list(COLOURS)
    for i in range(n):
        colour, shape = names[i % len(names)], SHAPES[(i // len(names)) % len(SHAPES)]
        buf = io.BytesIO()
        shape_image(colour, shape, size, offset=i % 3).save(buf, format="PNG")
        images.append(buf.getvalue())
        captions.append(f"a {colour} {shape} on a white background")
    for _ in range(bad_empty_caption):
        images.append(images[0])
        captions.append("  ")
    for _ in range(bad_image):
        images.append(b"not an image")
        captions.append("a broken picture")
    return Dataset.from_dict({"image": images, "caption": captions})


def save_tiny_image_text(path: str | Path, n: int = 32) -> Path:
    """``tiny_image_text_dataset(n)`` saved with ``save_to_disk`` (``data.path: tiny`` of the regions trainer)."""
    tiny_image_text_dataset(n).save_to_disk(str(path))
    return Path(path)


def write_tiny_shards(folder: str | Path, shards: int = 6, per_shard: int = 40, size: int = 16, bad_every: int = 0,
                      truncate: tuple[int, ...] = ()) -> list[Path]:
    """``shards`` webdataset tars of ``per_shard`` pairs each (``<key>.png`` + ``<key>.txt``); sample k's caption
    ends with ``#k`` so a reader's output can be traced. Every ``bad_every``-th sample is bad (alternately an empty
    caption and undecodable image bytes); the shards listed in ``truncate`` are cut in the middle of a member."""
    import tarfile

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names, paths = list(COLOURS), []
    for s in range(shards):
        path = folder / f"shard-{s:04d}.tar"
        with tarfile.open(path, "w") as tf:
            for i in range(per_shard):
                k = s * per_shard + i
                colour, shape = names[k % len(names)], SHAPES[(k // len(names)) % len(SHAPES)]
                buf = io.BytesIO()
                shape_image(colour, shape, size, offset=k % 3).save(buf, format="PNG")
                image, caption = buf.getvalue(), f"a {colour} {shape} on a white background #{k}"
                if bad_every and k % bad_every == bad_every - 1:
                    if (k // bad_every) % 2:
                        image = b"not an image"
                    else:
                        caption = " "
                for name, data in ((f"{k:06d}.png", image), (f"{k:06d}.txt", caption.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        if s in truncate:  # cut inside the data of the middle member (a cut at a header reads as a clean end)
            with tarfile.open(path) as tf:
                middle = tf.getmembers()[per_shard]
            path.write_bytes(path.read_bytes()[: middle.offset_data + middle.size // 2])
        paths.append(path)
    return paths
