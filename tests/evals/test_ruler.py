"""Tests for the offline RULER-11 generator and scorers (sparseprefill.evals.ruler)."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from sparseprefill.evals.ruler import (
    NOISE,
    RULER_11,
    TASK_CONFIGS,
    TASK_METRIC,
    RulerSample,
    generate,
    score,
    string_match_all,
    string_match_part,
)

pytest.importorskip("wonderwords")

# A small paragraph written for these tests (stands in for the essay haystack).
ESSAY = (
    "I wrote this short paragraph for the tests. It talks about gardens, rivers and small towns! "
    "Do people still walk to the market on Sundays? Some do, and they carry baskets of bread. "
    "The baker opens early; the river is slow in August. Children race paper boats under the bridge."
)

NEEDLE_RE = re.compile(r"One of the special magic (\w+) for (.+?) is: (\S+)\.")  # keys may hold spaces
VAR_VALUE_RE = re.compile(r"^VAR ([A-Z]+) = (\d+)\s*$")
VAR_VAR_RE = re.compile(r"^VAR ([A-Z]+) = VAR ([A-Z]+)\s*$")


class WhitespaceTokenizer:
    """A stand-in tokenizer: one token per whitespace-separated piece."""

    def encode(self, text, add_special_tokens=False):
        return text.split()


@pytest.fixture(scope="module")
def smollm2_tok():
    from sparseprefill.evals import offline_models

    if not offline_models.smollm2_is_cached():
        pytest.skip("SmolLM2 tokenizer not cached locally")
    try:
        return offline_models.load_smollm2_tokenizer(progress=False)
    except Exception as exc:  # pragma: no cover - environment dependent
        pytest.skip(f"SmolLM2 tokenizer unavailable: {exc}")


@pytest.fixture(scope="module")
def samples_2048(smollm2_tok):
    return {t: generate(t, smollm2_tok, 2048, 3, seed=7, haystack_text=ESSAY) for t in RULER_11}


# ----------------------------------------------------------------------------------- API basics


def test_task_list_and_metrics():
    assert len(RULER_11) == 11 and len(set(RULER_11)) == 11
    assert set(RULER_11) == set(TASK_CONFIGS)
    assert all(TASK_METRIC[t] == "string_match_all" for t in RULER_11)
    assert TASK_METRIC["qa_1"] == TASK_METRIC["qa_2"] == "string_match_part"
    assert TASK_CONFIGS["niah_multikey_3"]["type_needle_k"] == "uuids"
    assert TASK_CONFIGS["cwe"]["freq_cw"] == 30 and TASK_CONFIGS["vt"]["num_hops"] == 4


def test_errors():
    tok = WhitespaceTokenizer()
    with pytest.raises(ValueError, match="unknown"):
        generate("qa_1", tok, 1024, 1, seed=0)
    with pytest.raises(ValueError, match="haystack_text"):
        generate("niah_single_2", tok, 1024, 1, seed=0)
    with pytest.raises(ValueError):
        generate("niah_single_1", tok, 100, 1, seed=0)  # no room beyond the 128 generated tokens
    with pytest.raises(ValueError):
        generate("cwe", tok, 160, 1, seed=0)  # budget too small for the task


@pytest.mark.parametrize("task", RULER_11)
def test_deterministic_per_seed(task):
    tok = WhitespaceTokenizer()
    a = generate(task, tok, 1500, 2, seed=3, haystack_text=ESSAY)
    b = generate(task, tok, 1500, 2, seed=3, haystack_text=ESSAY)
    c = generate(task, tok, 1500, 2, seed=4, haystack_text=ESSAY)
    assert a == b
    assert [s.input for s in a] != [s.input for s in c]
    assert [s.outputs for s in a] != [s.outputs for s in c]
    assert a[0].input != a[1].input  # samples differ within one call
    assert [s.index for s in a] == [0, 1]
    assert all(isinstance(s, RulerSample) and s.task == task for s in a)


# --------------------------------------------------------------------------- token budget fit


@pytest.mark.parametrize("length", [1024, 2048])
@pytest.mark.parametrize("task", RULER_11)
def test_fits_token_budget(smollm2_tok, task, length):
    samples = generate(task, smollm2_tok, length, 2, seed=11, haystack_text=ESSAY)
    for s in samples:
        prompt_tokens = len(smollm2_tok.encode(s.input + s.answer_prefix, add_special_tokens=False))
        assert s.length == prompt_tokens + s.max_new_tokens
        assert s.length <= length
        room = length - s.max_new_tokens
        assert prompt_tokens > 0.9 * room, (prompt_tokens, room)


def test_generation_budgets(samples_2048):
    expected = {"vt": 30, "cwe": 120, "fwe": 50}
    for task, samples in samples_2048.items():
        assert samples[0].max_new_tokens == expected.get(task, 128)
        assert samples[0].metric == "string_match_all"


# -------------------------------------------------------------------------------------- NIAH


def _needles(text):
    found: dict[str, list[str]] = {}
    for _kind, key, value in NEEDLE_RE.findall(text):
        found.setdefault(key, []).append(value)
    return found


def _query_keys(prefix):
    query = re.search(r" for (.+) mentioned in the provided text", prefix).group(1)
    return [k for k in re.split(r", and |, ", query)]


@pytest.mark.parametrize("task", [t for t in RULER_11 if t.startswith("niah")])
def test_niah_needles_and_answers(samples_2048, task):
    cfg = TASK_CONFIGS[task]
    num_q, num_v = cfg["num_needle_q"], cfg["num_needle_v"]
    for s in samples_2048[task]:
        needles = _needles(s.input)
        keys = _query_keys(s.answer_prefix)
        assert len(keys) == num_q
        assert len(s.outputs) == num_q * num_v
        # The expected answers are exactly the values of the queried keys' needles.
        assert sorted(v for k in keys for v in needles[k]) == sorted(s.outputs)
        for value in s.outputs:
            assert value in s.input
            assert re.search(r"for .+? is: " + re.escape(value) + r"\.", s.input)
        if cfg["type_needle_v"] == "numbers":
            assert all(re.fullmatch(r"\d{7}", v) for v in s.outputs)
        elif cfg["type_needle_v"] == "uuids":
            assert all(re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", v)
                       for v in s.outputs)
        if cfg["type_needle_k"] == "words":
            assert all(re.fullmatch(r"[\w' -]+-[\w' -]+", k) for k in keys)
        if cfg["type_haystack"] == "needle":
            assert len(needles) > 10  # the haystack is made of distractor needles
            assert all(len(needles[k]) == num_v for k in keys)  # no distractor reuses a queried key
        else:  # all needles are real: num_needle_k keys (at least num_needle_q) x num_needle_v values
            assert sum(map(len, needles.values())) == max(cfg["num_needle_k"], num_q) * num_v
        single = num_q * num_v == 1
        assert s.input.startswith("A special magic" if single else "Some special magic")
        assert s.answer_prefix.endswith(" is" if single else " are")


def test_niah_haystacks(samples_2048):
    s = samples_2048["niah_single_1"][0]
    body = s.input.split("\n")[1:-1]
    assert sum(line == NOISE for line in body) == len(body) - 1
    s = samples_2048["niah_single_2"][0]
    assert "Children race paper boats under the bridge." in s.input
    assert NOISE not in s.input


# ------------------------------------------------------------------------- variable tracking


def _resolve_vars(text):
    values: dict[str, str] = {}
    refs: dict[str, str] = {}
    order: dict[str, int] = {}
    for i, line in enumerate(text.split("\n")):
        if m := VAR_VALUE_RE.match(line):
            values[m.group(1)] = m.group(2)
            order[m.group(1)] = i
        elif m := VAR_VAR_RE.match(line):
            refs[m.group(1)] = m.group(2)
            order[m.group(1)] = i
            assert order[m.group(2)] < i  # assigned after its source is defined

    def value(var):
        return values[var] if var in values else value(refs[var])

    return {var: value(var) for var in order}


def test_vt_chain_consistent(samples_2048):
    for s in samples_2048["vt"]:
        marker = "Memorize and track the chain(s)"
        assert s.input.count(marker) == 2  # one-shot example + the task
        main = s.input[s.input.rindex(marker):]
        query = re.search(r"assigned the value (\d+) in the text above", main).group(1)
        assert f"assigned the value {query}, they are: " in s.answer_prefix
        resolved = _resolve_vars(main)
        assert sorted(v for v, val in resolved.items() if val == query) == sorted(s.outputs)
        assert len(s.outputs) == 5 and all(re.fullmatch(r"[A-Z]{5}", v) for v in s.outputs)
        assert f"VAR {s.outputs[0]} = {query}" in main
        # The one-shot example is answered and consistent too.
        shot = s.input[:s.input.rindex(marker)]
        shot_query = re.search(r"assigned the value (\d+), they are: ", shot).group(1)
        shot_answer = shot.rsplit("they are: ", 1)[1].split()
        shot_resolved = _resolve_vars(shot)
        assert sorted(v for v, val in shot_resolved.items() if val == shot_query) == sorted(shot_answer)


# ------------------------------------------------------------------------------- CWE and FWE


def _numbered_words(block):
    # wonderwords has a few two-word entries ("dump truck"), so split on the numbering.
    return re.findall(r"\d+\. (.+?)(?= \d+\. |$)", block)


@pytest.mark.parametrize("length, common, rare", [(2048, 6, 1), (4096, 30, 3)])
def test_cwe_answers_are_most_common(smollm2_tok, length, common, rare):
    for s in generate("cwe", smollm2_tok, length, 2, seed=5):
        main = s.input[s.input.rindex("Below is a numbered list of words."):]
        block = main.split("\n")[1]
        counts = Counter(_numbered_words(block))
        assert len(s.outputs) == 10
        assert all(counts[w] == common for w in s.outputs)
        others = [c for w, c in counts.items() if w not in s.outputs]
        assert others and all(c == rare for c in others)
        assert sorted(w for w, _ in counts.most_common(10)) == sorted(s.outputs)
        # The one-shot example precedes the task, with its answer spelled out.
        assert s.input.index("Answer: The top 10 words") < s.input.rindex("Below is a numbered list")


def test_fwe_answers_are_most_frequent(samples_2048):
    for s in samples_2048["fwe"]:
        text = s.input.split("three most frequently appeared coded words. ", 1)[1].split("\nQuestion:")[0]
        counts = Counter(text.split())
        assert counts.most_common(1)[0][0] == "..."
        del counts["..."]
        ranked = counts.most_common()
        assert tuple(w for w, _ in ranked[:3]) == s.outputs
        assert ranked[0][1] > ranked[1][1] > ranked[2][1] > ranked[3][1]
        assert all(re.fullmatch(r"[a-z]{6}", w) for w in s.outputs)


# ------------------------------------------------------------------------------------ scoring


def test_string_match_all():
    assert string_match_all(["The answers: 123 and 456."], [["123", "456"]]) == 100.0
    assert string_match_all(["only 123"], [["123", "456"]]) == 50.0
    assert string_match_all(["ABC-Def"], [["abc-def"]]) == 100.0  # case-insensitive
    assert string_match_all(["x", "1", "12"], [["1"], ["1"], ["1", "2"]]) == 66.67
    assert string_match_all(["nothing"], [["a-b"]]) == 0.0
    with pytest.raises(ValueError):
        string_match_all(["a"], [["a"], ["b"]])


def test_string_match_part():
    assert string_match_part(["only 123"], [["123", "456"]]) == 100.0
    assert string_match_part(["none"], [["123", "456"]]) == 0.0
    assert string_match_part(["PARIS", "rome", "x"], [["paris"], ["Berlin", "Rome"], ["y"]]) == 66.67


def test_score_helper(samples_2048):
    samples = samples_2048["niah_multivalue"][:2]
    perfect = [" " + ", ".join(s.outputs) + "." for s in samples]
    half = [" " + s.outputs[0] + " \x00" + s.outputs[1] for s in samples]
    assert score("niah_multivalue", perfect, samples) == 100.0
    assert score("niah_multivalue", half, samples) == 50.0
    with pytest.raises(ValueError):
        score("vt", perfect, samples)


def test_plain_callable_token_counter():
    samples = generate("niah_single_1", lambda text: len(text.split()), 600, 1, seed=1)
    s = samples[0]
    assert len((s.input + s.answer_prefix).split()) + s.max_new_tokens == s.length <= 600
