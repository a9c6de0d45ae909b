"""trainer/hallucination.py: arithmetic statements in GSM8K-style reasoning, and ungrounded numbers and names.

Every expectation is worked out by hand in the test (the arithmetic is checked in comments).
"""

import pytest

from trainer.hallucination import (
    arithmetic_statements,
    grounding_hallucination,
    grounding_items,
    gsm8k_hallucination,
    normalize_number,
    normalize_word,
    unsupported_items,
)


def checked(text):
    """[(left, right, correct)] of text's statements."""
    return [(s.left, s.right, s.correct) for s in arithmetic_statements(text)]


# ---------------------------------------------------------------------------------------------
# What counts as a statement


@pytest.mark.parametrize("text, expected", [
    ("She has 16 - 3 - 4 = 9 eggs.", [("16 - 3 - 4", "9", True)]),  # 16-3-4 = 9
    ("She has 16 - 3 - 4 = 10 eggs.", [("16 - 3 - 4", "10", False)]),
    ("So 12 * 50 / 60 = 10.", [("12 * 50 / 60", "10", True)]),  # 600/60 = 10
    ("2 + 3 * 4 = 14", [("2 + 3 * 4", "14", True)]),  # precedence: 2 + 12
    ("2 + 3 * 4 = 20", [("2 + 3 * 4", "20", False)]),  # left to right would give 20: not how it reads
    ("(2 + 3) * 4 = 20", [("( 2 + 3 ) * 4", "20", True)]),
    ("10 - 4 - 3 = 3", [("10 - 4 - 3", "3", True)]),  # left-associative: (10-4)-3
    ("-3 + 5 = 2", [("- 3 + 5", "2", True)]),  # a sign written against its number
    ("14 = 2 * 7", [("14", "2 * 7", True)]),  # the result may stand on the left
])
def test_one_statement(text, expected):
    assert checked(text) == expected


@pytest.mark.parametrize("text", [
    "x = 5", "The answer is 5 = 5.", "5 + 3", "She is 3 years old.", "= 7", "3 + 4 =", "2^3 = 8",
    "2(3 + 4) = 14",  # an implicit product does not parse: no statement, neither right nor wrong
    "a 120-page book", "3 + 4 ≈ 7", "It is 10:30 = late",
])
def test_not_a_statement(text):
    assert checked(text) == []


def test_operators_as_written():
    # 0.2 x 50 = 10; 6 × 7 = 42; 84 ÷ 4 = 21; 3 \times 4 = 12; 9 − 2 = 7 (U+2212); 5 – 1 = 4 (en dash)
    text = "0.2 x 50 = 10, 6 × 7 = 42, 84 ÷ 4 = 21, \\(3 \\times 4 = 12\\), 9 − 2 = 7, 5 – 1 = 4"
    assert [c for _, _, c in checked(text)] == [True] * 6
    assert checked("5 x 5 = 24") == [("5 x 5", "24", False)]


def test_numbers_with_commas_dollars_and_percentages():
    assert checked("He pays $1,200 * 2 = $2,400.") == [("1,200 * 2", "2,400", True)]
    assert checked("20 * 50% = 10") == [("20 * 50%", "10", True)]  # 50% is 0.5
    assert checked("15% of $80 = $12") == [("15% of 80", "12", True)]  # 'of' between numbers multiplies
    # a percentage result may mean its number of percent: 3/4 * 100 = 75 (percent)
    assert checked("3/4 * 100 = 75%") == [("3 / 4 * 100", "75%", True)]
    assert checked("100% - 80% = 20 %") == [("100% - 80%", "20%", True)]
    assert checked("0.5 * .4 = .2") == [("0.5 * .4", ".2", True)]  # a leading point


def test_a_sentence_ending_point_is_not_a_decimal():
    assert checked("So 3 + 4 = 7. Then 7 * 2 = 14.") == [("3 + 4", "7", True), ("7 * 2", "14", True)]


def test_rounded_results_to_the_digits_written():
    # 10/3 = 3.333...: '3.33' is within half a unit of its last digit (0.005), '3.3' within 0.05, '3' within 0.5
    assert [c for _, _, c in checked("10 / 3 = 3.33; 10 / 3 = 3.3; 10 / 3 = 3")] == [True, True, True]
    # 2/3 = 0.6667: '0.67' holds (|0.6667 - 0.67| = 0.0033 <= 0.005), '0.66' does not (0.0067 > 0.005)
    assert [c for _, _, c in checked("2 / 3 = 0.67; 2 / 3 = 0.66")] == [True, False]
    # 8/3 = 2.67: '2' (a floor, "2 full boxes") is 0.67 away, more than 0.5: wrong
    assert checked("8 / 3 = 2") == [("8 / 3", "2", False)]
    # exact arithmetic, no float noise: 0.1 + 0.2 = 0.3 holds with zero tolerance on both sides
    assert checked("0.1 + 0.2 = 0.3 * 1") == [("0.1 + 0.2", "0.3 * 1", True)]


def test_division_by_zero_is_wrong():
    assert checked("5 / 0 = 0") == [("5 / 0", "0", False)]


# ---------------------------------------------------------------------------------------------
# Chains and running totals


def test_chain_checks_each_equals_sign():
    # 3 * (4 + 2) = 3 * 6 = 18: both equalities hold
    assert checked("3 * (4 + 2) = 3 * 6 = 18") == [("3 * ( 4 + 2 )", "3 * 6", True), ("3 * 6", "18", True)]
    # 3 * 6 = 18 = 20: the second '=' is between two single numbers, not a statement
    assert checked("3 * 6 = 18 = 20") == [("3 * 6", "18", True)]


def test_running_total_reads_the_next_expressions_first_number():
    # "2 + 3 = 5 + 4 = 9": 2 + 3 = 5 (the first number of "5 + 4"), then 5 + 4 = 9
    assert checked("2 + 3 = 5 + 4 = 9") == [("2 + 3", "5 + 4", True), ("5 + 4", "9", True)]
    # "2 + 3 = 6 + 4 = 10": 2 + 3 is neither 10 nor 6: wrong; 6 + 4 = 10 holds
    assert checked("2 + 3 = 6 + 4 = 10") == [("2 + 3", "6 + 4", False), ("6 + 4", "10", True)]


# ---------------------------------------------------------------------------------------------
# Calculator annotations


def test_annotation_counts_once():
    text = "Natalia sold 48/2 = <<48/2=24>>24 clips in May."
    statements = arithmetic_statements(text)
    assert [(s.left, s.right, s.correct, s.annotation) for s in statements] == [("48 / 2", "24", True, True)]


def test_wrong_annotation_and_text_beside_it():
    # the annotation is wrong (48/2 is 24); the text "48 + 24 = 72" after it is a statement of its own
    text = "Natalia sold 48/2 = <<48/2=25>>25 clips in May, 48 + 24 = 72 in all."
    assert [(s.right, s.correct, s.annotation) for s in arithmetic_statements(text)] == [
        ("25", False, True), ("72", True, False)]


def test_gsm8k_reference_solution_has_no_wrong_statement():
    answer = ("Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = "
              "$<<0.2*50=10>>10.\n#### 10")
    assert [(s.left, s.right, s.correct) for s in arithmetic_statements(answer)] == [
        ("12 / 60", "0.2", True), ("0.2 * 50", "10", True)]


# ---------------------------------------------------------------------------------------------
# Text around the arithmetic


@pytest.mark.parametrize("text, expected", [
    ("S + 143 = 200 - 16 = 184", [("200 - 16", "184", True)]),  # 'S + 143' has a variable: not arithmetic
    ("W/2 - 2 = $55", []),
    ("so 100 = 5A", []),  # 5A is 5 times A
    ("D3 = 2 * 322 = 644", [("2 * 322", "644", True)]),  # '3' belongs to the name D3
    ("3*30 = 30 + M trees", []),
    ("Week 1 + Week 2 = 35 + 35 = 70", [("35 + 35", "70", True)]),
    ("The sun sets at 6:00+48=6:48 PM", []),  # times
    ("- 3 + 4 = 7\n- 7 * 2 = 14", [("3 + 4", "7", True), ("7 * 2", "14", True)]),  # bullets, not signs
    ("**3 + 4 = 7**", [("3 + 4", "7", True)]),  # bold
    ("(so 3 + 4 = 7)", [("3 + 4", "7", True)]),
    ("a) 3 + 4 = 7", [("3 + 4", "7", True)]),
    ("It weighs 3 * 4 = 12kg", [("3 * 4", "12", True)]),  # a unit is not a variable
    ("3 + 4 = 7\n8 = 9", [("3 + 4", "7", True)]),  # a newline ends a run
])
def test_text_around_the_arithmetic(text, expected):
    assert checked(text) == expected


# ---------------------------------------------------------------------------------------------
# gsm8k_hallucination


def test_gsm8k_hallucination_counts():
    answers = [
        "48/2 = <<48/2=24>>24 clips. 48 + 24 = 72\n#### 72",  # 2 statements, both right, an answer
        "3 * 4 = 13 and 13 + 1 = 14\n#### 14",  # 2 statements, 1 wrong
        "I think it is 5 + 5 = 10",  # 1 right statement, no final answer
        "The answer is \\boxed{7}",  # no statement, a boxed answer
    ]
    out = gsm8k_hallucination(answers)
    assert out["num_statements"] == 5 and out["num_wrong_statements"] == 1
    assert out["wrong_statement_rate"] == pytest.approx(1 / 5)
    assert out["num_annotation_statements"] == 1 and out["num_answers_with_wrong_statement"] == 1
    assert out["num_without_final_answer"] == 1 and out["no_final_answer_rate"] == pytest.approx(1 / 4)
    assert out["num_answers"] == 4


def test_gsm8k_hallucination_without_statements_or_answers():
    assert gsm8k_hallucination(["no numbers here"])["wrong_statement_rate"] is None
    empty = gsm8k_hallucination([])
    assert empty["wrong_statement_rate"] is None and empty["no_final_answer_rate"] is None
    assert gsm8k_hallucination(["", "#### 5"])["num_without_final_answer"] == 1


# ---------------------------------------------------------------------------------------------
# Numbers and names that are not in the prompt or the context


@pytest.mark.parametrize("text, expected", [
    ("1,234", "1234"), ("3.50", "3.5"), ("007", "7"), ("2.0", "2"), ("0.50", "0.5"), ("100", "100"), (".5", "0.5"),
])
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


@pytest.mark.parametrize("word, expected", [
    ("Google's", "google"), ("Google’s", "google"), ("I'm", "i"), ("O'Brien", "o'brien"), ("ÉCOLE", "école"),
    ("ﬁsh", "fish"),  # NFKC: the ligature is two letters
])
def test_normalize_word(word, expected):
    assert normalize_word(word) == expected


def test_grounding_items_skip_sentence_initial_capitals():
    numbers, names = grounding_items("The tower in Paris is 330 m tall. It opened in 1,889! Eiffel's design: "
                                     "Gustave built it.\nYes, I'm sure.")
    # The, It, Eiffel's, Gustave, Yes start sentences ('.', '!', ':' or a newline before them); "I'm" is "i"
    assert names == {"paris"}
    assert numbers == {"330", "1889"}


def test_unsupported_items():
    out = unsupported_items("The band was founded in 1968 by Jimmy Page and Robert Plant in London, with 4 members.",
                            prompt="Who founded Led Zeppelin?",
                            context="Led Zeppelin formed in London in 1968. Its members were Jimmy Page, Robert "
                                    "Plant, John Paul Jones and John Bonham.")
    assert out["numbers"] == ["1968", "4"] and out["unsupported_numbers"] == ["4"]
    assert out["names"] == ["jimmy", "london", "page", "plant", "robert"] and out["unsupported_names"] == []


def test_source_words_count_whatever_their_case():
    # "Apple" mid-sentence is a name; the context has "apple" in lower case: supported
    assert unsupported_items("She ate an Apple pie", "What did she eat?", "an apple pie")["unsupported_names"] == []
    # without a context, only the prompt counts
    assert unsupported_items("She met Anna", "Who did she meet?", None)["unsupported_names"] == ["anna"]


def test_grounding_hallucination_micro_average():
    generations = ["It was built in 1889 by Gustave Eiffel in Paris.",  # 1889 ok, gustave, eiffel bad, paris ok
                   "About 7 million visit it, said Anna.",  # 7 bad, anna bad
                   "it is tall"]  # nothing stated
    prompts = ["When was the Eiffel tower built?", "How many visitors?", "How tall?"]
    contexts = ["The tower in Paris was finished in 1889.", None, "330 m"]
    out = grounding_hallucination(generations, prompts, contexts)
    # numbers: {1889} + {7} = 2, unsupported 1 (7); names: {gustave, eiffel, paris} + {anna} = 4, unsupported 2
    # ('eiffel' is in the prompt; gustave and anna are not)
    assert (out["num_numbers"], out["num_unsupported_numbers"]) == (2, 1)
    assert (out["num_names"], out["num_unsupported_names"]) == (4, 2)
    assert out["unsupported_rate"] == pytest.approx(3 / 6)
    assert out["unsupported_number_rate"] == pytest.approx(1 / 2)
    assert out["unsupported_name_rate"] == pytest.approx(2 / 4)
    assert out["num_answers_with_unsupported"] == 2 and out["num_answers"] == 3


def test_grounding_hallucination_nothing_stated_and_mismatched_lengths():
    out = grounding_hallucination(["yes"], ["Is it?"], [None])
    assert out["unsupported_rate"] is None and out["num_answers_with_unsupported"] == 0
    with pytest.raises(ValueError, match="one prompt and one context"):
        grounding_hallucination(["a", "b"], ["p"], [None, None])


# ---------------------------------------------------------------------------------------------
# Wired into kdtrain eval: the gsm8k metric's answers, and the grounding metric (generation faked)


def write_jsonl(path, rows):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_gsm8k_metric_reports_the_hallucination_rates(tmp_path, tiny_tokenizer_dir, monkeypatch):
    from transformers import AutoTokenizer

    import trainer.generation_metrics as ev

    data = write_jsonl(tmp_path / "gsm.jsonl", [{"question": f"Question {i}?", "answer": "#### 72"} for i in range(3)])
    answers = ["48/2 = <<48/2=24>>24 and 48 + 24 = 72\n#### 72", "3 * 4 = 13, so \\boxed{13}", "I do not know."]
    monkeypatch.setattr(ev, "generate", lambda *args, **kwargs: answers)
    config = ev.EvalConfig(model="unused", dataset=data, metrics=("gsm8k",), prompt_field="question",
                           response_field="answer")
    out = ev.gsm8k_metric(None, AutoTokenizer.from_pretrained(tiny_tokenizer_dir), config)
    # statements: 48/2=24 (annotation), 48+24=72, 3*4=13 (wrong): 1 of 3; no final answer: the third, 1 of 3
    assert (out["num_statements"], out["num_wrong_statements"]) == (3, 1)
    assert out["wrong_statement_rate"] == pytest.approx(1 / 3)
    assert out["num_without_final_answer"] == out["num_without_answer"] == 1
    assert out["no_final_answer_rate"] == pytest.approx(1 / 3) and out["num_correct"] == 1


DOLLY = [
    {"instruction": "When was the tower finished?", "context": "The tower in Paris was finished in 1889.",
     "response": "1889", "category": "closed_qa"},
    {"instruction": "Write a poem about Rome.", "context": "", "response": "...", "category": "creative_writing"},
    {"instruction": "List the members.", "context": "The members were Anna and Ben.", "response": "Anna, Ben",
     "category": "information_extraction"},
]


def grounding_config(data, **kwargs):
    from trainer.evaluate import EvalConfig

    fields = {"prompt_field": "instruction", "input_field": "context", **kwargs}
    return EvalConfig(model="unused", dataset=data, metrics=("grounding",), **fields)


def test_grounding_metric_on_the_grounded_categories(tmp_path, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    from trainer.hallucination_eval import grounding_metric

    data = write_jsonl(tmp_path / "dolly.jsonl", DOLLY)
    asked = []

    def fake_generate(model, tokenizer, prompts, **kwargs):
        asked.extend(tokenizer.decode(p) for p in prompts)
        return ["It was finished in 1889 by Gustave Eiffel.", "The members were Anna, Ben and Carl."]

    out = grounding_metric(None, AutoTokenizer.from_pretrained(tiny_tokenizer_dir), grounding_config(data), fake_generate)
    # the creative_writing row is not asked; MiniLLM's template with the context as its input
    assert len(asked) == 2 and "When was the tower finished?" in asked[0] and "### Input:" in asked[0]
    # numbers {1889}: supported; names {gustave, eiffel} + {anna, ben, carl}: gustave, eiffel and carl unsupported
    assert (out["num_numbers"], out["num_unsupported_numbers"]) == (1, 0)
    assert (out["num_names"], out["num_unsupported_names"]) == (5, 3)
    assert out["unsupported_rate"] == pytest.approx(3 / 6) and out["num_answers_with_unsupported"] == 2
    assert out["num_examples"] == 2 and out["categories"] == ["closed_qa", "information_extraction"]


def test_grounding_metric_without_a_category_column_takes_every_row(tmp_path, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    from trainer.hallucination_eval import grounded_rows

    data = write_jsonl(tmp_path / "plain.jsonl", [{k: v for k, v in r.items() if k != "category"} for r in DOLLY])
    ids, prompts, contexts, counts = grounded_rows(grounding_config(data), AutoTokenizer.from_pretrained(tiny_tokenizer_dir))
    assert len(ids) == 3 and prompts == [r["instruction"] for r in DOLLY] and contexts == [DOLLY[0]["context"], None, DOLLY[2]["context"]]
    assert counts["categories"] == "all rows (no category column)"


def test_grounding_refusals(tmp_path, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    from trainer.evaluate import EvalConfig, EvalError
    from trainer.hallucination_eval import grounded_rows

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    with pytest.raises(EvalError, match="'grounding' needs --prompt-field"):
        EvalConfig(model="m", dataset="d.jsonl", metrics=("grounding",))
    data = write_jsonl(tmp_path / "dolly.jsonl", DOLLY)
    with pytest.raises(EvalError, match="field 'question' is not in"):
        grounded_rows(grounding_config(data, prompt_field="question"), tokenizer)
    only_open = write_jsonl(tmp_path / "open.jsonl", [DOLLY[1]])
    with pytest.raises(EvalError, match="no rows of category closed_qa or information_extraction"):
        grounded_rows(grounding_config(only_open), tokenizer)
