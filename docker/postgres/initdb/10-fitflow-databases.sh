#!/usr/bin/env bash
# One PostgreSQL server, separate databases and login roles for Prefect and MLflow:
#   prefect      owned by role prefect  (Prefect server; its migrations create pg_trgm, so it must own it)
#   mlflow       owned by role mlflow   (MLflow tracking store)
#   mlflow_auth  owned by role mlflow   (MLflow basic-auth users and permissions)
# Neither role can connect to the other's database. The postgres image runs this file on the
# first start of an empty volume (/docker-entrypoint-initdb.d); tests/stack.py runs the same file
# against a native cluster. Passwords come from the environment (.env), never from this file.
set -euo pipefail
: "${PREFECT_DB_PASSWORD:?set PREFECT_DB_PASSWORD in .env}"
: "${MLFLOW_DB_PASSWORD:?set MLFLOW_DB_PASSWORD in .env}"

# psql variables (:'name') quote the passwords as SQL literals.
psql -v ON_ERROR_STOP=1 --no-psqlrc --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-postgres}" \
    -v prefect_password="$PREFECT_DB_PASSWORD" -v mlflow_password="$MLFLOW_DB_PASSWORD" <<'SQL'
CREATE ROLE prefect LOGIN PASSWORD :'prefect_password';
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE prefect OWNER prefect;
CREATE DATABASE mlflow OWNER mlflow;
CREATE DATABASE mlflow_auth OWNER mlflow;
REVOKE CONNECT, TEMPORARY ON DATABASE prefect, mlflow, mlflow_auth FROM PUBLIC;
SQL
