"""`edgeqwen serve`: a real server process on 127.0.0.1, driven by the real openai client and httpx."""
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from bench.harness import Served, free_port
from helpers import REAL_TOKENIZER, build_name, invoke, run_cli

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

QUESTION = "Name three colours."


@pytest.mark.parametrize("which,flags", [("gguf", []), ("gguf", ["--lean"]), ("onnx", [])])
def test_greedy_chat_matches_edgeqwen_run(server, margin_builds, margin_onnx, which, flags):
    """The server (a normal load) against `run` on both of llama.cpp's kernel paths."""
    folder = margin_builds["q4_0"] if which == "gguf" else margin_onnx["int8"]
    r = server.client().chat.completions.create(model=build_name(folder), temperature=0, max_tokens=24,
                                                messages=[{"role": "user", "content": QUESTION}])
    ref = json.loads(run_cli("run", folder, QUESTION, "-t", "0", "-n", "24", "--json", *flags).stdout)
    assert r.choices[0].message.content == ref["text"]
    assert r.usage.completion_tokens == ref["generation_tokens"] and r.usage.prompt_tokens == ref["prompt_tokens"]
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason == ("length" if ref["finish_reason"] == "length" else "stop")


def test_streaming_equals_non_streaming_and_reports_usage(server, margin_builds):
    model = build_name(margin_builds["q4_0"])
    c = server.client()
    whole = c.chat.completions.create(model=model, temperature=0, max_tokens=20,
                                      messages=[{"role": "user", "content": QUESTION}])
    chunks = list(c.chat.completions.create(model=model, temperature=0, max_tokens=20, stream=True,
                                            stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": QUESTION}]))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens and not chunks[-1].choices
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == whole.choices[0].finish_reason


def test_completions_is_run_raw_and_models_lists_both(server, margin_builds, margin_onnx):
    c = server.client()
    model = build_name(margin_builds["q4_0"])
    r = c.completions.create(model=model, prompt="The sky is", max_tokens=12, temperature=0)
    ref = json.loads(run_cli("run", margin_builds["q4_0"], "The sky is", "--raw", "-t", "0", "-n", "12",
                             "--json").stdout)
    assert r.choices[0].text == ref["text"] and r.usage.completion_tokens == ref["generation_tokens"]
    listed = {m.id: m for m in c.models.list().data}
    assert set(listed) == {model, build_name(margin_onnx["int8"])}
    assert listed[model].model_extra["format"] == "gguf" and listed[model].model_extra["file_size"] > 0


def test_stop_strings_and_max_completion_tokens(server, margin_builds):
    c = server.client()
    model = build_name(margin_builds["q4_0"])
    full = c.completions.create(model=model, prompt="Once upon a time", max_tokens=30, temperature=0,
                                extra_body={"ignore_eos": True}).choices[0].text
    stop = full[5:8]
    r = c.completions.create(model=model, prompt="Once upon a time", max_tokens=30, temperature=0, stop=[stop],
                             extra_body={"ignore_eos": True})
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"
    r = c.chat.completions.create(model=model, max_completion_tokens=3, temperature=0,
                                  messages=[{"role": "user", "content": "hi"}], extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_run_json_and_the_api_carry_the_models_exact_text(server, margin_builds, margin_cycles):
    """Machine outputs carry a model's exact text, control characters included; only the terminal's is cleaned."""
    from margin import STEER_TEXT, continues

    from edgeqwen.runner import display_text
    prompt = "Whatever comes first, then " + STEER_TEXT   # steers the margin model into its control cycle
    r = server.client().completions.create(model=build_name(margin_builds["q4_0"]), prompt=prompt, max_tokens=8,
                                           temperature=0)
    args = ("run", margin_builds["q4_0"], prompt, "--raw", "-t", "0", "-n", "8")
    ref = json.loads(run_cli(*args, "--json").stdout)
    assert r.choices[0].text == ref["text"] and continues(ref["text"], margin_cycles["control_text"])
    assert "\x05" in ref["text"] and "\x0c" in ref["text"] and ref["generation_tokens"] == 8
    plain = run_cli(*args).stdout
    assert plain == display_text(ref["text"]) + "\n" and "\x05" not in plain and "\ufffd" in plain


@pytest.mark.parametrize("body,status,words", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    ({"model": "M"}, 400, "messages"),
    ({"model": "M", "messages": "hi"}, 400, "messages"),
    ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}, 400, "max_tokens"),
    ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature"),
    ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n > 1"),
    ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "not served"),
    ({"model": "M", "messages": [{"role": "user", "content": "word " * 40000}]}, 400, "too many"),
    ({"model": "M", "messages": [{"role": "user", "content": "x" * (1 << 21)}]}, 413, "limit"),
])
def test_errors_have_openais_shape(server, margin_builds, body, status, words):
    if isinstance(body, dict):
        body = json.dumps(body).replace('"M"', json.dumps(build_name(margin_builds["q4_0"]))).encode()
    r = httpx.post(server.url + "/v1/chat/completions", content=body, timeout=60,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"] and {"message", "type", "code"} <= set(err)
    assert httpx.get(server.url + "/health").status_code == 200


def test_a_client_that_disconnects_stops_its_generation(server, margin_builds):
    model = build_name(margin_builds["q4_0"])
    before = server.metric("edgeqwen_generated_tokens_total")
    body = {"model": model, "prompt": "Tell me everything.", "max_tokens": 100000, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 10:
                break
    time.sleep(1.0)
    a = server.metric("edgeqwen_generated_tokens_total")
    time.sleep(1.0)
    b = server.metric("edgeqwen_generated_tokens_total")
    assert a == b and a - before < 2000, (before, a, b)   # stopped, long before max_tokens
    assert server.client().models.list().data   # and the server answers


def test_api_key_and_queue_full(tiny_builds):
    # one conversation at a time (--parallel 1): the second request waits, the third finds the queue full
    s = Served([tiny_builds["q4_0"]], "--max-queue", "1", "--ctx", "32768", "--parallel", "1",
               env={"EDGEQWEN_API_KEY": "s3cret"})
    try:
        model = build_name(tiny_builds["q4_0"])
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").models.list()
        r = httpx.get(s.url + "/v1/models")
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        c = s.client("s3cret")
        assert c.models.list().data[0].id == model
        long = {"model": model, "prompt": "go", "max_tokens": 100000, "temperature": 0, "stream": True,
                "ignore_eos": True}
        hdr = {"Authorization": "Bearer s3cret"}
        with httpx.stream("POST", s.url + "/v1/completions", json=long, headers=hdr, timeout=60) as busy:
            lines = busy.iter_lines()   # kept: a dropped iterator closes the connection
            next(lines)                 # generating: the slot is taken
            waiting = threading.Thread(target=lambda: httpx.post(s.url + "/v1/completions", headers=hdr, timeout=60,
                                                                 json={**long, "stream": False, "max_tokens": 2}))
            waiting.start()
            time.sleep(0.5)           # one in the queue: the queue (1) is full
            r = httpx.post(s.url + "/v1/completions", headers=hdr, json={**long, "stream": False, "max_tokens": 2})
            assert r.status_code == 503 and r.headers["retry-after"] and r.json()["error"]["type"] == "server_busy"
        waiting.join(60)
        assert not waiting.is_alive()
    finally:
        assert s.stop() == 0


def test_load_16_clients_none_lost_or_mixed(server, margin_builds, margin_cycles):
    model = build_name(margin_builds["q4_0"])
    c = server.client()
    # each prompt ends on another word of the model's cycle and has another length: 16 different answers
    words = margin_cycles["cycle_text"].split()
    prompts = [f"Client{' again' * i} counts {words[i % len(words)]}" for i in range(16)]
    expected = {}
    for p in prompts:   # each prompt's greedy answer, alone
        r = c.completions.create(model=model, prompt=p, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
        expected[p] = (r.choices[0].text, r.usage.prompt_tokens)
    assert len(set(expected.values())) == 16
    rss_before = server.rss()
    results, lock = [], threading.Lock()

    def client(p):
        cl = server.client()
        for _ in range(4):
            try:
                r = cl.completions.create(model=model, prompt=p, max_tokens=8, temperature=0,
                                          extra_body={"ignore_eos": True})
                got = ("ok", p, r.choices[0].text, r.usage.prompt_tokens, r.usage.completion_tokens)
            except openai.APIStatusError as e:
                got = ("status", p, e.status_code, None, None)
            with lock:
                results.append(got)
    threads = [threading.Thread(target=client, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(results) == 64
    for kind, p, text, n_prompt, n_gen in results:
        if kind == "status":
            assert text == 503
            continue
        assert (text, n_prompt) == expected[p] and n_gen == 8
    assert sum(r[0] == "ok" for r in results) >= 48
    assert server.client().models.list().data
    assert server.rss() <= rss_before * 1.10


def test_health_is_503_while_loading(tiny_builds):
    from starlette.testclient import TestClient

    from edgeqwen.serve import ServeConfig, Server, create_app
    srv = Server(ServeConfig(builds=[str(tiny_builds["q4_0"])]))
    with TestClient(create_app(srv)) as tc:
        r = tc.get("/health")
        assert r.status_code == 503 and r.headers["retry-after"]
        srv.pool.submit(srv._ensure, build_name(tiny_builds["q4_0"])).result()
        assert tc.get("/health").status_code == 200
        assert tc.get("/nowhere").json()["error"]["code"] == "not_found"
    srv.close()


def test_non_loopback_host_needs_a_key_or_says_it_is_insecure(tiny_builds):
    """serve --help says a non-loopback host needs --api-key: without one it is refused, before any load."""
    r = invoke("serve", tiny_builds["q4_0"], "--host", "0.0.0.0", "--port", str(free_port()))
    assert r.returncode == 2 and "--api-key" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    p = subprocess.Popen([sys.executable, "-m", "edgeqwen.cli", "serve", str(tiny_builds["q4_0"]), "--host",
                          "0.0.0.0", "--port", str(free_port()), "--insecure-no-key"], stderr=subprocess.PIPE,
                         text=True)
    try:
        line = p.stderr.readline()
        assert "Warning" in line and "without --api-key" in line
    finally:
        p.terminate()
        p.wait(20)


@pytest.mark.parametrize("host, words", [
    ("", "--host is empty"),
    ("no-such-host.invalid", "cannot resolve"),
    ("192.0.2.1", "not an address of this machine"),   # TEST-NET-1: never this machine's
])
def test_hosts_that_cannot_be_served_are_one_line(tiny_builds, host, words):
    r = invoke("serve", tiny_builds["q4_0"], "--host", host, "--port", str(free_port()), "--api-key", "k")
    assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_port_in_use_is_one_line_before_any_load(tiny_builds):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        r = run_cli("serve", tiny_builds["q4_0"], "--port", str(port))
    assert r.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_ipv6_loopback_is_loopback(tiny_builds):
    s = Served([tiny_builds["q4_0"]], "--host", "::1", url_host="[::1]")   # no key needed: this machine only
    try:
        assert httpx.get(f"{s.url}/health", timeout=10).status_code == 200
    finally:
        assert s.stop() == 0


@pytest.mark.parametrize("content", [b"not a model at all" * 100, "truncated", "template"])
def test_an_unloadable_build_is_one_line_not_a_server_answering_500(tiny_builds, tmp_path, content):
    src = next(Path(tiny_builds["q4_0"]).glob("*.gguf"))
    bad = tmp_path / "bad.gguf"
    if content == "truncated":
        bad.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    elif content == "template":   # a template syntax error, same length
        data = bytearray(src.read_bytes())
        at = data.index(b"{%", data.index(b"tokenizer.chat_template"))
        data[at:at + 2] = b"{{"
        bad.write_bytes(bytes(data))
    else:
        bad.write_bytes(content)
    r = invoke("serve", tiny_builds["q4_0"], bad, "--port", str(free_port()))
    assert r.returncode != 0 and "Error:" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert str(bad.name) in r.stderr


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.browser
@pytest.mark.skipif(not (CHROMIUM and shutil.which("chromedriver")), reason="chromium and chromedriver not installed")
def test_chat_page_in_a_real_browser(server, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(a)
    drv = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=shutil.which("chromedriver")))
    try:
        drv.get(server.url + "/")
        WebDriverWait(drv, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))
        drv.find_element(By.ID, "max").clear()
        drv.find_element(By.ID, "max").send_keys("32")
        drv.find_element(By.ID, "input").send_keys(QUESTION)
        drv.find_element(By.ID, "send").click()
        WebDriverWait(drv, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".assistant .stats"))
        drv.save_screenshot(str(tmp_path / "chat.png"))
        reply = drv.find_element(By.CSS_SELECTOR, ".assistant .text").text
        stats = drv.find_element(By.CSS_SELECTOR, ".assistant .stats").text
        assert QUESTION in drv.find_element(By.CSS_SELECTOR, ".user").text
        assert reply.strip() and "tok/s" in stats and "TTFT" in stats and stats.startswith("32 tokens")
        assert drv.find_elements(By.CSS_SELECTOR, ".assistant .text p"), "the answer is rendered as markdown"
        assert (tmp_path / "chat.png").stat().st_size > 1000
        _markdown_renders_and_stays_inert(drv, By)
    finally:
        drv.quit()


MARKDOWN = "# Title\n\n- one\n- two\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n```python\nprint('<b>hi</b>')\n```\n"
INJECTION = ('<img src=x onerror="window.pwned=1"><script>window.pwned=2</script>'
             '<a href="javascript:window.pwned=3" id="js">click</a> [md](javascript:window.pwned=4) '
             '<iframe srcdoc="<script>parent.pwned=5</script>"></iframe><svg onload="window.pwned=6"></svg>'
             '<details open ontoggle="window.pwned=7">x</details>\n\n```\n<script>window.pwned=8</script>\n```')


def _markdown_renders_and_stays_inert(drv, By):
    """The page's own render() (what each streamed delta goes through) on an answer a model could write: markdown
    becomes headings, lists, tables and a code block with a copy button; HTML and script in it never run (the
    sanitizer strips them, and the page's Content-Security-Policy forbids inline scripts besides)."""
    import time
    def answer(text):
        return drv.execute_script("const d = bubble('assistant', ''); render(d.querySelector('.text'), arguments[0]);"
                                  "return d.querySelector('.text');", text)
    md = answer(MARKDOWN)
    assert md.find_element(By.TAG_NAME, "h1").text == "Title"
    assert [li.text for li in md.find_elements(By.TAG_NAME, "li")] == ["one", "two"]
    assert [td.text for td in md.find_elements(By.TAG_NAME, "td")] == ["1", "2"]
    code = md.find_element(By.CSS_SELECTOR, ".code pre code")
    assert code.text == "print('<b>hi</b>')" and not code.find_elements(By.TAG_NAME, "b")
    assert md.find_element(By.CSS_SELECTOR, ".code button.copy").text == "Copy"
    bad = answer(INJECTION)
    time.sleep(1)   # an onerror, onload or ontoggle would have fired by now
    assert drv.execute_script("return window.pwned") is None
    html = bad.get_attribute("innerHTML")
    for gone in ("<script", "onerror", "onload", "ontoggle", "<iframe", "<img", "javascript:"):
        assert gone not in html, (gone, html)
    assert "&lt;script&gt;window.pwned=8" in html   # inside a code block it is text, shown as written
    assert drv.execute_script("return document.querySelectorAll('script:not([src])').length") == 0


ANSWER_SCHEMA = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no", "maybe"]},
                                                  "count": {"type": "integer"},
                                                  "colours": {"type": "array", "items": {"type": "string",
                                                                                         "maxLength": 12},
                                                              "maxItems": 3}},
                 "required": ["answer", "count", "colours"], "additionalProperties": False}


@pytest.mark.parametrize("which,stream", [("gguf", False), ("gguf", True), ("onnx", False), ("onnx", True)])
def test_a_strict_json_schema_is_followed(server, margin_builds, margin_onnx, which, stream):
    """response_format json_schema: the answer parses and validates (jsonschema), streamed or not, sampled or
    greedy; whatever the model would say, the engine's grammar (llama.cpp's sampler, onnxruntime-genai's guidance)
    allows only what the schema does."""
    jsonschema = pytest.importorskip("jsonschema")
    if which == "onnx" and not REAL_TOKENIZER.exists():
        pytest.skip("llguidance lets genai sample a token it then refuses with the generated tokenizer (a fresh "
                    "clone's); the real Qwen2 tokenizer (../shared) is what ONNX's guidance is tested with")
    schema = ANSWER_SCHEMA
    if which == "onnx":   # llguidance bounds no integer (llama.cpp's grammar: 16 digits); this model writes digits
        schema = json.loads(json.dumps(ANSWER_SCHEMA))
        schema["properties"]["count"]["enum"] = [0, 1, 2, 3, 66, 666]
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    build = margin_builds["q4_0"] if which == "gguf" else margin_onnx["int8"]
    for temperature in (0, 1.0):
        kw = dict(model=build_name(build), temperature=temperature, max_tokens=200, seed=3,
                  response_format=fmt, messages=[{"role": "user", "content": QUESTION}])
        if stream:
            chunks = list(server.client().chat.completions.create(stream=True, **kw))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        else:
            r = server.client().chat.completions.create(**kw)
            text, finish = r.choices[0].message.content, r.choices[0].finish_reason
        assert finish == "stop", (finish, text)
        jsonschema.validate(json.loads(text), schema)


def test_json_object_mode_constrains_the_answer(server, margin_builds):
    """json_object: the grammar of any JSON object. The margin model, left free, says its word cycle; in JSON mode
    its answer is an object from the first character. (It then writes its cycle inside a string it never closes:
    free JSON mode cannot make a model end its answer, only keep it JSON; a schema can, as above.)"""
    kw = dict(model=build_name(margin_builds["q4_0"]), temperature=0, max_tokens=40,
              messages=[{"role": "user", "content": QUESTION}])
    free = server.client().chat.completions.create(**kw).choices[0].message.content
    r = server.client().chat.completions.create(response_format={"type": "json_object"}, **kw)
    text = r.choices[0].message.content
    assert not free.lstrip().startswith("{") and text.startswith("{"), (free, text)
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("fmt, which, words", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}, "q4_0", "not a valid JSON Schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object",
                                                                      "patternProperties": {"^a": {}}}}},
     "q4_0", "patternProperties"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 3}}},
     "q4_0", "minimum"),
    ({"type": "json_schema"}, "q4_0", "needs a json_schema"),
    ({"type": "xml"}, "q4_0", "response_format"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 3}}},
     "int8", "minimum"),
])
def test_structured_output_it_cannot_honour_is_a_400(server, margin_builds, margin_onnx, fmt, which, words):
    """Never free text in place of what was asked: an invalid schema, a keyword the grammar would drop, or a format
    without a grammar sampler is one OpenAI-shaped 400."""
    import openai
    build = margin_builds["q4_0"] if which == "q4_0" else margin_onnx["int8"]
    with pytest.raises(openai.BadRequestError) as e:
        server.client().chat.completions.create(model=build_name(build), max_tokens=8, response_format=fmt,
                                                messages=[{"role": "user", "content": QUESTION}])
    assert words in e.value.response.json()["error"]["message"], e.value.response.text


def test_the_page_and_its_scripts_come_from_the_package_with_a_strict_policy(server):
    import httpx
    page = httpx.get(server.url + "/")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self';" in policy and "unsafe-inline" not in policy.split("script-src")[1].split(";")[0]
    for src in ("/static/chat.js", "/static/vendor/marked.umd.js", "/static/vendor/purify.min.js"):
        assert f'src="{src}"' in page.text
        r = httpx.get(server.url + src)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/javascript") and len(r.text) > 1000
    for bad in ("/static/chat.html", "/static/../edgeqwen/data/claims.toml", "/static/vendor/VERSIONS.md",
                "/static/%2e%2e/%2e%2e/pyproject.toml", "/static/"):
        r = httpx.get(server.url + bad)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", bad
