#!/bin/sh
# Check command: lichen runs it on the staged file ($1) before it replaces the real one; a
# non-zero exit keeps the old file. A real one: `nginx -t -c "$1"` (with an include wrapper).
# LICHEN_DOC, LICHEN_HEADS, LICHEN_FILE and LICHEN_TEMPLATE say which signed state it is.
grep -q "^upstream " "$1" || { echo "no upstream block in $1" >&2; exit 1; }
echo "check ok: $LICHEN_FILE from $LICHEN_HEADS" >> "$(dirname "$LICHEN_FILE")/check.log"
