"""Chat and instruction data: conversations formatted by the tokenizer's chat template measure exactly as the same
texts written out by hand; prompt/response pairs fall back to plain concatenation; bad conversations are refused."""

import json
import math
from pathlib import Path

import pytest
import torch
import transformers as tf
from conftest import build_model, save_model
from safetensors.torch import load_file
from test_bad_input import cli_fails
from test_merge import run

from regmean.errors import RegmeanError
from regmean.io.data import load_examples

# BERT's tokenizer reads "[CLS]" and "[SEP]" written in a text as its special tokens, so a template that writes them
# gives the same ids as the hand-written text tokenised with the special tokens added
TEMPLATE = "[CLS] {% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}[SEP]"
CONVERSATIONS = [
    [{"role": "user", "content": "is the flight on time"}, {"role": "assistant", "content": "it is delayed"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "great movie?"}],
    [{"role": "user", "content": "who won"}, {"role": "assistant", "content": "the patriots, again"}],
]


def by_hand(conversation: list[dict]) -> str:
    return " ".join(f"{m['role']}: {m['content']}" for m in conversation)


def chat_model(root: Path, template: str | None) -> Path:
    path = save_model(build_model("llama", "LlamaForCausalLM"), root / "model")
    if template is not None:
        tok = tf.AutoTokenizer.from_pretrained(path)
        tok.chat_template = template
        tok.save_pretrained(path)
    return path


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def measured(root: Path, model: Path, data: Path, name: str, *fields: str) -> dict:
    result = run("measure", model, "--data", data, "--out", root / name, *fields)
    assert result.exit_code == 0, result.output
    return load_file(root / name / "statistics.safetensors")


def test_messages_measure_as_their_rendered_text(tmp_path):
    model = chat_model(tmp_path, TEMPLATE)
    chat = write_rows(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVERSATIONS])
    plain = write_rows(tmp_path / "plain.jsonl", [{"text": by_hand(c)} for c in CONVERSATIONS])
    got = measured(tmp_path, model, chat, "chat", "--messages-field", "messages")
    want = measured(tmp_path, model, plain, "plain")
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].equal(want[key]), key
    shown = run("stats", "show", tmp_path / "chat")
    assert "chat template" in shown.output and "messages" in shown.output


def test_prompt_response_without_template_is_plain_concatenation(tmp_path):
    model = chat_model(tmp_path, None)
    pairs = [("is the flight on time", "it is delayed"), ("who won", "the patriots")]
    chat = write_rows(tmp_path / "pairs.jsonl", [{"q": p, "a": r} for p, r in pairs])
    plain = write_rows(tmp_path / "plain.jsonl", [{"text": f"{p}\n{r}"} for p, r in pairs])
    got = measured(tmp_path, model, chat, "chat", "--prompt-field", "q", "--response-field", "a")
    want = measured(tmp_path, model, plain, "plain")
    for key in want:
        assert got[key].equal(want[key]), key
    assert "plain concatenation" in run("stats", "show", tmp_path / "chat").output


def test_messages_need_a_chat_template(tmp_path):
    model = chat_model(tmp_path, None)
    chat = write_rows(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVERSATIONS])
    args = ["measure", model, "--data", chat, "--out", tmp_path / "s", "--messages-field", "messages"]
    cli_fails(args, "has no chat template")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    ("cell", "expected"),
    [
        ("hello", "row 2: expected a non-empty list"),
        ([{"role": "user"}], "row 2: each message must be"),
        ([], "row 2: expected a non-empty list"),
    ],
)
def test_bad_conversations_are_named_by_row(tmp_path, cell, expected):
    data = write_rows(tmp_path / "chat.jsonl", [{"messages": CONVERSATIONS[0]}, {"messages": cell}])
    with pytest.raises(RegmeanError, match=expected):
        load_examples(data, messages_field="messages")


def test_evaluate_perplexity_of_conversations(tmp_path):
    model = chat_model(tmp_path, TEMPLATE)
    chat = write_rows(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVERSATIONS])
    plain = write_rows(tmp_path / "plain.jsonl", [{"text": by_hand(c)} for c in CONVERSATIONS])
    scores = []
    for data, fields in ((chat, ["--messages-field", "messages", "--score", "all"]), (plain, [])):
        out = tmp_path / f"{data.stem}.json"
        result = run("evaluate", model, "--data", data, "--json", out, *fields)
        assert result.exit_code == 0, result.output
        scores.append(json.loads(out.read_text())[0]["perplexity"])
    assert scores[0] == pytest.approx(scores[1], rel=1e-6)
    assert scores[0] > 1.0


# turns that render as beginnings of the conversation, as ChatML and Llama-3's templates do
TURNS = (
    "{% for m in messages %}[CLS] {{ m['role'] }}: {{ m['content'] }} [SEP] {% endfor %}"
    "{% if add_generation_prompt %}[CLS] assistant: {% endif %}"
)


def assistant_oracle(model_dir: Path, conversations: list[list[dict]]) -> tuple[float, int]:
    """Perplexity over the assistant turns, computed plainly: each conversation tokenised piece by piece (pieces
    split at spaces tokenise as the whole does), the answers' pieces marked, the model's NLL of each marked token."""
    model = tf.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = tf.AutoTokenizer.from_pretrained(model_dir)
    total, count = 0.0, 0
    for conversation in conversations:
        ids, scored = [], []
        for m in conversation:
            header = f"[CLS] {m['role']}: "
            body = f"{m['content']} [SEP] "
            for piece, mark in ((header, False), (body, m["role"] == "assistant")):
                new = tok(piece, add_special_tokens=False)["input_ids"]
                ids, scored = ids + new, scored + [mark] * len(new)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, :-1]
        nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
        marked = torch.tensor(scored[1:])
        total, count = total + float(nll[marked].sum()), count + int(marked.sum())
    return math.exp(total / count), count


def test_evaluate_scores_the_assistant_turns_of_conversations(tmp_path):
    model = chat_model(tmp_path, TURNS)
    conversations = [*CONVERSATIONS, [*CONVERSATIONS[0], {"role": "user", "content": "why"}, CONVERSATIONS[2][1]]]
    chat = write_rows(tmp_path / "chat.jsonl", [{"messages": c} for c in conversations])
    result = run("evaluate", model, "--data", chat, "--messages-field", "messages", "--json", tmp_path / "s.json")
    assert result.exit_code == 0, result.output
    assert "assistant turns scored" in " ".join(result.output.split())
    (row,) = json.loads((tmp_path / "s.json").read_text())
    perplexity, tokens = assistant_oracle(model, conversations)
    assert row["tokens"] == tokens and row["perplexity"] == pytest.approx(perplexity, rel=1e-5)
    assert row["scored"] == "assistant turns" and row["examples"] == len(conversations)
