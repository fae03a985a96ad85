"""LongBench (v1) helpers: task table, loading, prompt building and the metrics of eval.py.

Expected metric values are worked out by hand in the comments; the fixtures under
``tests/fixtures/longbench`` are small made-up files in THUDM's ``{task}.jsonl`` layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sparseprefill.evals import longbench as lb
from sparseprefill.evals.longbench import (
    TASKS,
    LongBenchDataError,
    LongBenchSample,
    apply_chat_template,
    build_prompt,
    classification_score,
    code_sim_score,
    count_score,
    fuzz_ratio,
    load_task,
    normalize_answer,
    normalize_zh_answer,
    qa_f1_score,
    qa_f1_zh_score,
    retrieval_score,
    retrieval_zh_score,
    rouge_score,
    rouge_zh_score,
    score_sample,
    score_task,
    truncate_middle,
    uses_chat_template,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "longbench"

LONGBENCH_TASKS = [
    "narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh", "hotpotqa", "2wikimqa",
    "musique", "dureader", "gov_report", "qmsum", "multi_news", "vcsum", "trec", "triviaqa",
    "samsum", "lsht", "passage_count", "passage_retrieval_en", "passage_retrieval_zh", "lcc",
    "repobench-p",
]
# Tasks whose LongBench template has no {input} (summaries, counting, lcc).
NO_INPUT_TASKS = {"gov_report", "multi_news", "vcsum", "passage_count", "lcc"}
# Every other score in these tests is checked to this precision.
TOL = 1e-9


# ----------------------------------------------------------------------------- task table


def test_table_has_the_21_tasks_in_longbench_order():
    assert list(TASKS) == LONGBENCH_TASKS
    assert all(TASKS[name].name == name for name in TASKS)


@pytest.mark.parametrize("name", LONGBENCH_TASKS)
def test_templates_have_context_and_input_where_longbench_has_it(name):
    template = TASKS[name].prompt_template
    assert "{context}" in template
    assert ("{input}" in template) == (name not in NO_INPUT_TASKS)
    # Only the two LongBench fields are format fields: formatting with them must work.
    template.format(context="C", input="I")


def test_table_numbers_metrics_and_chat_flags():
    assert {name: task.max_new_tokens for name, task in TASKS.items()} == {
        "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "multifieldqa_zh": 64,
        "hotpotqa": 32, "2wikimqa": 32, "musique": 32, "dureader": 128, "gov_report": 512,
        "qmsum": 512, "multi_news": 512, "vcsum": 512, "trec": 64, "triviaqa": 32,
        "samsum": 128, "lsht": 64, "passage_count": 32, "passage_retrieval_en": 32,
        "passage_retrieval_zh": 32, "lcc": 64, "repobench-p": 64,
    }
    assert {n for n, t in TASKS.items() if not t.chat_template} == {
        "trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"
    }
    assert {n for n, t in TASKS.items() if t.first_line_only} == {
        "trec", "triviaqa", "samsum", "lsht"
    }
    assert TASKS["dureader"].metric == "rouge_zh_score"
    assert TASKS["triviaqa"].metric == "qa_f1_score"
    assert TASKS["lsht"].metric == "classification_score"
    assert TASKS["passage_count"].metric == "count_score"
    assert all(task.metric in lb.METRICS for task in TASKS.values())
    assert {t.language for t in TASKS.values()} == {"en", "zh", "code"}
    # The official narrativeqa prompt carries a typo; prompts must match LongBench's exactly.
    assert "asconcisely" in TASKS["narrativeqa"].prompt_template


def test_task_is_frozen_and_unknown_task_is_a_clear_error():
    with pytest.raises(AttributeError):
        TASKS["trec"].max_new_tokens = 1  # type: ignore[misc]
    with pytest.raises(ValueError, match="unknown LongBench task 'nq'"):
        lb.get_task("nq")


# ----------------------------------------------------------------------------- loading


def test_load_fixtures():
    hotpot = load_task(FIXTURES, "hotpotqa")
    assert len(hotpot) == 3
    first = hotpot[0]
    assert first.answers == ("the Silverrun",)
    assert first.id == "lbfix-hotpotqa-0001"
    assert first.all_classes is None and first.dataset == "hotpotqa" and first.language == "en"
    trec = load_task(FIXTURES, TASKS["trec"])
    assert all(sample.all_classes and "City" in sample.all_classes for sample in trec)
    assert len(load_task(FIXTURES, "passage_retrieval_en")) == 2
    assert load_task(FIXTURES, "lcc")[0].language == "python"


def _good_record() -> dict:
    return json.loads((FIXTURES / "hotpotqa.jsonl").read_text(encoding="utf-8").splitlines()[0])


def _write(tmp_path: Path, lines: list[str]) -> Path:
    (tmp_path / "hotpotqa.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tmp_path


def test_blank_lines_are_skipped(tmp_path):
    good = json.dumps(_good_record())
    assert len(load_task(_write(tmp_path, [good, "", good]), "hotpotqa")) == 2


def test_malformed_json_names_file_and_line(tmp_path):
    good = json.dumps(_good_record())
    with pytest.raises(LongBenchDataError, match=r"hotpotqa\.jsonl:2: invalid JSON"):
        load_task(_write(tmp_path, [good, "{not json", good]), "hotpotqa")


def test_missing_field_names_file_line_and_field(tmp_path):
    record = _good_record()
    del record["answers"]
    del record["_id"]
    expected = r"hotpotqa\.jsonl:1: missing field\(s\) answers, _id"
    with pytest.raises(LongBenchDataError, match=expected):
        load_task(_write(tmp_path, [json.dumps(record)]), "hotpotqa")


@pytest.mark.parametrize(
    "field, value",
    [("answers", "the Silverrun"), ("answers", []), ("length", "12"), ("all_classes", "City"),
     ("context", None)],
)
def test_wrongly_typed_field_is_rejected(tmp_path, field, value):
    record = _good_record()
    record[field] = value
    with pytest.raises(LongBenchDataError, match=rf"hotpotqa\.jsonl:1: field '{field}' must be"):
        load_task(_write(tmp_path, [json.dumps(record)]), "hotpotqa")


def test_not_an_object_missing_and_empty_files(tmp_path):
    with pytest.raises(LongBenchDataError, match="expected a JSON object"):
        load_task(_write(tmp_path, ["[1, 2]"]), "hotpotqa")
    with pytest.raises(LongBenchDataError, match="no samples"):
        load_task(_write(tmp_path, [""]), "hotpotqa")
    with pytest.raises(LongBenchDataError, match=r"not found: .*trec\.jsonl"):
        load_task(tmp_path, "trec")


# ----------------------------------------------------------------------------- prompts


class CharTokenizer:
    """One token per character (ids are code points), BOS id 0 prepended like a Llama
    tokenizer: enough to pin down pred.py's truncation arithmetic exactly."""

    BOS = 0
    chat_template = None

    def __call__(self, text, truncation=False):
        return {"input_ids": [self.BOS] + [ord(ch) for ch in text]}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i == self.BOS))


def _sample(context: str, question: str = "Q?") -> LongBenchSample:
    return LongBenchSample(
        input=question, context=context, answers=("x",), length=0, dataset="hotpotqa",
        language="en", all_classes=None, id="s",
    )


def test_truncate_middle_keeps_half_head_and_half_tail_tokens():
    tokenizer = CharTokenizer()
    text = "abcdefghijklmnopqrstuvwxyz"  # 27 tokens with the BOS
    assert truncate_middle(text, tokenizer, 27) == text  # fits: unchanged
    # 11 -> int(11/2) = 5 tokens each side; the head's BOS is dropped by skip_special_tokens.
    assert truncate_middle(text, tokenizer, 11) == "abcd" + "vwxyz"
    assert truncate_middle(text, tokenizer, 10) == "abcd" + "vwxyz"
    with pytest.raises(ValueError, match="at least 2"):
        truncate_middle(text, tokenizer, 1)


def test_build_prompt_formats_braces_in_context_verbatim():
    prompt = build_prompt("lcc", _sample("x = {'a': 1}\n"), CharTokenizer(), 10_000)
    assert prompt == "Please complete the code given below. \nx = {'a': 1}\nNext line of code:\n"


def test_chat_template_choice_with_a_tokenizer_without_one():
    assert not uses_chat_template("hotpotqa", CharTokenizer())
    assert apply_chat_template("hotpotqa", "raw", CharTokenizer()) == "raw"


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    try:
        from sparseprefill.evals.offline_models import load_smollm2_tokenizer

        return load_smollm2_tokenizer(progress=False)
    except Exception as error:  # noqa: BLE001 - any failure means "not available offline"
        pytest.skip(f"SmolLM2 tokenizer not available offline: {error}")


# Re-tokenizing the joined halves may merge or split a token at the seam.
SEAM_TOLERANCE = 4


def test_real_tokenizer_middle_truncation(smollm2_tokenizer):
    tok = smollm2_tokenizer
    filler = " ".join(f"Item {i} is stored on shelf {i % 7}." for i in range(600))
    sample = _sample(filler, "Which shelf holds the first item?")
    full = lb.format_prompt("hotpotqa", sample)
    max_tokens = 256
    assert len(tok(full)["input_ids"]) > 4 * max_tokens
    prompt = build_prompt("hotpotqa", sample, tok, max_tokens)
    assert len(tok(prompt)["input_ids"]) <= max_tokens + SEAM_TOLERANCE
    assert prompt.startswith("Answer the question based on the given passages.")
    assert "Item 0 is stored on shelf 0." in prompt
    assert prompt.endswith("Question: Which shelf holds the first item?\nAnswer:")
    assert "Item 300 is stored" not in prompt
    # A prompt that fits is returned unchanged.
    short = _sample("Item 1 is stored on shelf 1.")
    assert build_prompt("hotpotqa", short, tok, max_tokens) == lb.format_prompt("hotpotqa", short)


def test_real_tokenizer_chat_template(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert uses_chat_template("hotpotqa", tok)
    assert not uses_chat_template("trec", tok)
    chat = apply_chat_template("hotpotqa", "PROMPT TEXT", tok)
    assert "PROMPT TEXT" in chat and chat != "PROMPT TEXT"
    assert "<|im_start|>user" in chat and chat.rstrip().endswith("<|im_start|>assistant")
    assert apply_chat_template("trec", "PROMPT TEXT", tok) == "PROMPT TEXT"


# ----------------------------------------------------------------------------- metrics


def test_normalization():
    assert normalize_answer("The  Cat's hat, a RED one!") == "cats hat red one"
    assert normalize_zh_answer("北京， 大学。ABC") == "北京大学abc"


def test_qa_f1_partial_overlap():
    # prediction {silverrun, river}, answer {silverrun} ("the" removed): P=1/2, R=1 -> F1=2/3.
    assert qa_f1_score("Silverrun River", "the Silverrun") == pytest.approx(2 / 3, abs=TOL)
    # multiset overlap: [cat, cat, dog] vs [cat, dog, dog] -> common {cat, dog} = 2;
    # P = R = 2/3 -> F1 = 2/3.
    assert qa_f1_score("cat cat dog", "cat dog dog") == pytest.approx(2 / 3, abs=TOL)
    assert qa_f1_score("The.", "the") == 0.0  # both normalize to nothing
    assert qa_f1_score("Exactly right", "exactly, right!") == 1.0


def test_qa_f1_zh_character_level(monkeypatch):
    monkeypatch.setitem(lb._JIEBA_STATE, "module", None)
    assert lb.chinese_segmenter() == "character"
    # pred chars 北 京 大 学, answer 北 京: P=1/2, R=1 -> 2/3. Punctuation tokens are dropped.
    assert qa_f1_zh_score("北京大学。", "北京") == pytest.approx(2 / 3, abs=TOL)
    # ASCII letter/digit runs stay whole: "GPT4" is one token, "GPT 4" two -> no overlap.
    assert qa_f1_zh_score("GPT4", "GPT 4") == 0.0
    # [用, gpt, 写] vs [gpt]: P = 1/3, R = 1 -> F1 = 1/2.
    assert qa_f1_zh_score("用GPT写", "GPT") == pytest.approx(0.5, abs=TOL)


def test_rouge_l_single_sentence():
    # distinct words 5 and 5; LCS "the cat on the mat" -> word set {the, cat, on, mat} = 4;
    # P = R = 4/5 -> F = 2PR/(P+R+1e-8).
    expected = 2 * 0.8 * 0.8 / (1.6 + 1e-8)
    assert rouge_score("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(
        expected, abs=TOL
    )


def test_rouge_l_summary_level_union_and_sets():
    # reference sentences "a b c" / "d e" (m = 5), prediction "a c e" (n = 3):
    # LCS words {a, c} and {e}, union 3 -> P = 1, R = 3/5 -> F = 1.2 / 1.6.
    assert rouge_score("a c e", "a b c. d e") == pytest.approx(1.2 / (1.6 + 1e-8), abs=TOL)
    # Exclusive (set) counting: repeated words count once. m = 2, n = 1, union {the}:
    # P = 1, R = 1/2 -> F = 1 / 1.5.
    assert rouge_score("the the the", "the cat") == pytest.approx(1 / (1.5 + 1e-8), abs=TOL)
    # The rouge package raises on texts without a sentence; LongBench scores that 0.
    assert rouge_score("", "the cat") == 0.0
    assert rouge_score("...", "the cat") == 0.0


def test_rouge_zh_character_level(monkeypatch):
    monkeypatch.setitem(lb._JIEBA_STATE, "module", None)
    # chars 今天开会 vs 今天下雨: m = n = 4 distinct, LCS {今, 天} -> P = R = 1/2.
    assert rouge_zh_score("今天开会", "今天下雨") == pytest.approx(0.5 / (1 + 1e-8), abs=TOL)


def test_classification_several_matches_and_substring_rule():
    classes = ["Animal", "City", "Country", "Date"]
    # matches City and Country, right one among them -> 1/2.
    assert classification_score("City or Country", "City", all_classes=classes) == 0.5
    assert classification_score("City", "City", all_classes=classes) == 1.0
    assert classification_score("Nothing", "City", all_classes=classes) == 0.0
    assert classification_score("Country", "City", all_classes=classes) == 0.0
    # "Human" is a substring of the answer "Human being": dropped, so no dilution -> 1.
    assert classification_score(
        "Human being", "Human being", all_classes=["Human", "Human being"]
    ) == 1.0
    with pytest.raises(ValueError, match="all_classes"):
        classification_score("City", "City")


def test_classification_reproduces_longbench_list_mutation_quirk():
    # matches [ball, foot, football]; LongBench removes "ball" while iterating, which skips
    # "foot", so [foot, football] remain -> 1/2 (not 1).
    assert classification_score(
        "football", "football", all_classes=["ball", "foot", "football"]
    ) == 0.5


def test_retrieval_and_count():
    assert retrieval_score("Paragraph 4", "Paragraph 4") == 1.0
    assert retrieval_score("Paragraph 2 or Paragraph 12", "Paragraph 12") == 0.5
    assert retrieval_score("I do not know", "Paragraph 12") == 0.0
    assert retrieval_zh_score("答案是段落3", "段落3") == 1.0
    assert retrieval_zh_score("段落3和段落5", "段落5") == 0.5
    with pytest.raises(ValueError, match="no paragraph id"):
        retrieval_score("Paragraph 1", "1")
    # numbers [7, 8], one right -> 1/2.
    assert count_score("There are 7 unique paragraphs, not 8", "7") == 0.5
    assert count_score("seven", "7") == 0.0
    assert count_score("17", "7") == 0.0  # whole numbers are compared


def test_fuzz_ratio_and_code_similarity():
    # difflib: "x = compute(a,b)" (16) vs "x = compute(a, b)" (17) share 16 characters:
    # 2 * 16 / 33 = 0.9697 -> 97.
    assert fuzz_ratio("x = compute(a,b)", "x = compute(a, b)") == 97
    assert fuzz_ratio("x = compute(a,b)", "x = compute(a, b)", backend="levenshtein") == 97
    # "abcd" vs "acbd": difflib finds "a", "b"/"c" then "d" -> 3 matches -> 2*3/8 = 75;
    # LCS is also 3 -> 75.
    assert fuzz_ratio("abcd", "acbd") == 75
    assert fuzz_ratio("abcd", "acbd", backend="levenshtein") == 75
    # Both empty -> 100 (equal); one empty -> 0.
    assert fuzz_ratio("", "") == 100 and fuzz_ratio("", "a") == 0
    assert fuzz_ratio("ab", "ac") == 50  # 2 * 1 / 4
    # 2 * 1 / 16 = 12.5 exactly: fuzzywuzzy's int(round(.)) rounds half to even -> 12.
    assert fuzz_ratio("abcdefgh", "aijklmno") == 12
    with pytest.raises(ValueError, match="backend"):
        fuzz_ratio("a", "b", backend="rapidfuzz")
    # The first line without ` # or // is compared.
    prediction = "\n```python\n# compute it\nx = compute(a,b)\nreturn x"
    assert code_sim_score(prediction, "x = compute(a, b)") == 0.97
    assert code_sim_score("# only a comment", "x = 1") == 0.0


def test_first_line_trimming_applies_only_to_few_shot_tasks():
    trec = load_task(FIXTURES, "trec")[0]  # answer Animal
    assert score_sample("trec", "\n\nAnimal\nQuestion: next one\nType: Color", trec) == 1.0
    # Without trimming both Animal and Color would match -> 1/2; check the rule is per task.
    assert lb.trim_prediction("trec", "\nA\nB") == "A"
    assert lb.trim_prediction("hotpotqa", "\nA\nB") == "\nA\nB"


# ----------------------------------------------------------------------------- task scores


def test_score_task_on_fixtures():
    hotpot = load_task(FIXTURES, "hotpotqa")
    # 2/3 (partial overlap), 1 (exact, best over the two answers), 0 -> 55.555... -> 55.56
    assert score_task("hotpotqa", ["Silverrun River", "1887", "Tomas Ruhl"], hotpot) == 55.56
    trec = load_task(FIXTURES, "trec")
    # 1 (first line only), 1/2 (City and Country match), 0 -> 50.0
    trec_predictions = ["\nAnimal\nType: Color", "City or Country", "Distance"]
    assert score_task("trec", trec_predictions, trec) == 50.0
    retrieval = load_task(FIXTURES, "passage_retrieval_en")
    retrieval_predictions = ["Paragraph 4", "Paragraph 2 or 12"]
    assert score_task("passage_retrieval_en", retrieval_predictions, retrieval) == 75.0
    lcc = load_task(FIXTURES, "lcc")
    # 1.0 (identical first line) and 0.97 -> 98.5
    predictions = [
        "    return total / count\n\ndef median(values):",
        "# compute it\nx = compute(a,b)",
    ]
    assert score_task("lcc", predictions, lcc) == 98.5


def test_score_task_checks_lengths():
    hotpot = load_task(FIXTURES, "hotpotqa")
    with pytest.raises(ValueError, match="2 predictions for 3 samples"):
        score_task("hotpotqa", ["a", "b"], hotpot)
    with pytest.raises(ValueError, match="no samples"):
        score_task("hotpotqa", [], [])
