#!/bin/sh
# Check command. lichen runs it on the staged file (path in $1) before renaming it into
# place, and in sync mode on an edited file before the edit propagates. A non-zero exit
# keeps the old file / refuses the edit. A real one would be `nginx -t -c "$1"`,
# `haproxy -c -f "$1"`, `promtool check config "$1"`...
# This one insists on a "port" between 1 and 65535.
port=$(sed -n 's/.*"port": *\([0-9][0-9]*\).*/\1/p' "$1" | head -n 1)
if [ -z "$port" ] || [ "$port" -lt 1 ] || [ "$port" -gt 65535 ]; then
    echo "check.sh: \"port\" is missing or not between 1 and 65535" >&2
    exit 1
fi
