// Conversations and settings, kept in this browser's localStorage (nothing is stored on the server).
// One key per conversation, so saving the open one does not rewrite all the others. A message's images
// are named by reference ({ref, mime}); their data is in IndexedDB (images.js).

import * as images from "./images.js";

const CONVERSATION_PREFIX = "dashchat.conversation.";
const SETTINGS_KEY = "dashchat.settings";
const KEY_KEY = "dashchat.apiKey";
export const EXPORT_FORMAT = "dashchat.conversations";

export const DEFAULT_SETTINGS = { model: "", temperature: 0.7, topP: 1, maxTokens: null, extraJson: "",
                                  system: "", rememberKey: false };

function newId() {
  return (crypto.randomUUID ? crypto.randomUUID() : `${Date.now()}-${Math.random()}`).replaceAll("-", "");
}

export function newConversation(system = "") {
  const now = Date.now();
  return { id: newId(), title: "", createdAt: now, updatedAt: now, system, messages: [] };
}

// What is read back goes through the same checks as an import: an entry written by an older page (or
// edited by hand) that the page cannot show is skipped, never allowed to break every reload.
function readStored(key) {
  try {
    return cleanConversation(JSON.parse(localStorage.getItem(key)), key.slice(CONVERSATION_PREFIX.length));
  } catch (err) {
    console.warn("unreadable conversation", key, err);
    return null;
  }
}

export function listConversations() {
  const all = [];
  for (let i = 0; i < localStorage.length; i++) {
    const key = localStorage.key(i);
    if (!key.startsWith(CONVERSATION_PREFIX)) continue;
    const conv = readStored(key);
    if (conv) all.push(conv);
  }
  return all.sort((a, b) => b.updatedAt - a.updatedAt);
}

export function loadConversation(id) {
  const key = CONVERSATION_PREFIX + id;
  return localStorage.getItem(key) === null ? null : readStored(key);
}

// Throws (QuotaExceededError) when the browser's storage is full; the caller says so.
export function saveConversation(conv) {
  localStorage.setItem(CONVERSATION_PREFIX + conv.id, JSON.stringify(conv));
}

export function deleteConversation(id) {
  localStorage.removeItem(CONVERSATION_PREFIX + id);
}

export function titleOf(conv) {
  if (conv.title) return conv.title;
  const first = conv.messages.find((m) => m.role === "user" && (m.content || m.images?.length));
  if (!first) return "New chat";
  if (!first.content) return "Image";
  const text = first.content.replace(/\s+/g, " ").trim();
  return text.length > 60 ? `${text.slice(0, 59)}…` : text;
}

// Every conversation, each image in it as an OpenAI `image_url` part with its data, so that the file
// alone brings them back (an image this browser no longer has is left out).
export async function exportAll() {
  const conversations = listConversations();
  for (const conv of conversations) {
    conv.messages = await Promise.all(conv.messages.map(async (m) => {
      if (!m.images?.length) return m;
      const { images: refs, ...rest } = m;
      const urls = (await Promise.all(refs.map((i) => images.getImage(i.ref)))).filter(Boolean);
      const parts = m.content ? [{ type: "text", text: m.content }] : [];
      return { ...rest, content: [...parts, ...urls.map((url) => ({ type: "image_url", image_url: { url } }))] };
    }));
  }
  return { format: EXPORT_FORMAT, version: 1, exportedAt: new Date().toISOString(), conversations };
}

// The refs every stored conversation names: the images to keep.
export function referencedImages() {
  const refs = new Set();
  for (const conv of listConversations()) {
    for (const m of conv.messages) for (const i of m.images || []) refs.add(i.ref);
  }
  return refs;
}

const ROLES = new Set(["system", "user", "assistant", "tool"]);

// `stored`: read back from this browser, where images are refs; an import carries them as data URLs
// (content parts), collected in `out.imageData` for importConversations to store.
function cleanMessage(m, stored) {
  if (!m || typeof m !== "object" || !ROLES.has(m.role)) throw new Error("a message without a known role");
  let content = m.content ?? "";
  const imageData = [];
  if (Array.isArray(content)) { // OpenAI content parts: the text ones, and images as data: URLs
    if (!stored) imageData.push(...imageParts(content, m.role));
    content = content.filter((p) => p && p.type === "text").map((p) => String(p.text ?? "")).join("");
  }
  const out = { role: m.role, content: String(content) };
  if (imageData.length) out.imageData = imageData;
  if (stored && m.role === "user" && Array.isArray(m.images)) {
    const refs = m.images.filter((i) => images.isRef(i?.ref) && images.IMAGE_TYPES.includes(i?.mime))
      .map((i) => ({ ref: i.ref, mime: i.mime }));
    if (refs.length) out.images = refs;
  }
  if (typeof m.reasoning === "string" && m.reasoning) out.reasoning = m.reasoning;
  if (Array.isArray(m.tool_calls)) {
    out.tool_calls = m.tool_calls.map((c) => ({
      id: String(c?.id ?? ""), type: "function",
      function: { name: String(c?.function?.name ?? ""), arguments: String(c?.function?.arguments ?? "") },
    }));
  }
  if (m.role === "tool" && m.tool_call_id) out.tool_call_id = String(m.tool_call_id);
  const meta = cleanMeta(m.meta);
  if (meta) out.meta = meta;
  if (m.error && typeof m.error === "object") {
    out.error = { title: String(m.error.title ?? ""), detail: String(m.error.detail ?? "") };
  }
  return out;
}

// An import's image parts: only data: URLs of PNG, JPEG, GIF or WebP, and only in a user's message.
// Anything else (a remote URL the page would fetch, an SVG, a script's MIME type) rejects the file.
function imageParts(parts, role) {
  const found = parts.filter((p) => p && (p.type === "image_url" || p.type === "image"));
  if (found.length && role !== "user") throw new Error("an image outside a user's message");
  return found.map((p) => {
    const url = typeof p.image_url === "string" ? p.image_url : p.image_url?.url;
    if (!images.parseDataUrl(url)) {
      throw new Error("an image that is not a data: URL of a PNG, JPEG, GIF or WebP image");
    }
    return url;
  });
}

// A message's numbers as the page wrote them; anything else (a string where a number goes, an object
// for the model's name) is dropped, since showing it would throw.
function cleanMeta(meta) {
  if (!meta || typeof meta !== "object" || Array.isArray(meta)) return undefined;
  const out = {};
  for (const key of ["ttftMs", "tokens", "tokensPerS"]) {
    if (Number.isFinite(meta[key])) out[key] = meta[key];
  }
  if (typeof meta.model === "string") out.model = meta.model;
  if (typeof meta.finish === "string") out.finish = meta.finish;
  if (typeof meta.estimated === "boolean") out.estimated = meta.estimated;
  return Object.keys(out).length ? out : undefined;
}

// `storedId`: the id of a conversation read back from this browser (kept); an import gets a new one.
function cleanConversation(c, storedId = null) {
  if (!c || typeof c !== "object" || !Array.isArray(c.messages)) throw new Error("a conversation without messages");
  const now = Date.now();
  const conv = newConversation(typeof c.system === "string" ? c.system : "");
  if (storedId) conv.id = storedId;
  conv.title = typeof c.title === "string" ? c.title.slice(0, 200) : "";
  conv.createdAt = Number.isFinite(c.createdAt) ? c.createdAt : now;
  conv.updatedAt = Number.isFinite(c.updatedAt) ? c.updatedAt : now;
  conv.messages = c.messages.map((m) => cleanMessage(m, storedId !== null));
  if (storedId && typeof c.title === "string") conv.title = c.title;
  // An OpenAI-style message list may carry the system prompt as its first message.
  if (conv.messages[0]?.role === "system" && !conv.system) conv.system = conv.messages.shift().content;
  return conv;
}

// Parse an exported file (or a single conversation, or a bare list of them) and store each as a new
// conversation. Returns the added conversations; throws with a readable message on a malformed file.
export async function importConversations(text) {
  let data;
  try {
    data = JSON.parse(text);
  } catch {
    throw new Error("The file is not JSON.");
  }
  const list = Array.isArray(data) ? data : Array.isArray(data?.conversations) ? data.conversations : [data];
  let cleaned;
  try {
    cleaned = list.map((c) => cleanConversation(c)); // not map(fn): its index would read as a stored id
  } catch (err) {
    throw new Error(`The file is not a dashchat export: ${err.message}.`);
  }
  if (!cleaned.length) throw new Error("The file holds no conversations.");
  for (const conv of cleaned) {
    for (const m of conv.messages) {
      if (!m.imageData) continue;
      m.images = [];
      for (const url of m.imageData) {
        const ref = await images.refOf(url);
        await images.putImage(ref, url);
        m.images.push({ ref, mime: images.parseDataUrl(url).mime });
      }
      delete m.imageData;
    }
  }
  cleaned.forEach(saveConversation);
  return cleaned;
}

export function loadSettings() {
  let saved = {};
  try { saved = JSON.parse(localStorage.getItem(SETTINGS_KEY) || "{}"); } catch { saved = {}; }
  return { ...DEFAULT_SETTINGS, ...saved };
}

export function saveSettings(settings) {
  localStorage.setItem(SETTINGS_KEY, JSON.stringify(settings));
}

// The API key stays for this tab only (sessionStorage) unless the person asks to remember it.
export function loadApiKey() {
  return sessionStorage.getItem(KEY_KEY) || localStorage.getItem(KEY_KEY) || "";
}

export function saveApiKey(key, remember) {
  sessionStorage.setItem(KEY_KEY, key);
  if (remember && key) localStorage.setItem(KEY_KEY, key);
  else localStorage.removeItem(KEY_KEY);
}
