"""Chapter 18's thinking budget: the message arrives exactly after N thinking tokens, never in non-thinking mode or
once the model has closed its thinking, the forced tail is not part of the answer, and batched replies split
into thinking and answer as the verifier needs."""
import tempfile

import pytest
import torch

from qwen3_scratch.reasoning import complete
from qwen3_scratch.thinking import BUDGET_MESSAGE, ThinkingBudget, check_budget


@pytest.fixture(scope="module")
def tok():
    from qwen3_scratch.reasoning import save_chat_tokenizer
    from qwen3_scratch.tokenizer import Qwen3Tokenizer
    return Qwen3Tokenizer(save_chat_tokenizer(tempfile.mkdtemp()))


def run(budget: ThinkingBudget, sampled):
    """Feed sampled tokens through the budget; return what was emitted and the hidden flags."""
    out = [budget.step(t) for t in sampled]
    return [t for t, _ in out], [h for _, h in out]


def test_the_message_is_qwen3s():
    assert BUDGET_MESSAGE == ("Considering the limited time by the user, I have to give the solution based on the "
                              "thinking directly now.\n</think>.\n\n")


@pytest.mark.parametrize("n", [0, 1, 5])
def test_message_after_exactly_n_thinking_tokens(tok, n):
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 1 + 2?"}], tokenize=True)
    b = ThinkingBudget(tok, n, prompt)
    x = tok.encode("7")[0]
    sampled = [tok.think_id] + [x] * (n + 200)  # the model would think forever
    emitted, hidden = run(b, sampled)
    msg = tok.encode(BUDGET_MESSAGE)
    start = 1 + n
    assert emitted[:start] == sampled[:start], "the first n thinking tokens are the model's"
    assert emitted[start:start + len(msg)] == msg, "then the whole message, token by token"
    assert emitted[start + len(msg):] == sampled[start + len(msg):], "then the model answers freely"
    tail = len(tok.encode(".\n\n"))
    assert [i for i, h in enumerate(hidden) if h] == list(range(start + len(msg) - tail, start + len(msg))), \
        "only the forced '.\\n\\n' after </think> is hidden from the answer"
    assert b.count == n and b.fired and b.closed


def test_no_message_when_the_model_closes_in_time_or_does_not_think(tok):
    b = ThinkingBudget(tok, 3, [])
    sampled = [tok.think_id] + tok.encode("12") + [tok.end_think_id] + tok.encode("\n\n3") * 5
    assert run(b, sampled)[0] == sampled and not b.fired and b.count == 2
    no_think = tok.apply_chat_template([{"role": "user", "content": "hi"}], enable_thinking=False, tokenize=True)
    b = ThinkingBudget(tok, 0, no_think)
    assert b.closed and run(b, tok.encode("3" * 20))[0] == tok.encode("3" * 20), "a non-thinking prompt is closed"


def test_a_prompt_that_opens_the_think_block_counts_from_there(tok):
    prompt = tok.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n")
    b = ThinkingBudget(tok, 0, prompt)
    assert b.thinking and list(b.forced) == tok.encode(BUDGET_MESSAGE), "budget 0: the message comes first"


def test_a_display_copy_stays_in_step(tok):
    driver, display = ThinkingBudget(tok, 2, []), ThinkingBudget(tok, 2, [])
    for t in [tok.think_id] + tok.encode("9" * 150):
        emitted, hidden = driver.step(t)
        assert display.observe(emitted) == hidden


def test_bad_budgets_are_refused(tok):
    for bad in (-1, 1.5, "3", True):
        with pytest.raises(ValueError, match="thinking budget must be an integer >= 0"):
            check_budget(bad)
    assert check_budget(None) is None and check_budget(0) == 0


class Thinker(torch.nn.Module):
    """A stand-in model whose greedy choice is always the digit 7: it opens no think block itself and never
    closes one, so only the budget can end its thinking."""

    def __init__(self, tok):
        super().__init__()
        from qwen3_scratch.config import Qwen3Config
        self.config = Qwen3Config(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=1, num_key_value_heads=1, head_dim=32,
                                  max_position_embeddings=512, bos_token_id=None, eos_token_id=None)
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seven = tok.encode("7")[0]

    def forward(self, input_ids, attention_mask=None, kv_cache=None, last_only=False, **kwargs):
        logits = torch.zeros(input_ids.shape[0], 1 if last_only else input_ids.shape[1], self.config.vocab_size)
        logits[..., self.seven] = 1.0
        return logits


def test_complete_forces_the_message_and_splits_the_reply(tok):
    model = Thinker(tok)
    prompts = [tok.apply_chat_template([{"role": "user", "content": "What is 1 + 2?"}], tokenize=True)
               + [tok.think_id], tok.encode("<|im_start|>assistant\n<think>\n12")]
    free = complete(model, tok, prompts, max_new_tokens=30)
    assert all(not c.closed and c.answer == "" and c.thinking_tokens == 30 for c in free), \
        "without a budget the thinking never ends, and there is no answer to verify"
    n_msg = len(tok.encode(BUDGET_MESSAGE))
    for budget in (0, 4):
        cut = complete(model, tok, prompts, max_new_tokens=budget + n_msg + 3, thinking_budget=budget)
        for c in cut:
            assert c.budget_fired and c.closed and c.thinking_tokens == budget
            assert c.thinking == "7" * budget + BUDGET_MESSAGE.split("\n</think>")[0], c.thinking
            assert c.answer == "777", "the answer is what the model wrote after the forced '.\\n\\n'"
    no_think = tok.apply_chat_template([{"role": "user", "content": "hi"}], enable_thinking=False, tokenize=True)
    c = complete(model, tok, [no_think], max_new_tokens=5, thinking_budget=0)[0]
    assert c.closed and not c.budget_fired and c.answer == "77777" and c.thinking == ""


def test_a_batch_equals_one_row_at_a_time(tok, one_thread):
    from qwen3_scratch.config import Qwen3Config
    from qwen3_scratch.model import Qwen3Model
    from qwen3_scratch.pretrain import init_weights
    cfg = Qwen3Config(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=512,
                      bos_token_id=None, eos_token_id=tok.im_end_id)
    model = init_weights(Qwen3Model(cfg), seed=0)
    prompts = [tok.encode("<|im_start|>assistant\n<think>\n"), tok.encode("<|im_start|>user\nWhat is 5 * 6?"
                                                                          "<|im_end|>\n<|im_start|>assistant\n<think>\n1")]
    batch = complete(model, tok, prompts, max_new_tokens=140, thinking_budget=3)
    alone = [complete(model, tok, [p], max_new_tokens=140, thinking_budget=3)[0] for p in prompts]
    assert [c.token_ids for c in batch] == [c.token_ids for c in alone]
    assert all(c.thinking_tokens <= 3 for c in batch)
