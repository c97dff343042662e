"""Chapter 18 on the command line and over HTTP, with the shipped reasoning model: `generate`/`chat` with
--no-think and --thinking-budget, `serve` with vLLM's chat_template_kwargs, reasoning_content (streaming too) and a
thinking_budget request field, checked with the real `openai` client; clear errors for a negative budget and for
a tokenizer without <think>."""
import io
import json
import shutil

import openai
import pytest

from qwen3_scratch.cli import main
from qwen3_scratch.thinking import BUDGET_MESSAGE
from qwen3_scratch.utils import package_dir

RL = package_dir() / "data" / "reasoning" / "rl"
pytestmark = pytest.mark.usefixtures("one_thread")
QUESTION = "What is 4739 + 85?"


def run(argv, stdin=""):
    out, err = io.StringIO(), io.StringIO()
    status = main(argv, stdin=io.StringIO(stdin), stdout=out, stderr=err)
    return status, out.getvalue(), err.getvalue()


def test_generate_thinks_answers_and_obeys_the_budget():
    status, out, err = run(["generate", "--model", str(RL), "--prompt", QUESTION, "--chat", "--max-new-tokens", "300"])
    assert status == 0 and out.startswith("<think>\n4739+85\n") and out.rstrip().endswith("</think>\n\n4824"), out
    status, out, _ = run(["generate", "--model", str(RL), "--prompt", QUESTION, "--chat", "--no-think"])
    assert status == 0 and "<think>" not in out and out.strip().isdigit(), "non-thinking: the answer at once"
    status, out, _ = run(["generate", "--model", str(RL), "--prompt", QUESTION, "--chat", "--thinking-budget", "10",
                          "--max-new-tokens", "200"])
    assert status == 0 and BUDGET_MESSAGE in out, "the raw continuation shows the forced message"
    think = out.split("<think>", 1)[1].split("Considering")[0]
    assert len(think) == 10, "10 thinking tokens of one character each, then the message"


def test_chat_shows_thinking_apart_and_hides_the_forced_tail():
    status, out, err = run(["chat", "--model", str(RL), "--temperature", "0", "--thinking-budget", "0"],
                           stdin=f"{QUESTION}\n")
    assert status == 0 and err == ""
    reply = out.split("]\n", 1)[1]
    assert "Considering the limited time" in reply and "</think>\n\n" in reply, reply
    answer = reply.split("</think>\n\n", 1)[1].strip()
    assert answer.isdigit(), f"the answer is the model's digits, without the forced '.': {answer!r}"
    status, out, _ = run(["chat", "--model", str(RL), "--temperature", "0"], stdin=f"{QUESTION}\n")
    assert "</think>\n\n4824" in out


def test_bad_budgets_and_tokenizers_are_one_line(tmp_path):
    status, _, err = run(["chat", "--model", str(RL), "--thinking-budget", "-1"])
    assert status == 2 and err == "error: --thinking-budget must be >= 0 (tokens of thinking), got -1\n"
    bad = tmp_path / "no-think-tokens"
    shutil.copytree(RL, bad)
    spec = json.loads((bad / "tokenizer.json").read_text())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if "think" not in t["content"]]
    for t in ("<think>", "</think>"):
        spec["model"]["vocab"].pop(t)
    (bad / "tokenizer.json").write_text(json.dumps(spec))
    for command in ("chat", "generate"):
        status, _, err = run([command, "--model", str(bad), "--prompt", "x"][:3 if command == "chat" else 5])
        assert status == 1 and "has no <think> token" in err and err.count("\n") == 1, err


@pytest.fixture(scope="module")
def server():
    from qwen3_scratch.cli import load_model_and_tokenizer
    from qwen3_scratch.server import OpenAIServer, ServerThread, build_engine
    model, tok = load_model_and_tokenizer(str(RL))
    running = ServerThread(OpenAIServer(build_engine(model, max_batch=4, block_size=16), tok, "reasoner").app)
    with running:
        yield openai.OpenAI(base_url=running.url + "/v1", api_key="none", max_retries=0, timeout=60)


def ask(client, **extra):
    return client.chat.completions.create(model="reasoner", messages=[{"role": "user", "content": QUESTION}],
                                          temperature=0, max_tokens=400, extra_body=extra or None)


def test_serve_splits_reasoning_and_switches_modes_like_vllm(server):
    m = ask(server).choices[0].message
    assert m.content == "4824" and m.reasoning_content.startswith("4739+85\n")
    m = ask(server, chat_template_kwargs={"enable_thinking": False}).choices[0].message
    assert m.content.isdigit() and not m.reasoning_content
    m = ask(server, thinking_budget=0).choices[0].message
    assert m.reasoning_content.strip() == BUDGET_MESSAGE.split("\n</think>")[0] and m.content.isdigit()
    text = {"reasoning": "", "content": ""}
    for chunk in server.chat.completions.create(model="reasoner", messages=[{"role": "user", "content": QUESTION}],
                                                temperature=0, max_tokens=400, stream=True,
                                                extra_body={"thinking_budget": 12}):
        delta = chunk.choices[0].delta if chunk.choices else None
        text["reasoning"] += (getattr(delta, "reasoning_content", None) or "") if delta else ""
        text["content"] += (delta.content or "") if delta else ""
    assert text["reasoning"].startswith("4739+85\n") and "directly now." in text["reasoning"]
    assert text["content"].isdigit(), f"streamed answer without the forced '.': {text['content']!r}"
    with pytest.raises(openai.BadRequestError) as e:
        ask(server, thinking_budget=-3)
    assert e.value.body["param"] == "thinking_budget" and "must be >= 0" in e.value.body["message"]


def test_serve_command_refuses_a_negative_budget(capsys):
    from qwen3_scratch.server import main as serve_main
    assert serve_main(["serve", "--model", str(RL), "--thinking-budget", "-1"]) == 2
    assert "--thinking-budget must be >= 0" in capsys.readouterr().err
