"""Assistant-only labels through the chat template: exact spans, weight 0, the prefix property and
its fallback, tool calls, templates that would never train end-of-turn."""

from __future__ import annotations

import copy

import pytest

from tunelab.data.check import check_data
from tunelab.data.tokenize import (
    IGNORE_INDEX,
    TemplateProblem,
    end_of_turn_probe,
    tokenize_conversation,
    tokenize_for_training,
)

MULTI_TURN = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome, the eternal city."},
]


def _spans(example) -> list[list[int]]:
    """Contiguous runs of trained positions, as token ids."""
    spans, current = [], []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            assert label == token  # a trained position predicts the token that is there
            current.append(token)
    if current:
        spans.append(current)
    return spans


@pytest.fixture
def template_tokenizer(tokenizer):
    """A copy of the tiny model's tokenizer whose chat template a test may replace."""
    return copy.deepcopy(tokenizer)


def test_labels_decode_to_exactly_the_assistant_texts_and_end_of_turn(tokenizer):
    example = tokenize_conversation(tokenizer, MULTI_TURN)
    assert [tokenizer.decode(span) for span in _spans(example)] == ["Paris.<|im_end|>", "Rome, the eternal city.<|im_end|>"]
    assert example.input_ids == list(tokenizer.apply_chat_template(MULTI_TURN, tokenize=True)["input_ids"])
    assert example.prefix_ok and example.end_of_turn_trained and not example.truncated
    assert example.trainable_tokens == sum(len(s) for s in _spans(example))


def test_weight_zero_turn_is_not_trained(tokenizer):
    messages = copy.deepcopy(MULTI_TURN)
    messages[2]["weight"] = 0
    example = tokenize_conversation(tokenizer, messages)
    assert [tokenizer.decode(span) for span in _spans(example)] == ["Rome, the eternal city.<|im_end|>"]
    # the untrained turn is still in the input: the model reads it as context
    assert "Paris." in tokenizer.decode(example.input_ids)


def test_all_weights_zero_trains_nothing(tokenizer):
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]
    assert tokenize_conversation(tokenizer, messages).trainable_tokens == 0


def test_truncation_is_flagged_and_cut(tokenizer):
    full = tokenize_conversation(tokenizer, MULTI_TURN)
    cut = tokenize_conversation(tokenizer, MULTI_TURN, max_seq_len=20)
    assert cut.truncated and cut.length == len(full.input_ids) and len(cut.input_ids) == 20
    assert cut.input_ids == full.input_ids[:20] and cut.labels == full.labels[:20]


# A Qwen3-style template: the reasoning of earlier assistant turns is dropped, the last turn keeps it.
DROPS_REASONING = (
    "{% for message in messages %}{% set content = message['content'] %}"
    "{% if message['role'] == 'assistant' and not loop.last and '</think>' in content %}"
    "{% set content = content.split('</think>')[-1].lstrip() %}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + content + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
REASONING = [
    {"role": "user", "content": "2+3?"},
    {"role": "assistant", "content": "<think>2 plus 3 is 5</think> 5"},
    {"role": "user", "content": "times 4?"},
    {"role": "assistant", "content": "<think>5 times 4 is 20</think> 20"},
]


def test_template_breaking_the_prefix_property_is_detected_and_handled(template_tokenizer):
    tok = template_tokenizer
    tok.chat_template = DROPS_REASONING
    single = tokenize_conversation(tok, REASONING)
    # the whole rendering shows turn 1 without its reasoning, so it cannot be trained there
    assert not single.prefix_ok
    assert [tok.decode(s) for s in _spans(single)] == ["<think>5 times 4 is 20</think> 20<|im_end|>"]
    per_turn = tokenize_for_training(tok, REASONING)
    assert len(per_turn) == 2 and not any(p.prefix_ok for p in per_turn)
    assert [tok.decode(s) for p in per_turn for s in _spans(p)] == [
        "<think>2 plus 3 is 5</think> 5<|im_end|>", "<think>5 times 4 is 20</think> 20<|im_end|>",
    ]
    # each example is exactly what the model sees when it generates that turn
    first_prompt = tok.apply_chat_template(REASONING[:1], tokenize=True, add_generation_prompt=True)["input_ids"]
    assert per_turn[0].input_ids[: len(first_prompt)] == list(first_prompt)
    assert per_turn[1].input_ids == list(tok.apply_chat_template(REASONING, tokenize=True)["input_ids"])


def test_prefix_keeping_template_gives_one_example(tokenizer):
    assert len(tokenize_for_training(tokenizer, REASONING)) == 1


TOOLS = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message.get('tool_calls') %}{% for call in message['tool_calls'] %}"
    "{{ '<tool_call>' + call['function']['name'] + '(' + call['function']['arguments'] + ')</tool_call>' }}{% endfor %}"
    "{% else %}{{ message['content'] }}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]},
    {"role": "tool", "content": "5 C", "tool_call_id": "1"},
    {"role": "assistant", "content": "It is 5 C."},
]


def test_tool_calls_render_with_a_template_that_supports_them(template_tokenizer, tokenizer):
    with pytest.raises(TemplateProblem) as err:
        tokenize_conversation(tokenizer, TOOL_CONVERSATION)
    assert err.value.code == "tools_unsupported"
    template_tokenizer.chat_template = TOOLS
    example = tokenize_conversation(template_tokenizer, TOOL_CONVERSATION)
    assert [template_tokenizer.decode(s) for s in _spans(example)] == [
        '<tool_call>weather({"city": "Oslo"})</tool_call><|im_end|>', "It is 5 C.<|im_end|>",
    ]


def test_template_without_end_of_turn_is_reported(template_tokenizer, tmp_path):
    template_tokenizer.chat_template = (
        "{% for message in messages %}{{ message['role'] + ':\n' + message['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant:\n' }}{% endif %}"
    )
    assert "never learn to stop" in end_of_turn_probe(template_tokenizer)
    path = tmp_path / "d.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n')
    report = check_data(path, tokenizer=template_tokenizer)
    assert [i.code for i in report.issues] == ["end_of_turn_not_trained"] and report.exit_code == 1


def test_a_failing_template_is_a_template_error_at_the_line(template_tokenizer, tmp_path):
    template_tokenizer.chat_template = (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    path = tmp_path / "d.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
                    '{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}\n')
    report = check_data(path, tokenizer=template_tokenizer)
    assert [(i.line, i.code) for i in report.issues] == [(2, "template_error")]
    assert "no system role" in report.issues[0].message


def test_a_generation_prompt_that_merges_with_the_answer_breaks_the_prefix_property(template_tokenizer):
    # "assistant: " + "a" tokenizes as "assistant:" + " a": the prompt the model sees at inference
    # ends with a lone space token that training would never show it
    template_tokenizer.chat_template = (
        "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '<|im_end|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert not tokenize_conversation(template_tokenizer, messages).prefix_ok


def test_check_and_prepare_report_and_handle_a_prefix_breaking_template(template_tokenizer, tmp_path):
    import json

    from tunelab.config import Recipe
    from tunelab.data.prepare import prepare_data

    template_tokenizer.chat_template = DROPS_REASONING
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"messages": REASONING}) + "\n" + json.dumps({"messages": REASONING[:2]}) + "\n")
    report = check_data(path, tokenizer=template_tokenizer)
    [issue] = report.issues
    assert (issue.code, issue.line, issue.severity) == ("prefix_mismatch", 0, "warning")
    assert f"{path}:1" in issue.message and "1 examples" in issue.message
    prepared = prepare_data(Recipe(data={"train": str(path), "valid_fraction": 0, "test_fraction": 0}), template_tokenizer, tmp_path / "out")
    rows = prepared.tokenized("train")
    [multi] = [c["id"] for c in prepared.conversations("train") if len(c["messages"]) == 4]
    assert sorted(r["id"] for r in rows if r["id"].startswith(multi)) == [f"{multi}/turn-1", f"{multi}/turn-2"]
    assert prepared.stats["issues"]["by_code"] == {"prefix_mismatch": 1}
