"""Tool calls: OpenAI's tools and tool_choice through `serve` (the openai client against a real server), Qwen2.5's
convention for templates without a tools section, the answer's <tool_call> blocks split into calls however the
text is streamed, and a named or required call grammar-constrained to its parameters."""
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from margin import continues

from edgeqwen.runner import ChatTemplated
from edgeqwen.serve.tools import Calls, in_convention, render, template_has_tools

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "days": {"type": "integer", "enum": [1, 2, 3]}},
                   "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def _split(chunks, names=("get_weather",)):
    c = Calls(list(names))
    out = [e for ch in chunks for e in c.feed(ch)] + c.finish()
    return "".join(x for k, x in out if k == "content"), [x for k, x in out if k == "call"]


ANSWER = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n'
          '</tool_call>\n<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>\n<tool_call>\n'
          '{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\", \\"days\\": 1}"}\n</tool_call>\n')


def test_an_answers_blocks_become_calls_and_the_rest_stays_content():
    content, calls = _split([ANSWER])
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Paris", "days": 2},
                                                                      {"city": "Oslo", "days": 1}]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    # an unknown function's block is text the model wrote, kept as content
    assert content == 'Let me look.\n<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>'
    assert _split(["no calls <tool_call here"]) == ("no calls <tool_call here", [])
    assert _split(["<tool_call>\n{broken\n</tool_call>"])[1] == []
    assert _split(["unclosed <tool_call>\n{\"name\": \"get_weather\""]) == \
        ("unclosed <tool_call>\n{\"name\": \"get_weather\"", [])


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.lists(st.integers(0, len(ANSWER)), max_size=12))
def test_calls_do_not_depend_on_how_the_text_is_streamed(cuts):
    cuts = sorted(set(cuts))
    chunks = [ANSWER[a:b] for a, b in zip([0, *cuts], [*cuts, len(ANSWER)])]
    content, calls = _split(chunks)
    want_content, want_calls = _split([ANSWER])
    assert content == want_content
    assert [c["function"] for c in calls] == [c["function"] for c in want_calls]


def test_the_convention_lists_tools_and_turns_calls_and_results_into_text():
    msgs = [{"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "", "tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"},
                                                                 "id": "call_1"}]},
            {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
            {"role": "tool", "content": "12 C", "tool_call_id": "call_2"}]
    out = in_convention(msgs, [WEATHER])
    assert out[0]["role"] == "system" and "<tools>\n" + json.dumps(WEATHER) + "\n</tools>" in out[0]["content"]
    assert out[2] == {"role": "assistant", "content": '<tool_call>\n{"name": "get_weather", "arguments": '
                                                      '{"city": "Oslo"}}\n</tool_call>'}
    assert out[3] == {"role": "user", "content": "<tool_response>\nsunny\n</tool_response>\n<tool_response>\n12 C\n"
                                                 "</tool_response>"}
    assert len(out) == 4
    mine = in_convention([{"role": "system", "content": "Be brief."}, msgs[0]], [WEATHER])
    assert mine[0]["content"].startswith("Be brief.\n\n# Tools")
    assert in_convention(msgs[:1], None) == msgs[:1]
    assert template_has_tools("{% if tools %}...{% endif %}") and not template_has_tools("{{ messages }}")


def test_a_template_with_a_tools_section_renders_them_itself():
    """Such a template (Qwen2.5's has one) gets the tools and the calls' arguments as objects; one without gets the
    convention."""
    native = ChatTemplated()
    native.chat_template = (
        "{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}\n{% endif %}"
        "{% for m in messages %}{{ m.role }}:{{ m.content }}"
        "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }} {{ c.function.arguments | tojson }}{% endfor %}"
        "\n{% endfor %}")
    msgs = [{"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "", "tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"},
                                                                 "id": "1"}]},
            {"role": "tool", "content": "sunny", "tool_call_id": "1"}]
    # (transformers' trim_blocks takes the newline after each block tag)
    assert render(native, msgs, [WEATHER, TIME]) == ('TOOLS:get_weather;get_time;user:Weather?assistant:'
                                                     'CALL get_weather {"city": "Oslo"}tool:sunny')
    plain = ChatTemplated()
    plain.chat_template = "{% for m in messages %}{{ m.role }}:{{ m.content }}\n{% endfor %}"
    text = render(plain, msgs, [WEATHER])
    assert text.startswith("system:You are Qwen") and "<tool_response>\nsunny\n</tool_response>" in text


# --- through the server -------------------------------------------------------------------------------------------

def _model(build):
    from helpers import build_name
    return build_name(build)


@pytest.mark.parametrize("stream", [False, True])
def test_a_named_call_follows_its_schema_and_the_round_trip_answers(server, margin_builds, margin_cycles,
                                                                     stream):
    import jsonschema
    c, model = server.client(), _model(margin_builds["q4_0"])
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    kw = dict(model=model, messages=msgs, tools=[WEATHER, TIME], max_tokens=80, temperature=0,
              tool_choice={"type": "function", "function": {"name": "get_weather"}})
    if stream:
        calls, finish = {}, None
        for ch in c.chat.completions.create(**kw, stream=True):
            if not ch.choices:
                continue
            for d in ch.choices[0].delta.tool_calls or []:
                got = calls.setdefault(d.index, {"id": d.id, "name": d.function.name, "arguments": ""})
                got["arguments"] += d.function.arguments or ""
            finish = ch.choices[0].finish_reason or finish
        (call,) = calls.values()
        call_id, name, arguments = call["id"], call["name"], call["arguments"]
    else:
        r = c.chat.completions.create(**kw)
        finish = r.choices[0].finish_reason
        (tc,) = r.choices[0].message.tool_calls
        call_id, name, arguments = tc.id, tc.function.name, tc.function.arguments
    assert finish == "tool_calls" and name == "get_weather"
    jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])
    msgs += [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]},
             {"role": "tool", "tool_call_id": call_id, "content": "sunny, 21 C"}]
    r = c.chat.completions.create(model=model, messages=msgs, tools=[WEATHER, TIME], max_tokens=6, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.tool_calls is None
    assert continues(r.choices[0].message.content, margin_cycles["cycle_text"])   # the margin model's answer


def test_required_calls_one_of_the_tools(server, margin_builds):
    c = server.client()
    r = c.chat.completions.create(model=_model(margin_builds["q4_0"]), messages=[{"role": "user", "content": "Hi"}],
                                  tools=[WEATHER, TIME], tool_choice="required", max_tokens=80, temperature=0)
    (tc,) = r.choices[0].message.tool_calls
    assert tc.function.name in ("get_weather", "get_time") and isinstance(json.loads(tc.function.arguments), dict)


def test_tools_on_onnx(server, margin_onnx):
    """ONNX: the tools are shown (auto) and the answer is parsed; a named call is constrained by onnxruntime-genai's
    guidance (a Lark grammar around the call's schema), tested with the real tokenizer (test_serve's strict schema
    test says why)."""
    import jsonschema
    from helpers import REAL_TOKENIZER
    c, model = server.client(), _model(margin_onnx["int8"])
    r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], tools=[WEATHER],
                                  max_tokens=4, temperature=0)
    assert r.choices[0].message.content and r.choices[0].finish_reason == "length"
    if not REAL_TOKENIZER.exists():
        return
    r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "Weather in Oslo?"}],
                                  tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {
                                      "name": "get_weather"}}, max_tokens=80, temperature=0)
    (tc,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and tc.function.name == "get_weather"
    jsonschema.validate(json.loads(tc.function.arguments), WEATHER["function"]["parameters"])


@pytest.mark.parametrize("body,words", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "not among"),
    ({"tool_choice": "auto"}, "needs tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}]},
     "not a valid JSON Schema"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ({"tools": [WEATHER, WEATHER]}, "same name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "contentEncoding": "base64"}}}}}],
      "tool_choice": "required"}, "contentEncoding"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "both"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "1", "type": "function", "function": {
        "name": "get_weather", "arguments": "{not json"}}]}]}, "not a JSON object"),
    ({"messages": [{"role": "tool", "tool_call_id": "1"}]}, "needs content"),
])
def test_bad_tool_requests_are_a_400(server, margin_builds, body, words):
    import httpx
    r = httpx.post(server.url + "/v1/chat/completions", json={
        "model": _model(margin_builds["q4_0"]), "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
        **body})
    assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
