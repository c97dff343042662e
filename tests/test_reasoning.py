"""Chapter 18's task: problems, scratchpads that compute the right answer, the verifier on malformed replies, the
digit tokenizer and its chat template against transformers, pass@k and majority vote."""
import math
import tempfile

import pytest

from qwen3_scratch.reasoning import (Problem, draw_problems, encode_last_turn, majority_vote, parse_answer,
                                     parse_integer, pass_at_k, reply, reward, save_chat_tokenizer, scratchpad)


def test_problems_follow_the_issue():
    probs = draw_problems(4000, seed=0)
    add = [p for p in probs if p.op == "+"]
    mul = [p for p in probs if p.op == "*"]
    assert 1800 < len(add) < 2200 and len(add) + len(mul) == 4000
    assert {len(str(p.a)) for p in add} == set(range(1, 7)) == {len(str(p.b)) for p in add}
    assert {len(str(p.a)) for p in mul} == set(range(1, 5)) and {len(str(p.b)) for p in mul} == {1, 2}
    assert len(set(probs)) == 4000, "distinct"
    assert Problem(12, "+", 345).question == "What is 12 + 345?" and Problem(7, "*", 89).answer == 623
    held_out = draw_problems(500, seed=1, exclude=set(probs))
    assert not set(held_out) & set(probs)
    assert draw_problems(5, seed=3) == draw_problems(5, seed=3), "a seed gives the same problems"
    with pytest.raises(ValueError, match="ops"):
        draw_problems(3, 0, ops="-")


def test_every_scratchpad_reaches_the_answer():
    cases = draw_problems(3000, seed=2) + [Problem(0, "+", 0), Problem(999999, "+", 999999), Problem(0, "*", 7),
                                           Problem(4739, "*", 0), Problem(4739, "*", 10), Problem(9999, "*", 99)]
    for p in cases:
        text = reply(p)
        assert parse_answer(text) == p.answer and reward(text, p) == 1.0, text
        last = scratchpad(p).splitlines()[-1]
        assert last.rsplit(" ", 1)[1].lstrip("0") == str(p.answer).lstrip("0"), f"{p}: last line {last!r}"
    assert reply(Problem(2, "+", 3), thinking=False) == "<think>\n\n</think>\n\n5"
    assert scratchpad(Problem(47, "+", 85)) == "47+85\n7+5+0=12 4+8 2\n4+8+1=13 + 132"
    assert max(len(scratchpad(Problem(9999, "*", 99))), len(scratchpad(Problem(999999, "+", 999999)))) < 320


@pytest.mark.parametrize("text", [
    "<think>\n1+2\n</think>\n\n3 4",  # several numbers
    "<think>\n1+2\n</think>\n\nthe answer is 3",  # words
    "<think>\n1+2\n</think>\n\n",  # no number
    "<think>\n1+2+0=03 + 3\n3",  # no </think>
    "3",  # no think block at all
    "<think>\n</think>\n\n03",  # a leading zero
    "<think>\n</think>\n\n+3",  # a sign
    "<think>\n</think>\n\n3.0",  # not an integer
    "<think>\n</think>\n\n3,000",  # a separator
])
def test_the_verifier_refuses_malformed_replies(text):
    p = Problem(1, "+", 2)
    assert parse_answer(text) is None or parse_answer(text) != 3, text
    assert reward(text, p) == 0.0


def test_the_verifier_accepts_what_the_template_allows():
    p = Problem(1, "+", 2)
    assert reward("<think>\nanything\n</think>\n\n3", p) == 1.0
    assert reward("<think>\n</think>\n\n 3 \n<|im_end|>", p) == 1.0, "whitespace and the end-of-turn token"
    assert reward("<think>a</think>b</think>\n\n3", p) == 1.0, "the text after the LAST </think>"
    assert parse_integer("0") == 0 and parse_integer("-0") is None and parse_integer("00") is None


def test_pass_at_k_and_majority_vote():
    assert pass_at_k(8, 0, 4) == 0 and pass_at_k(8, 8, 1) == 1 and pass_at_k(8, 2, 1) == pytest.approx(0.25)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(5, 2))
    assert pass_at_k(4, 1, 4) == 1.0, "k = n: right if any sample is"
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    assert majority_vote([5, None, 7, 7, None, None]) == 7
    assert majority_vote([5, 7, 7, 5]) == 5, "a tie goes to the answer seen first"
    assert majority_vote([None, None]) is None


@pytest.fixture(scope="module")
def tokenizers():
    from transformers import AutoTokenizer
    from qwen3_scratch.tokenizer import Qwen3Tokenizer
    folder = save_chat_tokenizer(tempfile.mkdtemp())
    return Qwen3Tokenizer(folder), AutoTokenizer.from_pretrained(folder)


def test_every_digit_is_one_token_and_transformers_agrees(tokenizers):
    ours, hf = tokenizers
    assert ours.vocab_size == 261 and len(hf) == 261
    text = "What is 4739 * 85?\n9*5+0=45 473 5"
    ids = ours.encode(text)
    assert len(ids) == len(text), "one token per character (ASCII)"
    assert ids == hf(text)["input_ids"] and hf.decode(ids) == text == ours.decode(ids)
    assert [ours.special_tokens[t] for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")] \
        == [0, 1, 2, 3, 4]
    assert hf.eos_token == "<|im_end|>" and hf.pad_token == "<|endoftext|>"
    assert ours.decode(ours.encode("<think>x</think>"), skip_special_tokens=True) == "<think>x</think>", \
        "as in Qwen3, <think> and </think> are not skipped"


def test_the_chat_template_renders_as_transformers_does(tokenizers):
    ours, hf = tokenizers
    chat = [{"role": "user", "content": "What is 3 + 4? /no_think"},
            {"role": "assistant", "content": reply(Problem(3, "+", 4), thinking=False)},
            {"role": "user", "content": "What is 12 * 5? /think"},
            {"role": "assistant", "content": reply(Problem(12, "*", 5))},
            {"role": "user", "content": "What is 9 + 9?"}]
    for n in (1, 3, 5):
        for thinking in (True, False):
            want = hf.apply_chat_template(chat[:n], tokenize=False, add_generation_prompt=True,
                                          enable_thinking=thinking)
            assert ours.apply_chat_template(chat[:n], enable_thinking=thinking) == want
            assert ours.apply_chat_template(chat[:n], enable_thinking=thinking, tokenize=True) == \
                hf.apply_chat_template(chat[:n], add_generation_prompt=True, enable_thinking=thinking)["input_ids"]
    text = ours.apply_chat_template(chat, enable_thinking=False)
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n"), "the empty block switches thinking off"
    assert "12*5" not in text, "earlier assistant turns lose their thinking"


def test_only_the_last_turn_is_trained(tokenizers):
    ours, _ = tokenizers
    chat = [{"role": "user", "content": "What is 3 + 4?"}, {"role": "assistant", "content": "7"},
            {"role": "user", "content": "What is 1 + 1? /no_think"},
            {"role": "assistant", "content": reply(Problem(1, "+", 1), thinking=False)}]
    ids, labels = encode_last_turn(ours, chat)
    trained = ours.decode([t for t, lab in zip(ids, labels) if lab != -100])
    assert trained == "<think>\n\n</think>\n\n2<|im_end|>"
