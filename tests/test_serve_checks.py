"""The server's request checks called directly, without HTTP: what each accepts, and the exact
status, message, param and code of the OpenAI error it raises for what it refuses; the stream's
wire format from a scripted worker."""

import asyncio
import json
from types import SimpleNamespace

import pytest

from tunelab.use.serve import (
    APIError,
    ChatCompletionRequest,
    ChunkWriter,
    PrepareGate,
    _Job,
    body_too_large,
    check_api_key,
    check_prompt_chars,
    check_request_options,
    completion_budget,
    decoding_settings,
    http_error,
    parse_request,
    read_body,
    sse_events,
)


def refusal(call, *args):
    with pytest.raises(APIError) as caught:
        call(*args)
    return caught.value.status, caught.value.message, caught.value.param, caught.value.code


def request(**fields):
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                                 **fields})


# ---------------------------------------------------------------------------------------------- API key

KEY_REFUSED = (401, "Missing or incorrect API key: send 'Authorization: Bearer <key>'.", None, "invalid_api_key")


@pytest.mark.parametrize("header", ["Bearer k3y", "bearer k3y", "BEARER  k3y "])
def test_the_api_key_is_accepted_with_any_case_of_bearer_and_surrounding_spaces(header):
    assert check_api_key(header, "k3y") is None


@pytest.mark.parametrize("header", ["", "k3y", "Basic k3y", "Bearer k3", "Bearer k3y2", "Bearer"])
def test_a_missing_or_wrong_api_key_is_401(header):
    assert refusal(check_api_key, header, "k3y") == KEY_REFUSED


def test_without_a_key_every_request_passes():
    assert check_api_key("", None) is None and check_api_key("Bearer anything", None) is None


# ---------------------------------------------------------------------------------------------- body size


async def chunks_of(*parts, seen=None):
    for part in parts:
        if seen is not None:
            seen.append(part)
        yield part


def test_a_body_up_to_the_limit_is_read_whole():
    assert asyncio.run(read_body("10", chunks_of(b"01234", b"56789"), 10)) == b"0123456789"


def test_a_declared_length_over_the_limit_is_413_before_reading():
    seen = []
    with pytest.raises(APIError) as caught:
        asyncio.run(read_body("11", chunks_of(b"x", seen=seen), 10))
    assert (caught.value.status, caught.value.code) == (413, "request_too_large") and seen == []
    assert caught.value.message == "The request body is larger than 10 bytes."


@pytest.mark.parametrize("declared", [None, "", "5", "abc", "-1"])
def test_a_body_larger_than_it_says_is_413_once_the_limit_is_passed(declared):
    seen = []
    with pytest.raises(APIError) as caught:
        asyncio.run(read_body(declared, chunks_of(b"123456", b"78901", b"never read", seen=seen), 10))
    assert caught.value.body() == body_too_large(10).body() and seen == [b"123456", b"78901"]


# ---------------------------------------------------------------------------------------------- JSON and fields


@pytest.mark.parametrize("body, status, start, param, code", [
    (b"{not json", 400, "We could not parse the JSON body of your request", None, None),
    (b"[1, 2]", 400, "The request body must be a JSON object: ", None, None),
    (b'{"model": "m"}', 400, "Missing required parameter: 'messages'.", "messages", "missing_required_parameter"),
    (b'{"model": "m", "messages": [{"role": "user", "content": 3}]}', 400, "Invalid value for 'messages.0.content'",
     "messages.0.content", "invalid_value"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"}', 400,
     "Invalid value for 'max_tokens'", "max_tokens", "invalid_value"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400,
     "Invalid value for 'temperature'", "temperature", "invalid_value"),
])
def test_a_malformed_body_names_its_field(body, status, start, param, code):
    got_status, message, got_param, got_code = refusal(parse_request, body)
    assert (got_status, got_param, got_code) == (status, param, code)
    assert message.startswith(start), message


def test_a_valid_body_parses_with_developer_as_system_and_text_parts_joined():
    req = parse_request(b'{"model": "m", "messages": [{"role": "developer", "content": "be brief"}, '
                        b'{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],'
                        b' "stop": "END", "unknown_option": 1}')
    assert [m.as_dict() for m in req.messages] == [{"role": "system", "content": "be brief"},
                                                   {"role": "user", "content": "ab"}]
    assert req.stops == ["END"]


# ---------------------------------------------------------------------------------------------- options


def test_another_model_is_404_and_a_huge_name_is_not_echoed():
    assert refusal(check_request_options, request(model="gpt-4o"), "m", 32) == (
        404, "The model 'gpt-4o' does not exist; this server has 'm'.", "model", "model_not_found")
    message = refusal(check_request_options, request(model="y" * 10_000), "m", 32)[1]
    assert message == f"The model '{'y' * 200}...' does not exist; this server has 'm'."


@pytest.mark.parametrize("fields, param, message", [
    ({"n": 2}, "n", "n > 1 is not supported; send separate requests"),
    ({"presence_penalty": 0.5}, "presence_penalty", "penalties are not supported"),
    ({"frequency_penalty": -1}, "frequency_penalty", "penalties are not supported"),
    ({"logprobs": True}, "logprobs", "logprobs are not supported"),
    ({"tools": [{"type": "function"}]}, "tools", "tool calls are not supported"),
    ({"logit_bias": {"1": 5}}, "logit_bias", "logit_bias is not supported"),
    ({"response_format": {"type": "json_object"}}, "response_format",
     "only response_format {'type': 'text'} is supported"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "stop takes up to 4 non-empty strings of at most 256 characters"),
    ({"stop": [""]}, "stop", "stop takes up to 4 non-empty strings of at most 256 characters"),
    ({"stop": "x" * 257}, "stop", "stop takes up to 4 non-empty strings of at most 256 characters"),
    ({"temperature": 1e-4}, "temperature", "temperature is 0 (greedy) or from 0.001 to 2"),
])
def test_an_option_this_server_cannot_honour_is_400_unsupported(fields, param, message):
    assert refusal(check_request_options, request(**fields), "m", 32) == (400, message, param, "unsupported_parameter")


@pytest.mark.parametrize("fields", [
    {"n": 1}, {"presence_penalty": 0}, {"logprobs": False}, {"tools": []}, {"response_format": {"type": "text"}},
    {"stop": ["a", "b", "c", "x" * 256]}, {"temperature": 0}, {"temperature": 1e-3}, {"temperature": 2},
])
def test_options_the_server_honours_pass(fields):
    assert check_request_options(request(**fields), "m", 32) is None


def test_the_tokens_asked_for_are_returned_and_max_completion_tokens_wins():
    assert check_request_options(request(max_tokens=32), "m", 32) == 32
    assert check_request_options(request(max_tokens=99, max_completion_tokens=7), "m", 32) == 7


@pytest.mark.parametrize("fields, param", [({"max_tokens": 33}, "max_tokens"),
                                           ({"max_tokens": 1, "max_completion_tokens": 33}, "max_completion_tokens")])
def test_more_tokens_than_the_limit_is_400_naming_the_field_used(fields, param):
    assert refusal(check_request_options, request(**fields), "m", 32) == (
        400, f"{param} is too large: 33. This server allows at most 32 completion tokens.", param, "invalid_value")


# ---------------------------------------------------------------------------------------------- context


def test_a_prompt_is_refused_untokenized_only_when_no_tokenization_could_fit_it():
    assert check_prompt_chars(100 * 7, 100, 7) is None
    assert refusal(check_prompt_chars, 100 * 7 + 1, 100, 7) == (
        400, "This model's maximum context length is 100 tokens. However, your messages are 701 characters, more "
        "than 100 tokens can hold. Please reduce the length of the messages.", "messages", "context_length_exceeded")


def test_the_completion_budget_is_what_was_asked_or_the_default_capped_by_the_room_left():
    assert completion_budget(prompt_tokens=10, asked=5, context_tokens=100, default_max_tokens=256) == 5
    assert completion_budget(prompt_tokens=10, asked=90, context_tokens=100, default_max_tokens=256) == 90
    assert completion_budget(prompt_tokens=10, asked=None, context_tokens=100, default_max_tokens=256) == 90
    assert completion_budget(prompt_tokens=10, asked=None, context_tokens=100, default_max_tokens=16) == 16


def test_a_prompt_filling_the_context_is_400_and_never_shows_a_negative_budget():
    assert refusal(completion_budget, 100, None, 100, 256) == (
        400, "This model's maximum context length is 100 tokens. However, your messages resulted in 100 tokens, "
        "leaving none for the completion. Please reduce the length of the messages.", "messages",
        "context_length_exceeded")
    assert refusal(completion_budget, 10, 91, 100, 256) == (
        400, "This model's maximum context length is 100 tokens. However, you requested 101 tokens (10 in the "
        "messages, 91 in the completion). Please reduce the length of the messages or completion.", "messages",
        "context_length_exceeded")


def test_decoding_settings_default_to_greedy_seed_0_and_take_what_is_asked():
    from tunelab.engine.generate import DecodingSettings

    assert decoding_settings(request(), 9, 0.0) == DecodingSettings(max_new_tokens=9, temperature=0.0, top_p=1.0,
                                                                    seed=0)
    asked = decoding_settings(request(temperature=0.7, top_p=0.9, seed=-3), 4, 0.0)
    assert asked == DecodingSettings(max_new_tokens=4, temperature=0.7, top_p=0.9, seed=-3)


# ---------------------------------------------------------------------------------------------- errors, gate


def test_routing_errors_get_an_openai_body_with_a_code_for_404_and_405():
    assert http_error(404, "Not Found").body() == {"error": {"message": "Not Found", "type": "invalid_request_error",
                                                             "param": None, "code": "not_found"}}
    assert http_error(405, "Method Not Allowed").body()["error"]["code"] == "method_not_allowed"
    assert http_error(418, "teapot").body()["error"]["code"] is None


def test_the_prepare_gate_admits_up_to_its_limit_then_answers_429_and_frees_on_exit():
    gate = PrepareGate(1)
    with gate:
        with pytest.raises(APIError) as caught:
            gate.__enter__()
        assert (caught.value.status, caught.value.type, caught.value.code) == (429, "server_error", "server_busy")
    assert gate.active == 0
    with gate:
        assert gate.active == 1
    with pytest.raises(APIError):
        PrepareGate(0).__enter__()


# ---------------------------------------------------------------------------------------------- the stream


def stream(events, stops=(), include_usage=False):
    """The server-sent events for a worker that sends `events`, and whether the job was cancelled."""
    job = _Job(messages=[], settings=None, stats=SimpleNamespace(prompt_tokens=3, completion_tokens=2))
    writer = ChunkWriter("chatcmpl-1", "m", 1700000000, include_usage)

    async def collect():
        queue = asyncio.Queue()
        for event in events:
            queue.put_nowait(event)
        return [line async for line in sse_events(job, queue, writer, list(stops), 0.0)]

    return asyncio.run(collect()), job.cancel.is_set()


def payloads(lines):
    return [json.loads(line[6:]) for line in lines if line != "data: [DONE]\n\n"]


def test_a_stream_sends_role_pieces_finish_and_done():
    lines, cancelled = stream([("piece", "Hel"), ("piece", "lo"), ("end", SimpleNamespace(finish_reason="length"))])
    assert lines[-1] == "data: [DONE]\n\n" and cancelled
    chunks = payloads(lines)
    assert [c["choices"][0]["delta"] for c in chunks] == [{"role": "assistant", "content": ""}, {"content": "Hel"},
                                                         {"content": "lo"}, {}]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, "length"]
    assert chunks[0] == {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000, "model": "m",
                         "system_fingerprint": None,
                         "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                      "finish_reason": None}]}


def test_a_stop_string_split_across_pieces_ends_the_stream_before_it_and_cancels_the_job():
    lines, cancelled = stream([("piece", "ab<"), ("piece", "/s"), ("piece", ">cd"), ("piece", "never")], stops=["</s>"])
    chunks = payloads(lines)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "ab"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and cancelled


def test_usage_when_asked_is_null_on_each_chunk_and_counted_in_a_last_chunk_without_choices():
    chunks = payloads(stream([("end", SimpleNamespace(finish_reason="stop"))], include_usage=True)[0])
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 2,
                                                                   "total_tokens": 5}


def test_a_worker_error_ends_the_stream_with_an_error_body_and_no_done():
    lines, cancelled = stream([("piece", "a"), ("error", "RuntimeError")])
    assert "data: [DONE]\n\n" not in lines and cancelled
    assert payloads(lines)[-1] == {"error": {"message": "Generation failed (RuntimeError).", "type": "server_error",
                                             "param": None, "code": None}}


def test_the_job_is_cancelled_when_the_client_goes_away_mid_stream():
    job = _Job(messages=[], settings=None, stats=SimpleNamespace(prompt_tokens=0, completion_tokens=0))
    queue = asyncio.Queue()

    async def read_one_then_leave():
        events = sse_events(job, queue, ChunkWriter("c", "m", 0, False), [], 0.0)
        await events.__anext__()
        await events.aclose()

    asyncio.run(read_one_then_leave())
    assert job.cancel.is_set()
