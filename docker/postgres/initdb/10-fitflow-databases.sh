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

# psql reads the passwords from the environment (\getenv): an argument would show them to anyone
# on the machine (ps); psql variables (:'name') quote them as SQL literals, any character included.
psql -v ON_ERROR_STOP=1 --no-psqlrc --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-postgres}" <<'SQL'
\getenv prefect_password PREFECT_DB_PASSWORD
\getenv mlflow_password MLFLOW_DB_PASSWORD
CREATE ROLE prefect LOGIN PASSWORD :'prefect_password';
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE prefect OWNER prefect;
CREATE DATABASE mlflow OWNER mlflow;
CREATE DATABASE mlflow_auth OWNER mlflow;
REVOKE CONNECT, TEMPORARY ON DATABASE prefect, mlflow, mlflow_auth FROM PUBLIC;
SQL
