// The chat page: conversation list, messages, composer, settings. State lives in this browser
// (store.js); the server is reached only through the public API (api.js).

import { APIError, describeError, listModels, streamChat } from "./api.js";
import * as images from "./images.js";
import { copyText, markdownToSafeHtml, renderMarkdown, renderToolCall, splitThinking } from "./render.js";
import * as store from "./store.js";

const $ = (id) => document.getElementById(id);
const el = (tag, className, text) => {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text != null) node.textContent = text;
  return node;
};

const ui = {
  list: $("conversation-list"), messages: $("messages"), prompt: $("prompt"), send: $("send"), stop: $("stop"),
  model: $("model-select"), title: $("chat-title"), banner: $("banner"), system: $("system-prompt"),
  temperature: $("temperature"), temperatureValue: $("temperature-value"), topP: $("top-p"),
  topPValue: $("top-p-value"), maxTokens: $("max-tokens"), extraJson: $("extra-json"),
  extraJsonError: $("extra-json-error"), apiKey: $("api-key"), rememberKey: $("remember-key"),
  composer: $("composer"), attachInput: $("attach-file"), attachments: $("attachments"),
  composerError: $("composer-error"),
};

let settings = store.loadSettings();
let apiKey = store.loadApiKey();
let conv = null; // the open conversation
let generation = null; // {controller, index} while an answer streams
let draftImages = []; // [{ref, mime, dataUrl}] attached to the message being written

// ---- conversations -----------------------------------------------------------------------------

// Save a conversation (the open one by default). One that is no longer open is saved only if it is still
// stored: an answer that ends after its conversation was deleted must not bring it back.
function persist(target = conv) {
  if (!target.messages.length) return; // an empty chat is not worth a list entry
  if (target !== conv && !store.loadConversation(target.id)) return;
  target.updatedAt = Date.now();
  try {
    store.saveConversation(target);
  } catch (err) {
    showBanner("The browser's storage is full: export and delete old conversations to keep new ones.");
    console.warn(err);
  }
}

function openConversation(next) {
  if (generation) stopGeneration();
  conv = next;
  settings.lastConversation = conv.id;
  store.saveSettings(settings);
  ui.system.value = conv.system || "";
  hideComposerError();
  renderSidebar();
  renderMessages();
  closeDrawers();
}

function startNewConversation() {
  openConversation(store.newConversation(settings.system || ""));
  ui.prompt.focus();
}

function renderSidebar() {
  ui.list.replaceChildren();
  for (const item of store.listConversations()) {
    const li = el("li", `conversation${item.id === conv?.id ? " active" : ""}`);
    li.dataset.id = item.id;
    const open = el("button", "conversation-open", store.titleOf(item));
    open.type = "button";
    open.title = store.titleOf(item);
    open.addEventListener("click", () => {
      if (item.id === conv?.id) closeDrawers(); // already open (and maybe still answering): keep it as it is
      else openConversation(store.loadConversation(item.id) || item);
    });
    const rename = el("button", "icon-btn small rename", "✎");
    rename.type = "button";
    rename.title = "Rename";
    rename.setAttribute("aria-label", "Rename");
    rename.addEventListener("click", () => startRename(li, item));
    const del = el("button", "icon-btn small delete", "✕");
    del.type = "button";
    del.title = "Delete";
    del.setAttribute("aria-label", "Delete");
    del.addEventListener("click", () => confirmDelete(del, item));
    li.append(open, rename, del);
    ui.list.append(li);
  }
  ui.title.textContent = conv ? store.titleOf(conv) : "";
}

function startRename(li, item) {
  const input = el("input", "rename-input");
  input.value = store.titleOf(item);
  input.setAttribute("aria-label", "New name");
  li.replaceChildren(input);
  input.focus();
  input.select();
  let done = false;
  const finish = (save) => {
    if (done) return;
    done = true;
    if (save) {
      const target = item.id === conv.id ? conv : store.loadConversation(item.id);
      target.title = input.value.trim().slice(0, 200);
      store.saveConversation(target);
    }
    renderSidebar();
  };
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter") finish(true);
    if (e.key === "Escape") finish(false);
  });
  input.addEventListener("blur", () => finish(true));
}

// Two clicks to delete (no modal dialog): the first arms the button for a few seconds.
function confirmDelete(button, item) {
  if (button.dataset.armed !== "1") {
    button.dataset.armed = "1";
    button.textContent = "Delete?";
    button.classList.add("armed");
    setTimeout(() => { if (button.isConnected) renderSidebar(); }, 3000);
    return;
  }
  store.deleteConversation(item.id);
  images.keepOnly(store.referencedImages());
  if (item.id === conv.id) startNewConversation();
  else renderSidebar();
}

async function exportConversations() {
  const blob = new Blob([JSON.stringify(await store.exportAll(), null, 2)], { type: "application/json" });
  const a = el("a");
  a.href = URL.createObjectURL(blob);
  a.download = `dashchat-conversations-${new Date().toISOString().slice(0, 10)}.json`;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 1000);
}

async function importFile(file) {
  try {
    const added = await store.importConversations(await file.text());
    openConversation(added[0]);
    showBanner(`Imported ${added.length} conversation${added.length === 1 ? "" : "s"}.`, "info");
  } catch (err) {
    showBanner(`Import failed: ${err.message}`);
  }
}

// ---- messages ----------------------------------------------------------------------------------

function renderMessages() {
  ui.messages.replaceChildren();
  if (!conv.messages.length) {
    const empty = el("div", "empty");
    empty.append(el("h2", null, "Start a conversation"),
                 el("p", null, settings.model ? `Talking to ${settings.model}.` : "No model loaded yet."),
                 el("p", "hint", "Enter sends, Shift+Enter adds a line. Settings (⚙) hold the system prompt "
                                  + "and sampling options."));
    ui.messages.append(empty);
  }
  conv.messages.forEach((msg, i) => ui.messages.append(messageElement(msg, i)));
  ui.title.textContent = store.titleOf(conv);
  scrollToEnd(true);
}

function messageElement(msg, index) {
  const article = el("article", `msg ${msg.role}`);
  article.dataset.index = index;
  const who = { user: "You", assistant: "Assistant", tool: "Tool result" }[msg.role] || msg.role;
  const head = el("div", "msg-role", who);
  if (msg.role === "assistant" && msg.meta?.model) head.append(el("span", "msg-model", ` · ${msg.meta.model}`));
  article.append(head);
  if (msg.role === "assistant") {
    article.append(el("details", "reasoning"), el("div", "md content"), el("div", "tool-calls"),
                   el("div", "msg-error"), el("div", "msg-meta"));
    fillAssistant(article, msg, false);
  } else {
    if (msg.images?.length) article.append(imageStrip(msg.images));
    article.append(el("div", "user-text content", msg.content));
  }
  article.append(actionsFor(msg, index));
  return article;
}

// A message's images as thumbnails (a click shows one larger); the data comes from IndexedDB.
function imageStrip(refs) {
  const strip = el("div", "msg-images");
  refs.forEach(({ ref }, i) => {
    const img = el("img", "thumb");
    img.alt = `Image ${i + 1}`;
    img.dataset.ref = ref;
    const known = images.cachedImage(ref);
    if (known) img.src = known;
    else {
      images.getImage(ref).then((url) => {
        if (url) img.src = url;
        else {
          img.alt = "Image no longer stored in this browser";
          img.classList.add("missing");
        }
      });
    }
    img.addEventListener("click", () => img.classList.toggle("zoomed"));
    strip.append(img);
  });
  return strip;
}

function actionsFor(msg, index) {
  const bar = el("div", "msg-actions");
  const add = (label, title, handler, cls = "") => {
    const b = el("button", `link-btn ${cls}`, label);
    b.type = "button";
    b.title = title;
    b.addEventListener("click", handler);
    bar.append(b);
    return b;
  };
  const text = msg.role === "assistant" ? splitThinking(msg.content).content : msg.content;
  add("Copy", "Copy this message", (e) => copyText(text, e.currentTarget), "copy-msg");
  if (msg.role === "user") add("Edit", "Edit and send again", () => startEdit(index), "edit");
  if (msg.role === "assistant" && index === conv.messages.length - 1) {
    add("Regenerate", "Answer again", () => regenerate(), "regenerate");
  }
  return bar;
}

// Fill (or refresh, while streaming) an assistant message's parts in place.
function fillAssistant(article, msg, streaming) {
  const split = splitThinking(msg.content);
  const reasoningText = [msg.reasoning, split.reasoning].filter(Boolean).join("\n\n");
  const details = article.querySelector(".reasoning");
  details.hidden = !reasoningText;
  if (reasoningText) {
    if (!details.firstChild) {
      const summary = el("summary", null, "Reasoning");
      summary.addEventListener("click", () => { details.dataset.pinned = "1"; });
      details.append(summary, el("div", "md reasoning-body"));
    }
    renderMarkdown(details.querySelector(".reasoning-body"), reasoningText);
    // Open while the model is still thinking; folded away once the answer starts, unless the person chose.
    if (details.dataset.pinned !== "1") details.open = streaming && !split.content;
  }
  const content = article.querySelector(".content");
  renderMarkdown(content, split.content);
  content.classList.toggle("typing", streaming && !split.content && !msg.tool_calls?.length);
  const tools = article.querySelector(".tool-calls");
  tools.replaceChildren(...(msg.tool_calls || []).map(renderToolCall));
  const errorBox = article.querySelector(".msg-error");
  errorBox.replaceChildren();
  if (msg.error) errorBox.append(errorCard(msg.error));
  const meta = article.querySelector(".msg-meta");
  meta.textContent = msg.meta && !streaming ? formatMeta(msg.meta) : streaming ? "generating…" : "";
}

function formatMeta(meta) {
  const parts = [];
  // store.js checks imported and stored meta; a number test here too costs nothing.
  if (Number.isFinite(meta.ttftMs)) parts.push(`TTFT ${(meta.ttftMs / 1000).toFixed(2)} s`);
  if (Number.isFinite(meta.tokensPerS)) parts.push(`${meta.tokensPerS.toFixed(1)} tok/s`);
  if (Number.isFinite(meta.tokens)) parts.push(`${meta.estimated ? "≈" : ""}${meta.tokens} tokens`);
  if (typeof meta.finish === "string" && meta.finish) parts.push(meta.finish === "length" ? "hit max tokens" : meta.finish);
  return parts.join(" · ");
}

function errorCard(error) {
  const card = el("div", "error-card");
  card.append(el("strong", null, error.title), el("p", null, error.detail));
  if (error.needsKey) card.append(keyForm(() => regenerate()));
  if (error.retryable) {
    const retry = el("button", "btn", "Retry");
    retry.type = "button";
    retry.addEventListener("click", () => regenerate());
    card.append(retry);
  }
  return card;
}

// An inline "API key" field: saves the key and calls `then` (retry, or reload the model list).
function keyForm(then) {
  const form = el("form", "key-form");
  const input = el("input", "key-input");
  input.type = "password";
  input.placeholder = "API key";
  input.setAttribute("aria-label", "API key");
  input.autocomplete = "off";
  const use = el("button", "btn primary", "Use key");
  use.type = "submit";
  form.append(input, use);
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    setApiKey(input.value.trim());
    then();
  });
  return form;
}

function scrollToEnd(force = false) {
  const box = ui.messages;
  const nearEnd = box.scrollHeight - box.scrollTop - box.clientHeight < 120;
  if (force || nearEnd) box.scrollTop = box.scrollHeight;
}

function startEdit(index) {
  if (generation) return;
  const article = ui.messages.querySelector(`article[data-index="${index}"]`);
  const box = el("div", "edit-box");
  const area = el("textarea", "edit-area");
  area.value = conv.messages[index].content;
  area.rows = Math.min(12, area.value.split("\n").length + 1);
  const save = el("button", "btn primary", "Save & send");
  save.type = "button";
  const cancel = el("button", "btn", "Cancel");
  cancel.type = "button";
  const buttons = el("div", "edit-buttons");
  buttons.append(cancel, save);
  box.append(area, buttons);
  article.querySelector(".content").replaceWith(box);
  article.querySelector(".msg-actions").hidden = true;
  area.focus();
  cancel.addEventListener("click", () => renderMessages());
  const submit = () => {
    const text = area.value.trim();
    const kept = conv.messages[index].images; // editing changes the text; the images stay
    if (!text && !kept?.length) return;
    conv.messages = conv.messages.slice(0, index);
    conv.messages.push(kept?.length ? { role: "user", content: text, images: kept } : { role: "user", content: text });
    answer();
  };
  save.addEventListener("click", submit);
  area.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); submit(); }
    if (e.key === "Escape") renderMessages();
  });
}

// ---- generation --------------------------------------------------------------------------------

function sendPrompt() {
  const text = ui.prompt.value.trim();
  if ((!text && !draftImages.length) || generation) return;
  if (!settings.model) {
    showBanner("No model to talk to: the model list could not be loaded.");
    return;
  }
  const draft = { text: ui.prompt.value, images: draftImages };
  const msg = { role: "user", content: text };
  if (draftImages.length) {
    msg.images = draftImages.map(({ ref, mime }) => ({ ref, mime }));
    // This tab keeps the data in memory for the request; the store is for reloads and other tabs.
    Promise.all(draftImages.map((i) => images.putImage(i.ref, i.dataUrl))).catch((err) => {
      console.warn(err);
      showBanner("This browser did not let the page store images: they will be gone after a reload.");
    });
  }
  conv.messages.push(msg);
  ui.prompt.value = "";
  draftImages = [];
  renderAttachments();
  hideComposerError();
  autoGrow();
  answer(draft);
}

function regenerate() {
  if (generation) return;
  while (conv.messages.length && conv.messages.at(-1).role === "assistant") conv.messages.pop();
  if (conv.messages.length) answer();
}

// The request's messages: the system prompt, then the conversation without the page's own fields,
// a message's images as OpenAI `image_url` parts with data: URLs.
async function requestMessages(history) {
  const out = [];
  if (conv.system?.trim()) out.push({ role: "system", content: conv.system });
  for (const m of history) {
    if (m.role === "assistant") {
      if (m.error && !m.content && !m.tool_calls?.length) continue; // a failed answer is not history
      const a = { role: "assistant", content: splitThinking(m.content).content || (m.tool_calls?.length ? null : "") };
      if (m.tool_calls?.length) a.tool_calls = m.tool_calls;
      out.push(a);
    } else if (m.role === "tool") {
      out.push({ role: "tool", tool_call_id: m.tool_call_id || "", content: m.content });
    } else if (m.images?.length) {
      const urls = await Promise.all(m.images.map((i) => images.getImage(i.ref)));
      if (!urls.every(Boolean)) throw new Error("An image in this conversation is no longer stored in this browser.");
      const parts = m.content ? [{ type: "text", text: m.content }] : [];
      out.push({ role: m.role, content: [...parts, ...urls.map((url) => ({ type: "image_url", image_url: { url } }))] });
    } else {
      out.push({ role: m.role, content: m.content });
    }
  }
  return out;
}

function parseExtraJson() {
  const text = ui.extraJson.value.trim();
  ui.extraJsonError.hidden = true;
  if (!text) return {};
  try {
    const value = JSON.parse(text);
    if (value && typeof value === "object" && !Array.isArray(value)) return value;
    throw new Error("it must be a JSON object");
  } catch (err) {
    ui.extraJsonError.textContent = `Extra request JSON: ${err.message}`;
    ui.extraJsonError.hidden = false;
    return null;
  }
}

// The request without its messages (they need the images' data: answer() adds them).
function requestBody(extra) {
  const body = {
    model: settings.model,
    messages: null,
    temperature: settings.temperature,
    top_p: settings.topP,
    stream_options: { include_usage: true },
  };
  if (settings.maxTokens) body.max_tokens = settings.maxTokens;
  return { ...body, ...extra };
}

function mergeToolCalls(calls, deltas) {
  for (const d of deltas) {
    const i = d.index ?? calls.length;
    calls[i] ??= { id: "", type: "function", function: { name: "", arguments: "" } };
    if (d.id) calls[i].id = d.id;
    if (d.function?.name) calls[i].function.name += d.function.name;
    if (d.function?.arguments) calls[i].function.arguments += d.function.arguments;
  }
}

// `draft`: the composer's text and images when this answers a message just sent; a request the server
// refuses outright (400) gives them back to the composer.
async function answer(draft = null) {
  const target = conv; // the person may open another conversation while this answer streams
  const history = target.messages.slice();
  const extra = parseExtraJson();
  if (extra === null) {
    openSettings();
    renderMessages();
    return;
  }
  const body = requestBody(extra);
  const msg = { role: "assistant", content: "", meta: { model: body.model } };
  target.messages.push(msg);
  const index = target.messages.length - 1;
  persist();
  renderSidebar();
  renderMessages();
  const article = ui.messages.querySelector(`article[data-index="${index}"]`);
  const controller = new AbortController();
  generation = { controller, index };
  setGenerating(true);

  const started = performance.now();
  let firstAt = null;
  let pieces = 0; // content/reasoning deltas: the token count when the stream ends before usage
  let usage = null;
  let finish = null;
  let frame = 0;
  const paint = () => {
    frame = 0;
    if (!article.isConnected) return;
    fillAssistant(article, msg, true);
    scrollToEnd();
  };
  const schedule = () => { if (!frame) frame = requestAnimationFrame(paint); };
  let refused = null;
  try {
    body.messages ??= await requestMessages(history);
    for await (const chunk of streamChat(body, { apiKey, signal: controller.signal })) {
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices?.find((c) => (c.index ?? 0) === 0); // the page shows one choice
      if (!choice) continue;
      const delta = choice.delta || {};
      const reasoning = delta.reasoning_content ?? delta.reasoning;
      if (delta.content || reasoning || delta.tool_calls?.length) {
        firstAt ??= performance.now();
        pieces += 1;
      }
      if (delta.content) msg.content += delta.content;
      if (reasoning) msg.reasoning = (msg.reasoning || "") + reasoning;
      if (delta.tool_calls?.length) mergeToolCalls(msg.tool_calls ??= [], delta.tool_calls);
      if (choice.finish_reason) finish = choice.finish_reason;
      schedule();
    }
  } catch (err) {
    if (err.name === "AbortError") {
      finish = "stopped";
    } else if (draft && err instanceof APIError && err.status === 400 && !err.midStream) {
      refused = describeError(err);
    } else {
      const told = describeError(err);
      msg.error = told;
      console.warn(err);
    }
  } finally {
    if (frame) cancelAnimationFrame(frame);
    const ended = performance.now();
    const tokens = usage?.completion_tokens ?? pieces;
    const decodeS = firstAt != null ? (ended - firstAt) / 1000 : 0;
    msg.meta = {
      model: body.model,
      ttftMs: firstAt != null ? Math.round(firstAt - started) : null,
      tokens: firstAt != null ? tokens : null,
      estimated: !usage,
      // decode speed: tokens after the first, over the time after the first
      tokensPerS: tokens > 1 && decodeS > 0 ? (tokens - 1) / decodeS : null,
      finish,
    };
    generation = null;
    setGenerating(false);
    if (refused) takeBack(target, index, draft, refused);
    else {
      persist(target);
      if (conv === target) renderMessages();
    }
  }
}

// The server refused a new message outright (400: an image for a model without vision, a conversation
// too long): nothing was generated, so the turn is taken back and the message returns to the composer,
// to change (another model, fewer images) and send again.
function takeBack(target, index, draft, told) {
  target.messages.splice(index - 1, 2); // the message and its failed answer
  if (target.messages.length) persist(target);
  else store.deleteConversation(target.id);
  if (conv !== target) return;
  renderSidebar();
  renderMessages();
  if (!ui.prompt.value.trim() && !draftImages.length) { // unless something new was written meanwhile
    ui.prompt.value = draft.text;
    draftImages = draft.images;
    renderAttachments();
    autoGrow();
  }
  showComposerError(told);
}

function stopGeneration() {
  generation?.controller.abort();
}

function setGenerating(on) {
  ui.send.hidden = on;
  ui.stop.hidden = !on;
  document.body.dataset.state = on ? "generating" : "idle";
}

// ---- models, key, settings ---------------------------------------------------------------------

async function loadModels() {
  try {
    const models = await listModels(apiKey);
    ui.model.replaceChildren(...models.map((m) => {
      // ● marks a loaded model; another loads on its first message (which waits for it).
      const option = el("option", null, m.loaded ? `● ${m.id}` : m.id);
      option.value = m.id;
      option.title = [m.maxModelLen && `context: ${m.maxModelLen} tokens`,
                      m.loaded !== null && (m.loaded ? "loaded" : "not loaded: loads on first use")]
        .filter(Boolean).join("; ");
      return option;
    }));
    if (!models.some((m) => m.id === settings.model)) settings.model = models[0]?.id || "";
    ui.model.value = settings.model;
    store.saveSettings(settings);
    hideBanner();
    if (!conv.messages.length) renderMessages();
  } catch (err) {
    const told = describeError(err);
    if (told.needsKey) showKeyPrompt();
    else showBanner(`${told.title}: ${told.detail}`);
  }
}

function setApiKey(key) {
  apiKey = key;
  ui.apiKey.value = key;
  store.saveApiKey(key, settings.rememberKey);
  loadModels(); // hides the banner once the key works

}

function showKeyPrompt() {
  ui.banner.replaceChildren(el("strong", null, "This server needs an API key."),
                            el("span", null, apiKey ? " The key you gave was not accepted." : " Enter it to chat."),
                            keyForm(() => {}));
  ui.banner.className = "banner error";
  ui.banner.hidden = false;
  ui.banner.querySelector("input").focus();
}

function showBanner(text, kind = "error") {
  ui.banner.replaceChildren(el("span", null, text));
  const close = el("button", "icon-btn small", "×");
  close.type = "button";
  close.setAttribute("aria-label", "Dismiss");
  close.addEventListener("click", hideBanner);
  ui.banner.append(close);
  ui.banner.className = `banner ${kind}`;
  ui.banner.hidden = false;
}

function hideBanner() {
  ui.banner.hidden = true;
}

// ---- attachments -------------------------------------------------------------------------------

async function attachFiles(fileList) {
  const files = [...fileList]; // before any await: a file input's list is cleared once this returns
  hideComposerError();
  for (const file of files) {
    if (draftImages.length >= images.MAX_ATTACHMENTS) {
      showComposerError({ title: "Too many images", detail: `One message takes at most ${images.MAX_ATTACHMENTS}.` });
      break;
    }
    try {
      const image = await images.prepareImage(file);
      if (!draftImages.some((d) => d.ref === image.ref)) draftImages.push(image);
    } catch (err) {
      showComposerError({ title: "Image not attached", detail: err.message });
    }
    renderAttachments();
  }
}

function renderAttachments() {
  ui.attachments.replaceChildren(...draftImages.map((image, i) => {
    const item = el("div", "attachment");
    const img = el("img", "thumb");
    img.src = image.dataUrl;
    img.alt = `Attached image ${i + 1}`;
    const remove = el("button", "remove-attachment", "×");
    remove.type = "button";
    remove.title = "Remove";
    remove.setAttribute("aria-label", `Remove image ${i + 1}`);
    remove.addEventListener("click", () => {
      draftImages = draftImages.filter((d) => d !== image);
      renderAttachments();
      ui.prompt.focus();
    });
    item.append(img, remove);
    return item;
  }));
  ui.attachments.hidden = !draftImages.length;
}

// An error about the message being written (not an answer's): shown above the composer.
function showComposerError(told) {
  const close = el("button", "icon-btn small", "×");
  close.type = "button";
  close.setAttribute("aria-label", "Dismiss");
  close.addEventListener("click", hideComposerError);
  const text = el("div", "composer-error-text");
  text.append(el("strong", null, told.title), el("p", null, told.detail));
  ui.composerError.replaceChildren(text, close);
  ui.composerError.hidden = false;
}

function hideComposerError() {
  ui.composerError.hidden = true;
}

const hasFiles = (e) => !!e.dataTransfer?.types?.includes("Files");

function bindAttachments() {
  $("attach").addEventListener("click", () => ui.attachInput.click());
  ui.attachInput.addEventListener("change", (e) => {
    attachFiles(e.target.files);
    e.target.value = "";
  });
  ui.composer.addEventListener("paste", (e) => {
    const files = [...(e.clipboardData?.files || [])].filter((f) => f.type.startsWith("image/"));
    if (!files.length) return;
    // Copied from a web page, an image may come with its text: that still pastes as text.
    if (!e.clipboardData.types.includes("text/plain")) e.preventDefault();
    attachFiles(files);
  });
  ui.composer.addEventListener("dragover", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    ui.composer.classList.add("dropping");
  });
  ui.composer.addEventListener("dragleave", () => ui.composer.classList.remove("dropping"));
  ui.composer.addEventListener("drop", (e) => {
    ui.composer.classList.remove("dropping");
    if (!hasFiles(e)) return;
    e.preventDefault();
    attachFiles(e.dataTransfer.files);
  });
  // A file dropped beside the composer must not make the browser leave the page to show it.
  window.addEventListener("dragover", (e) => { if (hasFiles(e)) e.preventDefault(); });
  window.addEventListener("drop", (e) => { if (hasFiles(e)) e.preventDefault(); });
}

function showSettings() {
  ui.temperature.value = settings.temperature;
  ui.temperatureValue.textContent = Number(settings.temperature).toFixed(2);
  ui.topP.value = settings.topP;
  ui.topPValue.textContent = Number(settings.topP).toFixed(2);
  ui.maxTokens.value = settings.maxTokens ?? "";
  ui.extraJson.value = settings.extraJson || "";
  ui.apiKey.value = apiKey;
  ui.rememberKey.checked = !!settings.rememberKey;
}

function bindSettings() {
  ui.temperature.addEventListener("input", () => {
    settings.temperature = Number(ui.temperature.value);
    ui.temperatureValue.textContent = settings.temperature.toFixed(2);
    store.saveSettings(settings);
  });
  ui.topP.addEventListener("input", () => {
    settings.topP = Number(ui.topP.value);
    ui.topPValue.textContent = settings.topP.toFixed(2);
    store.saveSettings(settings);
  });
  ui.maxTokens.addEventListener("input", () => {
    const n = Number.parseInt(ui.maxTokens.value, 10);
    settings.maxTokens = Number.isFinite(n) && n > 0 ? n : null;
    store.saveSettings(settings);
  });
  ui.extraJson.addEventListener("input", () => {
    settings.extraJson = ui.extraJson.value;
    if (parseExtraJson() !== null) store.saveSettings(settings);
  });
  ui.system.addEventListener("input", () => {
    conv.system = ui.system.value;
    settings.system = ui.system.value; // the default for the next new chat
    store.saveSettings(settings);
    persist();
  });
  ui.apiKey.addEventListener("change", () => setApiKey(ui.apiKey.value.trim()));
  ui.rememberKey.addEventListener("change", () => {
    settings.rememberKey = ui.rememberKey.checked;
    store.saveSettings(settings);
    store.saveApiKey(apiKey, settings.rememberKey);
  });
  ui.model.addEventListener("change", () => {
    settings.model = ui.model.value;
    store.saveSettings(settings);
  });
  $("reset-settings").addEventListener("click", () => {
    Object.assign(settings, { temperature: store.DEFAULT_SETTINGS.temperature, topP: store.DEFAULT_SETTINGS.topP,
                              maxTokens: null, extraJson: "" });
    store.saveSettings(settings);
    showSettings();
  });
}

// ---- layout ------------------------------------------------------------------------------------

function openSettings() {
  document.body.classList.add("settings-open");
  $("scrim").hidden = false;
}

function closeDrawers() {
  document.body.classList.remove("sidebar-open", "settings-open");
  $("scrim").hidden = true;
}

function autoGrow() {
  ui.prompt.style.height = "auto";
  ui.prompt.style.height = `${Math.min(ui.prompt.scrollHeight, 240)}px`;
}

function bindLayout() {
  $("toggle-sidebar").addEventListener("click", () => {
    const open = !document.body.classList.contains("sidebar-open");
    closeDrawers();
    if (open) {
      document.body.classList.add("sidebar-open");
      $("scrim").hidden = false;
    }
  });
  $("toggle-settings").addEventListener("click", () => {
    if (document.body.classList.contains("settings-open")) closeDrawers();
    else { closeDrawers(); openSettings(); }
  });
  $("close-settings").addEventListener("click", closeDrawers);
  $("scrim").addEventListener("click", closeDrawers);
  $("new-chat").addEventListener("click", startNewConversation);
  $("export-all").addEventListener("click", exportConversations);
  $("import-file").addEventListener("change", (e) => {
    const file = e.target.files?.[0];
    if (file) importFile(file);
    e.target.value = "";
  });
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); sendPrompt(); });
  ui.stop.addEventListener("click", stopGeneration);
  ui.prompt.addEventListener("input", autoGrow);
  ui.prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      sendPrompt();
    }
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && generation) stopGeneration();
  });
  // Another tab changed the list: show it.
  window.addEventListener("storage", (e) => {
    if (e.key?.startsWith("dashchat.conversation.")) renderSidebar();
  });
}

function init() {
  bindLayout();
  bindSettings();
  bindAttachments();
  showSettings();
  const last = settings.lastConversation && store.loadConversation(settings.lastConversation);
  openConversation(last || store.newConversation(settings.system || ""));
  setGenerating(false);
  loadModels().finally(() => { document.body.dataset.ready = "1"; });
  images.keepOnly(store.referencedImages()); // images of conversations deleted in another tab
  ui.prompt.focus();
}

// For the browser tests: the renderer that every model answer goes through.
window.dashchat = { markdownToSafeHtml, renderMarkdown, APIError, images };

init();
