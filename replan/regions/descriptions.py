"""Descriptive texts for learnable regions (§3 of ``learnable-regions-spec.md``), cached per sample on disk.

* ``t_o`` — description of the source image: the dataset caption (``t_o_source="caption"``, the paper's training
  setup) or a VLM caption through the planner backends (``"vlm"``: ``load_planner(vlm_kind, vlm_path)``).
* ``(t_ins, t_e)`` for training — an LLM proposes a local edit instruction and the caption after it (JSON reply).
* ``t_e`` at inference — an LLM rewrites ``t_o`` under ``t_ins``.

LLM backends: ``openai`` (OpenAI-compatible endpoint via ``OpenAIPlanner.generate_text``), ``transformers`` (a local
causal LM, greedy) and ``offline`` — a deterministic template (NOT an LLM: swaps a colour/object word; for tests and
smoke runs only). The prompt wording is ours (the paper gives none). Replies are cached in a JSONL file keyed by
``sample_key(image bytes, caption)`` *and* by everything that produced them (``Describer.fingerprint``: the LLM and
VLM ids, the prompt's sha256, ``max_new_tokens``, the t_o source): rows written by another LLM or prompt are never
reused (they are regenerated), and ``reused``/``generated``/``stale`` count what happened.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path

CAPTION_PROMPT = "Describe the main content of this image in one short sentence."
TARGET_PROMPT = ("Original description: {t_o}\nEdit instruction: {t_ins}\n"
                 "Write one short sentence describing the image after the edit. Answer with the sentence only.")
PAIR_PROMPT = ("Caption: {t_o}\nPropose one realistic local edit of this image (add, remove, replace an object, or "
               "change an attribute) as an imperative instruction, and the caption of the image after the edit.\n"
               'Answer with JSON only: {{"instruction": "...", "edited_caption": "..."}}')

OFFLINE_SWAPS = {"red": "blue", "blue": "green", "green": "yellow", "yellow": "red", "cat": "dog", "dog": "cat",
                 "square": "circle", "circle": "square", "man": "woman", "woman": "man", "car": "bicycle"}
OFFLINE_ADD = ("a small hat", "a red balloon", "a wooden bench", "a bird")


@dataclass
class DescriptionConfig:
    t_o_source: str = "caption"   # caption | vlm
    vlm_kind: str = "local"       # planner backend for t_o: local (Qwen2.5-VL) | openai
    vlm_path: str | None = None
    llm: str = "offline"          # offline | openai | transformers
    llm_model: str | None = None  # model name (openai) or id/dir (transformers)
    base_url: str | None = None   # openai: endpoint (or REPLAN_PLANNER_BASE_URL / OPENAI_BASE_URL)
    max_new_tokens: int = 128
    cache: str | None = None      # JSONL path; None = in memory only
    concurrency: int = 1          # LLM requests in flight per process (a vLLM server batches them)


def sample_key(image, caption: str) -> str:
    """sha256 over the image bytes (encoded PNG for a PIL image) and the caption, 32 hex digits."""
    if not isinstance(image, (bytes, bytearray)):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        image = buf.getvalue()
    h = hashlib.sha256(bytes(image))
    h.update(b"\0" + caption.encode("utf-8"))
    return h.hexdigest()[:32]


def offline_pair(t_o: str) -> tuple[str, str]:
    """Deterministic stand-in for the LLM: swap the first known word, else add an object (NOT an LLM)."""
    words = t_o.strip().rstrip(".").split()
    for i, w in enumerate(words):
        if w.lower() in OFFLINE_SWAPS:
            new = OFFLINE_SWAPS[w.lower()]
            return f"change the {w} to {new}", " ".join(words[:i] + [new] + words[i + 1:])
    obj = OFFLINE_ADD[int(hashlib.sha256(t_o.encode()).hexdigest(), 16) % len(OFFLINE_ADD)]
    return f"add {obj}", f"{t_o.strip().rstrip('.')} with {obj}"


def parse_pair(text: str) -> tuple[str, str]:
    """``{"instruction": ..., "edited_caption": ...}`` anywhere in an LLM reply → (t_ins, t_e); ValueError if absent."""
    for m in re.finditer(r"\{.*?\}", text, flags=re.S):
        try:
            data = json.loads(m.group(0))
        except json.JSONDecodeError:
            continue
        ins, out = str(data.get("instruction", "")).strip(), str(data.get("edited_caption", "")).strip()
        if ins and out:
            return ins, out
    raise ValueError(f"no instruction/edited_caption JSON in the LLM reply: {text[:200]!r}")


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class Describer:
    def __init__(self, cfg: DescriptionConfig | None = None, llm=None, vlm=None, llm_id: str | None = None):
        """``llm``: a callable prompt → text (overrides ``cfg.llm``; ``llm_id`` names it in the cache key, default
        ``"custom"``); ``vlm``: a planner with ``generate``."""
        self.cfg = cfg or DescriptionConfig()
        self._llm, self._vlm, self.llm_id = llm, vlm, llm_id
        self.custom = llm is not None
        self.cache: dict[str, dict] = {}
        self.reused = self.generated = self.stale = 0
        self._lock = threading.Lock()
        self.path = Path(self.cfg.cache) if self.cfg.cache else None
        wanted = {self.fingerprint("pair"), self.fingerprint("target")}
        if self.path and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line) if line.strip() else None
                except json.JSONDecodeError:  # a line cut by a kill: ignored
                    row = None
                if not isinstance(row, dict) or "key" not in row:
                    continue
                if row.get("fingerprint") in wanted:
                    self.cache[self._slot(row["fingerprint"], row["key"])] = row
                else:
                    self.stale += 1

    @property
    def generator_name(self) -> str:
        return "custom" if self.custom else self.cfg.llm

    def producer(self, kind: str) -> dict:
        """What writes a row of ``kind`` (``pair``: training t_o/t_ins/t_e; ``target``: t_e at inference)."""
        c = self.cfg
        llm = {"llm": self.generator_name, "llm_model": None if self.custom else c.llm_model,
               "llm_id": (self.llm_id or "custom") if self.custom else None,
               "max_new_tokens": None if self.generator_name == "offline" else c.max_new_tokens,
               "prompt_sha256": _sha(PAIR_PROMPT if kind == "pair" else TARGET_PROMPT)}
        if kind == "pair":
            llm["t_o_source"] = c.t_o_source
            if c.t_o_source == "vlm":
                llm["vlm"] = {"kind": c.vlm_kind, "path": c.vlm_path, "prompt_sha256": _sha(CAPTION_PROMPT)}
        return llm

    def fingerprint(self, kind: str) -> str:
        return _sha(json.dumps(self.producer(kind), sort_keys=True))[:16]

    @staticmethod
    def _slot(fingerprint: str, key: str) -> str:
        return f"{fingerprint}:{key}"

    def summary(self) -> str:
        where = f" in {self.path}" if self.path else ""
        stale = f"; {self.stale} cached rows from another LLM/prompt ignored" if self.stale else ""
        return f"descriptions: {self.reused} reused from the cache{where}, {self.generated} generated{stale}"

    # ---------------------------------------------------------------------------------------------- backends
    def llm(self, prompt: str) -> str:
        if self._llm is None:
            self._llm = self._build_llm()
        return self._llm(prompt)

    def _build_llm(self):
        kind = self.cfg.llm
        if kind == "openai":
            from replan.planner.openai_backend import OpenAIPlanner

            planner = OpenAIPlanner(base_url=self.cfg.base_url, model=self.cfg.llm_model,
                                    max_tokens=self.cfg.max_new_tokens)
            return planner.generate_text
        if kind == "transformers":
            return _TransformersLLM(self.cfg.llm_model, self.cfg.max_new_tokens)
        if kind == "offline":
            return None
        raise ValueError(f"descriptions.llm must be offline, openai or transformers, not {kind!r}")

    def source_caption(self, image, caption: str) -> str:
        if self.cfg.t_o_source == "caption":
            return caption.strip()
        if self.cfg.t_o_source != "vlm":
            raise ValueError(f"t_o_source must be caption or vlm, not {self.cfg.t_o_source!r}")
        if self._vlm is None:
            from replan.planner import load_planner

            self._vlm = load_planner(self.cfg.vlm_kind, self.cfg.vlm_path)
        return self._vlm.generate(image, CAPTION_PROMPT).text.strip()

    # ------------------------------------------------------------------------------------------------ public
    def training_texts(self, image, caption: str, image_bytes: bytes | None = None) -> dict:
        """``{"t_o", "t_ins", "t_e", "generator"}`` for one training sample (cached)."""
        key = sample_key(image_bytes if image_bytes is not None else image, caption)
        fp = self.fingerprint("pair")
        if self._slot(fp, key) in self.cache:
            with self._lock:
                self.reused += 1
            return self.cache[self._slot(fp, key)]
        t_o = self.source_caption(image, caption)
        if self.generator_name == "offline":
            t_ins, t_e = offline_pair(t_o)
        else:
            t_ins, t_e = parse_pair(self.llm(PAIR_PROMPT.format(t_o=t_o)))
        row = {"key": key, "t_o": t_o, "t_ins": t_ins, "t_e": t_e, "generator": self.generator_name,
               "fingerprint": fp, "producer": self.producer("pair")}
        self._store(row)
        return row

    def target(self, t_o: str, t_ins: str) -> str:
        """t_e = LLM(t_o, t_ins) at inference (cached on the two texts)."""
        key = "target:" + hashlib.sha256(f"{t_o}\0{t_ins}".encode()).hexdigest()[:32]
        fp = self.fingerprint("target")
        if self._slot(fp, key) in self.cache:
            self.reused += 1
            return self.cache[self._slot(fp, key)]["t_e"]
        if self.generator_name == "offline":
            t_e = offline_pair(t_o)[1]
        else:
            t_e = self.llm(TARGET_PROMPT.format(t_o=t_o, t_ins=t_ins)).strip().splitlines()[0].strip()
        self._store({"key": key, "t_o": t_o, "t_ins": t_ins, "t_e": t_e, "generator": self.generator_name,
                     "fingerprint": fp, "producer": self.producer("target")})
        return t_e

    def many(self, samples) -> list:
        """``training_texts`` for ``[{"image", "caption", "bytes"}, ...]`` with up to ``cfg.concurrency`` LLM requests
        in flight; each entry is the row or the exception that sample raised (the caller skips and counts it)."""
        def one(s):
            try:
                return self.training_texts(s["image"], s["caption"], s.get("bytes"))
            except (ValueError, RuntimeError, OSError) as e:
                return e

        if self.cfg.concurrency <= 1 or len(samples) <= 1:
            return [one(s) for s in samples]
        from concurrent.futures import ThreadPoolExecutor

        keys = [sample_key(s["bytes"] if s.get("bytes") is not None else s["image"], s["caption"]) for s in samples]
        first = {k: i for i, k in reversed(list(enumerate(keys)))}  # one request per distinct sample
        with ThreadPoolExecutor(max_workers=min(self.cfg.concurrency, len(first))) as pool:
            done = dict(zip(first, pool.map(one, [samples[i] for i in first.values()])))
        return [done[k] for k in keys]

    def _store(self, row: dict) -> None:
        line = json.dumps(row, ensure_ascii=False) + "\n"
        with self._lock:  # rows come from several threads (``many``); each lands as one whole line
            self.generated += 1
            self.cache[self._slot(row["fingerprint"], row["key"])] = row
            if self.path:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a", encoding="utf-8") as f:
                    f.write(line)


class _TransformersLLM:
    """A local causal LM (e.g. Qwen2.5-7B-Instruct) answering one user turn greedily."""

    def __init__(self, model: str | None, max_new_tokens: int):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not model:
            raise ValueError("descriptions.llm=transformers needs descriptions.llm_model (an id or a local dir)")
        self.tok = AutoTokenizer.from_pretrained(model)
        self.model = AutoModelForCausalLM.from_pretrained(model, torch_dtype="auto").eval()
        self.max_new_tokens = max_new_tokens

    def __call__(self, prompt: str) -> str:
        import torch

        if getattr(self.tok, "chat_template", None):
            text = self.tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                add_generation_prompt=True)
        else:
            text = prompt
        ids = self.tok(text, return_tensors="pt").to(self.model.device)
        with torch.no_grad():
            out = self.model.generate(**ids, max_new_tokens=self.max_new_tokens, do_sample=False)
        return self.tok.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)
