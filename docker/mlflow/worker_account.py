"""The team stack's worker account on the MLflow server (docker-compose.yml, job `mlflow-worker-account`).

Signed in as the admin (MLFLOW_TRACKING_USERNAME / _PASSWORD), creates the ordinary user
MLFLOW_WORKER_USERNAME with MLFLOW_WORKER_PASSWORD, or sets that password and takes away any
admin right when the user exists: running it again after .env changed brings the account in line.
The worker signs in with this account, so the experiments, runs and models of flow runs are its
own (basic-auth gives a creator MANAGE on what it creates) and a flow run cannot manage users or
other people's experiments. tests/stack.py runs this same file.
"""

import os
import sys

from mlflow.exceptions import RestException
from mlflow.server import get_app_client


def main() -> int:
    uri, admin = os.environ["MLFLOW_TRACKING_URI"], os.environ["MLFLOW_TRACKING_USERNAME"]
    user, password = os.environ["MLFLOW_WORKER_USERNAME"], os.environ["MLFLOW_WORKER_PASSWORD"]
    if user == admin:
        print(f"error: MLFLOW_WORKER_USERNAME is the admin's name ({admin}); give the worker an account of its own",
              file=sys.stderr)
        return 2
    client = get_app_client("basic-auth", tracking_uri=uri)
    try:
        client.get_user(user)
    except RestException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_user(user, password)
        print(f"created MLflow user '{user}' (not an admin)")
    else:
        client.update_user_password(user, password)
        client.update_user_admin(user, False)
        print(f"MLflow user '{user}' exists: password set from .env, not an admin")
    return 0


if __name__ == "__main__":
    sys.exit(main())
