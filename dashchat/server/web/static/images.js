// Images attached to messages: prepared in the browser, kept in IndexedDB under their content's SHA-256.
//
// localStorage holds about 5 MB in all, a few photos' worth, so a stored conversation names its images
// by hash ({ref, mime}) and the data lives in IndexedDB, which has room. Before anything is kept or sent,
// a large image is scaled down to MAX_SIDE on its longest side (what vision models use at most anyway)
// and re-encoded, so one photo does not fill the server's request limit. What goes to the server is an
// OpenAI `image_url` part with a `data:` URL, built from the stored data when a request is made.

export const MAX_SIDE = 1568;
export const MAX_ATTACHMENTS = 8; // per message
const KEEP_BYTES = 1536 * 1024; // past this after scaling, a PNG becomes a JPEG
const INPUT_MAX_BYTES = 40 * 1024 * 1024; // refused before decoding
export const IMAGE_TYPES = ["image/png", "image/jpeg", "image/gif", "image/webp"];
const DATA_URL = /^data:(image\/(?:png|jpeg|gif|webp));base64,([A-Za-z0-9+/]+={0,2})$/;
const REF = /^[0-9a-f]{64}$/;

// {mime, base64} of a data: URL of one of IMAGE_TYPES, or null for anything else.
export function parseDataUrl(url) {
  const match = typeof url === "string" ? DATA_URL.exec(url) : null;
  if (!match || match[2].length % 4 !== 0) return null;
  return { mime: match[1], base64: match[2] };
}

export function isRef(ref) {
  return typeof ref === "string" && REF.test(ref);
}

// ---- preparing an attached file -----------------------------------------------------------------

// A File (picked, pasted or dropped) -> {ref, mime, dataUrl}, scaled down and re-encoded when large.
// Throws an Error with a message for the person.
export async function prepareImage(file) {
  const name = file.name ? `"${file.name}"` : "The pasted file";
  if (!IMAGE_TYPES.includes(file.type)) throw new Error(`${name} is not a PNG, JPEG, GIF or WebP image.`);
  if (file.size > INPUT_MAX_BYTES) throw new Error(`${name} is larger than ${INPUT_MAX_BYTES >> 20} MB.`);
  let bitmap;
  try {
    bitmap = await createImageBitmap(file);
  } catch {
    throw new Error(`${name} cannot be read as an image.`);
  }
  let blob = file;
  try {
    const scale = Math.min(1, MAX_SIDE / Math.max(bitmap.width, bitmap.height));
    if (scale < 1 || file.size > KEEP_BYTES) blob = await reencode(bitmap, scale, file.type);
  } finally {
    bitmap.close();
  }
  const dataUrl = await blobToDataUrl(blob);
  return { ref: await refOf(dataUrl), mime: blob.type, dataUrl };
}

async function reencode(bitmap, scale, type) {
  const canvas = document.createElement("canvas");
  canvas.width = Math.max(1, Math.round(bitmap.width * scale));
  canvas.height = Math.max(1, Math.round(bitmap.height * scale));
  const ctx = canvas.getContext("2d");
  ctx.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
  // GIF and WebP become PNG (an animation keeps its first frame); JPEG stays JPEG.
  let blob = await toBlob(canvas, type === "image/jpeg" ? "image/jpeg" : "image/png", 0.9);
  if (blob.size > KEEP_BYTES && blob.type !== "image/jpeg") {
    // A photo saved as PNG: JPEG is a tenth of the size. JPEG has no transparency: white behind it.
    ctx.globalCompositeOperation = "destination-over";
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    blob = await toBlob(canvas, "image/jpeg", 0.88);
  }
  return blob;
}

function toBlob(canvas, type, quality) {
  return new Promise((resolve, reject) => {
    canvas.toBlob((b) => (b ? resolve(b) : reject(new Error("The image could not be encoded."))), type, quality);
  });
}

function blobToDataUrl(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

// ---- content hash -------------------------------------------------------------------------------

// SHA-256 of the image's bytes, in hex. crypto.subtle exists only in secure contexts (https, localhost);
// on plain http over a LAN address the same digest comes from sha256 below.
export async function refOf(dataUrl) {
  const bytes = Uint8Array.from(atob(dataUrl.slice(dataUrl.indexOf(",") + 1)), (c) => c.charCodeAt(0));
  const digest = globalThis.crypto?.subtle
    ? new Uint8Array(await crypto.subtle.digest("SHA-256", bytes))
    : sha256(bytes);
  return Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("");
}

// FIPS 180-4. The constants are the fractional parts of the first primes' square and cube roots.
const PRIMES = [];
for (let n = 2; PRIMES.length < 64; n++) if (PRIMES.every((p) => n % p)) PRIMES.push(n);
const frac32 = (x) => ((x - Math.floor(x)) * 2 ** 32) >>> 0;
const K = Uint32Array.from(PRIMES, (p) => frac32(Math.cbrt(p)));
const H0 = Uint32Array.from(PRIMES.slice(0, 8), (p) => frac32(Math.sqrt(p)));
const rotr = (x, n) => (x >>> n) | (x << (32 - n));

export function sha256(bytes) {
  const length = bytes.length;
  const padded = new Uint8Array((((length + 9) + 63) >> 6) << 6);
  padded.set(bytes);
  padded[length] = 0x80;
  const view = new DataView(padded.buffer);
  view.setUint32(padded.length - 8, Math.floor(length / 2 ** 29));
  view.setUint32(padded.length - 4, (length << 3) >>> 0);
  const h = H0.slice();
  const w = new Uint32Array(64);
  for (let off = 0; off < padded.length; off += 64) {
    for (let i = 0; i < 16; i++) w[i] = view.getUint32(off + 4 * i);
    for (let i = 16; i < 64; i++) {
      const s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >>> 3);
      const s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >>> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    let [a, b, c, d, e, f, g, k] = h;
    for (let i = 0; i < 64; i++) {
      const t1 = (k + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + K[i] + w[i]) | 0;
      const t2 = ((rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c))) | 0;
      k = g; g = f; f = e; e = (d + t1) | 0; d = c; c = b; b = a; a = (t1 + t2) | 0;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e; h[5] += f; h[6] += g; h[7] += k;
  }
  const out = new Uint8Array(32);
  const outView = new DataView(out.buffer);
  h.forEach((x, i) => outView.setUint32(4 * i, x));
  return out;
}

// ---- IndexedDB ----------------------------------------------------------------------------------

const DB_NAME = "dashchat";
const STORE = "images";
const memory = new Map(); // ref -> data URL: what this tab has read or written
let opened = null;

function database() {
  opened ??= new Promise((resolve, reject) => {
    const req = indexedDB.open(DB_NAME, 1);
    req.onupgradeneeded = () => req.result.createObjectStore(STORE);
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
  return opened;
}

async function transact(mode, work) {
  const db = await database();
  return new Promise((resolve, reject) => {
    const tx = db.transaction(STORE, mode);
    const req = work(tx.objectStore(STORE));
    tx.oncomplete = () => resolve(req?.result);
    tx.onerror = () => reject(tx.error);
    tx.onabort = () => reject(tx.error);
  });
}

// Keep an image (idempotent: the key is its hash). Throws when the browser cannot store it.
export async function putImage(ref, dataUrl) {
  memory.set(ref, dataUrl);
  await transact("readwrite", (s) => s.put(dataUrl, ref));
}

// The data URL of a stored image, or null when this browser no longer has it.
export async function getImage(ref) {
  if (memory.has(ref)) return memory.get(ref);
  let value = null;
  try {
    value = await transact("readonly", (s) => s.get(ref));
  } catch (err) {
    console.warn("image store unreadable", err);
  }
  if (typeof value === "string") memory.set(ref, value);
  return typeof value === "string" ? value : null;
}

// Without waiting: the data URL if this tab already has it.
export function cachedImage(ref) {
  return memory.get(ref) ?? null;
}

// Delete every stored image whose ref is not in `keep` (the ones no conversation names any more).
export async function keepOnly(keep) {
  try {
    const refs = await transact("readonly", (s) => s.getAllKeys());
    const gone = (refs || []).filter((r) => !keep.has(r));
    if (gone.length) await transact("readwrite", (s) => { gone.forEach((r) => s.delete(r)); });
    gone.forEach((r) => memory.delete(r));
  } catch (err) {
    console.warn("image store cleanup failed", err);
  }
}
