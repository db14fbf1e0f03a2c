#!/bin/sh
# Reload command. lichen runs it after the bound file changed (with a timeout, after a small
# random delay). A real one would be `systemctl reload web` or `nginx -s reload`.
# LICHEN_FILE and LICHEN_DOC are set by lichen. This one appends one line per reload.
echo "$(date +%H:%M:%S) node $1 reloaded: $(tr -d ' \n' < "$LICHEN_FILE")" >> "$(dirname "$LICHEN_FILE")/reloads.log"
