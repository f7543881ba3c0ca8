#!/bin/sh
# Entrypoint of the MLflow server image: writes the basic-auth app's config from the environment
# (MLflow reads the auth store's URI only from an ini file), then runs the command (`mlflow server
# ... --app-name basic-auth`). The store's password comes from PGPASSWORD (libpq), not the URI; a
# URI that does hold one, percent-encoded, keeps its `%`: MLflow's ini parser reads `%%` as `%`.
# tests/stack.py runs this same file in front of the same command natively.
set -eu
: "${MLFLOW_AUTH_DATABASE_URI:?set MLFLOW_AUTH_DATABASE_URI (the basic-auth users store)}"
: "${MLFLOW_AUTH_ADMIN_PASSWORD:?set MLFLOW_AUTH_ADMIN_PASSWORD in .env}"
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?set MLFLOW_FLASK_SERVER_SECRET_KEY in .env}"
export MLFLOW_AUTH_CONFIG_PATH="${MLFLOW_AUTH_CONFIG_PATH:-/tmp/mlflow-basic-auth.ini}"
umask 077
ini_value() { printf '%s' "$1" | sed 's/%/%%/g'; }
cat > "$MLFLOW_AUTH_CONFIG_PATH" <<INI
[mlflow]
# READ: every signed-in user can see every experiment (a team's shared comparison view);
# only an experiment's creator and admins can change it.
default_permission = $(ini_value "${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}")
database_uri = $(ini_value "$MLFLOW_AUTH_DATABASE_URI")
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
# PBKDF2 per request makes logging several times slower; cache a verified password a minute.
auth_cache_ttl_seconds = ${MLFLOW_AUTH_CACHE_TTL_SECONDS:-60}
INI
exec "$@"
