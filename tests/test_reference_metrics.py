"""The paper's metric pipelines on small hand-written fixtures, against sacrebleu / rouge-score run directly on text
preprocessed by hand the way the reference scripts do it (Romanian: exps/romanian_postprocess.sh; ROUGE-Lsum: one
sentence per line, as run_summarization.py's nltk split)."""

from __future__ import annotations

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from unipelt.errors import DataError
from unipelt.tasks import compute_metrics, load_task_config
from unipelt.tasks.metrics import check_sentence_split
from unipelt.tasks.romanian import normalise_romanian, reference_tokens, remove_diacritics

# Romanian system outputs and references, with the preprocessed lines written out by hand: Moses punctuation
# normalisation (typographic quotes, guillemets and dashes become ASCII), s/t-cedilla -> s/t-comma, no diacritics,
# Moses tokens (punctuation split off, hyphenated clitics such as nu-i and sa-si kept whole).
HYPOTHESES = ["Şcoala „Ion Creangă” are 1.200 de elevi.",
              "Ţara noastră e frumoasă, nu-i aşa?",
              "Președintele a spus: «Vom câștiga!»",
              "Guvernul a decis – în sfârşit – să-şi revizuiască planul (2016)."]
REFERENCES = ["Școala „Ion Creangă” are 1.200 de copii.",
              "Țara noastră este frumoasă, nu-i așa?",
              "Președintele a declarat: «Vom câștiga!»",
              "Guvernul a decis – în sfârșit – să-și revizuiască planul (2016)."]
HYPOTHESES_TOKENS = ['Scoala " Ion Creanga " are 1.200 de elevi .',
                     "Tara noastra e frumoasa , nu-i asa ?",
                     'Presedintele a spus : " Vom castiga ! "',
                     "Guvernul a decis - in sfarsit - sa-si revizuiasca planul ( 2016 ) ."]
REFERENCES_TOKENS = ['Scoala " Ion Creanga " are 1.200 de copii .',
                     "Tara noastra este frumoasa , nu-i asa ?",
                     'Presedintele a declarat : " Vom castiga ! "',
                     "Guvernul a decis - in sfarsit - sa-si revizuiasca planul ( 2016 ) ."]


def test_romanian_normalisation_and_diacritics_on_a_hand_written_fixture():
    cedilla = "\u015ecoala \u015fi \u0162ara \u0163ine"  # Şcoala şi Ţara ţine, with the legacy cedilla letters
    assert normalise_romanian(cedilla) == "\u0218coala \u0219i \u021aara \u021bine"  # comma-below letters
    assert remove_diacritics(normalise_romanian(cedilla)) == "Scoala si Tara tine"
    assert remove_diacritics("\u0102ST\u0102 \u00e2n \u00ceN \u00eencet \u0103\u00c2") == "ASTA an IN incet aA"
    assert normalise_romanian("plain ASCII text") == "plain ASCII text"
    # diacritics removal assumes comma-below letters: a cedilla letter left alone is not a Romanian diacritic for it
    assert remove_diacritics("\u015f") == "\u015f"


def test_reference_tokens_equal_the_hand_written_pipeline_output():
    assert [reference_tokens(t) for t in HYPOTHESES] == HYPOTHESES_TOKENS
    assert [reference_tokens(t) for t in REFERENCES] == REFERENCES_TOKENS


def test_reference_en_ro_bleu_equals_sacrebleu_on_the_preprocessed_fixture():
    expected = sacrebleu.corpus_bleu(HYPOTHESES_TOKENS, [REFERENCES_TOKENS], tokenize="none",
                                     smooth_method="none").score
    ours = compute_metrics(["bleu_ro_moses", "bleu"], HYPOTHESES, REFERENCES)
    assert ours["bleu_ro_moses"] == pytest.approx(expected, abs=1e-9)
    # `bleu` is SacreBLEU's standard score on the raw text: another number, and which is which matters
    assert ours["bleu"] == pytest.approx(sacrebleu.corpus_bleu(HYPOTHESES, [REFERENCES]).score, abs=1e-9)
    assert ours["bleu"] != pytest.approx(ours["bleu_ro_moses"], abs=0.5)


def test_reference_bleu_ignores_diacritics_and_cedillas_as_the_paper_does():
    with_cedillas = ["\u015ecoala \u015fi \u0163ara au \u00eenceput ast\u0103zi ."]
    bare = ["Scoala si tara au inceput astazi ."]
    assert compute_metrics(["bleu_ro_moses"], with_cedillas, bare)["bleu_ro_moses"] == pytest.approx(100.0)
    assert compute_metrics(["bleu"], with_cedillas, bare)["bleu"] < 50.0


SUMMARIES = ["The council approved the plan on Monday. Work starts next year.",
             "Police arrested two men after the robbery. Both were released on bail."]
GOLD = ["Work on the plan starts next year. The council approved it on Monday.",
        "Two men were arrested after a robbery in the town centre."]
SUMMARIES_LINES = ["The council approved the plan on Monday.\nWork starts next year.",
                   "Police arrested two men after the robbery.\nBoth were released on bail."]
GOLD_LINES = ["Work on the plan starts next year.\nThe council approved it on Monday.",
              "Two men were arrested after a robbery in the town centre."]


def _rouge_lsum(predictions, references) -> float:
    scorer = rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=True)
    scores = [scorer.score(r, p)["rougeLsum"].fmeasure for p, r in zip(predictions, references)]
    return sum(scores) / len(scores)


def test_rouge_lsum_scores_sentences_one_per_line():
    expected = _rouge_lsum(SUMMARIES_LINES, GOLD_LINES)
    ours = compute_metrics(["rougeLsum", "rougeL"], SUMMARIES, GOLD, sentence_split="punkt_untrained")
    assert ours["rougeLsum"] == pytest.approx(expected, abs=1e-12)
    # unsplit, summary-level LCS is plain ROUGE-L: the split is what makes rougeLsum differ here
    assert _rouge_lsum(SUMMARIES, GOLD) == pytest.approx(ours["rougeL"], abs=1e-12)
    assert ours["rougeLsum"] > ours["rougeL"] + 0.05
    assert compute_metrics(["rougeLsum"], SUMMARIES_LINES, GOLD_LINES, sentence_split="none")["rougeLsum"] == \
        pytest.approx(expected, abs=1e-12)


def test_trained_punkt_when_its_data_is_installed():
    try:
        check_sentence_split("punkt")
    except DataError as exc:
        assert "nltk.downloader punkt_tab" in str(exc) and "punkt_untrained" in str(exc)
        pytest.skip("nltk's English Punkt model is not installed (offline machine)")
    ours = compute_metrics(["rougeLsum"], SUMMARIES, GOLD, sentence_split="punkt")
    assert ours["rougeLsum"] == pytest.approx(_rouge_lsum(SUMMARIES_LINES, GOLD_LINES), abs=1e-12)


def test_task_files_report_the_metrics_and_generation_settings_they_say():
    xsum = load_task_config("xsum")
    assert xsum.metrics == ["rouge1", "rouge2", "rougeL", "rougeLsum"] and xsum.main_metric == "rouge2"
    assert (xsum.num_beams, xsum.max_new_tokens, xsum.min_new_tokens, xsum.no_repeat_ngram_size,
            xsum.length_penalty, xsum.sentence_split) == (6, 59, 9, 3, 1.0, "punkt")
    en_ro = load_task_config("wmt16_en_ro")
    assert en_ro.metrics == ["bleu_ro_moses", "bleu", "loss"] and en_ro.main_metric == "bleu_ro_moses"
    assert (en_ro.source_lang, en_ro.target_lang, en_ro.num_beams, en_ro.max_new_tokens) == ("en_XX", "ro_RO", 5, 149)


@pytest.mark.parametrize("change, culprit", [
    ({"sentence_split": "nltk"}, "sentence_split"), ({"source_lang": "en_XX", "target_lang": None}, "target_lang"),
    ({"min_new_tokens": 500}, "min_new_tokens"), ({"length_penalty": float("nan")}, "length_penalty"),
    ({"no_repeat_ngram_size": -1}, "no_repeat_ngram_size"), ({"max_new_tokens": 0}, "max_new_tokens"),
])
def test_bad_generation_settings_are_named(change, culprit):
    raw = {"name": "t", "kind": "translation", "data_dir": "x", "text_columns": ["en", "ro"], "metrics": ["bleu"],
           **change}
    with pytest.raises(DataError, match=culprit):
        load_task_config(raw)
