#!/bin/sh
# Reload command: lichen runs it after the file changed. A harmless stand-in for
# `nginx -s reload`: it appends one line per reload.
echo "$(date +%H:%M:%S) reloaded $LICHEN_FILE (docs: $LICHEN_DOC)" >> "$(dirname "$LICHEN_FILE")/reloads.log"
