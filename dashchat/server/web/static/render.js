// Turning model output into safe DOM.
//
// Model text is untrusted: a model can write `<script>` or `<img onerror=...>`. Three layers keep it inert:
//   1. marked's `html` renderer is replaced, so raw HTML in the markdown comes out as escaped *text*;
//   2. the HTML that marked does produce (from markdown syntax only) goes through DOMPurify, which also
//      drops `javascript:` links, and images are shown as links so nothing is fetched from elsewhere;
//   3. the page's Content-Security-Policy forbids inline scripts and event handlers anyway.
// Libraries: marked (markdown), DOMPurify (sanitiser), highlight.js (code highlighting), vendored
// under vendor/ (see vendor/VERSIONS).

const { marked, DOMPurify, hljs } = window;

export function escapeHtml(text) {
  return String(text)
    .replaceAll("&", "&amp;").replaceAll("<", "&lt;").replaceAll(">", "&gt;")
    .replaceAll('"', "&quot;").replaceAll("'", "&#39;");
}

const HIGHLIGHT_AUTO_LIMIT = 20000; // language guessing is slow on long text; plain text past this

function highlight(code, lang) {
  const language = (lang || "").trim().split(/\s+/)[0].toLowerCase();
  try {
    if (language && hljs.getLanguage(language)) {
      return { html: hljs.highlight(code, { language, ignoreIllegals: true }).value, language };
    }
    if (!language && code.length <= HIGHLIGHT_AUTO_LIMIT) {
      const guess = hljs.highlightAuto(code);
      return { html: guess.value, language: guess.language || "" };
    }
  } catch (err) {
    console.warn("highlight failed", err);
  }
  return { html: escapeHtml(code), language };
}

const markdown = new marked.Marked({
  gfm: true,
  breaks: true, // chat models put single newlines where they mean line breaks
  renderer: {
    html(token) {
      return escapeHtml(token.text ?? token.raw ?? "");
    },
    image(token) {
      // An <img> would fetch from wherever the model points; show the address as a link instead.
      const label = token.text || token.href;
      return `<a href="${escapeHtml(token.href)}">[image: ${escapeHtml(label)}]</a>`;
    },
    code(token) {
      const { html, language } = highlight(token.text, token.lang);
      const label = escapeHtml(language || "text");
      return `<pre data-lang="${label}"><code class="hljs">${html}</code></pre>\n`;
    },
  },
});

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer nofollow");
  }
});

const PURIFY = {
  USE_PROFILES: { html: true },
  FORBID_TAGS: ["img", "style", "form", "input", "button", "textarea", "select", "iframe", "video", "audio",
                "source", "picture", "svg", "math"],
  FORBID_ATTR: ["style", "srcset"],
  ALLOWED_URI_REGEXP: /^(?:https?:|mailto:|#)/i,
};

// Markdown text -> sanitised HTML string.
export function markdownToSafeHtml(text) {
  const html = markdown.parse(String(text ?? ""), { async: false });
  return DOMPurify.sanitize(html, PURIFY);
}

// Render markdown into `container`, with a header and copy button on each code block.
export function renderMarkdown(container, text) {
  container.innerHTML = markdownToSafeHtml(text);
  for (const pre of container.querySelectorAll("pre")) {
    const head = document.createElement("div");
    head.className = "code-head";
    const lang = document.createElement("span");
    lang.textContent = pre.dataset.lang || "text";
    const copy = document.createElement("button");
    copy.type = "button";
    copy.className = "copy-code";
    copy.textContent = "Copy";
    copy.addEventListener("click", () => copyText(pre.querySelector("code").textContent, copy));
    head.append(lang, copy);
    const block = document.createElement("div");
    block.className = "code-block";
    pre.replaceWith(block);
    block.append(head, pre);
  }
}

// Copy to the clipboard; outside a secure context (plain http on a LAN address) navigator.clipboard
// does not exist, so fall back to a hidden textarea and execCommand.
export async function copyText(text, button) {
  let ok = false;
  try {
    if (navigator.clipboard && window.isSecureContext) {
      await navigator.clipboard.writeText(text);
      ok = true;
    }
  } catch (err) {
    console.warn("clipboard write failed", err);
  }
  if (!ok) {
    const area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.style.position = "fixed";
    area.style.opacity = "0";
    document.body.append(area);
    area.select();
    try { ok = document.execCommand("copy"); } catch { ok = false; }
    area.remove();
  }
  if (button) {
    const before = button.textContent;
    button.textContent = ok ? "Copied" : "Copy failed";
    setTimeout(() => { button.textContent = before; }, 1200);
  }
  return ok;
}

// Models without a server-side reasoning parser write `<think>…</think>` into the content itself;
// show that as reasoning too. Returns {reasoning, content}; an unclosed block is still being written.
export function splitThinking(content) {
  const text = String(content ?? "");
  const match = /^\s*<think>([\s\S]*?)(<\/think>|$)/.exec(text);
  if (!match) return { reasoning: "", content: text };
  return { reasoning: match[1].trim(), content: text.slice(match[0].length).replace(/^\s+/, "") };
}

// A tool call as a card: function name and its arguments, pretty-printed when they are JSON.
export function renderToolCall(call) {
  const card = document.createElement("div");
  card.className = "tool-call";
  const head = document.createElement("div");
  head.className = "tool-call-head";
  const label = document.createElement("span");
  label.className = "tool-call-label";
  label.textContent = "Tool call";
  const name = document.createElement("code");
  name.className = "tool-call-name";
  name.textContent = call?.function?.name || "(unnamed)";
  head.append(label, name);
  if (call?.id) {
    const id = document.createElement("span");
    id.className = "tool-call-id";
    id.textContent = call.id;
    head.append(id);
  }
  const args = document.createElement("pre");
  args.className = "tool-call-args";
  const raw = call?.function?.arguments ?? "";
  let shown = raw;
  try { shown = JSON.stringify(JSON.parse(raw), null, 2); } catch { /* still streaming, or not JSON */ }
  const code = document.createElement("code");
  code.className = "hljs";
  code.innerHTML = highlight(shown, "json").html; // highlight.js escapes its input
  args.append(code);
  card.append(head, args);
  return card;
}
