#!/usr/bin/env bash
# Refresh the chat page's vendored JavaScript libraries from the npm registry (a maintainer's step, not
# part of set-up: the files are committed, so an installed dashchat serves the page offline).
#   bash scripts/vendor_web.sh        # then review the diff, run tests/web, and update VERSIONS
set -euo pipefail
cd "$(dirname "$0")/.."
MARKED=18.2.1 DOMPURIFY=3.4.18 HLJS=11.12.0
OUT=dashchat/server/web/static/vendor
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
(cd "$TMP" && npm pack --silent "marked@$MARKED" "dompurify@$DOMPURIFY" "@highlightjs/cdn-assets@$HLJS" >/dev/null)
for f in "$TMP"/*.tgz; do mkdir -p "${f%.tgz}" && tar xzf "$f" -C "${f%.tgz}"; done
cp "$TMP/marked-$MARKED/package/lib/marked.umd.js" "$OUT/marked.umd.js"
cp "$TMP/marked-$MARKED/package/LICENSE" "$OUT/LICENSE.marked"
cp "$TMP/dompurify-$DOMPURIFY/package/dist/purify.min.js" "$OUT/purify.min.js"
cp "$TMP/dompurify-$DOMPURIFY/package/LICENSE" "$OUT/LICENSE.dompurify"
cp "$TMP/highlightjs-cdn-assets-$HLJS/package/highlight.min.js" "$OUT/highlight.min.js"
cp "$TMP/highlightjs-cdn-assets-$HLJS/package/styles/github-dark.min.css" "$OUT/highlight-github-dark.min.css"
cp "$TMP/highlightjs-cdn-assets-$HLJS/package/LICENSE" "$OUT/LICENSE.highlight.js"
(cd "$TMP" && for f in *.tgz; do echo "$f sha512-$(openssl dgst -sha512 -binary "$f" | base64 -w0)"; done)
