// The page's only way to the server: the public OpenAI-style API, as any client would use it.

export class APIError extends Error {
  // status: the HTTP status (0: no answer at all); error: the body's {"message","type","code",...};
  // midStream: the error came as an event after the answer had begun.
  constructor(status, error, { retryAfter = null, midStream = false } = {}) {
    super(error?.message || `HTTP ${status}`);
    this.status = status;
    this.error = error || {};
    this.retryAfter = retryAfter;
    this.midStream = midStream;
  }
}

function headers(apiKey) {
  const h = { "Content-Type": "application/json" };
  if (apiKey) h.Authorization = `Bearer ${apiKey}`;
  return h;
}

async function errorFrom(response) {
  let error = null;
  try {
    error = (await response.json()).error;
  } catch { /* not JSON: a proxy's page, say */ }
  const retry = Number.parseFloat(response.headers.get("Retry-After") || "");
  return new APIError(response.status, error, { retryAfter: Number.isFinite(retry) ? retry : null });
}

async function send(path, init) {
  try {
    return await fetch(path, init);
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new APIError(0, { message: "The server cannot be reached. Is it still running?" });
  }
}

// [{id, maxModelLen, loaded}] of the served models (loaded: null where the server does not say).
export async function listModels(apiKey) {
  const response = await send("/v1/models", { headers: headers(apiKey) });
  if (!response.ok) throw await errorFrom(response);
  const body = await response.json();
  return (body.data || []).map((m) => ({ id: m.id, maxModelLen: m.max_model_len ?? null,
                                         loaded: m.status?.loaded ?? null }));
}

// POST /v1/chat/completions with stream: true; yields each chunk object. Aborting `signal` closes the
// connection, and the server aborts the generation when it sees the disconnect.
export async function* streamChat(body, { apiKey, signal }) {
  const response = await send("/v1/chat/completions", {
    method: "POST",
    headers: headers(apiKey),
    body: JSON.stringify({ ...body, stream: true }),
    signal,
  });
  if (!response.ok) throw await errorFrom(response);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
        const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
        if (!data) continue;
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new APIError(response.status, chunk.error, { midStream: true });
        yield chunk;
      }
    }
  } finally {
    reader.releaseLock();
  }
  throw new APIError(0, { message: "The connection closed before the answer was complete." }, { midStream: true });
}

// What to tell a person about an error: {title, detail, needsKey, retryable, retryAfter}.
export function describeError(err) {
  const told = explain(err);
  // Trying the same request again helps only when the server (or the way to it) was the problem.
  told.retryable = err instanceof APIError && !told.needsKey
    && (err.status === 0 || err.status === 429 || err.status >= 500 || err.midStream);
  return told;
}

function explain(err) {
  if (!(err instanceof APIError)) {
    return { title: "Something went wrong in the page", detail: String(err?.message || err), needsKey: false };
  }
  const detail = err.error.message || "";
  const code = err.error.code;
  if (err.status === 401 || err.error.type === "authentication_error") {
    return { title: "The server needs a valid API key", detail, needsKey: true };
  }
  if (err.status === 429) {
    const wait = err.retryAfter != null ? ` Try again in ${err.retryAfter} s.` : " Try again shortly.";
    return { title: "The server is busy", detail: `${detail}${wait}`, retryAfter: err.retryAfter, needsKey: false };
  }
  if (code === "context_length_exceeded") {
    return {
      title: "The conversation is too long for the model",
      detail: `${detail} Start a new conversation, delete or shorten earlier messages, or lower Max tokens.`,
      needsKey: false,
    };
  }
  if (err.status === 0) return { title: "No answer from the server", detail, needsKey: false };
  if (err.status === 404 && code === "model_not_found") {
    return { title: "That model is not served here", detail, needsKey: false };
  }
  const where = err.midStream ? "The answer stopped with an error" : `The server answered ${err.status}`;
  return { title: where, detail, needsKey: false };
}
