"""Task metrics by name, each computed by the library made for it (scikit-learn, scipy, rouge-score, sacrebleu,
seqeval). Scales are the libraries' own: accuracy, F1, Matthews, Pearson, Spearman, ROUGE and seqeval scores
are fractions (correlations in [-1, 1]); BLEU is sacrebleu's 0-100 score: `bleu` is SacreBLEU's standard
(detokenized, 13a) score, `bleu_ro_moses` the Romanian-normalised, Moses-tokenized BLEU that He et al. report."""

from __future__ import annotations

import math
import warnings
from typing import Callable, Sequence

from ..errors import DataError, allowed


def _accuracy(predictions: Sequence, references: Sequence) -> float:
    from sklearn.metrics import accuracy_score

    return float(accuracy_score(references, predictions))


def _f1_binary(predictions: Sequence[int], references: Sequence[int]) -> float:
    from sklearn.metrics import f1_score

    # GLUE's F1 (MRPC, QQP): the positive class is label index 1 ("equivalent", "duplicate")
    return float(f1_score(references, predictions, average="binary", pos_label=1, zero_division=0.0))


def _f1_macro(predictions: Sequence[int], references: Sequence[int]) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(references, predictions, average="macro", zero_division=0.0))


def _matthews(predictions: Sequence[int], references: Sequence[int]) -> float:
    from sklearn.metrics import matthews_corrcoef

    return float(matthews_corrcoef(references, predictions))


def _correlation(kind: str) -> Callable[[Sequence[float], Sequence[float]], float]:
    def compute(predictions: Sequence[float], references: Sequence[float]) -> float:
        from scipy import stats

        if len(predictions) < 2:
            return math.nan
        with warnings.catch_warnings():  # constant predictions (an untrained model) give nan, not a warning storm
            warnings.simplefilter("ignore")
            result = stats.pearsonr(predictions, references) if kind == "pearson" else \
                stats.spearmanr(predictions, references)
        return float(result[0])

    return compute


SENTENCE_SPLITS = ("punkt", "punkt_untrained", "none")


def check_sentence_split(split: str) -> None:
    """A clear error now, not after training: the trained English Punkt model is nltk data, not part of the wheel."""
    if split == "punkt":
        import nltk

        try:
            nltk.data.find("tokenizers/punkt_tab/english/")
        except LookupError:
            raise DataError("rougeLsum: sentence_split 'punkt' needs nltk's English Punkt model (run once: python -m "
                            "nltk.downloader punkt_tab), or set task.sentence_split=punkt_untrained") from None
    elif split not in SENTENCE_SPLITS:
        raise DataError(f"unknown sentence_split '{split}' (allowed: {allowed(SENTENCE_SPLITS)})")


def split_sentences(text: str, split: str) -> str:
    """One sentence per line, as ROUGE-Lsum reads them. `punkt`: nltk.sent_tokenize (trained English Punkt, what
    the reference's run_summarization.py does); `punkt_untrained`: Punkt's rules without the trained abbreviation
    and collocation lists (no data to install); `none`: the text's own newlines."""
    if split == "none":
        return text
    if split == "punkt":
        import nltk

        return "\n".join(nltk.sent_tokenize(text))
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    return "\n".join(PunktSentenceTokenizer().tokenize(text))


def _rouge(rouge_type: str) -> Callable[..., float]:
    def compute(predictions: Sequence[str], references: Sequence[str], sentence_split: str = "none") -> float:
        from rouge_score import rouge_scorer

        # the mean F-measure over examples (the reference's datasets metric reports a bootstrap estimate of it)
        scorer = rouge_scorer.RougeScorer([rouge_type], use_stemmer=True)
        if not predictions:
            return 0.0
        if rouge_type == "rougeLsum":  # summary-level LCS: sentences are the lines of each text
            check_sentence_split(sentence_split)
            predictions = [split_sentences(p, sentence_split) for p in predictions]
            references = [split_sentences(r, sentence_split) for r in references]
        scores = [scorer.score(ref, pred)[rouge_type].fmeasure for pred, ref in zip(predictions, references)]
        return float(sum(scores) / len(scores))

    return compute


def _bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """SacreBLEU's standard score: detokenized text, its 13a tokenizer, no other normalisation."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def _bleu_ro_moses(predictions: Sequence[str], references: Sequence[str]) -> float:
    """He et al.'s reported en-ro BLEU (exps/romanian_postprocess.sh): both sides normalised, diacritics removed and
    Moses-tokenized (unipelt.tasks.romanian), then BLEU on those tokens without smoothing (sacrebleu -tok none -s none)."""
    import sacrebleu

    from .romanian import reference_tokens

    hypotheses = [reference_tokens(p) for p in predictions]
    golds = [reference_tokens(r) for r in references]
    return float(sacrebleu.corpus_bleu(hypotheses, [golds], tokenize="none", smooth_method="none").score)


def _seqeval(name: str) -> Callable[[Sequence[Sequence[str]], Sequence[Sequence[str]]], float]:
    def compute(predictions: Sequence[Sequence[str]], references: Sequence[Sequence[str]]) -> float:
        from seqeval import metrics

        function = {"f1": metrics.f1_score, "precision": metrics.precision_score,
                    "recall": metrics.recall_score}[name]
        with warnings.catch_warnings():  # no predicted entity at all: seqeval warns and returns 0
            warnings.simplefilter("ignore")
            return float(function([list(r) for r in references], [list(p) for p in predictions], zero_division=0))

    return compute


def _token_accuracy(predictions: Sequence[Sequence[str]], references: Sequence[Sequence[str]]) -> float:
    from seqeval.metrics import accuracy_score

    return float(accuracy_score([list(r) for r in references], [list(p) for p in predictions]))


METRICS: dict[str, Callable] = {
    "accuracy": _accuracy,
    "f1": _f1_binary,
    "f1_macro": _f1_macro,
    "matthews_correlation": _matthews,
    "pearson": _correlation("pearson"),
    "spearmanr": _correlation("spearmanr"),
    "rouge1": _rouge("rouge1"),
    "rouge2": _rouge("rouge2"),
    "rougeL": _rouge("rougeL"),
    "rougeLsum": _rouge("rougeLsum"),
    "bleu": _bleu,
    "bleu_ro_moses": _bleu_ro_moses,
    "seqeval_f1": _seqeval("f1"),
    "seqeval_precision": _seqeval("precision"),
    "seqeval_recall": _seqeval("recall"),
    "token_accuracy": _token_accuracy,
}
# `loss`: the teacher-forced token cross-entropy on the eval split (PreparedTask.evaluate computes it from the model,
# not from generated text); He et al.'s en-ro run picks its checkpoint by it.
_GENERATION = ("rouge1", "rouge2", "rougeL", "rougeLsum", "bleu", "bleu_ro_moses", "loss")
METRICS_BY_KIND: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy", "f1", "f1_macro", "matthews_correlation"),
    "regression": ("pearson", "spearmanr"),
    "tagging": ("seqeval_f1", "seqeval_precision", "seqeval_recall", "token_accuracy"),
    "summarization": _GENERATION,
    "translation": _GENERATION,
}
LOWER_IS_BETTER: frozenset[str] = frozenset({"loss"})


def compute_metrics(names: Sequence[str], predictions: Sequence, references: Sequence, *,
                    sentence_split: str = "none") -> dict[str, float]:
    """{name: value} for each metric name; predictions/references are label ids (classification), floats
    (regression), tag-name lists (tagging) or strings (generation). `sentence_split`: how rougeLsum finds the
    sentences of each text (see split_sentences)."""
    if len(predictions) != len(references):
        raise DataError(f"metrics: {len(predictions)} predictions for {len(references)} references")
    out = {}
    for name in names:
        if name not in METRICS:
            raise DataError(f"unknown metric '{name}' (allowed: {allowed(METRICS)})")
        if name == "rougeLsum":
            out[name] = METRICS[name](predictions, references, sentence_split=sentence_split)
        else:
            out[name] = METRICS[name](predictions, references)
    return out


def greater_is_better(metric: str) -> bool:
    return metric not in LOWER_IS_BETTER
