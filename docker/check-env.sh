#!/bin/sh
# The team stack's first step (docker-compose.yml, service `check-env`): refuse to start while a
# secret in .env still has its .env.example value, so that no stack ever runs on passwords that
# are in the repository. One line names every such variable. tests/stack.py runs this same file.
unchanged=$(env | sed -n 's/^\([A-Za-z_][A-Za-z0-9_]*\)=.*change-me.*$/\1/p' | sort | paste -sd ' ' - | sed 's/ /, /g')
if [ -n "$unchanged" ]; then
    echo "error: .env still has the example value (change-me...) of $unchanged: set each to a secret of your own (e.g. openssl rand -hex 24), then docker compose up again" >&2
    exit 2
fi
echo "check-env: no example value left in .env"
