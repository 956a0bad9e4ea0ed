// nanoseek web chat: conversations live in the server's local SQLite history (/api/conversations); answers stream
// from /v1/chat/completions (fetch + ReadableStream over SSE). The reasoning shows in a collapsible <details>, the
// answer as Markdown (a small renderer below: the text is HTML-escaped first). Nothing is loaded from elsewhere.
// The key sent as a Bearer header is the server's API key or, without one, the history token `nanoseek serve` prints
// in the page's address (/#token=…): taken from there on load, kept in localStorage, and wiped from the address bar.
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
  const openList = (kind, start = 1) => {
    flushPara();
    if (list !== kind) { closeList(); html += start === 1 ? `<${kind}>` : `<${kind} start="${start}">`; list = kind; }
  };
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
    } else if ((m = line.match(/^\s*(\d{1,9})[.)]\s+(.*)$/)) && (!para.length || m[1] === "1")) {
      openList("ol", Number(m[1])); html += "<li>" + inline(m[2]) + "</li>";  // "1999. Then…" in a paragraph is text
    } else if (!line.trim()) {
      flushPara();  // a list goes on after a blank line if another item follows (a "loose" list)
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
function askForKey(why = "") {
  $("key-error").textContent = why;
  $("key-dialog").hidden = false;
  $("key-input").select();
  return new Promise((resolve) => keyWaiters.push(resolve));
}

async function api(path, opts = {}) {
  const headers = {};
  if (state.key) headers.Authorization = "Bearer " + state.key;
  let body;
  if (opts.json !== undefined) { headers["Content-Type"] = "application/json"; body = JSON.stringify(opts.json); }
  const res = await fetch(path, { method: opts.method || "GET", headers, body, signal: opts.signal });
  if (res.status === 401) {
    await askForKey(state.key ? "The server refused that key." : "");
    return api(path, opts);
  }
  if (!res.ok) {
    let msg = `${res.status} ${res.statusText}`, code = null, param = null;
    try { ({ message: msg, code, param } = (await res.json()).error); } catch (e) { /* not JSON */ }
    throw Object.assign(new Error(msg), { code, param, status: res.status });
  }
  return res;
}
const getJson = async (path, opts) => (await api(path, opts)).json();
const conversationUrl = (id) => `/api/conversations/${encodeURIComponent(id)}`;

// Streams one chat completion; onStart() once the server has accepted the request, then onDelta(kind, text) with
// kind "reasoning" or "content". Returns the finish reason.
async function streamChat(messages, onDelta, signal, onStart) {
  const body = { model: state.model, messages, stream: true, stream_options: { include_usage: true } };
  const s = settings();
  if (s.temperature !== "") body.temperature = Number(s.temperature);
  if (s.maxTokens !== "") body.max_tokens = Number(s.maxTokens);
  if (s.thinkingBudget !== "") body.thinking_token_budget = Number(s.thinkingBudget);
  const res = await api("/v1/chat/completions", { method: "POST", json: body, signal });
  onStart();
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
const SETTING_INPUTS = { temperature: "set-temperature", maxTokens: "set-max-tokens", thinkingBudget: "set-thinking-budget",
                         system: "set-system" };
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
  return div;
}

// An assistant message view; returns {update(reasoning, content), error(msg), note(msg), done(stopped), remove()}.
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
    note(msg) { div.append(el("div", "note", msg)); },
    done(stopped) { summary.textContent = stopped ? "Thought (stopped)" : "Thought"; paint(); },
    remove() { div.remove(); },
  };
}

const CUT_OFF = "(cut off at its token limit)";

function renderConversation() {
  $("messages").replaceChildren();
  for (const m of state.messages) {
    if (m.role === "user") addUserMessage(m.content);
    else if (m.role === "assistant") {
      const view = addAssistantMessage(m.reasoning || "", m.content || "");
      if (m.finish === "length") view.note(CUT_OFF);
      view.done(m.finish === "stopped");
    }
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
    const rename = el("button", "rename", "✎");
    rename.type = "button";
    rename.title = "Rename this conversation";
    rename.addEventListener("click", () => renameConversation(conv.id, conv.title));
    const del = el("button", "delete", "×");
    del.type = "button";
    del.title = "Delete this conversation";
    del.addEventListener("click", () => deleteConversation(conv.id));
    li.append(title, rename, del);
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

// A stream still running is stopped, and its partial answer saved, before another conversation is shown.
async function stopAnswer() {
  if (state.abort) state.abort.abort();
  await state.sending;
}

// A conversation gone (deleted in another tab): the list is refreshed, and one that was open is closed.
async function gone(id, e) {
  setStatus("Error: " + e.message);
  if (e.status !== 404) return;
  if (id === state.convId) { state.convId = null; state.messages = []; renderConversation(); }
  await refreshList();
}

async function openConversation(id) {
  if (id === state.convId) return;
  await stopAnswer();
  try {
    const conv = await getJson(conversationUrl(id));
    state.convId = conv.id;
    state.messages = conv.messages;
    renderConversation();
    setStatus("");
    await refreshList();
  } catch (e) { await gone(id, e); }
}

async function newConversation() {
  await stopAnswer();
  state.convId = null;
  state.messages = [];
  renderConversation();
  refreshList().catch((e) => setStatus("Error: " + e.message));
  $("input").focus();
}

async function renameConversation(id, title) {
  const name = (prompt("Rename the conversation", title) ?? "").trim();
  if (!name || name === title) return;
  try {
    const json = { title: Array.from(name).slice(0, 500).join("") };  // the server keeps 500 characters
    await api(conversationUrl(id), { method: "PATCH", json });
    await refreshList();
  } catch (e) { await gone(id, e); }
}

async function deleteConversation(id) {
  try {
    await api(conversationUrl(id), { method: "DELETE" });
  } catch (e) {
    if (e.status !== 404) { setStatus("Error: " + e.message); return; }  // 404: deleted already
  }
  if (id === state.convId) await newConversation();
  else await refreshList().catch((e) => setStatus("Error: " + e.message));
}

async function send() {
  const text = $("input").value.trim();
  if (!text || state.busy) return;
  $("input").value = "";
  setBusy(true);
  setStatus("");
  let done;
  state.sending = new Promise((resolve) => { done = resolve; });
  state.abort = new AbortController();  // Stop works from here on
  try {
    if (state.convId) {  // as stored: another tab may have added turns since it was opened
      state.messages = (await getJson(conversationUrl(state.convId), { signal: state.abort.signal })).messages;
      renderConversation();
    }
    await answer(text);
  } catch (e) {
    if (!$("input").value) $("input").value = text;  // the question is not lost: it can be sent again
    if (e.status === 404) await gone(state.convId, e);
    else if (e.name !== "AbortError") setStatus("Error: " + e.message);
  } finally {
    setBusy(false);
    state.abort = null;
    done();
  }
}

// Stores the question of a turn the server has accepted (in a new conversation, the conversation first); returns the
// conversation's id.
async function saveQuestion(text, history) {
  if (!state.convId) {
    const title = Array.from(text).slice(0, 60).join("");  // whole characters: half an emoji is no text
    state.convId = (await getJson("/api/conversations", { method: "POST", json: { title } })).id;
  }
  const convId = state.convId;
  await api(conversationUrl(convId) + "/messages", { method: "POST", json: { role: "user", content: text } });
  history.push({ role: "user", content: text });
  await refreshList();
  return convId;
}

// Asks the model about `text` after the open conversation. The turn is stored only once the server has accepted the
// request: a refused one (a setting out of range, a question too long) leaves nothing behind and its question goes
// back to the input box. Once a conversation outgrows the model's context, its oldest turns are left out of the
// prompt (as `nanoseek chat` does); they stay in the history.
async function answer(text) {
  const question = addUserMessage(text), view = addAssistantMessage("", "", true);
  const history = state.messages, earlier = history.length;
  let reasoning = "", content = "", stopped = false, accepted = false, finish = null, failure = null, saved = null;
  const system = settings().system.trim();  // sent before the turns, never left out, not stored with them
  let turns = [...history, { role: "user", content: text }].map((m) => ({ role: m.role, content: m.content }));
  const onStart = () => {
    accepted = true;
    saved = saveQuestion(text, history);
    saved.catch(() => {});  // (awaited below)
  };
  for (;;) {
    try {
      const sent = system ? [{ role: "system", content: system }, ...turns] : turns;
      finish = await streamChat(sent, (kind, t) => {
        if (kind === "reasoning") reasoning += t; else content += t;
        view.update(reasoning, content);
      }, state.abort.signal, onStart);
    } catch (e) {
      const next = turns.findIndex((m, i) => i > 0 && m.role === "user");
      if (!accepted && e.code === "context_length_exceeded" && next > 0) {
        turns = turns.slice(next);  // drop the oldest exchange and ask again
        continue;
      }
      if (e.name === "AbortError") stopped = true; else failure = e;
    }
    break;
  }
  if (!accepted) {
    question.remove();
    view.remove();
    if (failure) throw failure;
    $("input").value = text;  // stopped before the server took it
    return;
  }
  if (failure) view.error(failure.message);
  if (finish === "length") {
    const max = settings().maxTokens;
    view.note(max !== "" ? `(cut off at Max tokens: ${max})` : "(cut off: the model's context is full)");
  }
  if (turns.length <= earlier) setStatus(`${earlier + 1 - turns.length} earlier messages were left out: the ` +
                                         "conversation outgrew the model's context");
  view.done(stopped);
  const convId = await saved;  // a failure here: the question is not stored, and send() puts it back in the box
  if (reasoning || content) {
    const ended = stopped ? "stopped" : finish === "length" ? "length" : null;
    const msg = { role: "assistant", content, reasoning: reasoning || null, finish: ended };
    try {
      await api(conversationUrl(convId) + "/messages", { method: "POST", json: msg });
      history.push(msg);
    } catch (e) { view.error("the answer could not be saved: " + e.message); }  // the question was: not put back
  }
}

// --- start ---------------------------------------------------------------------------------------------------------
// The token of an address `nanoseek serve` printed (http://…/#token=…, pasted whole or as the token alone).
const tokenIn = (text) => (text.match(/[#&]token=([^&]*)/) || [null, text])[1];

function takeTokenFromAddress() {
  if (!/[#&]token=/.test(location.hash)) return false;
  useKey(tokenIn(location.hash));
  window.history.replaceState(null, "", location.pathname + location.search);  // out of sight, bookmarks, history
  return true;
}

function useKey(key) {  // and retry what waited for one
  state.key = key;
  localStorage.setItem(KEY_STORE, state.key);
  $("key-dialog").hidden = true;
  const waiters = keyWaiters;
  keyWaiters = [];
  waiters.forEach((resolve) => resolve());
}

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
    const key = tokenIn($("key-input").value.trim());
    if (!/^[\x21-\x7e]*$/.test(key)) {  // an HTTP header holds ASCII only (a pasted key may bring “quotes”)
      $("key-error").textContent = "A key holds only ASCII letters, digits and punctuation, without spaces.";
      return;
    }
    useKey(key);
  });
  $("forget-key").addEventListener("click", () => { localStorage.removeItem(KEY_STORE); state.key = ""; });
  // a newly printed address (a restarted server's new token) opened in this tab changes only the fragment
  window.addEventListener("hashchange", () => { if (takeTokenFromAddress()) refreshList().catch(() => {}); });
}

async function start() {
  takeTokenFromAddress();
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
