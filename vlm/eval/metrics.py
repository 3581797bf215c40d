"""Caption metrics exactly as the COCO caption evaluation computes them, plus top-k accuracy.

CIDEr and BLEU-4 come from the ``pycocoevalcap`` package: both sides are PTB-tokenized (Stanford
CoreNLP's PTBTokenizer, lower-cased, punctuation removed; the jar ships in the package and runs on
``java``), then ``Cider().compute_score`` / ``Bleu(4).compute_score``. CIDEr's IDF is taken from the
reference set passed in, so score a whole split in one call. SPICE is not used (it downloads models).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
import tempfile
from collections.abc import Hashable, Iterator, Mapping, Sequence

import torch


def _check(candidates: Mapping, references: Mapping) -> None:
    if not candidates:
        raise ValueError("no candidates to score")
    if set(candidates) != set(references):
        only_c = sorted(map(str, set(candidates) - set(references)))[:5]
        only_r = sorted(map(str, set(references) - set(candidates)))[:5]
        raise ValueError(
            f"candidates and references must have the same ids; only in candidates {only_c}, "
            f"only in references {only_r}"
        )
    for key, refs in references.items():
        if isinstance(refs, str) or not refs:
            raise ValueError(f"references[{key!r}] must be a non-empty list of captions, got {refs!r}")
    for key, cand in candidates.items():
        if not isinstance(cand, str):
            raise ValueError(f"candidates[{key!r}] must be one caption string, got {type(cand).__name__}")


@contextlib.contextmanager
def _java_stderr_captured() -> Iterator[None]:
    """Route file descriptor 2 (where the tokenizer's java process reports) to a temporary file; its
    text is attached to any error raised inside."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        except Exception as e:
            os.dup2(saved, 2)
            log.seek(0)
            raise RuntimeError(
                f"PTB tokenization failed: {e!r}; java said: {log.read().decode(errors='replace')}"
            ) from e
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def ptb_tokenize_strings(strings: Sequence[str]) -> dict[str, str]:
    """Each distinct string -> its PTB tokenization by pycocoevalcap's tokenizer, in one ``java`` call.

    The tokenizer works line by line (``-preserveLines``), so a string's tokens do not depend on the
    other strings of the call: tokenizing many sets together gives what tokenizing each alone gives.
    """
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if shutil.which("java") is None:
        raise RuntimeError("the PTB tokenizer of the COCO caption evaluation needs `java` on PATH (e.g. openjdk)")
    unique = list(dict.fromkeys(strings))
    with _java_stderr_captured():
        tokens = PTBTokenizer().tokenize({i: [{"caption": s}] for i, s in enumerate(unique)})
        if len(tokens) != len(unique):
            raise ValueError(f"the tokenizer returned {len(tokens)} of {len(unique)} captions")
    return {s: tokens[i][0] for i, s in enumerate(unique)}


def caption_scores_many(
    sets: Sequence[tuple[Mapping[Hashable, str], Mapping[Hashable, Sequence[str]]]],
) -> list[dict[str, float]]:
    """:func:`caption_scores` of several (candidates, references) sets with one tokenizer call; each set
    is scored on its own (CIDEr's IDF from that set's references). Each result also has ``cider_per_image``
    (id -> that image's CIDEr-D, whose mean is the set's ``cider``): what paired comparisons resample."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    for candidates, references in sets:
        _check(candidates, references)
    strings = [c for cands, _ in sets for c in cands.values()]
    strings += [r for _, refs in sets for rs in refs.values() for r in rs]
    tok = ptb_tokenize_strings(strings)
    out = []
    for candidates, references in sets:
        res = {k: [tok[c]] for k, c in candidates.items()}
        gts = {k: [tok[r] for r in references[k]] for k in candidates}
        cider_score, per_image = Cider().compute_score(gts, res)
        with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its n-gram statistics
            bleu_scores, _ = Bleu(4).compute_score(gts, res)
        # CIDEr-D of the set is the mean of its per-image scores (in the order of ``gts``' keys, the candidates').
        per_id = {k: float(v) for k, v in zip(gts, per_image)}
        out.append({"cider": float(cider_score), "bleu4": float(bleu_scores[3]), "cider_per_image": per_id})
    return out


def caption_scores(
    candidates: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]
) -> dict[str, float]:
    """``{"cider": ..., "bleu4": ...}`` of raw candidate captions (id -> str) against raw references
    (id -> list of str), on pycocoevalcap's scale (not multiplied by 100): both sides PTB-tokenized,
    then ``Cider().compute_score`` and ``Bleu(4).compute_score(...)[0][3]`` over the whole set."""
    scores = caption_scores_many([(candidates, references)])[0]
    return {"cider": scores["cider"], "bleu4": scores["bleu4"]}


def cider(candidates: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]) -> float:
    """Corpus CIDEr (CIDEr-D as in the COCO evaluation) of raw captions; id -> caption, id -> [captions]."""
    return caption_scores(candidates, references)["cider"]


def bleu4(candidates: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]) -> float:
    """Corpus BLEU-4 (closest reference length) of raw captions, as the COCO evaluation computes it."""
    return caption_scores(candidates, references)["bleu4"]


def topk_correct(scores: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """scores (N, C), labels (N,) -> bool (N,): the label is among the k highest scores (ties: lower index first)."""
    top = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :k]  # (N, k)
    return (top == labels[:, None]).any(dim=1)
