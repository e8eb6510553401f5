// The chat page's script (chat.html; served from the package like the vendored marked and DOMPurify, so the page's
// Content-Security-Policy can forbid every inline script: a model's HTML could not run one even unsanitized).
"use strict";
const $ = (id) => document.getElementById(id);
const history = [];
const keyBox = $("key");
keyBox.value = localStorage.getItem("edgeqwen-key") || "";
keyBox.addEventListener("change", () => { localStorage.setItem("edgeqwen-key", keyBox.value); loadModels(); });

function headers() {
  const h = { "Content-Type": "application/json" };
  if (keyBox.value) h["Authorization"] = "Bearer " + keyBox.value;
  return h;
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  div.appendChild(body);
  $("log").appendChild(div);
  $("log").scrollTop = $("log").scrollHeight;
  return div;
}

// Links open in a new tab without handing it this page.
if (window.DOMPurify) {
  DOMPurify.addHook("afterSanitizeAttributes", (node) => {
    if (node.tagName === "A") { node.setAttribute("target", "_blank"); node.setAttribute("rel", "noopener noreferrer"); }
  });
}

// A model's markdown as HTML: parsed by marked, sanitized by DOMPurify (no script, no event handler, no javascript:
// link; no image either, which would make the browser fetch whatever URL a model wrote), code blocks with a copy button.
function render(el, text) {
  if (!window.marked || !window.DOMPurify) { el.textContent = text; return; }
  el.innerHTML = DOMPurify.sanitize(marked.parse(text, { gfm: true, breaks: true }),
                                    { FORBID_TAGS: ["img", "style", "form", "input", "button", "textarea", "select"] });
  for (const pre of el.querySelectorAll("pre")) {
    const wrap = document.createElement("div");
    wrap.className = "code";
    pre.replaceWith(wrap);
    const copy = document.createElement("button");
    copy.type = "button";
    copy.className = "copy";
    copy.textContent = "Copy";
    copy.addEventListener("click", async () => {
      try {
        await navigator.clipboard.writeText(pre.textContent);
        copy.textContent = "Copied";
      } catch { copy.textContent = "Copy failed"; }
      setTimeout(() => { copy.textContent = "Copy"; }, 1500);
    });
    wrap.append(copy, pre);
  }
}

async function loadModels() {
  const r = await fetch("/v1/models", { headers: headers() });
  const sel = $("model");
  sel.innerHTML = "";
  if (!r.ok) { bubble("assistant error", (await r.json()).error.message); return; }
  for (const m of (await r.json()).data) {
    const o = document.createElement("option");
    o.value = m.id;
    o.textContent = `${m.id} (${m.format} ${m.quant ?? ""})`;
    sel.appendChild(o);
  }
}

async function send(text) {
  history.push({ role: "user", content: text });
  bubble("user", text);
  const div = bubble("assistant", "");
  const body = div.querySelector(".text");
  $("send").disabled = true;
  let reply = "";
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(),
      body: JSON.stringify({ model: $("model").value, messages: history, stream: true,
                             max_tokens: Number($("max").value) || undefined,
                             stream_options: { include_usage: true } }),
    });
    if (!r.ok) throw new Error((await r.json()).error.message);
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buf = "", pending = false;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      const events = buf.split(/\r?\n\r?\n/);
      buf = events.pop();
      for (const ev of events) {
        for (const line of ev.split(/\r?\n/)) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") continue;
          const msg = JSON.parse(data);
          if (msg.error) throw new Error(msg.error.message);
          const delta = msg.choices?.[0]?.delta?.content;
          if (delta) {
            reply += delta;
            if (!pending) {   // one render per frame however fast tokens arrive
              pending = true;
              requestAnimationFrame(() => { pending = false; render(body, reply); $("log").scrollTop = $("log").scrollHeight; });
            }
          }
          if (msg.usage) {
            const s = document.createElement("span");
            s.className = "stats";
            const t = msg.timings || {};
            s.textContent = `${msg.usage.completion_tokens} tokens · ${(t.predicted_per_second ?? 0).toFixed(1)} tok/s` +
                            ` · TTFT ${Math.round(t.ttft_ms ?? 0)} ms`;
            div.appendChild(s);
          }
        }
      }
    }
    render(body, reply);
    history.push({ role: "assistant", content: reply });
  } catch (e) {
    history.pop();
    div.classList.add("error");
    body.textContent = "Error: " + e.message;
  } finally {
    $("send").disabled = false;
  }
}

$("form").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("input").value.trim();
  if (!text || $("send").disabled) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("form").requestSubmit(); }
});
$("reset").addEventListener("click", () => { history.length = 0; $("log").innerHTML = ""; });
loadModels();
