// nanoseek web chat: conversations live in the server's local SQLite history (/api/conversations); answers stream
// from /v1/chat/completions (fetch + ReadableStream over SSE). The reasoning shows in a collapsible <details>, the
// answer as Markdown (a small renderer below: the text is HTML-escaped first). Nothing is loaded from elsewhere.
"use strict";

const KEY_STORE = "nanoseek.apiKey";
const SETTINGS_STORE = "nanoseek.settings";
const state = {
  key: localStorage.getItem(KEY_STORE) || "",
  model: null,
  convId: null,
  messages: [],   // {role, content, reasoning} of the open conversation
  busy: false,
  abort: null,
};
const $ = (id) => document.getElementById(id);

// --- Markdown ------------------------------------------------------------------------------------------------------
function escapeHtml(s) {
  return s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

function inline(s) { // s is escaped already
  return s.split(/(`[^`\n]+`)/g).map((part, i) => i % 2
    ? "<code>" + part.slice(1, -1) + "</code>"
    : part.replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>")
      .replace(/__([^_\n]+)__/g, "<strong>$1</strong>")
      .replace(/(^|[^*])\*([^*\s](?:[^*\n]*[^*\s])?)\*(?!\*)/g, "$1<em>$2</em>")
      .replace(/(^|[^\w_])_([^_\s](?:[^_\n]*[^_\s])?)_(?![\w_])/g, "$1<em>$2</em>")).join("");
}

function renderMarkdown(src) {
  let html = "", para = [], list = null, code = null;
  const flushPara = () => {
    if (para.length) html += "<p>" + inline(para.join("\n")).replace(/\n/g, "<br>") + "</p>";
    para = [];
  };
  const closeList = () => { if (list) html += `</${list}>`; list = null; };
  const openList = (kind) => { flushPara(); if (list !== kind) { closeList(); html += `<${kind}>`; list = kind; } };
  for (const line of escapeHtml(src).split("\n")) {
    let m;
    if (code !== null) {
      if (/^\s*```/.test(line)) { html += "<pre><code>" + code.join("\n") + "</code></pre>"; code = null; }
      else code.push(line);
    } else if (/^\s*```/.test(line)) {
      flushPara(); closeList(); code = [];
    } else if ((m = line.match(/^(#{1,6})\s+(.*)$/))) {
      flushPara(); closeList(); html += `<h${m[1].length}>${inline(m[2])}</h${m[1].length}>`;
    } else if ((m = line.match(/^\s*[-*+]\s+(.*)$/))) {
      openList("ul"); html += "<li>" + inline(m[1]) + "</li>";
    } else if ((m = line.match(/^\s*\d+[.)]\s+(.*)$/))) {
      openList("ol"); html += "<li>" + inline(m[1]) + "</li>";
    } else if (!line.trim()) {
      flushPara(); closeList();
    } else {
      closeList(); para.push(line);
    }
  }
  if (code !== null) html += "<pre><code>" + code.join("\n") + "</code></pre>"; // still streaming
  flushPara(); closeList();
  return html;
}

// --- API -----------------------------------------------------------------------------------------------------------
let keyWaiters = [];
function askForKey() {
  $("key-dialog").hidden = false;
  $("key-input").focus();
  return new Promise((resolve) => keyWaiters.push(resolve));
}

async function api(path, opts = {}) {
  const headers = {};
  if (state.key) headers.Authorization = "Bearer " + state.key;
  let body;
  if (opts.json !== undefined) { headers["Content-Type"] = "application/json"; body = JSON.stringify(opts.json); }
  const res = await fetch(path, { method: opts.method || "GET", headers, body, signal: opts.signal });
  if (res.status === 401) { await askForKey(); return api(path, opts); }
  if (!res.ok) {
    let msg = `${res.status} ${res.statusText}`, code = null;
    try { ({ message: msg, code } = (await res.json()).error); } catch (e) { /* not JSON */ }
    throw Object.assign(new Error(msg), { code });
  }
  return res;
}
const getJson = async (path, opts) => (await api(path, opts)).json();

// Streams one chat completion; onDelta(kind, text) with kind "reasoning" or "content". Returns the finish reason.
async function streamChat(messages, onDelta, signal) {
  const body = { model: state.model, messages, stream: true, stream_options: { include_usage: true } };
  const s = settings();
  if (s.temperature !== "") body.temperature = Number(s.temperature);
  if (s.maxTokens !== "") body.max_tokens = Number(s.maxTokens);
  if (s.thinkingBudget !== "") body.thinking_token_budget = Number(s.thinkingBudget);
  const res = await api("/v1/chat/completions", { method: "POST", json: body, signal });
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = "", finish = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return finish;
    buf += decoder.decode(value, { stream: true });
    let end;
    while ((end = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, end);
      buf = buf.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return finish;
        const obj = JSON.parse(data);
        if (obj.error) throw new Error(obj.error.message);
        for (const c of obj.choices || []) {
          const d = c.delta || {};
          if (d.reasoning_content) onDelta("reasoning", d.reasoning_content);
          if (d.content) onDelta("content", d.content);
          if (c.finish_reason) finish = c.finish_reason;
        }
      }
    }
  }
}

// --- settings ------------------------------------------------------------------------------------------------------
const SETTING_INPUTS = { temperature: "set-temperature", maxTokens: "set-max-tokens", thinkingBudget: "set-thinking-budget" };
function settings() {
  const out = {};
  for (const [name, id] of Object.entries(SETTING_INPUTS)) out[name] = $(id).value.trim();
  return out;
}
function loadSettings() {
  let saved = {};
  try { saved = JSON.parse(localStorage.getItem(SETTINGS_STORE) || "{}"); } catch (e) { /* ignore */ }
  for (const [name, id] of Object.entries(SETTING_INPUTS)) {
    $(id).value = saved[name] ?? "";
    $(id).addEventListener("change", () => localStorage.setItem(SETTINGS_STORE, JSON.stringify(settings())));
  }
}

// --- rendering -----------------------------------------------------------------------------------------------------
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function scrollDown() { const m = $("messages"); m.scrollTop = m.scrollHeight; }

function addUserMessage(text) {
  const div = el("div", "msg user");
  div.append(el("div", "role", "You"), el("div", "body", text));
  $("messages").append(div);
  scrollDown();
}

// An assistant message view; returns {update(reasoning, content), error(msg), done()}.
function addAssistantMessage(reasoning = "", content = "", streaming = false) {
  const div = el("div", "msg assistant");
  const thinking = el("details", "thinking");
  const summary = el("summary", null, streaming ? "Thinking…" : "Thought");
  const reasoningDiv = el("div", "reasoning");
  thinking.append(summary, reasoningDiv);
  const answer = el("div", "answer");
  div.append(el("div", "role", "Assistant"), thinking, answer);
  $("messages").append(div);
  thinking.open = streaming;
  let pending = false, r = reasoning, c = content;
  const paint = () => {
    pending = false;
    thinking.hidden = !r;
    reasoningDiv.textContent = r;
    answer.innerHTML = renderMarkdown(c);
    scrollDown();
  };
  paint();
  return {
    update(newReasoning, newContent) {
      if (!c && newContent && streaming) thinking.open = false; // the answer started: fold the thinking away
      r = newReasoning; c = newContent;
      if (!pending) { pending = true; requestAnimationFrame(paint); }
    },
    error(msg) { div.append(el("div", "error", "Error: " + msg)); },
    done(stopped) { summary.textContent = stopped ? "Thought (stopped)" : "Thought"; paint(); },
  };
}

function renderConversation() {
  $("messages").replaceChildren();
  for (const m of state.messages) {
    if (m.role === "user") addUserMessage(m.content);
    else if (m.role === "assistant") addAssistantMessage(m.reasoning || "", m.content || "");
  }
}

async function refreshList() {
  const { data } = await getJson("/api/conversations");
  const ul = $("conversations");
  ul.replaceChildren();
  for (const conv of data) {
    const li = el("li", conv.id === state.convId ? "active" : "");
    li.dataset.id = conv.id;
    const title = el("span", "title", conv.title);
    title.title = conv.title;
    title.addEventListener("click", () => openConversation(conv.id));
    const del = el("button", "delete", "×");
    del.type = "button";
    del.title = "Delete this conversation";
    del.addEventListener("click", () => deleteConversation(conv.id));
    li.append(title, del);
    ul.append(li);
  }
}

// --- actions -------------------------------------------------------------------------------------------------------
function setStatus(text) { $("status").textContent = text || ""; }

function setBusy(busy) {
  state.busy = busy;
  $("send").textContent = busy ? "Stop" : "Send";
  $("send").classList.toggle("stop", busy);
}

async function openConversation(id) {
  if (state.abort) state.abort.abort();
  const conv = await getJson(`/api/conversations/${encodeURIComponent(id)}`);
  state.convId = conv.id;
  state.messages = conv.messages;
  renderConversation();
  await refreshList();
}

function newConversation() {
  if (state.abort) state.abort.abort();
  state.convId = null;
  state.messages = [];
  renderConversation();
  refreshList();
  $("input").focus();
}

async function deleteConversation(id) {
  await api(`/api/conversations/${encodeURIComponent(id)}`, { method: "DELETE" });
  if (id === state.convId) newConversation();
  else await refreshList();
}

async function send() {
  const text = $("input").value.trim();
  if (!text || state.busy) return;
  $("input").value = "";
  setBusy(true);
  setStatus("");
  try {
    if (!state.convId) {
      const conv = await getJson("/api/conversations", { method: "POST", json: { title: text.slice(0, 60) } });
      state.convId = conv.id;
      state.messages = [];
    }
    const convId = state.convId, history = state.messages;
    await api(`/api/conversations/${convId}/messages`, { method: "POST", json: { role: "user", content: text } });
    history.push({ role: "user", content: text });
    addUserMessage(text);
    refreshList();
    await answer(convId, history);
  } catch (e) {
    setStatus("Error: " + e.message);
  } finally {
    setBusy(false);
    state.abort = null;
  }
}

// Once a conversation outgrows the model's context, its oldest turns are left out of the prompt (as `nanoseek chat`
// does); they stay in the history.
async function answer(convId, history) {
  const view = addAssistantMessage("", "", true);
  let reasoning = "", content = "", stopped = false;
  state.abort = new AbortController();
  let turns = history.map((m) => ({ role: m.role, content: m.content }));
  for (;;) {
    try {
      await streamChat(turns, (kind, t) => {
        if (kind === "reasoning") reasoning += t; else content += t;
        view.update(reasoning, content);
      }, state.abort.signal);
    } catch (e) {
      const next = turns.findIndex((m, i) => i > 0 && m.role === "user");
      if (e.code === "context_length_exceeded" && next > 0) {
        turns = turns.slice(next);  // drop the oldest exchange and ask again
        continue;
      }
      if (e.name === "AbortError") stopped = true; else view.error(e.message);
    }
    break;
  }
  if (turns.length < history.length) setStatus(`${history.length - turns.length} earlier messages were left out: ` +
                                               "the conversation outgrew the model's context");
  view.done(stopped);
  if (!reasoning && !content) return;
  const msg = { role: "assistant", content, reasoning: reasoning || null };
  history.push(msg);
  await api(`/api/conversations/${convId}/messages`, { method: "POST", json: msg });
}

// --- start ---------------------------------------------------------------------------------------------------------
function wire() {
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    if (state.busy) { if (state.abort) state.abort.abort(); } else send();
  });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  $("new-chat").addEventListener("click", newConversation);
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.key = $("key-input").value.trim();
    localStorage.setItem(KEY_STORE, state.key);
    $("key-dialog").hidden = true;
    const waiters = keyWaiters;
    keyWaiters = [];
    waiters.forEach((resolve) => resolve());
  });
  $("forget-key").addEventListener("click", () => { localStorage.removeItem(KEY_STORE); state.key = ""; });
}

async function start() {
  wire();
  loadSettings();
  try {
    const models = await getJson("/v1/models");
    state.model = models.data[0].id;
    $("model-name").textContent = state.model;
    await refreshList();
    document.body.dataset.ready = "1";
  } catch (e) {
    setStatus("Error: " + e.message);
  }
}

start();
