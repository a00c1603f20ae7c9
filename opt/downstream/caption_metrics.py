"""Standard caption metrics (COCO caption evaluation) and word error rate.

- BLEU-1..4, METEOR, ROUGE-L and CIDEr(-D) come from ``pycocoevalcap``, the
  package the COCO captioning results are reported with, scored as it does:
  corpus-level BLEU and METEOR, the mean of per-sample ROUGE-L and CIDEr.
  CIDEr weighs n-grams by their document frequency over the references, so it
  is only meaningful over a corpus, not a single caption.
- Text is tokenized by its PTBTokenizer (Stanford CoreNLP, run by ``java``)
  as in COCO. Without ``java``, or if the tokenizer fails (it writes a
  temporary file beside its jar), a lower-case word tokenizer that drops
  punctuation is used instead, with a warning.
- METEOR also runs on ``java``; without it METEOR is None, with a warning.
  Its jar loads a large paraphrase table (~10 s), so it can be skipped.
- SPICE also runs on ``java`` and needs Stanford CoreNLP 3.6.0 (its jar and
  its models' jar) in pycocoevalcap's ``spice/lib``, which the package would
  download on first use: here it is never downloaded. Without them SPICE is
  None, with a warning. Install them by hand where SPICE is wanted.
- Nothing else is needed: the other jars and METEOR's data ship in the package.
- Every metric takes several references per sample (COCO: five captions per
  image); a predicted caption identical to any of them is a perfect BLEU-1.
- Word error rate comes from ``jiwer``, over the corpus (all word edits over
  all reference words), on lower-cased text without punctuation. With
  several references for a sample, the one needing the fewest edits counts.
"""

from __future__ import annotations

import atexit
import functools
import re
import shutil
import subprocess
import warnings
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import jiwer
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
import pycocoevalcap.spice.get_stanford_models as corenlp
from pycocoevalcap.spice.spice import Spice
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

Captions = dict[Hashable, list[str]]
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_WER_TRANSFORM = jiwer.Compose([
    jiwer.ToLowerCase(),
    jiwer.RemovePunctuation(),
    jiwer.RemoveMultipleSpaces(),
    jiwer.Strip(),
    jiwer.ReduceToListOfListOfWords(),
])


def _java_available() -> bool:
    return shutil.which("java") is not None


def _simple_tokenize(captions: Captions) -> Captions:
    return {key: [" ".join(_WORD.findall(text.lower())) for text in texts] for key, texts in captions.items()}


def tokenize(captions: Captions) -> Captions:
    """COCO's PTB tokenization (lower-cased, punctuation dropped), or a simple one where it cannot run."""
    if not _java_available():
        warnings.warn("java not found: captions tokenized by a simple word tokenizer, not PTBTokenizer")
        return _simple_tokenize(captions)
    try:
        tokenized = PTBTokenizer().tokenize({key: [{"caption": t} for t in texts] for key, texts in captions.items()})
    except OSError as error:
        warnings.warn(f"PTBTokenizer failed ({error}): captions tokenized by a simple word tokenizer")
        return _simple_tokenize(captions)
    if {key: len(texts) for key, texts in tokenized.items()} != {key: len(texts) for key, texts in captions.items()}:
        warnings.warn("PTBTokenizer lost captions: captions tokenized by a simple word tokenizer")
        return _simple_tokenize(captions)
    return tokenized


@functools.cache
def _meteor_scorer() -> Meteor:
    """One METEOR java process per Python process (it takes ~15 s to load its tables)."""
    meteor = Meteor()

    def stop() -> None:  # the wrapper stops its java process only when garbage-collected
        meteor.meteor_p.kill()
        meteor.meteor_p.wait()

    atexit.register(stop)
    return meteor


def _meteor(references: Captions, predictions: Captions) -> float | None:
    if not _java_available():
        warnings.warn("java not found: METEOR is not computed")
        return None
    score, _ = _meteor_scorer().compute_score(references, predictions)
    return float(score)


def spice_models() -> list[Path]:
    """The Stanford CoreNLP jars SPICE needs, where pycocoevalcap looks for them."""
    lib = Path(corenlp.SPICEDIR) / corenlp.SPICELIB
    return [lib / f"{corenlp.JAR}{suffix}.jar" for suffix in ("", "-models")]


def _spice(references: Captions, predictions: Captions) -> float | None:
    """Mean SPICE F-score, or None (with a warning) without java or the CoreNLP jars: never downloads them."""
    missing = [str(path) for path in spice_models() if not path.is_file()]
    if not _java_available() or missing:
        warnings.warn(f"SPICE is not computed: it needs java and {', '.join(missing) or 'the CoreNLP jars'}")
        return None
    try:
        score, _ = Spice().compute_score(references, predictions)
    except (OSError, subprocess.CalledProcessError) as error:
        warnings.warn(f"SPICE failed ({error}): not computed")
        return None
    return float(score)


def _check_keys(predictions: Mapping, references: Mapping) -> None:
    missing, extra = set(references) - set(predictions), set(predictions) - set(references)
    if missing or extra:
        raise ValueError(f"predictions and references differ in keys: missing {sorted(map(str, missing))[:5]}, "
                         f"extra {sorted(map(str, extra))[:5]}")
    if not predictions:
        raise ValueError("no captions to score")


def caption_scores(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]], *,
                   with_meteor: bool = True) -> dict[str, float | None]:
    """COCO caption metrics of one predicted caption per key against its reference captions.

    Returns ``bleu_1`` .. ``bleu_4``, ``meteor`` (None without java or when
    ``with_meteor`` is False), ``rouge_l``, ``cider`` and ``spice`` (None
    without java or the CoreNLP jars).
    """
    _check_keys(predictions, references)
    if any(len(texts) == 0 for texts in references.values()):
        raise ValueError("every key needs at least one reference caption")
    tokenized_references = tokenize({key: list(texts) for key, texts in references.items()})
    tokenized_predictions = tokenize({key: [text] for key, text in predictions.items()})
    bleu, _ = Bleu(4).compute_score(tokenized_references, tokenized_predictions, verbose=0)
    rouge, _ = Rouge().compute_score(tokenized_references, tokenized_predictions)
    cider, _ = Cider().compute_score(tokenized_references, tokenized_predictions)
    scores: dict[str, float | None] = {f"bleu_{n}": float(bleu[n - 1]) for n in range(1, 5)}
    scores["meteor"] = _meteor(tokenized_references, tokenized_predictions) if with_meteor else None
    scores["rouge_l"] = float(rouge)
    scores["cider"] = float(cider)
    scores["spice"] = _spice(tokenized_references, tokenized_predictions)
    return scores


def _word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(word edits, reference words) to turn ``reference`` into ``hypothesis``."""
    out = jiwer.process_words(reference, hypothesis, reference_transform=_WER_TRANSFORM,
                              hypothesis_transform=_WER_TRANSFORM)
    return out.substitutions + out.deletions + out.insertions, out.substitutions + out.deletions + out.hits


def word_error_rate(predictions: Mapping[Hashable, str], references: Mapping[Hashable, str | Sequence[str]]) -> float:
    """Corpus word error rate: all word edits over all reference words.

    A key's reference is a string or a list of them; with a list, the
    reference needing the fewest edits counts.
    """
    _check_keys(predictions, references)
    edits = words = 0
    for key, hypothesis in predictions.items():
        options = [references[key]] if isinstance(references[key], str) else list(references[key])
        errors, length = min(_word_errors(reference, hypothesis) for reference in options)
        edits, words = edits + errors, words + length
    if words == 0:
        raise ValueError("the references hold no words")
    return edits / words
