"""Streaming generation, the interactive chat (through a real subprocess with stdin lines) and
`tunelab generate` over a JSONL file."""

import json
import os
import subprocess
import sys

import pytest

from test_export import make_fake_run

MAX_NEW_TOKENS = 12


def tunelab(*args, stdin=None):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "tunelab", *args], input=stdin, capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    return make_fake_run(tmp_path_factory.mktemp("runs") / "x")


@pytest.fixture(scope="module")
def loaded(run_dir):
    from tunelab.use.chat import load_for_use

    return load_for_use(str(run_dir), device="cpu", dtype="float32")


def reply(loaded, messages, max_new_tokens=MAX_NEW_TOKENS):
    from tunelab.engine.generate import DecodingSettings, generate

    [result] = generate(loaded.model, loaded.tokenizer, [messages], DecodingSettings(max_new_tokens=max_new_tokens))
    return result


@pytest.mark.parametrize("content", ["What is the capital of France?", "Say hi", "3 May 2021 -> ISO date, please"])
def test_stream_pieces_join_to_exactly_what_generate_returns(loaded, content):
    from tunelab.engine.generate import DecodingSettings, StreamStats, stream_generate

    messages = [{"role": "user", "content": content}]
    stats = StreamStats()
    pieces = list(stream_generate(loaded.model, loaded.tokenizer, messages,
                                  DecodingSettings(max_new_tokens=MAX_NEW_TOKENS), stats))
    expected = reply(loaded, messages)
    assert "".join(pieces) == expected.text
    assert len(pieces) >= 2 and all(pieces)  # streamed in pieces, no empty ones
    assert (stats.prompt_tokens, stats.completion_tokens, stats.finish_reason) == (
        expected.prompt_tokens, expected.completion_tokens, expected.finish_reason)


def test_stream_stops_at_end_of_turn(tiny_model, tokenizer):
    """A model whose every next token is <|im_end|> gives an empty reply that finished with "stop"."""
    import torch

    from tunelab.engine.generate import DecodingSettings, StreamStats, stream_generate

    bias = torch.zeros(tiny_model.config.vocab_size)
    bias[tokenizer.convert_tokens_to_ids("<|im_end|>")] = 1e4
    tiny_model.lm_head.register_forward_hook(lambda module, args, out: out + bias)
    stats = StreamStats()
    pieces = list(stream_generate(tiny_model, tokenizer, [{"role": "user", "content": "hi"}],
                                  DecodingSettings(max_new_tokens=20), stats))
    assert pieces == [] and stats.finish_reason == "stop" and stats.completion_tokens == 1


def test_sampled_stream_is_reproducible_with_its_seed(loaded):
    from tunelab.engine.generate import DecodingSettings, stream_generate

    settings = DecodingSettings(max_new_tokens=MAX_NEW_TOKENS, temperature=1.0, top_p=0.9, seed=7)
    messages = [{"role": "user", "content": "Tell me a story"}]
    first = "".join(stream_generate(loaded.model, loaded.tokenizer, messages, settings))
    again = "".join(stream_generate(loaded.model, loaded.tokenizer, messages, settings))
    assert first == again


def test_interactive_chat_keeps_history_resets_and_exits(run_dir, loaded):
    stdin = "hello there\nand what next?\n/reset\nhello there\n/exit\nnever read\n"
    result = tunelab("chat", str(run_dir), "--max-new-tokens", str(MAX_NEW_TOKENS), stdin=stdin)
    assert result.returncode == 0, result.stderr
    first = reply(loaded, [{"role": "user", "content": "hello there"}]).text
    second = reply(loaded, [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": first},
                            {"role": "user", "content": "and what next?"}]).text
    without_history = reply(loaded, [{"role": "user", "content": "and what next?"}]).text
    assert second != without_history  # the history changes the answer, so the check below means something
    assert result.stdout == f"{first}\n{second}\n{first}\n"
    assert "history cleared" in result.stderr and "Traceback" not in result.stderr


def test_chat_ends_cleanly_at_end_of_input_and_one_shot_prompt_still_works(run_dir, loaded):
    result = tunelab("chat", str(run_dir), "--max-new-tokens", "4", stdin="hi\n")  # no /exit: Ctrl-D
    assert result.returncode == 0, result.stderr
    assert result.stdout == reply(loaded, [{"role": "user", "content": "hi"}], 4).text + "\n"
    one_shot = tunelab("chat", str(run_dir), "--prompt", "hi", "--max-new-tokens", "4")
    assert one_shot.returncode == 0, one_shot.stderr
    assert one_shot.stdout == result.stdout


def test_generate_file_writes_one_line_per_input_with_references(loaded, tmp_path):
    from tunelab.engine.generate import DecodingSettings
    from tunelab.use.chat import generate_file

    rows = [
        {"id": "a", "messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
        {"prompt": "Capital of France?", "system": "Be brief."},
        {"messages": [{"role": "system", "content": "JSON only"}, {"role": "user", "content": "3 May 2021"}]},
    ]
    source = tmp_path / "in.jsonl"
    text = "\n".join(json.dumps(r) for r in rows) + "\n\n"
    source.write_text(text)
    out = tmp_path / "out.jsonl"
    count = generate_file(loaded, source, out, DecodingSettings(max_new_tokens=MAX_NEW_TOKENS), batch_size=2)
    assert count == 3 and source.read_text() == text
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["line"] for line in lines] == [1, 2, 3]
    assert [line["id"] for line in lines] == ["a", None, None]
    assert [line["reference"] for line in lines] == ["4", None, None]
    assert lines[0]["messages"] == [{"role": "user", "content": "2+2?"}]  # the answer is not in the prompt
    assert lines[1]["messages"] == [{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "Capital of France?"}]
    for line in lines:
        expected = reply(loaded, line["messages"])
        assert (line["output"], line["prompt_tokens"], line["finish_reason"]) == (
            expected.text, expected.prompt_tokens, expected.finish_reason)


def test_generate_reports_every_bad_line_with_file_and_line(tmp_path):
    from tunelab.errors import DataError
    from tunelab.use.chat import read_generation_inputs

    source = tmp_path / "bad.jsonl"
    source.write_text("\n".join([
        json.dumps({"prompt": "fine"}),
        "{not json",
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                                 {"role": "assistant", "content": "b"}]}),
        json.dumps({"messages": [{"role": "robot", "content": "q"}]}),
        json.dumps({"text": "no prompt"}),
        json.dumps(["a list"]),
        json.dumps({"prompt": 3}),
    ]) + "\n")
    with pytest.raises(DataError) as err:
        read_generation_inputs(source)
    message = str(err.value)
    assert message.splitlines()[0] == f"{source}: 6 bad line(s); nothing generated"
    for line in (2, 3, 4, 5, 6, 7):
        assert f"{source}:{line}: " in message
    assert f"{source}:1:" not in message
    assert f"{source}:4: messages[0].role" in message


def test_generate_command_refuses_to_overwrite_its_input_and_runs(run_dir, tmp_path):
    source = tmp_path / "in.jsonl"
    text = json.dumps({"prompt": "hi"}) + "\n"
    source.write_text(text)
    same = tunelab("generate", str(run_dir), "--input", str(source), "--out", str(tmp_path / "." / "in.jsonl"))
    assert same.returncode == 2 and "never overwrites its input" in same.stderr
    assert source.read_text() == text and "Traceback" not in same.stderr
    out = tmp_path / "sub" / "out.jsonl"
    ok = tunelab("generate", str(run_dir), "--input", str(source), "--out", str(out), "--max-new-tokens", "4")
    assert ok.returncode == 0, ok.stderr
    assert len(out.read_text().splitlines()) == 1 and "1 replies" in ok.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    failed = tunelab("generate", str(run_dir), "--input", str(bad), "--out", str(tmp_path / "o.jsonl"))
    assert failed.returncode == 1 and f"{bad}:1: not valid JSON" in failed.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_batched_streams_match_batched_generate_and_a_cancelled_row_stops_alone(loaded):
    from tunelab.engine.generate import DecodingSettings, StreamStats, generate, stream_generate_batch

    conversations = [[{"role": "user", "content": c}] for c in ("hi", "What is the capital of France, please?",
                                                               "Convert 3 May 2021 to an ISO date")]
    settings = DecodingSettings(max_new_tokens=MAX_NEW_TOKENS)
    want = generate(loaded.model, loaded.tokenizer, conversations, settings, batch_size=3)
    stats = [StreamStats() for _ in conversations]
    texts, ended = ["", "", ""], []
    for row, piece in stream_generate_batch(loaded.model, loaded.tokenizer, conversations, settings, stats):
        if piece is None:
            ended.append(row)
        else:
            assert row not in ended
            texts[row] += piece
    assert sorted(ended) == [0, 1, 2]
    assert texts == [w.text for w in want]
    assert [(s.prompt_tokens, s.completion_tokens, s.finish_reason) for s in stats] == [
        (w.prompt_tokens, w.completion_tokens, w.finish_reason) for w in want]

    events = list(stream_generate_batch(loaded.model, loaded.tokenizer, conversations, settings,
                                        cancelled=lambda row: row == 1))
    assert [e for e in events if e[0] == 1] == [(1, None)] and events.index((1, None)) <= 2  # ends at step 1
    assert "".join(p for r, p in events if r == 2 and p) == texts[2]


def test_sampling_draws_from_the_tempered_top_p_distribution():
    from collections import Counter

    import torch

    from tunelab.engine.generate import DecodingSettings, _next_token

    logits = torch.log(torch.tensor([0.6, 0.3, 0.1]))
    draws = 20000

    def frequencies(**settings):
        counts = Counter(_next_token(logits, DecodingSettings(**settings), torch.Generator().manual_seed(i))
                         for i in range(draws))
        return [counts[token] / draws for token in range(3)]

    assert frequencies(temperature=1.0) == pytest.approx([0.6, 0.3, 0.1], abs=0.015)
    assert frequencies(temperature=1.0, top_p=0.8) == pytest.approx([2 / 3, 1 / 3, 0.0], abs=0.015)
    # temperature 0.5 squares the probabilities: 0.36 : 0.09 : 0.01
    assert frequencies(temperature=0.5) == pytest.approx([0.36 / 0.46, 0.09 / 0.46, 0.01 / 0.46], abs=0.015)
    assert frequencies(temperature=0.0) == [1.0, 0.0, 0.0]
