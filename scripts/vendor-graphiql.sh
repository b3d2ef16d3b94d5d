#!/usr/bin/env bash
# Re-creates crates/koubou-live/assets/vendor/: the GraphiQL playground's files (GraphiQL's UMD
# build and the React UMD builds it needs), pinned, with their licenses. Koubou embeds and serves
# them itself, so the playground loads nothing from any other host.
#
# Usage: scripts/vendor-graphiql.sh      (needs npm; fetches three packages from the npm registry)
set -euo pipefail

GRAPHIQL=3.8.3
REACT=18.3.1

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="$ROOT/crates/koubou-live/assets/vendor"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

cd "$TMP"
npm pack --silent "graphiql@$GRAPHIQL" "react@$REACT" "react-dom@$REACT" >/dev/null
for p in "graphiql-$GRAPHIQL" "react-$REACT" "react-dom-$REACT"; do
    d="${p%-*}"
    mkdir -p "$d" && tar xzf "$p.tgz" -C "$d" --strip-components=1
done

rm -rf "$OUT" && mkdir -p "$OUT"
cp graphiql/graphiql.min.js graphiql/graphiql.min.css "$OUT/"
cp graphiql/LICENSE "$OUT/LICENSE.graphiql"
cp react/umd/react.production.min.js "$OUT/"
cp react/LICENSE "$OUT/LICENSE.react"
cp react-dom/umd/react-dom.production.min.js "$OUT/"
cp react-dom/LICENSE "$OUT/LICENSE.react-dom"
cat >"$OUT/VERSIONS" <<V
graphiql $GRAPHIQL
react $REACT
react-dom $REACT
V
# The minified files end with sourceMappingURL comments for maps we do not ship: drop them so
# browsers' dev tools do not ask for them.
sed -i -e '/^\/\/# sourceMappingURL=/d' -e '/^\/\*# sourceMappingURL=.*\*\/$/d' "$OUT"/*.min.js "$OUT"/*.min.css
ls -l "$OUT" >&2
