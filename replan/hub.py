"""Model sources (hub ids and local folders): checks before loading, and one-line reasons when loading fails.

``check_source`` runs before anything loads: a local path must exist; a hub id that is not cached locally is refused
at once when the hub is switched off (``HF_HUB_OFFLINE=1``). ``load_error`` turns the chained exceptions that
diffusers / transformers / huggingface_hub raise (whose text often says "check the stacktrace above" when no
stacktrace is shown) into one sentence with the way out: connect, download, accept a licence, set ``HF_TOKEN``,
or pass a local copy. No function here touches the network or imports torch.
"""

from __future__ import annotations

import os
from pathlib import Path

# Repositories whose licence must be accepted on the model page before the hub serves the files (gated).
GATED_PREFIXES = ("black-forest-labs/",)


def is_local(source: str) -> bool:
    """True for something that names a local path rather than a hub id (``org/name``)."""
    s = str(source)
    return (s.startswith(("/", "./", "../", "~", ".\\")) or s in (".", "..") or os.path.isabs(s)
            or os.path.exists(os.path.expanduser(s)))


def is_gated(repo_id: str) -> bool:
    return str(repo_id).startswith(GATED_PREFIXES)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def is_cached(repo_id: str, filename: str) -> bool:
    """Whether ``filename`` of ``repo_id`` is in the local hub cache (False if huggingface_hub is missing)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    try:
        return isinstance(try_to_load_from_cache(repo_id, filename), str)
    except Exception:  # a malformed id: the load itself reports it
        return False


def download_hint(repo_id: str, flag: str) -> str:
    gated = (f" (gated: accept the licence at https://huggingface.co/{repo_id} and set HF_TOKEN)"
             if is_gated(repo_id) else "")
    return f"download it with `hf download {repo_id}`{gated}, or pass {flag} /path/to/a/local/copy"


def check_source(source: str, what: str, flag: str, marker: str) -> None:
    """``ValueError`` naming the fix when ``source`` cannot be loaded for sure, before anything loads.

    ``marker``: a file every valid copy holds at its top (``model_index.json`` for a diffusers pipeline,
    ``config.json`` for a transformers model).
    """
    source = str(source)
    if is_local(source):
        path = Path(os.path.expanduser(source))
        if not path.exists():
            raise ValueError(f"{what} folder {source} does not exist: check {flag}")
        if not path.is_dir():
            raise ValueError(f"{what} {source} is a file; {flag} takes a folder (holding {marker}) or a hub id")
        if not (path / marker).is_file():
            raise ValueError(f"{what} folder {source} has no {marker}: it is not a saved model; check {flag}")
        return
    if _offline() and not is_cached(source, marker):
        raise ValueError(f"{what} {source} is not in the local hub cache and HF_HUB_OFFLINE is set: "
                         f"{download_hint(source, flag)}")


def _chain(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def load_error(what: str, source: str, error: BaseException, flag: str) -> str:
    """One sentence explaining why ``what`` could not be loaded from ``source``, with the way out."""
    source = str(source)
    errors = list(_chain(error))
    names = {type(e).__name__ for e in errors}
    text = " ".join(str(e) for e in errors)
    if is_local(source):
        return f"cannot load {what} from {source}: {_short(error)}; check that {flag} names a complete saved copy"
    if "GatedRepoError" in names or (is_gated(source) and any(c in text for c in ("401", "403", "gated"))):
        return (f"cannot download {what} {source}: the repository is gated; accept the licence at "
                f"https://huggingface.co/{source} and set HF_TOKEN (or pass {flag} /path/to/a/local/copy)")
    if "RepositoryNotFoundError" in names or "404 Client Error" in text:
        return (f"cannot find {what} {source} on the hub (misspelt, private, or gated without HF_TOKEN): "
                f"check {flag}")
    offline_words = ("Couldn't connect", "connect to the Hub", "Name or service not known", "Connection",
                     "not fully cached", "cached snapshot", "outgoing traffic has been disabled", "offline mode")
    if ({"LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectError", "ConnectionError"} & names
            or any(w in text for w in offline_words)):
        reason = "HF_HUB_OFFLINE is set" if _offline() else "the hub cannot be reached"
        return f"cannot load {what} {source}: it is not in the local cache and {reason}; {download_hint(source, flag)}"
    return f"cannot load {what} from {source}: {_short(error)}"


def _short(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    text = text.replace("Please check out the root cause in the stacktrace above.", "").strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."
