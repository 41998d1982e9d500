// The llmos chat page: plain JavaScript, no build step, nothing from the network but this server.
//
// It talks to /v1/models (models and assistants), /api/... (conversations, feedback, assistants,
// tokenize) and streams replies from POST /api/conversations/{id}/chat, whose server-sent events
// are {type: "start" | "delta" | "error" | "end"}. The server saves the reply as it streams.
//
// Model output is untrusted: it reaches the page only through textContent or renderMarkdown,
// which escapes all HTML first and then adds a few tags of its own.
"use strict";

const $ = (id) => document.getElementById(id);

const state = {
  models: [],        // /v1/models cards; assistants have `parent`
  assistants: [],    // /api/assistants rows
  conversation: null,
  messages: [],      // rows of the current conversation
  streaming: null,   // the AbortController of the reply being streamed
};

// ---------------------------------------------------------------------------
// Safe markdown: escape everything, then add code blocks, inline code, bold, italics,
// headings, lists, quotes and http(s) links. Nothing else can become markup.

function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function renderMarkdown(source) {
  const stash = [];  // finished HTML kept out of later rules, restored at the end
  const keep = (html) => `\u0000${stash.push(html) - 1}\u0000`;
  let text = escapeHtml(source.replace(/[\u0000\u0001]/g, ""));
  // Fenced code from a line that starts with ```; an unclosed fence (a reply still streaming) runs to the end.
  text = text.replace(/(^|\n)```([^\n]*)\n([\s\S]*?)(?:\n```|$)/g, (_, before, info, code) =>
    `${before}\n${keep(`<pre>${info.trim() ? `<span class="lang">${info.trim()}</span>` : ""}<code>${code}</code></pre>`)}\n`);

  const inline = (s) => {
    s = s.replace(/`([^`\n]+)`/g, (_, code) => keep(`<code>${code}</code>`));
    s = s.replace(/\[([^\]\n]+)\]\((https?:\/\/(?:(?!&lt;|&gt;)[^\s()])+)\)/g, (_, label, url) =>
      keep(`<a href="${url}" target="_blank" rel="noopener noreferrer nofollow">${emphasis(label)}</a>`));
    return emphasis(s);
  };
  const emphasis = (s) => s
    .replace(/\*\*(\S(?:[^*\n]*\S)?)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^*\w])\*(\S(?:[^*\n]*\S)?)\*(?![*\w])/g, "$1<em>$2</em>");

  const out = [];
  let paragraph = [], list = null;
  const flush = () => {
    if (paragraph.length) out.push(`<p>${inline(paragraph.join("\n")).replace(/\n/g, "<br>")}</p>`);
    paragraph = [];
  };
  const closeList = () => { if (list) out.push(`</${list}>`); list = null; };
  for (const line of text.split("\n")) {
    let m;
    if (/^\u0000\d+\u0000$/.test(line.trim())) { flush(); closeList(); out.push(line.trim()); }
    else if (!line.trim()) { flush(); closeList(); }
    else if ((m = line.match(/^(#{1,6})\s+(.*)$/))) { flush(); closeList(); out.push(`<h${m[1].length}>${inline(m[2])}</h${m[1].length}>`); }
    else if ((m = line.match(/^\s*([-*+]|\d{1,9}[.)])\s+(.*)$/))) {
      flush();
      const kind = /\d/.test(m[1]) ? "ol" : "ul";
      if (list !== kind) { closeList(); out.push(`<${kind}>`); list = kind; }
      out.push(`<li>${inline(m[2])}</li>`);
    }
    else if ((m = line.match(/^&gt;\s?(.*)$/))) { flush(); closeList(); out.push(`<blockquote>${inline(m[1])}</blockquote>`); }
    else { closeList(); paragraph.push(line); }
  }
  flush(); closeList();
  let html = out.join("");
  while (/\u0000\d+\u0000/.test(html)) html = html.replace(/\u0000(\d+)\u0000/g, (_, i) => stash[+i]);
  return html;
}

// ---------------------------------------------------------------------------
// The server

// body: an object (sent as JSON) or a string (sent as it is: an uploaded file).
async function api(method, path, body, { raw = false, signal } = {}) {
  const headers = {};
  const key = localStorage.getItem("llmos.key");
  if (key) headers.Authorization = `Bearer ${key}`;
  let payload = body;
  if (body !== undefined && typeof body !== "string") { headers["Content-Type"] = "application/json"; payload = JSON.stringify(body); }
  const r = await fetch(path, { method, headers, body: payload, signal });
  if (r.status === 401) {
    const given = window.prompt("This server needs its API key:");
    if (given) { localStorage.setItem("llmos.key", given.trim()); return api(method, path, body, { raw, signal }); }
  }
  if (!r.ok) {
    let message = `${r.status} ${r.statusText}`;
    try { message = (await r.json()).error.message; } catch (_) { /* not our error shape */ }
    throw new Error(message);
  }
  return raw ? r : r.json();
}

function showNotice(text, kind = "error") {
  const el = $("notice");
  el.textContent = text;
  el.className = `notice ${kind}`;
  el.hidden = !text;
}

function guard(fn) {  // an event handler whose failures show as a notice
  return async (...args) => {
    try { await fn(...args); } catch (e) { if (e.name !== "AbortError") showNotice(e.message); }
  };
}

// ---------------------------------------------------------------------------
// Models, assistants, settings

async function loadModels() {
  const [models, assistants] = await Promise.all([api("GET", "/v1/models"), api("GET", "/api/assistants")]);
  state.models = models.data;
  state.assistants = assistants;
  const select = $("model"), chosen = select.value;
  select.replaceChildren();
  const group = (label, cards) => {
    if (!cards.length) return;
    const g = document.createElement("optgroup");
    g.label = label;
    for (const c of cards) g.append(new Option(c.parent ? `${c.id} (on ${c.parent})` : c.id, c.id));
    select.append(g);
  };
  group("Models", state.models.filter((c) => !c.parent));
  group("Assistants", state.models.filter((c) => c.parent));
  if (chosen && state.models.some((c) => c.id === chosen)) select.value = chosen;
  renderAssistants();
  applyModelHints();
}

function currentCard() { return state.models.find((c) => c.id === $("model").value); }
function currentAssistant() { return state.assistants.find((a) => a.name === $("model").value); }

function applyModelHints() {  // an assistant's own prompt and defaults show as placeholders
  const a = currentAssistant();
  $("system").placeholder = a && a.system_prompt ? `The assistant's: ${a.system_prompt}` : "None";
  for (const key of ["temperature", "top_p", "max_tokens"]) $(key).placeholder = a && a[key] != null ? String(a[key]) : "default";
}

const SETTINGS = ["temperature", "top_p", "max_tokens"];

function sampling() {
  const out = {};
  for (const key of SETTINGS) {
    const v = $(key).value.trim();
    if (v !== "") out[key] = key === "max_tokens" ? parseInt(v, 10) : parseFloat(v);
  }
  return out;
}

function saveSettings() {
  localStorage.setItem("llmos.sampling", JSON.stringify(Object.fromEntries(SETTINGS.map((k) => [k, $(k).value]))));
}

function loadSettings() {
  try {
    const saved = JSON.parse(localStorage.getItem("llmos.sampling") || "{}");
    for (const key of SETTINGS) if (saved[key] != null) $(key).value = saved[key];
  } catch (_) { /* ignore a damaged entry */ }
}

function renderAssistants() {
  const ul = $("assistants");
  ul.replaceChildren();
  if (!state.assistants.length) {
    const li = document.createElement("li");
    li.className = "muted";
    li.textContent = "None yet.";
    ul.append(li);
  }
  for (const a of state.assistants) {
    const li = document.createElement("li");
    const name = document.createElement("div");
    name.className = "name";
    name.textContent = a.name;
    const about = document.createElement("div");
    about.className = "muted";
    about.textContent = a.description || (a.model ? `on ${a.model}` : "on the default model");
    const actions = document.createElement("div");
    actions.className = "actions";
    actions.append(
      button("Use", () => { $("model").value = a.name; modelChanged(); }),
      button("Export", guard(() => downloadAssistant(a.name))),
      button("Delete", guard(async () => {
        if (!window.confirm(`Delete the assistant ${a.name}?`)) return;
        await api("DELETE", `/api/assistants/${encodeURIComponent(a.name)}`);
        await loadModels();
      })),
    );
    li.append(name, about, actions);
    ul.append(li);
  }
}

async function downloadAssistant(name) {
  const r = await api("GET", `/api/assistants/${encodeURIComponent(name)}/file`, undefined, { raw: true });
  download(`${name}.toml`, await r.blob());
}

function download(filename, blob) {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = filename;
  a.click();
  setTimeout(() => URL.revokeObjectURL(a.href), 1000);
}

async function saveAssistant() {
  const card = currentCard();
  const body = {
    name: $("assistant-name").value.trim(),
    description: $("assistant-description").value.trim(),
    model: card ? (card.parent || card.id) : null,
    system_prompt: $("system").value,
    ...sampling(),
  };
  const saved = await api("POST", "/api/assistants", body);
  $("assistant-name").value = $("assistant-description").value = "";
  $("new-assistant").open = false;
  await loadModels();
  $("model").value = saved.name;
  modelChanged();
  showNotice(`Saved the assistant ${saved.name}.`, "info");
}

function modelChanged() {
  applyModelHints();
  countTokens();
  if (state.conversation) api("PATCH", `/api/conversations/${state.conversation.id}`, { model: $("model").value }).catch(() => {});
}

// ---------------------------------------------------------------------------
// Conversations

async function loadConversations() {
  const q = $("search").value.trim();
  const list = await api("GET", "/api/conversations" + (q ? `?q=${encodeURIComponent(q)}` : ""));
  const ul = $("conversations");
  ul.replaceChildren();
  for (const c of list) {
    const li = document.createElement("li");
    li.dataset.id = c.id;
    li.className = state.conversation && state.conversation.id === c.id ? "active" : "";
    const title = document.createElement("span");
    title.className = "title";
    title.textContent = c.title || "New chat";
    title.title = c.title;
    li.append(title,
      button({ icon: "edit" }, (e) => { e.stopPropagation(); rename(li, c); }, "Rename"),
      button({ icon: "trash" }, guard(async (e) => {
        e.stopPropagation();
        if (!window.confirm(`Delete "${c.title || "New chat"}"?`)) return;
        await api("DELETE", `/api/conversations/${c.id}`);
        if (state.conversation && state.conversation.id === c.id) newChat();
        await loadConversations();
      }), "Delete"));
    li.addEventListener("click", guard(() => openConversation(c.id)));
    ul.append(li);
  }
  if (!list.length) {
    const li = document.createElement("li");
    li.className = "muted";
    li.textContent = q ? "No match." : "No conversations yet.";
    ul.append(li);
  }
}

function rename(li, c) {
  const input = document.createElement("input");
  input.value = c.title;
  input.className = "rename";
  input.setAttribute("aria-label", "New title");
  li.replaceChildren(input);
  input.focus();
  input.select();
  let done = false;
  const finish = guard(async (save) => {
    if (done) return;
    done = true;
    if (save && input.value.trim()) await api("PATCH", `/api/conversations/${c.id}`, { title: input.value.trim() });
    await loadConversations();
  });
  input.addEventListener("click", (e) => e.stopPropagation());
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter") finish(true);
    if (e.key === "Escape") finish(false);
  });
  input.addEventListener("blur", () => finish(true));
}

async function openConversation(id) {
  if (state.streaming) state.streaming.abort();
  const c = await api("GET", `/api/conversations/${id}`);
  state.conversation = c;
  state.messages = c.messages;
  if (c.model && state.models.some((m) => m.id === c.model)) $("model").value = c.model;
  $("system").value = c.system_prompt;
  applyModelHints();
  history.replaceState(null, "", `#c=${id}`);
  showNotice("");
  renderMessages();
  countTokens();
  await loadConversations();
}

function newChat() {
  if (state.streaming) state.streaming.abort();
  state.conversation = null;
  state.messages = [];
  $("system").value = "";
  history.replaceState(null, "", location.pathname);
  renderMessages();
  countTokens();
  loadConversations().catch(() => {});
  $("input").focus();
}

// ---------------------------------------------------------------------------
// Messages

// Icons as SVG paths drawn on a 24-unit grid (after the Feather icon set, MIT): no font or file needed.
const ICONS = {
  up: "M7 22H4a2 2 0 0 1-2-2v-7a2 2 0 0 1 2-2h3M14 9V5a3 3 0 0 0-3-3l-4 9v11h11.28a2 2 0 0 0 2-1.7l1.38-9a2 2 0 0 0-2-2.3z",
  down: "M17 2h2.67A2.31 2.31 0 0 1 22 4v7a2.31 2.31 0 0 1-2.33 2H17M10 15v4a3 3 0 0 0 3 3l4-9V2H5.72a2 2 0 0 0-2 1.7l-1.38 9a2 2 0 0 0 2 2.3z",
  copy: "M9 9h11v11H9zM5 15H4a2 2 0 0 1-2-2V4a2 2 0 0 1 2-2h9a2 2 0 0 1 2 2v1",
  edit: "M12 20h9M16.5 3.5a2.12 2.12 0 0 1 3 3L7 19l-4 1 1-4z",
  trash: "M3 6h18M19 6l-1 14a2 2 0 0 1-2 2H8a2 2 0 0 1-2-2L5 6m3 0V4a2 2 0 0 1 2-2h4a2 2 0 0 1 2 2v2",
  again: "M23 4v6h-6M1 20v-6h6M3.51 9a9 9 0 0 1 14.85-3.36L23 10M1 14l4.64 4.36A9 9 0 0 0 20.49 15",
};

function icon(name) {
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", "0 0 24 24");
  svg.setAttribute("aria-hidden", "true");
  svg.classList.add("icon");
  const path = document.createElementNS("http://www.w3.org/2000/svg", "path");
  path.setAttribute("d", ICONS[name]);
  svg.append(path);
  return svg;
}

// label: text, or {icon, text} (text may be empty); title: the tooltip and accessible name.
function button(label, onClick, title) {
  const b = document.createElement("button");
  b.type = "button";
  if (typeof label === "string") b.textContent = label;
  else {
    b.append(icon(label.icon));
    if (label.text) { const span = document.createElement("span"); span.textContent = label.text; b.append(span); }
  }
  if (title) { b.title = title; b.setAttribute("aria-label", title); }
  b.addEventListener("click", onClick);
  return b;
}

function renderMessages() {
  const box = $("messages");
  box.replaceChildren();
  if (!state.messages.length) {
    const empty = document.createElement("div");
    empty.className = "empty";
    empty.textContent = "Start a conversation: pick a model or an assistant and write below.";
    box.append(empty);
  }
  const lastReply = state.messages.map((m) => m.role).lastIndexOf("assistant");
  state.messages.forEach((m, i) => box.append(messageElement(m, i === lastReply && i === state.messages.length - 1)));
  box.scrollTop = box.scrollHeight;
}

function messageElement(m, isLast) {
  const el = document.createElement("div");
  el.className = `message ${m.role}`;
  el.dataset.id = m.id;
  const body = document.createElement("div");
  body.className = "body";
  if (m.role === "user") body.textContent = m.content;
  else body.innerHTML = renderMarkdown(m.content);
  el.append(body);
  if (m.role !== "assistant") return el;

  if (m.correction) {
    const better = document.createElement("div");
    better.className = "correction";
    const label = document.createElement("div");
    label.className = "label";
    label.textContent = "Your better answer";
    const text = document.createElement("div");
    text.innerHTML = renderMarkdown(m.correction);
    better.append(label, text);
    el.append(better);
  }
  const bar = document.createElement("div");
  bar.className = "toolbar";
  const vote = (value, title) => {
    const b = button({ icon: value }, guard(async () => {
      const next = (value === "up" ? 1 : -1) === m.vote ? null : value;
      Object.assign(m, await api("POST", `/api/messages/${m.id}/feedback`, { vote: next, comment: m.comment }));
      el.replaceWith(messageElement(m, isLast));
    }), title);
    b.className = "vote" + (m.vote === (value === "up" ? 1 : -1) ? " on" : "");
    b.setAttribute("aria-pressed", b.className.includes("on"));
    return b;
  };
  bar.append(
    button({ icon: "copy" }, guard(async () => { await copy(m.content); showNotice("Copied.", "info"); }), "Copy the reply"),
    vote("up", "Good reply"),
    vote("down", "Bad reply"),
    button({ icon: "edit", text: "Better answer" }, () => editCorrection(el, m, isLast), "Write a better answer"),
  );
  if (isLast) bar.append(button({ icon: "again" }, guard(() => regenerate()), "Regenerate the reply"));
  const meta = document.createElement("span");
  meta.className = "meta";
  meta.textContent = [m.model, m.completion_tokens != null ? `${m.completion_tokens} tokens` : "", m.partial ? "partial" : ""]
    .filter(Boolean).join(" · ");
  bar.append(meta);
  el.append(bar);
  return el;
}

async function copy(text) {
  if (navigator.clipboard && window.isSecureContext) return navigator.clipboard.writeText(text);
  const area = document.createElement("textarea");  // plain http beyond localhost has no clipboard API
  area.value = text;
  document.body.append(area);
  area.select();
  document.execCommand("copy");
  area.remove();
}

function editCorrection(el, m, isLast) {
  if (el.querySelector(".editor")) return;
  const editor = document.createElement("div");
  editor.className = "editor";
  const area = document.createElement("textarea");
  area.value = m.correction || m.content;
  area.rows = Math.min(12, Math.max(3, area.value.split("\n").length + 1));
  area.setAttribute("aria-label", "A better answer");
  const save = button("Save better answer", guard(async () => {
    Object.assign(m, await api("POST", `/api/messages/${m.id}/correction`, { content: area.value }));
    el.replaceWith(messageElement(m, isLast));
  }));
  save.className = "primary";
  editor.append(area, save, button("Cancel", () => editor.remove()));
  el.append(editor);
  area.focus();
}

// ---------------------------------------------------------------------------
// Sending and streaming

async function send() {
  const input = $("input");
  const content = input.value.trim();
  if (!content || state.streaming) return;
  if (!state.conversation) {
    state.conversation = await api("POST", "/api/conversations", { model: $("model").value, system_prompt: $("system").value });
    history.replaceState(null, "", `#c=${state.conversation.id}`);
  }
  input.value = "";
  autosize();
  await streamTurn({ content });
}

async function regenerate() {
  if (state.streaming || !state.conversation) return;
  if (state.messages.length && state.messages[state.messages.length - 1].role === "assistant") state.messages.pop();
  renderMessages();
  await streamTurn({ regenerate: true });
}

async function streamTurn(turn) {
  const controller = new AbortController();
  state.streaming = controller;
  setBusy(true);
  showNotice("");
  const body = { ...turn, model: $("model").value, system_prompt: $("system").value, ...sampling() };
  let reply = null, replyBody = null, text = "", drawn = false;
  const draw = () => {  // at most once a frame, however fast the pieces come
    if (drawn) return;
    drawn = true;
    requestAnimationFrame(() => { drawn = false; if (replyBody) replyBody.innerHTML = renderMarkdown(text); scrollDown(); });
  };
  try {
    const r = await api("POST", `/api/conversations/${state.conversation.id}/chat`, body, { raw: true, signal: controller.signal });
    for await (const event of serverEvents(r)) {
      if (event.type === "start") {
        state.conversation = event.conversation;
        if (event.user) state.messages.push(event.user);
        reply = event.assistant;
        if (event.dropped) showNotice(`The ${event.dropped} oldest message${event.dropped === 1 ? "" : "s"} did not fit the model's context and were left out of this reply's prompt.`, "info");
        state.messages.push(reply);
        renderMessages();
        const el = $("messages").lastElementChild;
        el.classList.add("streaming");
        replyBody = el.querySelector(".body");
        loadConversations().catch(() => {});
      } else if (event.type === "delta") {
        text += event.content;
        draw();
      } else if (event.type === "error") {
        showNotice(event.error.message);
      } else if (event.type === "end") {
        Object.assign(reply, event.message);
      }
    }
  } finally {
    state.streaming = null;
    setBusy(false);
    document.body.dataset.turns = Number(document.body.dataset.turns || 0) + 1;  // for tests: a turn ended
    if (!reply) {  // refused before it started (busy, too long, ...): show what the server has, keep the draft
      if (turn.content && !$("input").value) { $("input").value = turn.content; autosize(); }
      if (state.conversation) await openConversation(state.conversation.id).catch(() => {});
    } else {
      if (reply.partial) reply.content = text;  // stopped: the server kept this much
      if (state.conversation) {
        renderMessages();
        countTokens();
        loadConversations().catch(() => {});
      }
    }
  }
}

async function* serverEvents(response) {  // the `data:` payloads of a server-sent event stream
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (data && data !== "[DONE]") yield JSON.parse(data);
    }
  }
}

function setBusy(busy) {
  const b = $("send");
  b.textContent = busy ? "Stop" : "Send";
  b.classList.toggle("stop", busy);
}

function scrollDown() {
  const box = $("messages");
  if (box.scrollHeight - box.scrollTop - box.clientHeight < 200) box.scrollTop = box.scrollHeight;
}

// ---------------------------------------------------------------------------
// The token counter: the next prompt (system, history, draft) against the model's context

let countTimer = null;
function countTokens() {
  clearTimeout(countTimer);
  countTimer = setTimeout(guard(async () => {
    const messages = [];
    if ($("system").value) messages.push({ role: "system", content: $("system").value });
    for (const m of state.messages) messages.push({ role: m.role, content: m.content });
    messages.push({ role: "user", content: $("input").value });
    const r = await api("POST", "/api/tokenize", { model: $("model").value || null, messages });
    const el = $("tokens");
    el.textContent = `${r.tokens.toLocaleString()} / ${r.context.toLocaleString()} tokens`;
    el.className = "tokens" + (r.tokens >= r.context ? " over" : r.tokens > 0.8 * r.context ? " warn" : "");
  }), 250);
}

function autosize() {
  const input = $("input");
  input.style.height = "auto";
  input.style.height = Math.min(input.scrollHeight, 240) + "px";
}

// ---------------------------------------------------------------------------
// Wiring

function readFile(input, handle) {
  input.addEventListener("change", guard(async () => {
    const file = input.files[0];
    input.value = "";
    if (file) await handle(await file.text());
  }));
}

async function start() {
  loadSettings();
  $("composer").addEventListener("submit", guard(async (e) => {
    e.preventDefault();
    if (state.streaming) state.streaming.abort();
    else await send();
  }));
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("composer").requestSubmit(); }
  });
  $("input").addEventListener("input", () => { autosize(); countTokens(); });
  $("new-chat").addEventListener("click", newChat);
  $("sidebar-toggle").addEventListener("click", () => document.body.classList.toggle("show-sidebar"));
  $("conversations").addEventListener("click", (e) => {  // narrow screens: a chosen conversation closes the list
    if (e.target.closest("li") && !e.target.closest("button, input")) document.body.classList.remove("show-sidebar");
  });
  document.querySelector("main").addEventListener("click", (e) => {
    if (!e.target.closest("#sidebar-toggle")) document.body.classList.remove("show-sidebar");
  });
  let searchTimer = null;
  $("search").addEventListener("input", () => { clearTimeout(searchTimer); searchTimer = setTimeout(guard(loadConversations), 200); });
  $("model").addEventListener("change", modelChanged);
  $("system").addEventListener("input", countTokens);
  for (const key of SETTINGS) $(key).addEventListener("change", saveSettings);
  $("settings-toggle").addEventListener("click", () => {
    const panel = $("settings");
    panel.hidden = !panel.hidden;
    $("settings-toggle").setAttribute("aria-expanded", String(!panel.hidden));
  });
  $("save-assistant").addEventListener("click", guard(saveAssistant));
  readFile($("import-assistant"), async (text) => {
    const a = await api("POST", "/api/assistants/import", text);
    await loadModels();
    showNotice(`Imported the assistant ${a.name}.`, "info");
  });
  $("export-all").addEventListener("click", guard(async () => {
    const r = await api("GET", "/api/export", undefined, { raw: true });
    download("llmos-conversations.json", await r.blob());
  }));
  readFile($("import-all"), async (text) => {
    const r = await api("POST", "/api/import", text);
    await loadConversations();
    showNotice(`Imported ${r.imported.length} conversation${r.imported.length === 1 ? "" : "s"}.`, "info");
  });

  await loadModels();
  const id = (location.hash.match(/^#c=(\d+)$/) || [])[1];
  if (id) await openConversation(Number(id)).catch(() => newChat());
  else newChat();
  document.body.dataset.ready = "1";  // for tests: the page has loaded its data
}

start().catch((e) => showNotice(e.message));
