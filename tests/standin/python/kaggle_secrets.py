"""STAND-IN for Kaggle's ``kaggle_secrets`` module, for tests only (it exists only inside a Kaggle
notebook). It asks for a secret the way the real one does, read in Kaggle/docker-python
``patches/kaggle_secrets.py`` and ``patches/kaggle_web_client.py``: an HTTP POST of
``{"Label": NAME}`` to ``$KAGGLE_URL_BASE/requests/GetUserSecretByLabelRequest`` with the headers
``Content-type: application/json`` and ``X-Kaggle-Authorization: Bearer $KAGGLE_USER_SECRETS_TOKEN``
(no token: CredentialError); the answer must be ``{"wasSuccessful": true, "result": {"secret": ...}}``,
anything else is a BackendError (a label not attached to the notebook, for one), 401/403 a
CredentialError. The server side is the test's (tests/kaggle_harness.py ``SecretsServer``). Put this
folder on PYTHONPATH to use it."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any


class CredentialError(Exception):
    pass


class BackendError(Exception):
    pass


class ValidationError(Exception):
    pass


class UserSecretsClient:
    GET_USER_SECRET_BY_LABEL_ENDPOINT = "/requests/GetUserSecretByLabelRequest"

    def __init__(self) -> None:
        self.url_base = os.getenv("KAGGLE_URL_BASE") or "https://www.kaggle.com"
        token = os.getenv("KAGGLE_USER_SECRETS_TOKEN")
        if token is None:
            raise CredentialError("A JWT Token is required to call Kaggle (KAGGLE_USER_SECRETS_TOKEN)")
        self.headers = {"Content-type": "application/json", "X-Kaggle-Authorization": f"Bearer {token}"}

    def _post(self, body: dict[str, Any], endpoint: str) -> dict[str, Any]:
        req = urllib.request.Request(
            self.url_base + endpoint, headers=self.headers, data=json.dumps(body).encode()
        )
        try:
            with urllib.request.urlopen(req, timeout=40) as response:
                data = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                raise CredentialError(f"Service responded with error code {exc.code}.") from exc
            raise BackendError("Unexpected response from the service.") from exc
        except urllib.error.URLError as exc:
            raise ConnectionError("Connection error trying to communicate with service.") from exc
        if not data.get("wasSuccessful") or "result" not in data:
            raise BackendError(f"Unexpected response from the service. Response: {data}.")
        result: dict[str, Any] = data["result"]
        return result

    def get_secret(self, label: str) -> str:
        if not label:
            raise ValidationError("Label must be non-empty.")
        result = self._post({"Label": label}, self.GET_USER_SECRET_BY_LABEL_ENDPOINT)
        if "secret" not in result:
            raise BackendError(f"Unexpected response from the service. Response: {result}")
        return str(result["secret"])
